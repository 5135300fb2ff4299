"""Pins of diffusion_lab.resume: successive resumes that change ``optim.lr`` each train with the *last* requested LR,
and the run's record states, for every resume, the step from which its values hold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from diffusion_lab.checkpoint_loading import load_checkpoint
from diffusion_lab.resume import RESUMES_KEY
from diffusion_lab.train import train
from tests.test_train import TINY_TOY, compose_train

QUIET = ["eval.num_samples=0", "eval.bpd_examples=0", "callbacks.grid_samples=0", "trainer.enable_progress_bar=false"]
BASE = [*TINY_TOY, *QUIET, "logger.wandb=null", "trainer.log_every_n_steps=1", "optim.warmup_steps=0"]


def lr_per_step(run_dir: Path) -> dict[int, float]:
    """``{step: lr-AdamW}`` from the run's CSV; fails if a step is logged twice."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {int(r["step"]): float(r["lr-AdamW"]) for r in rows}


def test_successive_resumes_train_with_the_last_changed_lr_and_record_each_from_its_step(tmp_path):
    """4 steps at lr 1e-3; resumed to 8 (lr unchanged); to 12 with lr 1e-4; to 16 with lr 1e-5. Each segment trains
    with the LR its own resume asked for (not the first resume's, not the stored one), and the checkpoint and
    summary.json list the three resumes with the step from which each holds and the value it replaced."""
    train(compose_train([*BASE, "optim.lr=1e-3", "trainer.max_steps=4"]), tmp_path)
    for lr, steps in (("1e-3", 8), ("1e-4", 12), ("1e-5", 16)):
        train(compose_train([*BASE, f"optim.lr={lr}", f"trainer.max_steps={steps}", "resume=true"]), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 16
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-5, rel=1e-12) and group["initial_lr"] == pytest.approx(1e-5, rel=1e-12)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-5, rel=1e-12)]
    expected_lr = {s: pytest.approx(1e-3 if s < 8 else 1e-4 if s < 12 else 1e-5, rel=1e-12) for s in range(16)}
    assert lr_per_step(tmp_path) == expected_lr  # the LR that trained each step, every step once
    history = [
        {"step": 4, "changed": {"trainer.max_steps": {"stored": 4, "requested": 8}}},
        {
            "step": 8,
            "changed": {
                "optim.lr": {"stored": 1e-3, "requested": 1e-4},
                "trainer.max_steps": {"stored": 8, "requested": 12},
            },
        },
        {
            "step": 12,
            "changed": {
                "optim.lr": {"stored": 1e-4, "requested": 1e-5},
                "trainer.max_steps": {"stored": 12, "requested": 16},
            },
        },
    ]
    assert ckpt[RESUMES_KEY] == history
    assert ckpt["diffusion_lab_config"]["optim"]["lr"] == 1e-5  # the config the next resume compares against
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed"] == history and summary["config"]["optim"]["lr"] == 1e-5
