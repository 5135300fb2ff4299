"""Pins of diffusion_lab.samplers.tuning at its boundaries: the acceptance rule on an equal held-out error, and a
grid record that lacks its checkpoint's sha256."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from diffusion_lab.cache_files import sha256_of
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.parameterizations import X0Parameterization
from diffusion_lab.diffusion.schedules.beta import LinearSchedule
from diffusion_lab.samplers import tuning as tuning_module
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler
from diffusion_lab.samplers.grids import TUNED_GRID
from diffusion_lab.samplers.tuning import (
    fit_grid,
    grid_file,
    load_tuned_grid,
    sampler_identity,
    save_grid_record,
)
from diffusion_lab.schema.jobs import FitOptions

F64 = torch.float64
GMM = GaussianMixture(
    torch.tensor([0.5, 0.5], dtype=F64),
    torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
    torch.tensor([0.2, 0.1], dtype=F64),
)
SCHEDULE = LinearSchedule()
HELD_BEFORE = 0.25  # the start grid's held-out mean squared error in the stand-in below
CANDIDATE = np.array([1.0, -1.0, 0.5, 0.0])  # logits of a grid other than the start (5 steps: 4 logits)


def oracle() -> Denoiser:
    param = X0Parameterization()
    return Denoiser(OracleNetwork(GMM, SCHEDULE, param), SCHEDULE, param)


def fit_with_heldout_error(monkeypatch, candidate_error: float):
    """``fit_grid`` whose search returns :data:`CANDIDATE` and whose endpoint error is ``HELD_BEFORE`` on the start
    grid and ``candidate_error`` on any other grid (fit and held-out draws alike)."""

    class StandInError:
        def __init__(self, sampler, denoiser, x_T, x_ref, y, batch) -> None:
            self.start, self.evals = sampler.time_grid(denoiser.schedule), 0

        def __call__(self, grid: torch.Tensor) -> float:
            return HELD_BEFORE if torch.equal(grid, self.start) else candidate_error

    monkeypatch.setattr(tuning_module, "EndpointError", StandInError)
    monkeypatch.setattr(tuning_module, "_search", lambda loss, param, start, max_evals: (CANDIDATE, 1))
    sampler = DPMSolverSampler(steps=5, grid="log_snr")
    draws = [sampler.prior((8, 2), SCHEDULE, torch.Generator().manual_seed(s)) for s in (0, 1)]
    return fit_grid(sampler, oracle(), *draws, FitOptions(num_draws=8, num_heldout=8, max_evals=1))


def test_a_fit_with_an_equal_held_out_error_is_rejected(monkeypatch):
    """Module docstring: "a fit whose held-out error is not below the start grid's is rejected": a tie keeps the
    start grid (fails if the rule is ``<=``)."""
    result = fit_with_heldout_error(monkeypatch, HELD_BEFORE)
    assert not result.accepted
    assert torch.equal(result.grid, result.start)
    assert result.heldout_before == result.heldout_after == 0.5  # RMSE = √0.25
    assert result.fit_before == result.fit_after == 0.5


def test_a_fit_better_by_one_ulp_on_held_out_draws_is_accepted(monkeypatch):
    """The other side of the boundary: the smallest improvement is kept and reported as it is."""
    better = float(np.nextafter(HELD_BEFORE, 0.0))
    result = fit_with_heldout_error(monkeypatch, better)
    assert result.accepted
    param = tuning_module.LogSigmaGrid(SCHEDULE, result.start, result.sigma_floor)
    assert torch.equal(result.grid, param.grid(CANDIDATE)) and not torch.equal(result.grid, result.start)
    assert result.heldout_before == 0.5 and result.heldout_after == math.sqrt(better)
    assert result.heldout_after < result.heldout_before
    assert result.fit_after == math.sqrt(better)


SETTINGS = {"_target_": "diffusion_lab.samplers.DPMSolverSampler", "steps": 5, "order": 2, "clip_x0": None}


# A record without checkpoint.sha256 is refused with a ValueError (RecordError) naming the file and the key.
def test_a_grid_record_without_the_checkpoint_sha256_is_refused_naming_the_file(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights v1")
    record = {
        "grid": [1.0, 0.5, 0.25, 0.1, 0.05, 0.0],
        "sampler_name": "dpm_solver",
        "steps": 5,
        "sampler": sampler_identity({**SETTINGS, "grid": "log_snr"}),
        "checkpoint": {"path": str(ckpt), "sha256": sha256_of(ckpt), "global_step": 7},
        "ema": True,
    }
    path = grid_file(ckpt, "dpm_solver", 5)
    save_grid_record(path, record)
    sampler = DPMSolverSampler(steps=5, grid=TUNED_GRID)
    load_tuned_grid(sampler, {**SETTINGS, "grid": TUNED_GRID}, ckpt, use_ema=True)  # the whole record is accepted
    stored = json.loads(path.read_text())
    del stored["checkpoint"]["sha256"]
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*sha256|sha256.*{re.escape(str(path))}"):
        load_tuned_grid(DPMSolverSampler(steps=5, grid=TUNED_GRID), {**SETTINGS, "grid": TUNED_GRID}, ckpt, True)
