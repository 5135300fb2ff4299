"""Post-hoc EMA (Karras et al. 2024 §3): σ_rel ↔ γ, the tracked power EMA's closed form, least-squares reconstruction
of stored and unstored profiles, the snapshots a training run writes, dlab-phema's checkpoints, and the plain
``ema.decay`` run left exactly as it was."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.callbacks.phema import PowerEMASnapshots, snapshot_name
from diffusion_lab.checkpoint_file import atomic_torch_save, with_checksum
from diffusion_lab.checkpoint_loading import load_checkpoint, load_module
from diffusion_lab.config import check_domains, validate_config
from diffusion_lab.phema import (
    discrete_power_weights,
    gamma_to_sigma_rel,
    power_beta,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from diffusion_lab.phema_cli import check_phema_request, list_argument, reconstruct, write_checkpoints
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.jobs import PhemaConfig
from diffusion_lab.schema.run import MAX_SIGMA_REL
from diffusion_lab.train import train
from tests.test_train import TINY_TOY, compose_train

# ------------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94), (0.010, 97.0)])
def test_sigma_rel_gamma_round_trip(sigma_rel, gamma):
    g = float(sigma_rel_to_gamma(sigma_rel))
    assert g == pytest.approx(gamma, abs=0.01)
    assert float(gamma_to_sigma_rel(g)) == pytest.approx(sigma_rel, rel=1e-12)
    # γ is a root of the cubic γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) (Karras et al. 2024 eq. 126).
    k = sigma_rel**-2
    assert g**3 + 7 * g**2 + (16 - k) * g + (12 - k) == pytest.approx(0.0, abs=1e-6 * g**3)


@pytest.mark.parametrize("bad", [MAX_SIGMA_REL, 0.3, 0.0, -0.05])
def test_sigma_rel_without_a_power_profile_is_refused(bad):
    with pytest.raises(ValueError, match="1/√12"):
        sigma_rel_to_gamma(bad)
    assert float(gamma_to_sigma_rel(1e-9)) == pytest.approx(MAX_SIGMA_REL, rel=1e-8)  # γ → 0⁺: the uniform average


def test_tracked_ema_is_the_closed_form_power_average():
    """The β recursion (eq. 127) weights update k by (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1), at any step."""
    n, gamma = 200, float(sigma_rel_to_gamma(0.1))
    theta = torch.randn(n, dtype=torch.float64)
    ema = theta[0].clone()
    for k in range(2, n + 1):
        beta = power_beta(gamma, k, 1)
        ema = beta * ema + (1 - beta) * theta[k - 1]
    assert power_beta(gamma, 1, 1) == 0.0  # the first update takes the weights as they are
    expected = float(discrete_power_weights(n, gamma) @ theta.numpy())
    assert float(ema) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_reconstructing_a_stored_profile_returns_it():
    times = [1000.0, 2000.0, 3000.0, 4000.0]
    in_time, in_sigma = [t for t in times for _ in (0, 1)], [s for _ in times for s in (0.05, 0.10)]
    x = solve_coefficients(in_time, in_sigma, 3000.0, [0.05, 0.10])
    expected = np.zeros((8, 2))
    expected[4, 0] = expected[5, 1] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-9)


def synthetic_run(snapshot_every=50, steps=1000, batch=1):
    """A callback fed a closed-form parameter trajectory θ(τ) = (sin(τ/150), (τ/1000)²) at τ = 1 … steps images."""
    cb = PowerEMASnapshots([0.05, 0.10], snapshot_every, "unused")
    theta = lambda tau: torch.tensor([math.sin(tau / 150), (tau / 1000) ** 2], dtype=torch.float64)  # noqa: E731
    cb.emas = [{"w": theta(batch).clone()} for _ in cb.sigma_rels]
    snaps = []
    for step in range(1, steps + 1):
        cb.nimg = step * batch
        if step > 1:
            cb.update({"w": theta(cb.nimg)}, batch)
        if cb.nimg % snapshot_every == 0:
            snaps.append((cb.nimg, [e["w"].clone() for e in cb.emas]))
    return cb, snaps, torch.stack([theta(k * batch) for k in range(1, steps + 1)])


def test_reconstruction_matches_the_closed_form_power_ema_of_a_synthetic_trajectory():
    cb, snaps, trajectory = synthetic_run()
    for gamma, ema in zip(cb.gammas, cb.emas, strict=True):  # the tracked EMAs are exact power averages
        expected = torch.from_numpy(discrete_power_weights(len(trajectory), gamma)) @ trajectory
        torch.testing.assert_close(ema["w"], expected, rtol=1e-10, atol=1e-12)
    in_time = [t for t, e in snaps for _ in e]
    in_sigma = [s for _ in snaps for s in cb.sigma_rels]
    stored = torch.stack([w for _, e in snaps for w in e])  # (inputs, 2)
    for sigma_out in (0.02, 0.07, 0.15):
        x = torch.from_numpy(solve_coefficients(in_time, in_sigma, in_time[-1], [sigma_out]))[:, 0]
        reconstructed = x @ stored
        truth = torch.from_numpy(discrete_power_weights(len(trajectory), float(sigma_rel_to_gamma(sigma_out))))
        truth = truth @ trajectory
        # The least-squares profile fit (20 snapshots of 2 widths) reproduces the exact average to ~1e-3.
        torch.testing.assert_close(reconstructed, truth, atol=3e-3, rtol=0)
        # ... far closer than either stored profile would be.
        assert (reconstructed - truth).abs().max() < 0.2 * min((e["w"] - truth).abs().max() for e in cb.emas)


# ----------------------------------------------------------------------------------------- snapshots on disk


def write_snapshots(directory: Path, snaps, sigma_rels=(0.05, 0.10)):
    for step, (nimg, emas) in enumerate(snaps, start=1):
        record = {"diffusion_lab_phema": 1, "nimg": nimg, "step": step, "sigma_rels": list(sigma_rels),
                  "emas": [{"w": e.half()} for e in emas], "buffers": {"b": torch.tensor([step])}}  # fmt: skip
        atomic_torch_save(with_checksum(record), directory / snapshot_name(nimg))
    return sorted(directory.glob("phema-*.pt"))


def test_reconstruct_from_snapshot_files_returns_a_stored_profile_and_the_last_buffers(tmp_path):
    _, snaps, _ = synthetic_run(snapshot_every=100)
    paths = write_snapshots(tmp_path, snaps)
    result = reconstruct(paths, [0.05, 0.10])
    for j in range(2):
        torch.testing.assert_close(result["emas"][j]["w"], snaps[-1][1][j].half().float(), atol=2e-3, rtol=0)
    assert result["errors"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert result["nimg"] == snaps[-1][0] and int(result["buffers"]["b"]) == len(snaps)


# ---------------------------------------------------------------------------------------------- training

POSTHOC = ["ema=posthoc", "ema.posthoc.snapshot_every=1024", "dataset.batch_size=256"]


def tiny(overrides):
    return compose_train([*TINY_TOY, "debug=default", "trainer.max_steps=8", "eval.num_samples=0",
                          "eval.bpd_examples=0", "callbacks.grid_samples=0", *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    plain, posthoc = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("posthoc")
    train(tiny(["dataset.batch_size=256"]), plain)
    train(tiny(POSTHOC), posthoc)
    return plain, posthoc


def test_the_plain_ema_decay_run_is_unchanged_by_posthoc_tracking(runs):
    plain, posthoc = runs
    a = load_checkpoint(plain / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(posthoc / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and any(k.startswith("ema.module.") for k in a)
    for key in a:  # raw weights and the ema.decay EMA, bit for bit
        assert torch.equal(a[key], b[key]), key
    assert not (plain / "phema").exists()


def test_a_posthoc_run_writes_fp16_snapshots_every_k_images(runs):
    _, posthoc = runs
    paths = sorted((posthoc / "phema" / "snapshots").glob("*.pt"))
    assert [p.name for p in paths] == [snapshot_name(1024 * k) for k in (1, 2)]  # 8 steps × 256 images
    snap = torch.load(paths[-1], weights_only=True)
    assert snap["nimg"] == 2048 and snap["step"] == 8 and snap["sigma_rels"] == [0.05, 0.10]
    assert all(v.dtype == torch.float16 for ema in snap["emas"] for v in ema.values())
    module = load_module(posthoc / "checkpoints" / "last.ckpt")
    assert set(snap["emas"][0]) == {k for k, _ in module.denoiser.named_parameters()}


def test_dlab_phema_writes_a_loadable_checkpoint_per_sigma_rel(runs, tmp_path):
    _, posthoc = runs
    cfg = OmegaConf.merge(OmegaConf.structured(PhemaConfig),
                          {"run_dir": str(posthoc), "sigma_rel": [0.10, 0.03], "out_dir": str(tmp_path)})  # fmt: skip
    check_phema_request(cfg)
    written = write_checkpoints(cfg)
    assert [w["sigma_rel"] for w in written] == [0.03, 0.10]
    last = torch.load(sorted((posthoc / "phema" / "snapshots").glob("*.pt"))[-1], weights_only=True)
    for record in written:
        module = load_module(record["path"])
        ckpt = load_checkpoint(record["path"])
        assert ckpt["diffusion_lab_config"]["ema"]["posthoc"]["sigma_rel"] == record["sigma_rel"]
        assert record["snapshot_step"] == record["checkpoint_step"] == 8
        ema = module.ema_denoiser().state_dict()
        if record["sigma_rel"] == 0.10:  # a tracked profile at the last snapshot: that snapshot itself
            for name, value in last["emas"][1].items():
                torch.testing.assert_close(ema[name], value.float(), atol=1e-3, rtol=0)
        raw = load_checkpoint(posthoc / "checkpoints" / "last.ckpt")["state_dict"]
        assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in raw.items() if not k.startswith("ema."))


def test_phema_request_checks(runs, tmp_path):
    _, posthoc = runs
    base = {"run_dir": str(posthoc), "sigma_rel": [0.05]}
    for bad, match in (({"sigma_rel": [0.3]}, "sigma_rel=\\[0.3\\] is out of range; valid: a non-empty list"),
                       ({"sigma_rel": []}, "out of range"),
                       ({"run_dir": str(tmp_path)}, "0 post-hoc EMA snapshot"),
                       ({"ckpt": str(tmp_path / "x.ckpt")}, "no such checkpoint")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            check_phema_request(OmegaConf.merge(OmegaConf.structured(PhemaConfig), {**base, **bad}))
    assert list_argument(["run_dir=a", "sigma_rel=0.02,0.05", "x=1,2"]) == [
        "run_dir=a",
        "sigma_rel=[0.02,0.05]",
        "x=1,2",
    ]
    assert list_argument(["sigma_rel=[0.1]", "sigma_rel=0.1"]) == ["sigma_rel=[0.1]", "sigma_rel=[0.1]"]


def test_training_config_checks():
    with pytest.raises(ConfigError, match=r"ema.posthoc.sigma_rels=\[0.05, 0.3\] is out of range"):
        check_domains(tiny(["ema.posthoc.sigma_rels=[0.05,0.3]"]))
    with pytest.raises(ConfigError, match=r"ema\.posthoc\.sigma_rel=0\.1 is written by dlab-phema"):
        validate_config(tiny(["ema.posthoc.sigma_rel=0.1"]))
    # Under FSDP the profiles are sharded like the weights (tests/test_sharded.py): accepted.
    validate_config(tiny(["ema=posthoc", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]))


def test_make_table_tables_quality_against_sigma_rel(runs, tmp_path, capsys):
    """Eval jobs on dlab-phema checkpoints of two training seeds: σ_rel is an axis (the training config a job stores
    under ``train``), and the seeds of one σ_rel pool to mean ± s.e."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_table", Path(__file__).parents[1] / "scripts" / "make_table.py")
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    _, posthoc = runs
    cfg = OmegaConf.merge(OmegaConf.structured(PhemaConfig),
                          {"run_dir": str(posthoc), "sigma_rel": [0.05, 0.15], "out_dir": str(tmp_path)})  # fmt: skip
    for record in write_checkpoints(cfg):
        stored = json.loads(json.dumps(load_checkpoint(record["path"])["diffusion_lab_config"]))
        for seed in (0, 1):
            job = tmp_path / "jobs" / f"{record['sigma_rel']}-{seed}"
            job.mkdir(parents=True)
            ckpt = f"run{seed}/phema/phema-{record['sigma_rel']:.3f}.ckpt"
            summary = {"choices": {}, "overrides": [f"ckpt_path={ckpt}"], "job_type": "eval",
                       "config": {"ckpt_path": ckpt, "seed": 0, "train": {**stored, "seed": seed}},
                       "metrics": {"val/fd_digits@1k_nfe50": 10 * record["sigma_rel"] + seed}}  # fmt: skip
            (job / "summary.json").write_text(json.dumps(summary))
    args = [str(tmp_path / "jobs"), "--rows", "train.ema.posthoc.sigma_rel", "--metric", "val/fd_digits@*"]
    assert make_table.main(args) == 0
    out = capsys.readouterr().out
    assert "n = 2 seeds" in out
    assert "| 0.05 | 1 ± 0.5 |" in out and "| 0.15 | 2 ± 0.5 |" in out, out


def test_a_resumed_run_continues_the_power_emas_exactly(runs, tmp_path):
    """4 steps, then resumed to 8: the same snapshots as 8 steps in one go (the EMAs live in the checkpoint)."""
    _, posthoc = runs
    train(tiny([*POSTHOC, "trainer.max_steps=4"]), tmp_path)
    train(tiny([*POSTHOC, "resume=true"]), tmp_path)
    for name in (snapshot_name(1024), snapshot_name(2048)):
        a = torch.load(posthoc / "phema" / "snapshots" / name, weights_only=True)
        b = torch.load(tmp_path / "phema" / "snapshots" / name, weights_only=True)
        for ema_a, ema_b in zip(a["emas"], b["emas"], strict=True):
            assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), name


def test_resuming_without_posthoc_state_is_refused(tmp_path):
    train(tiny(["dataset.batch_size=256", "trainer.max_steps=4"]), tmp_path)
    with pytest.raises(RuntimeError, match="written without post-hoc EMA state"):
        train(tiny([*POSTHOC, "resume=true"]), tmp_path)


@pytest.mark.slow
def test_ddp_two_cpu_processes_snapshot_the_full_weights_once(tmp_path):
    """2 ranks × 128 images × 5 steps: time counts both ranks' images; rank 0 alone writes each snapshot."""
    from tests.test_train import run_cli

    run_dir = tmp_path / "ddp"
    args = [
        *TINY_TOY,
        "debug=default",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "ema=posthoc",
        "ema.posthoc.snapshot_every=512",
        "dataset.batch_size=128",
        f"hydra.run.dir={run_dir}",
    ]
    proc = run_cli("diffusion_lab.train", args, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = sorted(p.name for p in (run_dir / "phema" / "snapshots").iterdir())
    assert names == [snapshot_name(512), snapshot_name(1024), snapshot_name(1280)]  # 256 images per step
    last = torch.load(run_dir / "phema" / "snapshots" / names[-1], weights_only=True)
    state = next(v for k, v in load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"].items()
                 if "PowerEMASnapshots" in k)  # fmt: skip
    assert state["nimg"] == last["nimg"] == 1280
    for snap, ema in zip(last["emas"], state["emas"], strict=True):
        assert all(torch.equal(snap[k], ema[k].half()) for k in snap)
