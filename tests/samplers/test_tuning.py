"""Model-tuned time grids (diffusion_lab/samplers/tuning.py) on a Gaussian mixture with its exact denoiser."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from diffusion_lab.cache_files import sha256_of
from diffusion_lab.diffusion import LinearSchedule, X0Parameterization
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.records import RecordError
from diffusion_lab.samplers import DDIMSampler, DPMSolverSampler, HeunSampler, time_grid
from diffusion_lab.samplers import tuning as tuning_module
from diffusion_lab.samplers.grids import TUNED_GRID
from diffusion_lab.samplers.tuning import (
    GRID_FORMAT,
    LogSigmaGrid,
    fit_grid,
    grid_file,
    grid_protocol,
    load_tuned_grid,
    sampler_identity,
    save_grid_record,
    sigma_floor,
)
from diffusion_lab.schema.jobs import FitOptions

F64 = torch.float64
# Three tight, well separated components: the PF-ODE bends sharply late, so a 5-step grid has much to gain.
GMM = GaussianMixture(
    torch.tensor([0.3, 0.3, 0.4], dtype=F64),
    torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], dtype=F64),
    torch.tensor([0.1, 0.2, 0.05], dtype=F64),
)
SCHEDULE = LinearSchedule()  # discrete, T = 1000
SMALL = FitOptions(num_draws=64, num_heldout=64, max_evals=60, seed=0)


def oracle() -> Denoiser:
    param = X0Parameterization()
    return Denoiser(OracleNetwork(GMM, SCHEDULE, param), SCHEDULE, param)


def noise(sampler, n: int, seed: int) -> torch.Tensor:
    return sampler.prior((n, 2), SCHEDULE, torch.Generator().manual_seed(seed))


def fit(sampler, options: FitOptions = SMALL):
    return fit_grid(
        sampler, oracle(), noise(sampler, options.num_draws, 0), noise(sampler, options.num_heldout, 1), options
    )


@pytest.fixture(scope="module")
def dpm5_fit():
    return fit(DPMSolverSampler(steps=5, grid="log_snr"))


def test_tuned_grid_beats_the_default_on_held_out_draws(dpm5_fit):
    """DPM-Solver++ 2M, 5 steps: the fitted grid has a clearly smaller held-out endpoint error than log_snr."""
    assert dpm5_fit.accepted
    assert dpm5_fit.heldout_after < 0.8 * dpm5_fit.heldout_before
    assert dpm5_fit.fit_after < dpm5_fit.fit_before
    # The reference is far more accurate than the errors being compared.
    assert dpm5_fit.reference_error < 0.05 * dpm5_fit.heldout_after
    assert 0 < dpm5_fit.loss_evaluations <= SMALL.max_evals


def test_tuned_grid_is_monotone_with_the_start_grids_end_points(dpm5_fit):
    grid, start = dpm5_fit.grid, dpm5_fit.start
    assert grid.dtype == F64 and grid.shape == start.shape == (6,)
    assert bool((grid[1:] < grid[:-1]).all())
    assert grid[0] == start[0] == 1.0 and grid[-1] == start[-1] == 0.0
    assert not torch.allclose(grid, start)


def test_a_fit_not_better_on_held_out_draws_is_rejected(monkeypatch):
    """The search's result only replaces the start grid when it wins on held-out draws: force a bad one."""

    def crowd_at_the_top(loss, param, start, max_evals):  # every interior point just below t_0
        return np.array([8.0, -8.0, -8.0, -8.0]), 1

    monkeypatch.setattr(tuning_module, "_search", crowd_at_the_top)
    result = fit(DPMSolverSampler(steps=5, grid="log_snr"), FitOptions(num_draws=16, num_heldout=16))
    assert not result.accepted
    assert torch.equal(result.grid, result.start)
    assert result.heldout_after == result.heldout_before and result.fit_after == result.fit_before


def test_log_sigma_map_is_monotone_for_any_logits_and_inverts_on_the_start():
    start = time_grid("karras", 8, SCHEDULE, sigma_min=0.05)  # last finite point above the floor: no clamping
    floor = sigma_floor(SCHEDULE, start)
    param = LogSigmaGrid(SCHEDULE, start, floor)
    torch.testing.assert_close(param.grid(param.logits(start)), start, rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grid = param.grid(rng.normal(scale=3.0, size=7))
        assert bool((grid[1:] < grid[:-1]).all()) and grid[0] == start[0] and grid[-1] == 0
        alpha, sigma = SCHEDULE.alpha_sigma(grid[1:-1])
        assert bool((sigma / alpha > floor * (1 - 1e-9)).all())


def test_a_stochastic_sampler_is_refused():
    with pytest.raises(ValueError, match="draws noise while it samples"):
        fit(DDIMSampler(steps=4, eta=1.0), FitOptions(num_draws=8, num_heldout=8, max_evals=2))


def test_tuned_without_an_attached_grid_is_refused_with_the_command():
    sampler = HeunSampler(steps=4, grid=TUNED_GRID)
    with pytest.raises(ValueError, match=r"fitted to one checkpoint.*dlab-tune-grid ckpt_path="):
        sampler.time_grid(SCHEDULE)
    with pytest.raises(ValueError, match="dlab-tune-grid"):
        time_grid(TUNED_GRID, 4, SCHEDULE)
    with pytest.raises(ValueError, match="takes no option"):
        HeunSampler(steps=4, grid=TUNED_GRID, rho=7.0)


SETTINGS = {"_target_": "diffusion_lab.samplers.DPMSolverSampler", "steps": 5, "order": 2, "clip_x0": None}


def write_record(tmp_path, grid: list[float], ema: bool = True):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights v1")
    record = {
        "grid": grid,
        "sampler_name": "dpm_solver",
        "steps": 5,
        "sampler": sampler_identity({**SETTINGS, "grid": "log_snr"}),
        "checkpoint": {"path": str(ckpt), "sha256": sha256_of(ckpt), "global_step": 7},
        "ema": ema,
    }
    save_grid_record(grid_file(ckpt, "dpm_solver", 5), record)
    return ckpt


def test_grid_file_round_trip_and_protocol(tmp_path, dpm5_fit):
    ckpt = write_record(tmp_path, dpm5_fit.grid.tolist())
    path = tmp_path / "run" / "checkpoints" / "grids" / "last" / "dpm_solver_5.json"
    assert json.loads(path.read_text())["format"] == GRID_FORMAT
    sampler = DPMSolverSampler(steps=5, grid=TUNED_GRID)
    record = load_tuned_grid(sampler, {**SETTINGS, "grid": TUNED_GRID}, ckpt, use_ema=True)
    assert record["checkpoint"]["global_step"] == 7
    assert torch.equal(sampler.time_grid(SCHEDULE), dpm5_fit.grid)  # float64 survives JSON exactly
    assert grid_protocol(sampler) == {"time_grid": TUNED_GRID, "time_grid_file": str(path)}
    assert grid_protocol(DPMSolverSampler(steps=5)) == {"time_grid": "uniform", "time_grid_file": None}
    x_T = noise(sampler, 8, 3)
    torch.testing.assert_close(
        sampler.sample(oracle(), x_T).x0, DPMSolverSampler(steps=5).sample(oracle(), x_T, t_grid=dpm5_fit.grid).x0
    )


def test_a_grid_fitted_for_something_else_is_refused(tmp_path, dpm5_fit):
    ckpt = write_record(tmp_path, dpm5_fit.grid.tolist())
    tuned = {**SETTINGS, "grid": TUNED_GRID}
    with pytest.raises(ValueError, match=r"dpm_solver_6\.json does not exist; fit one with: dlab-tune-grid ckpt_path="):
        load_tuned_grid(DPMSolverSampler(steps=6, grid=TUNED_GRID), {**tuned, "steps": 6}, ckpt, use_ema=True)
    with pytest.raises(ValueError, match=r"other sampler settings: \{'order': '2 \(fitted\) vs 3 \(asked\)'\}"):
        load_tuned_grid(DPMSolverSampler(steps=5, grid=TUNED_GRID, order=3), {**tuned, "order": 3}, ckpt, True)
    with pytest.raises(ValueError, match="the EMA weights, not the raw ones"):
        load_tuned_grid(DPMSolverSampler(steps=5, grid=TUNED_GRID), tuned, ckpt, use_ema=False)
    ckpt.write_bytes(b"weights v2")  # e.g. training continued into last.ckpt
    with pytest.raises(ValueError, match=r"checkpoint sha256 .* \(step 7\), but .* now"):
        load_tuned_grid(DPMSolverSampler(steps=5, grid=TUNED_GRID), tuned, ckpt, use_ema=True)


# ------------------------------------------------------------------------------ a damaged grid file names itself


def _damaged(tmp_path, damage) -> tuple:
    """A valid grid file for ``last.ckpt``, then ``damage(text) -> text`` applied to it; (ckpt, path)."""
    ckpt = write_record(tmp_path, [1.0, 0.5, 0.25, 0.1, 0.05, 0.0])
    path = grid_file(ckpt, "dpm_solver", 5)
    path.write_text(damage(path.read_text()))
    return ckpt, path


def _load(ckpt):
    return load_tuned_grid(DPMSolverSampler(steps=5, grid=TUNED_GRID), {**SETTINGS, "grid": TUNED_GRID}, ckpt, True)


def _edit(change):
    """A damage that parses the record, applies ``change(record)`` and writes it back."""

    def damage(text: str) -> str:
        record = json.loads(text)
        change(record)
        return json.dumps(record)

    return damage


SIX = r"expected a list of steps \+ 1 = 6 numbers"
REFIT = r"fit it again with: dlab-tune-grid ckpt_path=\S+last\.ckpt sampler=dpm_solver sampler\.steps=5"


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda text: text[: len(text) // 2], r"not valid JSON: truncated at byte \d+ \([^)]*\)"),
        (lambda text: "", r"empty \(0 bytes\), not JSON"),
        (lambda text: "[1.0, 0.0]", "holds a JSON array, expected an object"),
        (_edit(lambda r: r["checkpoint"].pop("sha256")), r"missing key 'checkpoint\.sha256' \(string\)"),
        (_edit(lambda r: r.pop("ema")), r"missing key 'ema' \(boolean\)"),
        (_edit(lambda r: r.update(steps="5")), r"key 'steps' is string \('5'\), expected integer"),
        (_edit(lambda r: r.update(ema=1)), r"key 'ema' is integer \(1\), expected boolean"),
        (_edit(lambda r: r.update(checkpoint="abc")), r"key 'checkpoint' is string \('abc'\), expected object"),
        (_edit(lambda r: r.update(grid=[1.0, "0.5", 0.0])), rf"key 'grid' is \[1\.0, '0\.5', 0\.0\], {SIX}"),
        (_edit(lambda r: r.update(grid=[1.0, 0.0])), rf"key 'grid' is \[1\.0, 0\.0\], {SIX}"),
        (_edit(lambda r: r.update(format="diffusion_lab.tuned_grid/0")), r"format 'diffusion_lab\.tuned_grid/0', "
         r"expected format 'diffusion_lab\.tuned_grid/1'"),
    ],
    ids=["truncated", "empty", "not-an-object", "no-sha256", "no-ema", "steps-str", "ema-int", "checkpoint-str",
         "grid-str", "grid-short", "other-format"],
)  # fmt: skip
def test_a_damaged_grid_file_is_refused_naming_the_file_the_problem_and_the_command(tmp_path, damage, problem):
    ckpt, path = _damaged(tmp_path, damage)
    named = rf"^sampler\.grid=tuned: the grid record {re.escape(str(path))}: {problem}; {REFIT}"
    with pytest.raises(RecordError, match=named):
        _load(ckpt)


def test_every_problem_of_a_grid_file_is_listed_at_once(tmp_path):
    ckpt, path = _damaged(tmp_path, _edit(lambda r: (r.pop("sampler_name"), r.update(steps=5.5, sampler=[]))))
    with pytest.raises(RecordError) as err:
        _load(ckpt)
    assert err.value.path == path
    assert err.value.problems == [
        "missing key 'sampler_name' (string)",
        "key 'steps' is number (5.5), expected integer",
        "key 'sampler' is array ([]), expected object",
    ]


def test_a_grid_record_that_would_be_refused_is_not_written(tmp_path):
    with pytest.raises(ValueError, match=r"not writing the grid record .*: missing key 'checkpoint\.sha256'"):
        record = {"grid": [1.0, 0.0], "sampler_name": "ddim", "steps": 1, "sampler": {}, "ema": False}
        save_grid_record(tmp_path / "g.json", {**record, "checkpoint": {"global_step": 1}})
    assert not (tmp_path / "g.json").exists()
