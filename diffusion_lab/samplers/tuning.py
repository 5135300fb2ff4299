"""Model-tuned time grids: fit a deterministic sampler's N-step grid to one denoiser.

The idea of "Align Your Steps" (Sabour et al. 2024, arXiv:2404.14507): the best grid depends on the model, so
optimise it for the model at hand. Like GITS (Chen et al. 2024, arXiv:2405.11326) we measure a grid by the
sampler's error against a fine "teacher" solve of the same noise, but we fit the grid by direct search on the
exact quantity reported instead of a dynamic programme over one-step costs (a DP is exact only for single-step
samplers; DPM-Solver++ 2M and UniPC reuse earlier evaluations, so the cost of a step depends on the path to it).

Method (every piece below is what :func:`fit_grid` runs):

- The grid ``t_0 > t_1 > … > t_{N−1} > t_N = 0`` keeps the start grid's ``t_0`` (where the prior is drawn) and
  ``t_N = 0``. The ``N − 1`` interior points live in ``u = log σ_e`` (``σ_e = σ/α = e^{−λ/2}``) between ``u_top``
  (``u(t_0)``) and ``u_floor`` (the σ-grids' default smallest ``σ_e``, or lower if the start grid goes lower):
  ``u_i = u_top − (u_top − u_floor)·Σ_{j≤i} softmax(z)_j`` with ``N`` logits ``z``, ``z_N = 0`` fixed, so any
  ``z ∈ R^{N−1}`` is a strictly decreasing grid with the same end points (:class:`LogSigmaGrid`).
- Reference: the same ``x_T`` integrated by the adaptive RK45 solver (tight tolerances) down to ``σ_e = u_floor``'s
  ``σ``, finished with ``x ← α x̂0`` as a grid ending there is (:func:`reference_solve`).
- Loss: the mean squared endpoint error per dimension, ``mean((x_N − x_ref)²)``, on ``fit`` draws (fixed noise, so
  the objective is deterministic); the error reported is the RMSE on separate ``heldout`` draws.
- Optimiser: Nelder–Mead (scipy, ``adaptive=True``, Gao & Han 2012) on ``z`` from the start grid. The samplers
  are torch code without gradients (``no_grad``, coefficients as python floats), so the search is derivative-free
  and runs the sampler's own ``sample`` — any deterministic sampler can be tuned unchanged.
- Acceptance: a fit whose held-out error is not below the start grid's is rejected and the start grid kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from diffusion_lab.atomic import atomic_write_json
from diffusion_lab.cache_files import sha256_of
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.records import RecordError, TypeSpec, check_record, is_number, read_record, short_repr
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.samplers.grids import (
    EDM_SIGMA_MAX,
    F64,
    GridOptions,
    schedule_alpha_sigma,
    schedule_t_from_log_snr,
    sigma_range,
)
from diffusion_lab.samplers.ode import RK45Sampler
from diffusion_lab.schema.jobs import FitOptions  # re-exported: the fit's options, declared once

# Smallest share of the log-σ range a start-grid increment is given when it is 0 (a start grid whose last point
# before t = 0 is the floor itself): its logit must be finite.
MIN_SHARE = 1e-4
# Nelder–Mead's first simplex: each logit moved by this much (a factor e^0.5 on one increment).
SIMPLEX_STEP = 0.5
# Held-out draws re-solved with 10× tighter tolerances to estimate the reference's own error.
REFERENCE_CHECK = 16


class LogSigmaGrid:
    """Monotone map from logits ``z (N−1,)`` to a ``(N+1,)`` float64 grid (module docstring).

    ``t_0`` and ``t_N = 0`` are the start grid's; interior ``σ_e`` lie in ``(σ_floor, σ_top)``.
    """

    def __init__(self, schedule: NoiseSchedule, start: Tensor, sigma_floor: float) -> None:
        self.schedule, self.steps = schedule, start.numel() - 1
        self.t_0 = float(start[0])
        sigma_e = _sigma_e(schedule, start)
        top = float(sigma_e[0]) if math.isfinite(sigma_e[0]) else max(EDM_SIGMA_MAX, 10.0 * float(sigma_e[1]))
        self.u_top, self.u_floor = math.log(top), math.log(sigma_floor)
        if not self.u_floor < self.u_top:
            raise ValueError(f"the grid's floor σ_e={sigma_floor:.4g} is not below its start σ_e={top:.4g}")

    def grid(self, z: np.ndarray) -> Tensor:
        """``z (N−1,)`` ↦ the ``(N+1,)`` grid ``[t_0, t(u_1), …, t(u_{N−1}), 0]``."""
        logits = torch.cat([torch.as_tensor(z, dtype=F64), torch.zeros(1, dtype=F64)])
        shares = torch.softmax(logits, 0).cumsum(0)[:-1]  # (N−1,) in (0, 1), increasing
        u = self.u_top - (self.u_top - self.u_floor) * shares
        interior = schedule_t_from_log_snr(self.schedule, -2.0 * u)
        return torch.cat([torch.tensor([self.t_0], dtype=F64), interior, torch.zeros(1, dtype=F64)])

    def logits(self, grid: Tensor) -> np.ndarray:
        """The ``z (N−1,)`` whose :meth:`grid` is (close to) ``grid``'s interior; zero increments get
        :data:`MIN_SHARE` of the range."""
        u = torch.log(_sigma_e(self.schedule, grid[1:-1])).clamp(self.u_floor, self.u_top)
        knots = torch.cat([torch.tensor([self.u_top], dtype=F64), u, torch.tensor([self.u_floor], dtype=F64)])
        shares = (-knots.diff() / (self.u_top - self.u_floor)).clamp(min=MIN_SHARE)  # (N,)
        return (shares.log()[:-1] - shares.log()[-1]).numpy()


def _sigma_e(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """``σ/α`` at ``t`` (float64, ``inf`` where ``α = 0``)."""
    alpha, sigma = schedule_alpha_sigma(schedule, t)
    return sigma / alpha


def sigma_floor(schedule: NoiseSchedule, start: Tensor) -> float:
    """The smallest interior ``σ_e``: the σ-grids' default ``sigma_min``, or the start grid's smallest positive
    ``σ_e`` if lower (so the start grid is representable)."""
    floor = sigma_range(schedule, GridOptions()).sigma_min
    sigma_e = _sigma_e(schedule, start[:-1])
    return min(floor, float(sigma_e.min()))


def run_batched(fn: Callable[[Tensor, Tensor | None], Tensor], x: Tensor, y: Tensor | None, batch: int) -> Tensor:
    """``fn`` over ``x (B, ...)`` (and labels ``y (B,)``) in chunks of ``batch``; outputs concatenated."""
    outs = [fn(x[i : i + batch], None if y is None else y[i : i + batch]) for i in range(0, x.shape[0], batch)]
    return torch.cat(outs)


def reference_solve(
    denoiser: Denoiser, x_T: Tensor, t_0: float, floor: float, clip_x0: float | None, rtol: float, atol: float,
    y: Tensor | None = None, batch: int = 256,
) -> tuple[Tensor, int]:  # fmt: skip
    """RK45 from ``t_0`` to ``σ_e = floor`` then ``x ← α x̂0`` (``σ = 0`` at ``t = 0``); ``x_T (B, ...)`` →
    ``(x_ref (B, ...), evaluations: Σ NFE × examples)``. ``clip_x0``: the tuned sampler's (it defines the ODE)."""
    solver = RK45Sampler(rtol=rtol, atol=atol, sigma_stop=floor, clip_x0=clip_x0)
    grid, calls = torch.tensor([t_0, 0.0], dtype=F64), [0]

    def solve(x: Tensor, lab: Tensor | None) -> Tensor:
        out = solver.sample(denoiser, x, y=lab, t_grid=grid)
        calls[0] += out.nfe * x.shape[0]
        return out.x0

    return run_batched(solve, x_T, y, batch), calls[0]


class EndpointError:
    """``grid ↦ mean((x_N − x_ref)²)`` of ``sampler`` on fixed draws ``x_T (B, ...)``; ``evals`` counts the
    denoiser's evaluations of single examples (NFE × examples)."""

    def __init__(
        self, sampler: Sampler, denoiser: Denoiser, x_T: Tensor, x_ref: Tensor, y: Tensor | None, batch: int
    ) -> None:
        self.sampler, self.denoiser, self.x_T, self.x_ref, self.y, self.batch = sampler, denoiser, x_T, x_ref, y, batch
        self.evals = 0

    def __call__(self, grid: Tensor) -> float:
        def run(x: Tensor, lab: Tensor | None) -> Tensor:
            out = self.sampler.sample(self.denoiser, x, y=lab, t_grid=grid)
            self.evals += out.nfe * x.shape[0]
            return out.x0

        x_N = run_batched(run, self.x_T, self.y, self.batch)
        return float((x_N.double() - self.x_ref.double()).square().mean())


def check_deterministic(sampler: Sampler, denoiser: Denoiser, x_T: Tensor, grid: Tensor, y: Tensor | None) -> int:
    """Raise unless ``sampler`` maps ``x_T (B, ...)`` to the same endpoint under two different noise generators;
    returns the evaluations spent (NFE × examples)."""
    outs = [sampler.sample(denoiser, x_T, y=y, t_grid=grid, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    if not torch.equal(outs[0].x0, outs[1].x0):
        raise ValueError(
            f"sampler {sampler.name!r} draws noise while it samples (its endpoint is not a function of x_T), so no "
            "grid can be fitted to a reference solve of the same noise; tune a deterministic sampler: dpm_solver, "
            "unipc, heun, euler or ddim with s_churn=0 and eta=0"
        )
    return (outs[0].nfe + outs[1].nfe) * x_T.shape[0]


@dataclass(frozen=True)
class GridFit:
    """A fitted grid and its record. ``grid``/``start``: ``(N+1,)`` float64; errors are RMSE per dimension
    against the reference on the fit and held-out draws, before (start grid) and after (``grid``);
    ``accepted``: the fit beat the start on held-out draws (else ``grid`` is the start grid);
    ``reference_error``: RMSE of the reference against one with 10× tighter tolerances (:data:`REFERENCE_CHECK`
    held-out draws), which the errors cannot resolve below.
    Cost: ``loss_evaluations`` of the search; ``sampler_evals`` / ``reference_evals``: denoiser evaluations of one
    example (NFE × examples) by the tuned sampler (search, checks and reports) and by the reference solver."""

    grid: Tensor
    start: Tensor
    fit_before: float
    fit_after: float
    heldout_before: float
    heldout_after: float
    accepted: bool
    loss_evaluations: int
    sampler_evals: int
    reference_evals: int
    reference_error: float
    sigma_floor: float
    wall_s: float


def fit_grid(
    sampler: Sampler, denoiser: Denoiser, x_fit: Tensor, x_heldout: Tensor, options: FitOptions,
    y_fit: Tensor | None = None, y_heldout: Tensor | None = None,
) -> GridFit:  # fmt: skip
    """Fit ``sampler``'s grid (its own ``time_grid`` is the start) to ``denoiser`` on noise ``x_fit (B, ...)``
    (drawn at the start grid's ``t_0``); report on ``x_heldout (B', ...)``. See the module docstring."""
    began = time.perf_counter()
    start = sampler.time_grid(denoiser.schedule)
    checked = check_deterministic(sampler, denoiser, x_fit[:4], start, None if y_fit is None else y_fit[:4])
    floor = sigma_floor(denoiser.schedule, start)
    ref = float(start[0]), floor, sampler.clip_x0, options.reference_rtol, options.reference_atol
    fit_ref, ref_a = reference_solve(denoiser, x_fit, *ref, y=y_fit, batch=options.batch_size)
    held_ref, ref_b = reference_solve(denoiser, x_heldout, *ref, y=y_heldout, batch=options.batch_size)
    ref_error, ref_c = _reference_error(denoiser, x_heldout, held_ref, ref, y_heldout)
    loss = EndpointError(sampler, denoiser, x_fit, fit_ref, y_fit, options.batch_size)
    held = EndpointError(sampler, denoiser, x_heldout, held_ref, y_heldout, options.batch_size)
    param = LogSigmaGrid(denoiser.schedule, start, floor)
    z, evaluations = _search(loss, param, start, options.max_evals) if start.numel() > 2 else (None, 0)
    candidate = start if z is None else param.grid(z)
    held_before, held_after = held(start), held(candidate)
    accepted = held_after < held_before
    grid = candidate if accepted else start
    fit_before, fit_after = loss(start), loss(grid)
    return GridFit(
        grid=grid, start=start, fit_before=math.sqrt(fit_before), fit_after=math.sqrt(fit_after),
        heldout_before=math.sqrt(held_before), heldout_after=math.sqrt(min(held_after, held_before)),
        accepted=bool(accepted), loss_evaluations=evaluations, sampler_evals=loss.evals + held.evals + checked,
        reference_evals=ref_a + ref_b + ref_c, reference_error=ref_error, sigma_floor=floor,
        wall_s=time.perf_counter() - began,
    )  # fmt: skip


def _reference_error(
    denoiser: Denoiser, x_T: Tensor, x_ref: Tensor, ref: tuple[float, float, float | None, float, float],
    y: Tensor | None,
) -> tuple[float, int]:  # fmt: skip
    """RMSE between ``x_ref`` and a 10× tighter solve of the first :data:`REFERENCE_CHECK` draws; and its cost."""
    t_0, floor, clip_x0, rtol, atol = ref
    n = min(REFERENCE_CHECK, x_T.shape[0])
    tight, evals = reference_solve(
        denoiser, x_T[:n], t_0, floor, clip_x0, rtol / 10, atol / 10, None if y is None else y[:n]
    )
    return float((tight.double() - x_ref[:n].double()).square().mean().sqrt()), evals


def _search(loss: EndpointError, param: LogSigmaGrid, start: Tensor, max_evals: int) -> tuple[np.ndarray, int]:
    """Nelder–Mead on the logits from the start grid's; returns the best logits and the evaluations used."""
    z0 = param.logits(start)
    simplex = np.vstack([z0, z0 + SIMPLEX_STEP * np.eye(z0.size)])
    result = minimize(
        lambda z: loss(param.grid(z)), z0, method="Nelder-Mead",
        options={"maxfev": max_evals, "initial_simplex": simplex, "adaptive": True, "xatol": 1e-3, "fatol": 0.0},
    )  # fmt: skip
    return np.asarray(result.x), int(result.nfev)


# ------------------------------------------------------------------------------------------------ grid files

GRID_FORMAT = "diffusion_lab.tuned_grid/1"


def grid_dir(ckpt_path: str | Path) -> Path:
    """The folder of the grids fitted for a checkpoint: ``<ckpt dir>/grids/<ckpt stem>``."""
    ckpt = Path(ckpt_path)
    return ckpt.parent / "grids" / ckpt.stem


def grid_file(ckpt_path: str | Path, sampler_name: str, steps: int) -> Path:
    """Where the grid fitted for a checkpoint, sampler and step count lives:
    ``<ckpt dir>/grids/<ckpt stem>/<sampler>_<steps>.json``."""
    return grid_dir(ckpt_path) / f"{sampler_name}_{steps}.json"


def sampler_identity(sampler_config: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings a tuned grid belongs to: its config without ``grid`` (the start grid when fitting,
    ``tuned`` when used)."""
    return {k: v for k, v in sorted(sampler_config.items()) if k != "grid"}


def tune_command(ckpt_path: str | Path, sampler_name: str, steps: int) -> str:
    """The command that fits the grid :func:`load_tuned_grid` looks for."""
    return (
        f"dlab-tune-grid ckpt_path={ckpt_path} sampler={sampler_name} sampler.steps={steps} "
        "(with the same other sampler.* settings)"
    )


# What :func:`load_tuned_grid` reads from a grid record (dotted: nested); the rest of the record is its protocol.
GRID_RECORD_KEYS: dict[str, TypeSpec] = {
    "grid": list,
    "sampler_name": str,
    "steps": int,
    "sampler": dict,
    "ema": bool,
    "checkpoint": dict,
    "checkpoint.sha256": str,
    "checkpoint.global_step": (int, type(None)),
}
GRID_RECORD = "sampler.grid=tuned: the grid record"  # what a grid file is called in messages


def _grid_problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with a record's keys and its ``grid`` (``steps + 1`` numbers); empty when nothing is."""
    problems = check_record(record, GRID_RECORD_KEYS)
    if problems:
        return problems
    grid, steps = record["grid"], record["steps"]
    if len(grid) != steps + 1 or not all(is_number(v) for v in grid):
        return [f"key 'grid' is {short_repr(grid)}, expected a list of steps + 1 = {steps + 1} numbers"]
    return []


def read_grid_record(path: Path, fix: str | None = None) -> dict[str, Any]:
    """A grid file read back and checked: format :data:`GRID_FORMAT`, every key of :data:`GRID_RECORD_KEYS` with
    its type, and ``grid`` a list of ``steps + 1`` numbers.

    Raises:
        RecordError: naming the file and every problem (truncated at byte N, missing key K, key K of type X), with
            ``fix`` (the command that fits the grid again).
    """
    record = read_record(path, GRID_RECORD_KEYS, GRID_RECORD, version=("format", GRID_FORMAT), fix=fix)
    problems = _grid_problems(record)
    if problems:
        raise RecordError(path, GRID_RECORD, problems, fix)
    return record


def save_grid_record(path: Path, record: dict[str, Any]) -> None:
    """Write a grid record (``grid``: the ``(N+1,)`` list, and its protocol) as JSON, atomically. A record that
    :func:`read_grid_record` would refuse is not written (ValueError naming what is wrong)."""
    problems = _grid_problems(record)
    if problems:
        raise ValueError(f"not writing the grid record {path}: {'; '.join(problems)}")
    atomic_write_json(path, {"format": GRID_FORMAT, **record}, sort_keys=False)


def load_tuned_grid(
    sampler: Sampler, sampler_config: dict[str, Any], ckpt_path: str | Path, use_ema: bool
) -> dict[str, Any]:
    """Attach to ``sampler`` (``grid="tuned"``) the grid fitted for this checkpoint file, sampler settings,
    ``steps`` and weights (EMA or raw); returns the record. Raises ``ValueError`` naming the file and the
    command to create it when there is none, or when it was fitted for something else."""
    path = grid_file(ckpt_path, sampler.name, sampler.steps)
    refit = f"fit one with: {tune_command(ckpt_path, sampler.name, sampler.steps)}"
    if not path.is_file():
        raise ValueError(f"sampler.grid=tuned: no grid was fitted for {ckpt_path} with this sampler: {path} does not "
                         f"exist; {refit}")  # fmt: skip
    record = read_grid_record(path, fix=f"fit it again with: {tune_command(ckpt_path, sampler.name, sampler.steps)}")
    problems = _mismatches(record, sampler, sampler_identity(sampler_config), ckpt_path, use_ema)
    if problems:
        raise ValueError(f"sampler.grid=tuned: {path} was fitted for {'; '.join(problems)}; {refit}")
    sampler.use_tuned_grid(torch.tensor(record["grid"], dtype=F64), str(path))
    return record


def _mismatches(
    record: dict[str, Any], sampler: Sampler, identity: dict[str, Any], ckpt_path: str | Path, use_ema: bool
) -> list[str]:
    """What differs between a grid record (checked by :func:`read_grid_record`) and the request (empty: it fits)."""
    problems = []
    if (record["sampler_name"], record["steps"]) != (sampler.name, sampler.steps):
        problems.append(f"sampler={record['sampler_name']} steps={record['steps']}")
    if record["sampler"] != identity:
        diff = {k: (record["sampler"].get(k), identity.get(k)) for k in set(record["sampler"]) | set(identity)}
        changed = {k: f"{a!r} (fitted) vs {b!r} (asked)" for k, (a, b) in sorted(diff.items()) if a != b}
        problems.append(f"other sampler settings: {changed}")
    if record["ema"] != use_ema:
        problems.append(f"the {'EMA' if record['ema'] else 'raw'} weights, not the {'EMA' if use_ema else 'raw'} ones")
    sha = sha256_of(ckpt_path)
    if record["checkpoint"]["sha256"] != sha:
        ck = record["checkpoint"]
        problems.append(f"checkpoint sha256 {ck['sha256'][:16]}… (step {ck['global_step']}), but {ckpt_path} is "
                        f"{sha[:16]}… now (overwritten, e.g. by further training)")  # fmt: skip
    return problems


def grid_protocol(sampler: Sampler) -> dict[str, Any]:
    """The grid half of a sampling protocol: ``time_grid`` (its name) and ``time_grid_file`` (for ``tuned``, the
    file it was read from; else None)."""
    if isinstance(sampler, RK45Sampler):
        return {"time_grid": "adaptive", "time_grid_file": None}  # RK45 takes only the end points
    return {"time_grid": sampler.grid, "time_grid_file": sampler.tuned_grid_file}
