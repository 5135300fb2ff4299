"""scripts/make_table.py: a multirun directory becomes a Markdown table of swept values and metrics."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_table.py"


@pytest.fixture(scope="module")
def make_table():
    spec = importlib.util.spec_from_file_location("make_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(root: Path, index: int, overrides: list[str], metrics: dict) -> None:
    job = root / str(index)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))


def test_table_has_varying_axes_as_columns_and_shared_overrides_once(tmp_path, make_table, capsys):
    _job(tmp_path, 0, ["schedule=linear", "trainer.max_steps=10"], {"train/loss": 0.123456, "val/bpd@180": 5.0})
    _job(tmp_path, 1, ["schedule=cosine", "trainer.max_steps=10"], {"train/loss": 0.2, "val/bpd@180": 4.5})
    (tmp_path / "2").mkdir()  # an unfinished job (no metrics.json) is left out
    assert make_table.main([str(tmp_path), "--metrics", "val/bpd@*", "train/loss"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Every run: `trainer.max_steps=10`"
    assert lines[2] == "| schedule | val/bpd@180 | train/loss |"  # metric columns in pattern order
    assert lines[4:] == ["| linear | 5 | 0.1235 |", "| cosine | 4.5 | 0.2 |"]


def test_empty_directory_is_a_clear_error(tmp_path, make_table):
    with pytest.raises(SystemExit, match=r"no \*/metrics\.json"):
        make_table.main([str(tmp_path)])


def _summary_run(root: Path, index: int, choices: dict, seed: int, metrics: dict) -> None:
    job = root / str(index)
    job.mkdir(parents=True)
    overrides = [f"{k}={v}" for k, v in choices.items()] + [f"seed={seed}"]
    summary = {"choices": choices, "overrides": overrides, "config": {"seed": seed, "weighting": {"gamma": 5}},
               "metrics": metrics, "group": "g", "tags": []}  # fmt: skip
    (job / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def seeded_sweep(tmp_path):
    i = 0
    for schedule in ("linear", "cosine"):
        for param in ("eps", "v"):
            for seed in (0, 1):
                value = {"linear": 1.0, "cosine": 2.0}[schedule] + {"eps": 0.0, "v": 10.0}[param] + seed
                _summary_run(tmp_path, i, {"schedule": schedule, "parameterization": param}, seed,
                             {"val/bpd@180": value, "train/loss": 0.5, "protocol": {"x": 1}})  # fmt: skip
                i += 1
    return tmp_path


def test_pivot_is_mean_and_standard_error_over_seeds(seeded_sweep, make_table, capsys):
    args = [str(seeded_sweep), "--rows", "schedule", "--cols", "parameterization", "--metric", "val/bpd@*"]
    assert make_table.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "val/bpd@180 (mean ± standard error over n = 2 seeds per cell)"
    assert lines[2:] == [  # seeds 0 and 1 differ by 1: std 0.71, s.e. = std / √2 = 0.5
        "| schedule | eps | v |",
        "|---|---|---|",
        "| linear | 1.5 ± 0.5 | 11.5 ± 0.5 |",
        "| cosine | 2.5 ± 0.5 | 12.5 ± 0.5 |",
    ]


def test_latex_and_csv_formats(seeded_sweep, make_table, capsys):
    base = [str(seeded_sweep), "--rows", "schedule", "--cols", "parameterization", "--metric", "val/bpd@*"]
    make_table.main([*base, "--format", "latex"])
    latex = capsys.readouterr().out
    assert r"\toprule" in latex and r"linear & $1.5 \pm 0.5$ & $11.5 \pm 0.5$ \\" in latex
    assert latex.strip().endswith("% mean ± standard error over n = 2 seeds per cell")
    make_table.main([*base, "--format", "csv"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "schedule,parameterization,metric,mean,sem,std,n"
    assert rows[1].startswith("linear,eps,val/bpd@180,1.5,0.5,0.7071") and rows[1].endswith(",2")


def test_axes_can_be_config_paths_and_seeds_can_be_rows(seeded_sweep, make_table, capsys):
    args = [str(seeded_sweep), "--rows", "seed", "--cols", "weighting.gamma", "--metric", "train/loss"]
    make_table.main([*args, "--average-over", "schedule", "parameterization"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "| seed | 5 |" and lines[4] == "| 0 | 0.5 ± 0 |"


def test_make_plots_writes_pngs_from_a_synthetic_sweep(tmp_path):
    spec = importlib.util.spec_from_file_location("make_plots", SCRIPT.parent / "make_plots.py")
    make_plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_plots)
    buckets = ["<-10", "[-10,-5)", "[0,2.5)", ">=10"]
    for i, schedule in enumerate(["linear", "cosine"]):
        _summary_run(tmp_path, i, {"schedule": schedule}, 0, {"val/ed@1k_nfe10": 0.1 * (i + 1)})
        header = ["step", "train/loss", *[f"train/loss_by_logsnr/{b}" for b in buckets]]
        rows = [[s, 1.0 / (s + 1), *[0.1 * (j + 1) for j in range(len(buckets))]] for s in range(0, 50, 5)]
        (tmp_path / str(i) / "csv").mkdir()
        lines = [",".join(f'"{h}"' for h in header)] + [",".join(map(str, r)) for r in rows]
        (tmp_path / str(i) / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    for j, (sampler, nfe) in enumerate([("ddim", 10), ("ddim", 20), ("heun", 19)]):
        _summary_run(tmp_path / "nfe", j, {"sampler": sampler}, 0, {f"val/ed@1k_nfe{nfe}": 1.0 / nfe, "nfe": nfe})
    out = tmp_path / "plots"
    written = make_plots.plot_all(tmp_path, "schedule", out, None, "train/loss", smooth=2, tail=3)
    assert sorted(p.name for p in written) == ["loss_vs_logsnr.png", "metric_vs_step.png"]
    written = make_plots.plot_all(tmp_path / "nfe", "sampler", out, "val/ed@*", "train/loss", smooth=2, tail=3)
    assert [p.name for p in written] == ["metric_vs_nfe.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.iterdir())
    _, curves = make_plots.nfe_curves(make_table_runs(tmp_path / "nfe", make_plots), "sampler", "val/ed@*")
    assert {k: [(n, s.mean, s.n) for n, s in c] for k, c in curves.items()} == {
        "ddim": [(10, 0.1, 1), (20, 0.05, 1)], "heun": [(19, 1.0 / 19, 1)]
    }  # fmt: skip
    by_logsnr = make_plots.logsnr_curves(make_table_runs(tmp_path, make_plots), "schedule", tail=3)
    assert list(by_logsnr["linear"]) == buckets
    assert [s.mean for s in by_logsnr["linear"].values()] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    curves = make_plots.step_curves(make_table_runs(tmp_path, make_plots), "schedule,seed", "train/loss", smooth=1)
    assert set(curves) == {"linear/0", "cosine/0"} and curves["linear/0"][5.0].mean == pytest.approx(1 / 6)


def make_table_runs(path, make_plots):
    return make_plots.make_table.load_runs(path)


def test_a_group_with_eval_jobs_tables_its_training_runs_unless_asked(tmp_path, make_table, capsys):
    """dlab-evaluate files its jobs in the training run's group: the default table keeps the training runs."""
    for i, (job, fd) in enumerate([("train", 5.0), ("eval", 9.0)]):
        (tmp_path / str(i)).mkdir()
        summary = {"choices": {"schedule": "cosine"}, "overrides": [], "config": {}, "metrics": {"val/fd@1k": fd},
                   "job_type": job}  # fmt: skip
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(summary))
    for job_type, expected in (("auto", "5"), ("eval", "9")):
        args = [str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*", "--job-type", job_type]
        assert make_table.main(args) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"| cosine | {expected} |"
    with pytest.raises(SystemExit, match=r"no runs with job_type=sample; found \['eval', 'train'\]"):
        make_table.main([str(tmp_path), "--job-type", "sample"])
