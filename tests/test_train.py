"""End to end: train on the real configs, write checkpoint + metrics + grid, sample from the checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from diffusion_lab.checkpoint_loading import load_checkpoint, load_module
from diffusion_lab.config import register_configs, validate_config
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.train import train

register_configs()
TINY_TOY = [
    "experiment=toy2d",
    "model.hidden=32",
    "model.num_layers=2",
    "dataset.num_train=2048",
    "dataset.num_val=256",
]
TINY_DIGITS = ["model.base_channels=16", "model.num_groups=4", "dataset.batch_size=16"]


def compose_train(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_cli(module, args, cwd=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.mark.parametrize("overrides", [TINY_TOY, TINY_DIGITS], ids=["toy2d", "digits"])
def test_fast_dev_run(tmp_path, overrides):
    metrics = train(compose_train([*overrides, "debug=fdr"]), tmp_path)
    assert metrics["train/steps"] == 1 and np.isfinite(metrics["train/loss"])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy_run")
    cfg = compose_train([*TINY_TOY, "debug=default", "trainer.max_steps=6"])
    metrics = train(cfg, run_dir)
    return run_dir, metrics


def test_run_writes_checkpoint_metrics_and_grid(toy_run):
    run_dir, _ = toy_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["train/steps"] == 6 and np.isfinite(saved["train/loss"])
    assert any(k.startswith("val/energy_distance@8_nfe2") for k in saved), saved.keys()
    assert saved["protocol"]["eval_samples"] == 8 and saved["protocol"]["weights"] == "EMA"
    # Bits/dim of the EMA model on 16 validation points, by the discrete VLB of the T = 1000 schedule.
    assert np.isfinite(saved["val/bpd@16"]) and saved["val/bpd_sem@16"] > 0
    assert saved["protocol"]["bpd"]["method"] == "discrete" and saved["protocol"]["bpd"]["num_examples"] == 16
    assert (run_dir / "samples_ema.png").is_file()
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert any(k.startswith("ema.module.net.") for k in ckpt["state_dict"])
    assert ckpt["diffusion_lab_config"]["parameterization"]["_target_"].endswith("EpsParameterization")


def test_checkpoint_round_trip_reproduces_ema_samples(toy_run):
    run_dir, _ = toy_run
    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ema = {k[len("ema.module.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    for name, value in module.ema_denoiser().state_dict().items():
        torch.testing.assert_close(value, ema[name])
    # EMA and raw weights differ after training, and sampling uses the EMA copy by default.
    raw = module.generate(range(4), use_ema=False).x0
    assert not torch.allclose(module.generate(range(4)).x0, raw)


def test_sample_cli_from_checkpoint(toy_run, tmp_path):
    run_dir, _ = toy_run
    out = tmp_path / "samples"
    proc = run_cli(
        "diffusion_lab.sample",
        [
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            "sampler=ddpm",
            "sampler.steps=7",
            "num_samples=10",
            "batch_size=4",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NFE: 7" in proc.stdout and "samples/s" in proc.stdout
    data = np.load(out / "samples.npz")
    assert data["x0"].shape == (10, 2) and int(data["nfe"]) == 7
    assert (out / "grid.png").is_file()


def test_evaluate_cli_prints_a_table_and_writes_json(toy_run, tmp_path):
    run_dir, _ = toy_run
    args = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_examples=32", "num_t_samples=3"]
    proc = run_cli("diffusion_lab.evaluate", [*args, f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'h'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| val/bpd@32" in proc.stdout
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert np.isfinite(saved["val/bpd@32"]) and saved["protocol"]["bpd"]["method"] == "discrete"
    bad = run_cli("diffusion_lab.evaluate", [*args, "scores=[bdp]", f"hydra.run.dir={tmp_path / 'h2'}"])
    valid = "['bpd', 'coverage', 'density', 'fd_digits', 'fid', 'precision', 'recall', 'toy2d']"
    assert bad.returncode != 0 and f"valid: a non-empty list of scores from {valid}" in bad.stderr


def test_importance_sampler_history_is_fed_and_checkpointed(tmp_path):
    """The loss-aware sampler sees every step's losses, and its history resumes from the checkpoint."""
    overrides = [
        *TINY_TOY,
        "debug=default",
        "time_sampler=importance",
        "time_sampler.num_bins=4",
        "schedule.discrete=false",
    ]
    train(compose_train([*overrides, "time_sampler.history=2", "eval.num_samples=0"]), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    state = ckpt["time_sampler"]
    assert state["counts"].tolist() == [2, 2, 2, 2]  # 5 steps × 512 examples fill every bin's history
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    restored = module.loss_fn.time_sampler.state_dict()
    torch.testing.assert_close(restored["losses"], state["losses"])
    assert module.loss_fn.time_sampler.is_warm


def test_sample_cli_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli("diffusion_lab.sample", [f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0 and "checkpoint not found" in proc.stderr


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"diffusion_lab_config": {}, "payload": Evil()}, path)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported"):
        load_checkpoint(path)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    metrics = train(compose_train([*TINY_TOY, "debug=default", "precision=bf16-mixed"]), tmp_path)
    assert np.isfinite(metrics["train/loss"])


def test_wandb_offline_run_and_csv_metrics(tmp_path):
    overrides = [
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "eval.num_samples=0",
        "callbacks.grid_samples=0",
        "logger.wandb.mode=offline",
    ]
    train(compose_train([*TINY_TOY, *overrides]), tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B offline run directory missing"
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0]


def test_cifar10_preset_fails_cleanly_without_data(tmp_path):
    proc = run_cli(
        "diffusion_lab.train",
        [
            "experiment=ddpm_cifar10",
            "trainer=cpu",
            f"dataset.root={tmp_path / 'c'}",
            "logger.wandb=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    assert proc.returncode != 0
    assert "dataset.root" in proc.stderr and "dataset.download=true" in proc.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_ddp_two_cpu_processes(tmp_path):
    """Lightning DDP (gloo) with 2 CPU processes: one run directory, one checkpoint, ranks in sync."""
    run_dir = tmp_path / "ddp"
    proc = run_cli(
        "diffusion_lab.train",
        [
            *TINY_TOY,
            "debug=default",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 5
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"], "one output directory per job, not per rank"


def compose_named(name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


# (sampler option, its overrides, the NFE it must report): NFE is the true count of denoiser calls.
SAMPLER_CASES = [
    ("ddim", ["sampler.steps=5", "sampler.grid=trailing"], 5),
    ("euler", ["sampler.steps=5", "sampler.s_churn=1"], 5),
    ("heun", ["sampler.steps=4"], 7),  # 2·steps − 1: the step to σ = 0 is Euler
    ("edm", ["sampler.steps=4"], 7),
    ("dpm_solver", ["sampler.steps=5", "sampler.order=3"], 5),
    ("dpm_solver", ["sampler.steps=4", "sampler.method=singlestep"], 4),  # 2S: one call per grid interval
    ("euler_maruyama", ["sampler.steps=6"], 6),
    ("pc", ["sampler.steps=10", "sampler.corrector_steps=2"], 30),  # a predictor and 2 corrector calls per step
    ("rk45", ["sampler.rtol=1e-3", "sampler.atol=1e-3"], None),  # adaptive: whatever the solver used
]


@pytest.mark.parametrize(("name", "overrides", "nfe"), SAMPLER_CASES, ids=[f"{c[0]}-{c[2]}" for c in SAMPLER_CASES])
def test_any_sampler_on_an_existing_checkpoint(toy_run, tmp_path, name, overrides, nfe):
    """``dlab-sample … sampler=<any>``: the run's unbounded data keep clip_x0=null unless it is overridden."""
    from diffusion_lab.checkpoint_jobs import build_sampler
    from diffusion_lab.sample import run as sample_run

    run_dir, _ = toy_run
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    cfg = compose_named("sample", [ckpt, f"sampler={name}", *overrides, "num_samples=6", "batch_size=6", "grid=false"])
    summary = sample_run(cfg, tmp_path, overrides=[f"sampler={name}"])
    data = np.load(tmp_path / "samples.npz")
    assert data["x0"].shape == (6, 2)
    # The Langevin corrector's SNR rule takes steps ∝ 1/‖ε̂‖², which explode on this 6-step model's ε̂ ≈ 0.
    assert name == "pc" or np.isfinite(data["x0"]).all()
    assert summary["sampler"] == name and int(data["nfe"]) == summary["nfe"]
    if nfe is not None:
        assert summary["nfe"] == nfe
    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    assert module.config["sampler"]["clip_x0"] is None and cfg.sampler.clip_x0 == 1.0
    assert build_sampler(cfg, module, []).clip_x0 is None
    assert build_sampler(cfg, module, ["sampler.clip_x0=1.0"]).clip_x0 == 1.0


def test_a_grid_the_checkpoints_schedule_lacks_is_a_clear_error(toy_run, tmp_path):
    from diffusion_lab.sample import run as sample_run

    run_dir, _ = toy_run
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    cfg = compose_named("sample", [ckpt, "sampler=dpm_solver", "sampler.grid=trailing", "sampler.steps=2000"])
    with pytest.raises(ConfigError, match="exceeds the discrete schedule's T=1000"):
        sample_run(cfg, tmp_path)
    assert not (tmp_path / "samples.npz").exists()
    cont = compose_train(["schedule=cosine", "schedule.discrete=false", "sampler.grid=leading"])
    with pytest.raises(ConfigError, match=r"valid choices there: \['karras', 'log_snr', 'uniform'\]"):
        validate_config(cont)


def test_evaluate_pf_ode_bits_per_dim(toy_run, tmp_path):
    """``dlab-evaluate bpd_method=ode``: the PF-ODE likelihood, its key, NFE and tolerances in the protocol."""
    from diffusion_lab.evaluate import run as evaluate_run

    run_dir, _ = toy_run
    args = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_examples=8", "bpd_method=ode"]
    cfg = compose_named("evaluate", [*args, "ode_rtol=1e-3", "ode_atol=1e-3"])
    results = evaluate_run(cfg, tmp_path)
    assert np.isfinite(results["val/bpd_ode@8"]) and results["val/bpd_ode_sem@8"] > 0
    protocol = results["protocol"]["bpd_ode"]
    assert protocol["method"] == "ode" and protocol["rtol"] == 1e-3 and protocol["nfe_mean"] > 2
    assert protocol["decoder"] == "density"  # 2-D points: a density, not dequantised
    with pytest.raises(ConfigCompositionException, match="ode_probe=sobol"):
        compose_named("evaluate", [*args, "ode_probe=sobol"])
    with pytest.raises(ConfigError, match=r"^ode_rtol=0.0 is out of range; valid: a finite number > 0"):
        evaluate_run(compose_named("evaluate", [*args, "ode_rtol=0"]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
