"""dlab-reproduce: the table maths, the preset checks, the report from run records, and a tiny preset end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusion_lab import reproduce
from diffusion_lab.reproduce import (
    Summary,
    cell_line,
    collect,
    load_preset,
    prediction_z,
    read_metric,
    report,
    summarize,
    verdict,
    z_score,
)
from diffusion_lab.schema.errors import ConfigError


def test_summary_is_numpys_mean_and_ddof0_std_and_the_sem_is_the_unbiased_one():
    rng = np.random.default_rng(0)
    values = list(rng.normal(3.0, 0.5, size=7))
    s = summarize(values)
    assert s.mean == pytest.approx(np.mean(values), rel=1e-14)
    assert s.std == pytest.approx(np.std(values), rel=1e-14)  # ddof = 0, as the paper's np.std
    assert s.sem == pytest.approx(np.std(values, ddof=1) / math.sqrt(7), rel=1e-12)
    assert math.isnan(summarize([1.0]).sem)
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_difference_in_combined_standard_errors():
    paper, ours = Summary(0.120, 0.045, 10), Summary(0.150, 0.030, 5)
    se = math.sqrt((0.045 / 3) ** 2 + (0.030 / 2) ** 2)  # std/√(n − 1) each
    assert z_score(paper, ours) == pytest.approx((0.150 - 0.120) / se)
    assert verdict(paper, ours) == "within 2 s.e."
    assert verdict(paper, Summary(0.3, 0.01, 5)) == "not within 2 s.e."
    assert verdict(paper, None) == "not run"
    # One run of ours: compared with the paper's run-to-run spread (prediction interval of one new run).
    s = 0.045 * math.sqrt(10 / 9)
    assert prediction_z(paper, 0.2) == pytest.approx((0.2 - 0.12) / (s * math.sqrt(1.1)))
    assert cell_line(paper, Summary(0.2, 0.0, 1))[2] == "within 2 s.d. of one run (n = 1)"


def test_read_metric_needs_exactly_one_matching_key():
    record = {"val/w2_sq@10k_nfe38": 0.05, "val/w2@10k_nfe38": 0.22, "protocol": {}}
    assert read_metric(record, "val/w2_sq@10k_nfe*", "x") == 0.05
    with pytest.raises(ValueError, match=r"x: 0 keys match 'val/w2_sq@2k_nfe\*' \(need one\); numeric keys: "):
        read_metric(record, "val/w2_sq@2k_nfe*", "x")
    with pytest.raises(ValueError, match="2 keys match"):
        read_metric(record, "val/w2*@10k_nfe38", "x")


def write_preset(directory: Path, name: str, body: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")


PRESET = {
    "title": "t",
    "paper": "p",
    "quantity": "q",
    "runnable": True,
    "seeds": [0, 1],
    "rows": {"a": {"label": "A", "train": ["experiment=c2ot_fig1_fm"]}},
    "columns": {
        "one": {"label": "Euler 1", "key": "val/w2_sq@64_nfe1", "evaluate": ["sampler=euler"]},
        "ode": {"label": "ODE", "key": "val/w2_sq@64_nfe*", "evaluate": None},
    },
    "cells": {"a.one": {"mean": 1.0, "std": 0.1, "n": 10}, "a.ode": {"mean": 0.5, "std": 0.2, "n": 10}},
}


def test_presets_are_checked_with_the_key_and_the_valid_choices(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "PRESET_DIR", tmp_path)
    write_preset(tmp_path, "good", PRESET)
    assert load_preset("good").cells[("a", "ode")] == Summary(0.5, 0.2, 10)
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; valid choices: \['good'\]"):
        load_preset("nope")
    write_preset(tmp_path, "bad_cell", {**PRESET, "cells": {"a.two": {"mean": 1, "std": 0, "n": 3}}})
    with pytest.raises(ConfigError, match=r"cells.a.two: not <row>.<column> of rows \['a'\] and columns"):
        load_preset("bad_cell")
    write_preset(tmp_path, "bad_key", {**PRESET, "target": "os.system"})
    with pytest.raises(ConfigError, match=r"unknown keys \['target'\]"):
        load_preset("bad_key")


def test_report_from_synthetic_run_records(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "PRESET_DIR", tmp_path / "presets")
    write_preset(tmp_path / "presets", "good", PRESET)
    preset, root = load_preset("good"), tmp_path / "runs"
    values = {0: (0.9, 0.4), 1: (1.3, 0.6)}
    for seed, (euler, ode) in values.items():
        run = root / "train" / f"a_seed{seed}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"metrics": {"val/w2_sq@64_nfe31": ode, "train/wall_s": 60.0}}))
        done = root / "evaluate" / "one" / "a" / str(seed)
        done.mkdir(parents=True)
        record = {"checkpoint": str(run / "checkpoints" / "last.ckpt"), "val/w2_sq@64_nfe1": euler}
        (done / "evaluation.json").write_text(json.dumps(record))
    got = collect(preset, root, [0, 1])
    assert got == {("a", "one"): {0: 0.9, 1: 1.3}, ("a", "ode"): {0: 0.4, 1: 0.6}}
    text = report(preset, got, "dlab-reproduce good", 12.0, [60.0, 60.0])
    z = (1.1 - 1.0) / math.sqrt((0.1 / 3) ** 2 + (0.2 / 1) ** 2)
    assert f"| A | Euler 1 | 1.000 ± 0.100 (10) | 1.100 ± 0.200 (2) | {z:+.1f} | within 2 s.e. |" in text
    assert "| 0 | 0.9000 | 0.4000 |" in text and "dlab-reproduce good" in text


def test_a_preset_not_run_prints_the_papers_cells_and_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "PRESET_DIR", tmp_path)
    write_preset(tmp_path, "gpu", {**PRESET, "runnable": False})
    reproduce.main(["gpu", "--report", str(tmp_path / "gpu.md")])
    text = (tmp_path / "gpu.md").read_text()
    assert "| A | Euler 1 | 1.000 ± 0.100 (10) | not run |  | not run |" in text
    assert "Not run: this preset needs GPUs" in text


def test_the_repository_presets_load_and_compose():
    for name in reproduce.preset_names():
        preset = load_preset(name)
        assert preset.cells, name
        if preset.runnable:
            reproduce.check_rows(preset)


def test_a_tiny_preset_end_to_end(tmp_path):
    """Two seeds of a 10-step preset: dlab-train -m, dlab-evaluate -m, the report (two processes, ~30 s)."""
    presets = tmp_path / "presets"
    tiny = {
        **PRESET,
        "rows": {
            "a": {
                "label": "A",
                "train": [
                    "experiment=c2ot_fig1_ot", "trainer.max_steps=10", "eval.num_samples=64", "eval.batch_size=64",
                    "dataset.num_train=1024", "callbacks.grid_samples=8", "coupling.plan_size=512",
                    "sampler.rtol=1e-2", "sampler.atol=1e-2",
                ],
            }
        },
        "columns": {
            "one": {
                "label": "Euler 1", "key": "val/w2_sq@64_nfe1",
                "evaluate": ["scores=[toy2d]", "metrics=toy2d", "metrics.exact_w2=true", "sampler=euler",
                             "sampler.steps=1", "sampler.grid=uniform", "sampler.clip_x0=null", "num_samples=64",
                             "batch_size=64"],
            },
            "ode": {"label": "ODE", "key": "val/w2_sq@64_nfe*", "evaluate": None},
        },
    }  # fmt: skip
    write_preset(presets, "tiny", tiny)
    code = (
        "import sys; from pathlib import Path; from diffusion_lab import reproduce; "
        f"reproduce.PRESET_DIR = Path({str(presets)!r}); reproduce.main(sys.argv[1:])"
    )
    out = tmp_path / "tiny.md"
    cmd = [sys.executable, "-c", code, "tiny", "--root", str(tmp_path / "runs"), "--report", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    got = collect(load_preset_from(presets, "tiny"), tmp_path / "runs", [0, 1])
    assert set(got[("a", "one")]) == {0, 1} and set(got[("a", "ode")]) == {0, 1}
    assert all(v > 0 for cell in got.values() for v in cell.values())
    assert "| A | Euler 1 | 1.000 ± 0.100 (10) |" in out.read_text()


def load_preset_from(directory: Path, name: str):
    old = reproduce.PRESET_DIR
    reproduce.PRESET_DIR = directory
    try:
        return load_preset(name)
    finally:
        reproduce.PRESET_DIR = old


def test_each_rows_evaluations_get_their_own_sweep_and_are_found_at_any_depth(tmp_path, monkeypatch):
    """Job numbers restart at 0 in every dlab-evaluate multirun: each (column, row, invocation) sweeps into its own
    directory, so two rows' job 0 never overwrite each other, and every record is found below the column, keyed by
    the resolved checkpoint path whether the record holds it relative or absolute."""
    from diffusion_lab.reproduce import Column, Row, checkpoint_key, evaluate_command, evaluated, last_checkpoint

    monkeypatch.chdir(tmp_path)
    root = Path("runs")
    column = Column("euler1", "Euler", "val/w2_sq@*", ["sampler=euler"])
    rows = [Row("fm", "FM", []), Row("ot", "OT", [])]
    sweeps = []
    for row in rows:
        cmd = evaluate_command(root, column, row, [last_checkpoint(root, row, 0)], "local")
        sweep = Path(next(a for a in cmd if a.startswith("hydra.sweep.dir=")).split("=", 1)[1])
        assert sweep.parent == root / "evaluate" / "euler1" / row.name
        sweeps.append(sweep)
    assert sweeps[0] != sweeps[1]
    for row, sweep, held in zip(rows, sweeps, ("relative", "absolute"), strict=True):
        ckpt = last_checkpoint(root, row, 0)
        (sweep / "0").mkdir(parents=True)  # job 0 of each row's own multirun
        stored = str(ckpt) if held == "relative" else str(ckpt.resolve())
        (sweep / "0" / "evaluation.json").write_text(json.dumps({"checkpoint": stored, "row": row.name}))
    found = evaluated(root, column)
    for row in rows:
        assert found[checkpoint_key(last_checkpoint(root, row, 0))]["row"] == row.name
    assert checkpoint_key("runs/x/../x/last.ckpt") == str((tmp_path / "runs" / "x" / "last.ckpt").resolve())


def test_run_all_trains_unfinished_seeds_and_scores_only_finished_unscored_checkpoints(tmp_path, monkeypatch):
    """Seed 0 trained and scored, seed 1 trained and not scored, seed 2 not trained: training runs for seed 2
    only, and the evaluation multirun gets seed 1's checkpoint only (never a missing file, never one scored)."""
    from diffusion_lab.reproduce import Column, Preset, Row, checkpoint_key, last_checkpoint, run_all, run_dir

    root, row = tmp_path / "runs", Row("fm", "FM", ["experiment=toy2d"])
    column = Column("euler1", "Euler", "val/w2_sq@*", ["sampler=euler"])
    preset = Preset("p", "t", "paper", "q", True, [0, 1, 2], [row], [column], {}, [])
    for seed in (0, 1):
        last_checkpoint(root, row, seed).parent.mkdir(parents=True)
        last_checkpoint(root, row, seed).write_bytes(b"ckpt")
        (run_dir(root, row, seed) / reproduce.SUMMARY_FILE).write_text("{}")
    scored = root / "evaluate" / "euler1" / "fm" / "earlier" / "0"
    scored.mkdir(parents=True)
    (scored / "evaluation.json").write_text(json.dumps({"checkpoint": checkpoint_key(last_checkpoint(root, row, 0))}))
    commands = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, check: commands.append(cmd))
    run_all(preset, root, [0, 1, 2], "local")
    train, evaluate = commands
    assert "diffusion_lab.train" in train and "seed=2" in train
    assert "diffusion_lab.evaluate" in evaluate and f"ckpt_path={last_checkpoint(root, row, 1)}" in evaluate
