"""Pins of scripts/make_table.py's pooling of sample/eval jobs: jobs on one checkpoint that differ in their sampling
seed pool as seeds (mean ± s.e., no "repeats" warning); jobs that share the checkpoint *and* the sampling seed are
repeats, and are warned about by name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

MAKE_TABLE = Path(__file__).resolve().parents[1] / "scripts" / "make_table.py"
CKPT = "runs/linear_s0/checkpoints/last.ckpt"
TRAIN = {"seed": 0, "schedule": "linear", "optim": {"lr": 1e-3}}  # the training run's config, stored by the job
ARGS = ["--rows", "sampler", "--cols", "steps", "--metric", "val/fd@*"]


@pytest.fixture(scope="module")
def make_table():
    spec = importlib.util.spec_from_file_location("make_table", MAKE_TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_job(root: Path, name: str, sampling_seed: int, fd: float, ckpt: str = CKPT) -> Path:
    """A finished dlab-sample job (``summary.json``) on ``ckpt`` with ``seed=<sampling_seed>`` on its command line."""
    job = root / name
    job.mkdir(parents=True)
    summary = {
        "choices": {"sampler": "dpm_solver"},
        "overrides": [f"ckpt_path={ckpt}", "steps=5", f"seed={sampling_seed}"],
        "job_type": "sample",
        "config": {"seed": sampling_seed, "ckpt_path": ckpt, "train": TRAIN},
        "metrics": {"val/fd@500": fd},
    }
    (job / "summary.json").write_text(json.dumps(summary))
    return job


def test_sampling_seeds_of_one_checkpoint_pool_as_seeds_without_a_repeats_warning(tmp_path, make_table, capsys):
    for seed in range(3):
        sample_job(tmp_path, f"job{seed}", seed, fd=10.0 + seed)
    assert make_table.main([str(tmp_path), *ARGS]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith("(mean ± standard error over n = 3 seeds per cell)")
    assert "| dpm_solver | 11 ± 0.58 |" in out  # mean of 10, 11, 12; s.e. = 1/√3
    assert "repeats" not in err and "warning" not in err


def test_one_checkpoint_and_one_sampling_seed_twice_are_repeats(tmp_path, make_table, capsys):
    first = sample_job(tmp_path, "a", 0, fd=10.0)
    sample_job(tmp_path, "b", 1, fd=12.0)
    again = sample_job(tmp_path, "c", 0, fd=10.0)  # the same checkpoint sampled with the same seed
    assert make_table.main([str(tmp_path), *ARGS]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith("(mean ± standard error over n = 3 runs (seeds, some repeated) per cell)")
    warnings = [line for line in err.splitlines() if "repeats" in line]
    assert warnings == [f"warning: {first}, {again} share one cell and seed=0/0: repeats, not independent seeds"]


def test_pooling_reads_the_sampling_seed_not_only_the_training_seed(make_table):
    """The seed axis of a sample/eval job is ``<training seed>/<sampling seed>``: two sampling seeds of one
    checkpoint are two settings, one sampling seed of two checkpoints of seed-only training runs too."""
    job = {"choices": {}, "overrides": {}, "metrics": {}, "dir": "x"}
    one = {**job, "config": {"seed": 1, "ckpt_path": CKPT, "train": TRAIN}}
    two = {**job, "config": {"seed": 2, "ckpt_path": CKPT, "train": TRAIN}}
    assert make_table.axis_value(one, "seed") == "0/1" and make_table.axis_value(two, "seed") == "0/2"
    assert make_table.repeated_runs([[one, two]]) == []
    assert make_table.repeated_runs([[one, two, dict(one)]]) == [[one, one]]
