"""Resume continues the record (issue 14): the CSV is appended with every step once, a SIGKILLed segment's W&B
history survives and tables read the run as one, a changed key is applied from the checkpoint's step and recorded
or refused, and ``resume=true`` without a checkpoint says that it starts fresh."""

import csv
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_lab.callbacks.exact_resume import resolve_resume
from diffusion_lab.checkpoint_loading import load_checkpoint
from diffusion_lab.resume import RESUMES_KEY, ResumeRefusedError
from diffusion_lab.tracking import AppendingCSVLogger, read_offline_run
from diffusion_lab.tracking.offline import _log_records
from diffusion_lab.train import train
from tests.test_train import TINY_TOY, compose_train

QUIET = ["eval.num_samples=0", "eval.bpd_examples=0", "callbacks.grid_samples=0", "trainer.enable_progress_bar=false"]
NO_WANDB = "logger.wandb=null"
WANDB = "logger.wandb.mode=offline"
MAKE_TABLE = Path(__file__).resolve().parents[1] / "scripts" / "make_table.py"


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of one CSV column; fails if a step holds the column twice."""
    out: dict[int, float] = {}
    for row in rows:
        if row.get(key):
            step = int(row["step"])
            assert step not in out, f"{key} logged twice at step {step}"
            out[step] = float(row[key])
    return out


def offline_segments(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda d: d.name)


def history_steps(segment: Path) -> list[float]:
    """``trainer/global_step`` of every history row in a W&B offline run log."""
    from wandb.proto import wandb_internal_pb2 as pb

    steps = []
    for raw in _log_records(next(segment.glob("run-*.wandb"))):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            if "trainer/global_step" in items:
                steps.append(float(items["trainer/global_step"]))
    return steps


# ------------------------------------------------------------------------------------------- CSV writer
def test_appending_csv_keeps_old_rows_drops_the_relogged_ones_and_unions_the_header(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("a,step\n" + "".join(f"{i},{i}\n" for i in range(6)))  # a killed run logged steps 0..5
    logger = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="", append=True)
    logger.log_metrics({"a": 30.0, "b": 1.0}, step=3)  # the resumed run starts again at step 3 (its checkpoint)
    logger.log_metrics({"a": 40.0}, step=4)
    rows = csv_rows(tmp_path)
    assert list(rows[0]) == ["a", "b", "step"]
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [
        ("0", "0", ""), ("1", "1", ""), ("2", "2", ""), ("3", "30.0", "1.0"), ("4", "40.0", "")
    ]  # fmt: skip
    fresh = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # not a resume: a new file
    fresh.log_metrics({"c": 1.0}, step=0)
    assert [dict(r) for r in csv_rows(tmp_path)] == [{"c": "1.0", "step": "0"}]


def test_resume_appends_the_csv_with_every_step_once(tmp_path):
    """In-process stand-in for a kill: a run that logged steps 0..5 but whose last checkpoint is step 4 is
    resumed to 8 steps: its rows before step 4 stay as they were and every step is in the CSV once."""
    args = [*TINY_TOY, *QUIET, NO_WANDB, "trainer.log_every_n_steps=1", "callbacks.checkpoint_every_n_steps=4"]
    train(compose_train([*args, "trainer.max_steps=6", "callbacks.keep_last_k=1"]), tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step=4.ckpt").replace(ckpts / "last.ckpt")  # the process died after logging steps 4 and 5
    before = column(csv_rows(tmp_path), "train/loss")
    assert sorted(before) == list(range(6))
    train(compose_train([*args, "trainer.max_steps=8", "resume=true"]), tmp_path)
    after = column(csv_rows(tmp_path), "train/loss")  # (fails if a step holds train/loss twice)
    assert sorted(after) == list(range(8))
    assert {s: v for s, v in after.items() if s < 4} == {s: v for s, v in before.items() if s < 4}
    assert sorted(column(csv_rows(tmp_path), "val/loss_ema")) == [3, 7]  # one validation per epoch of 4 batches


# ------------------------------------------------------------------------------------- kill -9 and resume
KILL_ARGS = [
    *TINY_TOY,
    *QUIET,
    "trainer.max_steps=40",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint_every_n_steps=20",
    "resume=true",
]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def kill_after_logging(victim: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300.0) -> None:
    """SIGKILL ``victim`` as soon as its CSV holds a ``train/loss`` row at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while victim.poll() is None and time.monotonic() < deadline:
        try:
            if max(column(csv_rows(run_dir), "train/loss"), default=-1) >= step:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass  # not written yet, or read mid-rewrite
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()


@pytest.mark.slow  # a training subprocess: 96 s on the loaded 2-core box (importing the package alone took 49 s)
def test_sigkill_then_resume_appends_the_csv_keeps_the_wandb_history_and_tables_one_run(tmp_path):
    """A run SIGKILLed a few steps after its checkpoint (step 20) and resumed: the CSV keeps the killed segment's
    rows up to the checkpoint and holds every step once, the killed segment's W&B log holds its history under the
    run's id, and ``make_table --wandb-offline`` reads the two segments as one run."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffusion_lab.train", *KILL_ARGS, WANDB, f"hydra.run.dir={run_dir}"]
    victim = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_logging(victim, run_dir, step=22)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 20
    before = column(csv_rows(run_dir), "train/loss")
    assert max(before) >= 21, "no row logged after the checkpoint: the test would not test the cut"
    time.sleep(0.5)  # W&B's service writes what it received after its parent died
    killed_history = history_steps(offline_segments(run_dir)[0])
    assert killed_history and max(killed_history) >= 20, f"the killed segment's W&B history: {killed_history}"

    train(compose_train([*KILL_ARGS, WANDB]), run_dir)  # the resume
    after = column(csv_rows(run_dir), "train/loss")  # (fails if a step holds train/loss twice)
    assert sorted(after) == list(range(40))
    assert {s: v for s, v in after.items() if s < 20} == {s: v for s, v in before.items() if s < 20}
    assert sorted(column(csv_rows(run_dir), "lr-AdamW")) == list(range(40))

    segments = offline_segments(run_dir)
    assert len(segments) == 2
    runs = [read_offline_run(s) for s in segments]
    assert runs[0]["id"] == runs[1]["id"] == load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["wandb_run_id"]
    spec = importlib.util.spec_from_file_location("make_table", MAKE_TABLE)
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    assert len(make_table.load_wandb_offline_runs(run_dir)) == 1


# ------------------------------------------------------------------------------------ changed keys on resume
BASE = [*TINY_TOY, *QUIET, "trainer.log_every_n_steps=1", "optim.warmup_steps=0", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A finished 4-step run, for resumes that are refused (and so leave it as it is)."""
    run_dir = tmp_path_factory.mktemp("stopped")
    train(compose_train([*BASE, NO_WANDB, "trainer.max_steps=4"]), run_dir)
    return run_dir


def test_a_changed_lr_is_applied_from_the_checkpoints_step_and_recorded(tmp_path):
    """A finished 4-step run (its checkpoint written at train end, at an epoch boundary) continued to 8 steps with
    a new LR and weight decay: they train steps 4..7, and the record says so from step 4."""
    run_dir = tmp_path / "run"
    train(compose_train([*BASE, WANDB, "trainer.max_steps=4"]), run_dir)
    changed = ["optim.lr=1e-5", "optim.weight_decay=0.01", "trainer.max_steps=8", "resume=true"]
    train(compose_train([*BASE, WANDB, *changed]), run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-5) and group["weight_decay"] == 0.01
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-5)]
    rows = csv_rows(run_dir)
    lrs = column(rows, "lr-AdamW")
    assert lrs == {s: pytest.approx(1e-3 if s < 4 else 1e-5) for s in range(8)}  # the LR that trained each step
    assert sorted(column(rows, "train/loss")) == list(range(8))  # every step once across the two segments
    expected = [
        {
            "step": 4,
            "changed": {
                "optim.lr": {"stored": 1e-3, "requested": 1e-5},
                "optim.weight_decay": {"stored": 0.0, "requested": 0.01},
                "trainer.max_steps": {"stored": 4, "requested": 8},
            },
        }
    ]
    assert ckpt[RESUMES_KEY] == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] == expected and summary["config"]["optim"]["lr"] == 1e-5
    assert read_offline_run(offline_segments(run_dir)[-1])["config"]["resumed"] == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=1", "seed: stored=0 requested=1 (noise, t, label dropout"),
        ("dataset.batch_size=256", "dataset.batch_size: stored=512 requested=256 (the training examples"),
        ("dataset.seed=3", "dataset.seed: stored=0 requested=3"),
    ],
)
def test_a_key_the_checkpoint_state_would_override_is_refused(stopped_run, override, message):
    cfg = compose_train([*BASE, NO_WANDB, "trainer.max_steps=8", "resume=true", override])
    with pytest.raises(ResumeRefusedError, match=message.replace("(", r"\(")):
        train(cfg, stopped_run)
    assert load_checkpoint(stopped_run / "checkpoints" / "last.ckpt")["global_step"] == 4  # nothing ran


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusion_lab.callbacks.checkpoint"):
        assert resolve_resume(None, True, tmp_path) is None
    assert f"resume=true: no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert "fresh start" in caplog.text


def test_a_run_log_killed_before_its_first_flush_still_names_its_run(tmp_path):
    segment = tmp_path / "offline-run-20260101_000000-abc123"
    segment.mkdir()
    (segment / "run-abc123.wandb").write_bytes(b":W&B\xe1\xbe\x00")  # just W&B's 7-byte header
    run = read_offline_run(segment)
    assert run["id"] == "abc123" and not run["finished"]
