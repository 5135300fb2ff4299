"""dlab-tune-grid end to end on a tiny toy checkpoint, then ``sampler.grid=tuned`` in dlab-sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.train import train
from tests.test_train import TINY_TOY, compose_named, compose_train, run_cli

TUNE = ["sampler=dpm_solver", "sampler.steps=4", "num_draws=24", "num_heldout=24", "max_evals=12"]


@pytest.fixture(scope="module")
def tuned_ckpt(tmp_path_factory):
    """A 6-step toy checkpoint and the grid record of a dlab-tune-grid job on it (run in-process)."""
    from diffusion_lab.tune_grid import run as tune_run

    run_dir = tmp_path_factory.mktemp("toy_tune")
    overrides = [*TINY_TOY, "debug=default", "trainer.max_steps=6", "eval.num_samples=0", "eval.bpd_examples=0"]
    train(compose_train(overrides), run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return ckpt, tune_run(compose_named("tune_grid", [f"ckpt_path={ckpt}", *TUNE]), TUNE)


def test_tune_grid_writes_the_grid_and_its_protocol_beside_the_checkpoint(tuned_ckpt):
    ckpt, returned = tuned_ckpt
    path = ckpt.parent / "grids" / "last" / "dpm_solver_4.json"
    assert returned["path"] == str(path)
    record = json.loads(path.read_text())
    assert record["format"] == "diffusion_lab.tuned_grid/1" and record["grid"] == returned["grid"]
    grid = torch.tensor(record["grid"], dtype=torch.float64)
    assert grid.shape == (5,) and bool((grid[1:] < grid[:-1]).all()) and grid[-1] == 0
    assert grid[0] == record["start_grid"]["grid"][0] and record["start_grid"]["name"] == "log_snr"
    assert record["sampler"]["order"] == 2 and "grid" not in record["sampler"]
    assert record["sampler"]["clip_x0"] is None  # the run's (unbounded 2-D data), as dlab-sample would use
    assert record["checkpoint"]["global_step"] == 6 and len(record["checkpoint"]["sha256"]) == 64
    assert record["draws"] == {**record["draws"], "fit": 24, "heldout": 24, "seed": 0}
    assert record["reference"]["rtol"] == 1e-5 and record["reference"]["rmse_vs_10x_tighter"] >= 0
    err = record["error"]
    assert err["heldout_after"] <= err["heldout_before"]  # a worse fit is never kept
    assert record["accepted"] == (err["heldout_after"] < err["heldout_before"])
    assert 0 < record["search"]["loss_evaluations"] <= 12 and record["cost"]["wall_s"] > 0


@pytest.mark.slow
def test_dlab_tune_grid_command(tuned_ckpt, tmp_path):
    """The console entry point (as ``python -m diffusion_lab.tune_grid``) fits, saves and prints."""
    ckpt, _ = tuned_ckpt
    args = [f"ckpt_path={ckpt}", *TUNE, "sampler.steps=3", f"hydra.run.dir={tmp_path}"]
    result = run_cli("diffusion_lab.tune_grid", args)
    assert result.returncode == 0, result.stderr[-3000:]
    path = ckpt.parent / "grids" / "last" / "dpm_solver_3.json"
    assert f"wrote {path}" in result.stdout and "held-out endpoint RMSE" in result.stdout
    assert json.loads(path.read_text())["steps"] == 3


def test_sample_with_the_tuned_grid_records_it(tuned_ckpt, tmp_path):
    from diffusion_lab.sample import run as sample_run

    ckpt, _ = tuned_ckpt
    path = ckpt.parent / "grids" / "last" / "dpm_solver_4.json"
    args = [f"ckpt_path={ckpt}", "sampler=dpm_solver", "sampler.steps=4", "sampler.grid=tuned"]
    cfg = compose_named("sample", [*args, "num_samples=6", "batch_size=6", "grid=false"])
    summary = sample_run(cfg, tmp_path, overrides=args[1:])
    assert summary["time_grid"] == "tuned" and summary["time_grid_file"] == str(path) and summary["nfe"] == 4
    data = np.load(tmp_path / "samples.npz")
    assert str(data["time_grid"]) == "tuned" and str(data["time_grid_file"]) == str(path)


def test_evaluate_with_the_tuned_grid_records_it(tuned_ckpt, tmp_path):
    from diffusion_lab.evaluate import run as evaluate_run

    ckpt, _ = tuned_ckpt
    args = ["scores=[toy2d]", "sampler=dpm_solver", "sampler.steps=4", "sampler.grid=tuned", "num_samples=16"]
    results = evaluate_run(compose_named("evaluate", [f"ckpt_path={ckpt}", *args]), tmp_path, args)
    protocol = results["protocol"]["samples"]
    assert protocol["time_grid"] == "tuned" and protocol["nfe"] == 4
    assert protocol["time_grid_file"] == str(ckpt.parent / "grids" / "last" / "dpm_solver_4.json")


def test_sample_with_an_unfitted_tuned_grid_is_refused(tuned_ckpt, tmp_path):
    from diffusion_lab.sample import run as sample_run

    ckpt, _ = tuned_ckpt
    cfg = compose_named("sample", [f"ckpt_path={ckpt}", "sampler=dpm_solver", "sampler.steps=6", "sampler.grid=tuned"])
    missing = ckpt.parent / "grids" / "last" / "dpm_solver_6.json"
    expected = (
        rf"{missing} does not exist; fit one with: dlab-tune-grid ckpt_path={ckpt} sampler=dpm_solver sampler.steps=6"
    )
    with pytest.raises(ConfigError, match=expected):
        sample_run(cfg, tmp_path)
    assert not (tmp_path / "samples.npz").exists()


def test_training_with_a_tuned_grid_is_refused_when_composed():
    from diffusion_lab.config import validate_config

    with pytest.raises(ConfigError, match="fitted to one checkpoint"):
        validate_config(compose_train([*TINY_TOY, "sampler.grid=tuned"]))


def test_tune_grid_refuses_an_adaptive_or_stochastic_sampler(tuned_ckpt, tmp_path):
    from diffusion_lab.tune_grid import run as tune_run

    ckpt, _ = tuned_ckpt
    base = [f"ckpt_path={ckpt}", "num_draws=4", "num_heldout=4", "max_evals=1"]
    with pytest.raises(ConfigError, match="sampler=rk45 chooses its own steps"):
        tune_run(compose_named("tune_grid", [*base, "sampler=rk45"]))
    with pytest.raises(ValueError, match="draws noise while it samples"):
        tune_run(compose_named("tune_grid", [*base, "sampler=ddim", "sampler.steps=3", "sampler.eta=1.0"]))
    with pytest.raises(ConfigError, match="num_draws=0 is out of range; valid: an integer >= 1"):
        tune_run(compose_named("tune_grid", [f"ckpt_path={ckpt}", "num_draws=0"]))
