"""Sharded training on CPU (gloo): 2 processes × batch B equal 1 process × batch 2B, under DDP and FSDP2.

The runs are :mod:`tests.sharded_train` (the project's module, optimizer, clipping, EMA, strategy and checkpoint IO;
only the loss's random draws are fixed per example). Compared in float64 after 3 steps, from the consolidated
``last``-style checkpoint each run writes (read back verified and weights-only):

- weights, EMA copy and AdamW moments (``exp_avg`` = Σ (1−β1)β1^k g: it carries the gradient's scale, which Adam's
  update itself does not, so a sum-instead-of-mean reduction or a missing rank fails here);
- tolerance atol 1e-10 / rtol 1e-8: the runs differ only in the order of float64 additions (reduction over 2 ranks vs
  one batch), ~1e-16 relative per operation, while one AdamW step moves a weight by about lr ≫ 1e-10.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.checkpoint_file import read_checkpoint
from tests.sharded_train import run
from tests.test_evaluate import DDP_SCRIPT, assert_sharded_generation_equals_single

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 8


def launch(
    tmp_path: Path, mode: str, precision: str = "32", dtype: str = "float64", steps: int = STEPS, resume: str = ""
) -> dict:
    """Run tests/sharded_train.py with 2 CPU processes (batch B each); the checkpoint it wrote (verified read)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [str(tmp_path), mode, str(steps), precision, dtype, str(BATCH), *([resume] if resume else [])]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_train.py"), *args],
        capture_output=True, text=True, timeout=500, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_checkpoint(tmp_path / f"{mode}.ckpt")


def reference(tmp_path: Path, precision: str = "32", dtype: torch.dtype = torch.float64) -> dict:
    """The same training on one process with batch 2B."""
    run(tmp_path, "single", STEPS, precision, dtype, 2 * BATCH)
    return read_checkpoint(tmp_path / "single.ckpt")


def test_a_two_process_fsdp_checkpoint_resumes_on_one_process_exactly(tmp_path: Path) -> None:
    """N → M: 2 FSDP2 processes train steps 1–2 and write last.ckpt (consolidated); one process resumes from it for
    step 3 (batch 2B) and ends where 3 single-process steps end: weights, EMA (its update counter included) and AdamW
    moments (float64, same tolerances). The data order is the caller's to keep (here: the next 2B examples)."""
    launch(tmp_path, "fsdp", steps=STEPS - 1)
    run(tmp_path, "single_resumed", STEPS, "32", torch.float64, 2 * BATCH, resume=tmp_path / "fsdp.ckpt")
    assert_same_training(read_checkpoint(tmp_path / "single_resumed.ckpt"), reference(tmp_path))


def moments(ckpt: dict) -> list[torch.Tensor]:
    """AdamW's exp_avg and exp_avg_sq of every parameter, in parameter order."""
    state = ckpt["optimizer_states"][0]["state"]
    return [state[k][m] for k in sorted(state, key=str) for m in ("exp_avg", "exp_avg_sq")]


def assert_same_training(got: dict, want: dict, atol: float = 1e-10, rtol: float = 1e-8) -> None:
    assert got["global_step"] == want["global_step"] == STEPS
    assert sorted(got["state_dict"]) == sorted(want["state_dict"])
    assert any(k.startswith("ema.module.net.") for k in got["state_dict"])
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, atol=atol, rtol=rtol, msg=key)
    m_got, m_want = moments(got), moments(want)
    assert len(m_got) == len(m_want) > 0
    for a, b in zip(m_got, m_want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    # Post-hoc EMA (two power profiles, fp32 by design): full tensors in the checkpoint, as one process has them.
    ph_got, ph_want = got["callbacks"]["PowerEMASnapshots"], want["callbacks"]["PowerEMASnapshots"]
    assert ph_got["nimg"] == ph_want["nimg"] == STEPS * 2 * BATCH and len(ph_want["emas"]) == 2
    for ema_got, ema_want in zip(ph_got["emas"], ph_want["emas"], strict=True):
        assert sorted(ema_got) == sorted(ema_want) and ema_want
        for key, value in ema_want.items():
            assert ema_got[key].shape == value.shape, key  # gathered, not one rank's shard
            torch.testing.assert_close(ema_got[key], value, atol=max(atol, 1e-6), rtol=max(rtol, 1e-6), msg=key)


def assert_same_snapshots(got_dir: Path, want_dir: Path) -> None:
    """The fp16 snapshot files (rank 0's, full weights) of a sharded run equal one process's, file by file."""
    got, want = sorted(p.name for p in got_dir.iterdir()), sorted(p.name for p in want_dir.iterdir())
    assert got == want and len(want) == STEPS
    for name in want:
        a, b = read_checkpoint(got_dir / name), read_checkpoint(want_dir / name)
        assert a["nimg"] == b["nimg"]
        for ema_a, ema_b in zip(a["emas"], b["emas"], strict=True):
            for key, value in ema_b.items():
                assert ema_a[key].dtype == torch.float16 and ema_a[key].shape == value.shape
                torch.testing.assert_close(ema_a[key], value, atol=1e-3, rtol=1e-3, msg=key)


@pytest.mark.parametrize("mode", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path: Path, mode: str) -> None:
    """Weights, EMA and optimizer state after 3 steps: 2 ranks × 8 examples = 1 process × 16 (float64). The FSDP2
    checkpoint is one consolidated file of plain full-shape tensors, so one process loads it as it is."""
    got, want = launch(tmp_path, mode), reference(tmp_path)
    assert_same_training(got, want)
    assert_same_snapshots(tmp_path / f"{mode}_phema", tmp_path / "single_phema")
    for key, value in got["state_dict"].items():
        assert type(value) is torch.Tensor and value.shape == want["state_dict"][key].shape, key


@pytest.mark.slow  # two more 2-process launches (~1 min each on 2 shared cores)
def test_bf16_mixed_under_fsdp_keeps_fp32_master_weights_near_fp32_training(tmp_path: Path) -> None:
    """precision=bf16-mixed (MixedPrecisionPolicy: bf16 compute, fp32 reductions): finite, fp32 master weights, and
    within 3·lr·k of fp32 training: each AdamW step moves a weight by lr·|m̂/√v̂| ≤ ~1.5·lr in either run (k ≤ 3), so
    two runs can differ by at most 2·1.5·lr per step, whatever bf16 did to the gradients. They must differ (> 0):
    identical weights would mean bf16 was never applied."""
    bf16 = launch(tmp_path, "fsdp", precision="bf16-mixed", dtype="float32")
    (tmp_path / "fp32").mkdir()
    fp32 = launch(tmp_path / "fp32", "fsdp", precision="32", dtype="float32")
    lr = float(bf16["diffusion_lab_config"]["optim"]["lr"])
    diffs = []
    for key, value in fp32["state_dict"].items():
        got = bf16["state_dict"][key]
        if not value.is_floating_point():  # ema.n_averaged: the update count, equal
            assert torch.equal(got, value), key
            continue
        assert got.dtype == value.dtype == torch.float32 and torch.isfinite(got).all(), key
        diffs.append(float((got - value).abs().max()))
    assert 0 < max(diffs) <= 3 * lr * STEPS, (max(diffs), lr)


@pytest.mark.slow  # two more 2-process launches
def test_a_resumed_fsdp_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """Same world size: FSDP2 steps 1–2, then FSDP2 resumed from that last.ckpt (read verified on both ranks and
    re-sharded) for step 3, ends bit-for-bit where 3 uninterrupted FSDP2 steps end."""
    (tmp_path / "first").mkdir()
    launch(tmp_path / "first", "fsdp", steps=STEPS - 1)
    resumed = launch(tmp_path, "fsdp", steps=STEPS, resume=str(tmp_path / "first" / "fsdp.ckpt"))
    (tmp_path / "whole").mkdir()
    assert_same_training(resumed, launch(tmp_path / "whole", "fsdp"), atol=0.0, rtol=0.0)


@pytest.mark.slow  # three Python processes import torch + Lightning (~1.5 min on 2 shared cores)
def test_fsdp_sharded_evaluation_equals_single_process(tmp_path: Path) -> None:
    """The evaluation callback under FSDP2 (2 CPU ranks): the EMA is gathered once, each rank samples its share of
    the indices, and rank 0 holds exactly N unique samples equal to one process sampling all N (tests/test_evaluate.py's
    DDP check with the strategy swapped)."""
    script_text = DDP_SCRIPT.replace('strategy="ddp"', "strategy=FSDP2Strategy()").replace(
        "from diffusion_lab.module import build_module", "from diffusion_lab.module import build_module\n"
        "from diffusion_lab.strategies import FSDP2Strategy"
    )  # fmt: skip
    assert "FSDP2Strategy()" in script_text
    assert_sharded_generation_equals_single(script_text, tmp_path, n=11)  # odd: one rank has a padded shard
