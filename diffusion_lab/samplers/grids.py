"""Time grids: the decreasing ``(N+1,)`` grids every sampler steps through, and the schedule evaluated on them.

The time grid is data (k-diffusion style): a decreasing ``(N+1,)`` float64 tensor ending at ``t = 0``,
built by a registered grid builder (:data:`TIME_GRIDS`) and handed to the sampler, which sees the model
only through the denoiser contract ``D(x_t, t, y) -> x̂0`` (:class:`CountingDenoiser`) and the schedule's
``(α_t, σ_t)``.

Grids (``N`` = steps, ``T`` = a discrete schedule's ``num_timesteps``, ``σ_e = σ/α = e^{−λ/2}``):

- ``uniform``: uniform in ``t`` (snapped to the integer steps of a discrete schedule);
- ``leading`` / ``trailing``: diffusers' ``timestep_spacing`` of the same name (Lin et al. 2024, Table 2) on
  the integer steps of a discrete schedule; diffusers' 0-based timestep ``k`` is our step ``i = k + 1`` at
  ``t = (k + 1)/T``;
- ``karras``: Karras et al. 2022 eq. 5 in ``σ_e`` (options ``rho``, ``sigma_min``, ``sigma_max``);
- ``log_snr``: uniform in ``λ`` over the same ``σ_e`` range (options ``sigma_min``, ``sigma_max``);
- ``time_power``: eq. 5's ramp in ``t`` from 1 to the time of ``sigma_min`` (options ``rho``, default 2: DPM-Solver's
  ``time_quadratic``; ``sigma_min``).

Every grid ends at ``t = 0``. The σ-grids start at ``t = 1`` unless ``sigma_max`` is below the schedule's
``σ_e(1)`` (or that is infinite, zero terminal SNR), and ``leading`` starts below ``t = 1`` by construction;
:meth:`Sampler.prior` draws ``x_T`` at the grid's first point.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule

F64 = torch.float64

# Karras et al. 2022, Table 1 (EDM): σ range used where the schedule's own σ/α range is unbounded.
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
# Karras et al. 2022, eq. 5 and Table 1: ρ = 7.
DEFAULT_RHO = 7.0
# Relative tolerance when comparing a requested σ with the schedule's end values.
_SIGMA_RTOL = 1e-9


def schedule_alpha_sigma(schedule: NoiseSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(α_t, σ_t)`` as CPU float64 tensors (shape of ``t``), evaluated on the schedule's own device."""
    ref = next(itertools.chain(schedule.parameters(), schedule.buffers()), None)
    t = t.to(device=ref.device if ref is not None else "cpu", dtype=F64)
    with torch.no_grad():
        alpha, sigma = schedule.alpha_sigma(t)
    return alpha.double().cpu(), sigma.double().cpu()


def schedule_t_from_log_snr(schedule: NoiseSchedule, log_snr: Tensor) -> Tensor:
    """``t(λ)`` as a CPU float64 tensor (shape of ``log_snr``), evaluated on the schedule's own device."""
    ref = next(itertools.chain(schedule.parameters(), schedule.buffers()), None)
    log_snr = log_snr.to(device=ref.device if ref is not None else "cpu", dtype=F64)
    with torch.no_grad():
        return schedule.t_from_log_snr(log_snr).double().cpu()


# ------------------------------------------------------------------------------------------------ time grids


@dataclass(frozen=True)
class GridOptions:
    """Options of the σ-grids; ``None`` picks the default (see :func:`sigma_range`).

    ``rho``: the exponent ρ of Karras et al. 2022 eq. 5 (``karras``, default 7; ``time_power``, default 2; > 0).
    ``sigma_min``, ``sigma_max``: the range of ``σ_e = σ/α`` (``karras``, ``log_snr``; 0 < σ_min < σ_max).
    """

    rho: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None

    def __post_init__(self) -> None:
        for name in ("rho", "sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"sampler.{name} must be a finite number > 0 (or null for the default), got {value}")
        if self.sigma_min is not None and self.sigma_max is not None and not self.sigma_min < self.sigma_max:
            raise ValueError(f"sampler.sigma_min={self.sigma_min} must be < sampler.sigma_max={self.sigma_max}")

    def given(self) -> list[str]:
        """Names of the options set (not None)."""
        return [k for k, v in asdict(self).items() if v is not None]


GridFn = Callable[[int, NoiseSchedule, GridOptions], Tensor]
TIME_GRIDS: dict[str, GridFn] = {}
GRID_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_grid(name: str, options: tuple[str, ...] = ()) -> Callable[[GridFn], GridFn]:
    """Decorator adding a grid builder ``(steps, schedule, GridOptions) -> (steps+1,) float64`` that accepts
    the :class:`GridOptions` fields named in ``options``."""

    def wrap(fn: GridFn) -> GridFn:
        TIME_GRIDS[name] = fn
        GRID_OPTIONS[name] = options
        return fn

    return wrap


# A grid fitted to one checkpoint (diffusion_lab/samplers/tuning.py), attached by :meth:`Sampler.use_tuned_grid`.
TUNED_GRID = "tuned"
TUNED_GRID_HELP = (
    "sampler.grid=tuned is a grid fitted to one checkpoint, sampler and step count by "
    "`dlab-tune-grid ckpt_path=… sampler=… sampler.steps=N`; dlab-sample and dlab-evaluate load it for their "
    "ckpt_path, and nothing else can use it (e.g. training, whose weights change)"
)


def check_grid(name: str, options: GridOptions) -> None:
    """Raise unless ``name`` is a registered grid (or ``tuned``) and every option set is one that grid accepts."""
    if name not in TIME_GRIDS and name != TUNED_GRID:
        raise ValueError(
            f"unknown sampler.grid {name!r}; valid choices: {sorted(TIME_GRIDS)} or {TUNED_GRID!r} (dlab-tune-grid)"
        )
    allowed = GRID_OPTIONS.get(name, ())
    extra = [k for k in options.given() if k not in allowed]
    if extra:
        accepted = {g: list(o) for g, o in GRID_OPTIONS.items() if o}
        raise ValueError(
            f"sampler.grid={name!r} takes no option {extra}; valid options: {list(allowed)} "
            f"(grids with options: {accepted})"
        )


def _grid_from_timesteps(k: Tensor, T: int) -> Tensor:
    """diffusers' 0-based timesteps ``k`` ``(N,)`` (decreasing) ↦ ``t = (k + 1)/T`` followed by ``t = 0``."""
    return torch.cat([(k.to(F64) + 1) / T, torch.zeros(1, dtype=F64)])


def _discrete_steps(schedule: NoiseSchedule, name: str, steps: int) -> int:
    """The discrete schedule's ``T``; raises for a continuous schedule or ``steps > T``."""
    T = schedule.num_timesteps
    if T is None:
        raise ValueError(
            f"sampler.grid={name!r} spaces the integer timesteps of a discrete-time schedule, but the schedule is "
            "continuous (num_timesteps=None); valid choices there: ['karras', 'log_snr', 'uniform']"
        )
    if steps > T:
        raise ValueError(f"sampler.steps={steps} exceeds the discrete schedule's T={T} timesteps")
    return T


@register_grid("uniform")
def uniform_grid(steps: int, schedule: NoiseSchedule, options: GridOptions) -> Tensor:
    """Uniform in ``t`` from 1 to 0; a discrete schedule snaps to integer steps (evenly respaced)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    T = schedule.num_timesteps
    if T is not None:
        if steps > T:
            raise ValueError(f"sampler.steps={steps} exceeds the discrete schedule's T={T} timesteps")
        grid = torch.round(grid * T) / T
    return grid


# diffusers DDIMScheduler.set_timesteps, timestep_spacing="leading" (steps_offset=0); Lin et al. 2024, Table 2.
@register_grid("leading")
def leading_grid(steps: int, schedule: NoiseSchedule, options: GridOptions) -> Tensor:
    """``k = j·⌊T/N⌋`` for ``j = N−1..0``; starts at ``t = ((N−1)⌊T/N⌋ + 1)/T``, below 1 unless ``N = T``."""
    T = _discrete_steps(schedule, "leading", steps)
    return _grid_from_timesteps(torch.arange(steps - 1, -1, -1, dtype=F64) * (T // steps), T)


# diffusers DDIMScheduler.set_timesteps, timestep_spacing="trailing"; Lin et al. 2024, Table 2.
@register_grid("trailing")
def trailing_grid(steps: int, schedule: NoiseSchedule, options: GridOptions) -> Tensor:
    """``k = round(T − j·T/N) − 1`` for ``j = 0..N−1``; starts at ``t = 1``.

    Computed with numpy's ``arange`` as diffusers does, so ties (``x.5``) round identically. For some ``N``
    (e.g. T = 1000, N = 61) diffusers' ``arange`` yields an extra timestep ``k = −1``, i.e. ``t = 0``: our final point.
    """
    T = _discrete_steps(schedule, "trailing", steps)
    k = np.round(np.arange(T, 0, -T / steps))[:steps] - 1
    return _grid_from_timesteps(torch.from_numpy(k), T)


@dataclass(frozen=True)
class SigmaRange:
    """``σ_e`` range of a σ-grid: ``sigma_min``, ``sigma_max``; ``starts_at_one``: ``sigma_max`` is the schedule's
    ``σ_e(1)`` (the first point is ``t = 1``); ``ends_at_min``: ``sigma_min`` is the schedule's ``σ_e(0) > 0``
    (the last point ``t = 0`` is ``sigma_min`` itself, not ``σ_e = 0``)."""

    sigma_min: float
    sigma_max: float
    starts_at_one: bool
    ends_at_min: bool


def sigma_range(schedule: NoiseSchedule, options: GridOptions) -> SigmaRange:
    """The ``σ_e`` range of the ``karras`` / ``log_snr`` grids on ``schedule``.

    Defaults: ``sigma_max = σ_e(1)``, or EDM's 80 when that is infinite (zero terminal SNR);
    ``sigma_min = σ_e(1/T)`` (the first step) for a discrete schedule, else ``σ_e(0)`` when positive (VE),
    else EDM's 0.002. A requested range outside ``[σ_e(0), σ_e(1)]`` raises.
    """
    lam_1, lam_0 = schedule.log_snr_bounds()
    top, bottom = math.exp(-0.5 * lam_1), math.exp(-0.5 * lam_0)  # σ_e(1) (inf at zero SNR), σ_e(0) (0 unless VE)
    hi = options.sigma_max if options.sigma_max is not None else (top if math.isfinite(top) else EDM_SIGMA_MAX)
    if options.sigma_min is not None:
        lo = options.sigma_min
    elif schedule.num_timesteps is not None:
        a, s = schedule_alpha_sigma(schedule, torch.tensor([1.0 / schedule.num_timesteps], dtype=F64))
        lo = float(s[0] / a[0])
    else:
        lo = bottom if bottom > 0 else EDM_SIGMA_MIN
    if hi > top * (1 + _SIGMA_RTOL):
        raise ValueError(f"sampler.sigma_max={hi} exceeds the schedule's largest σ/α = σ_e(1) = {top:.6g}")
    if lo < bottom * (1 - _SIGMA_RTOL):
        raise ValueError(f"sampler.sigma_min={lo} is below the schedule's smallest σ/α = σ_e(0) = {bottom:.6g}")
    if not lo < hi:
        raise ValueError(f"the σ-grid needs sigma_min < sigma_max, got {lo:.6g} and {hi:.6g} on this schedule")
    starts = math.isfinite(top) and hi >= top * (1 - _SIGMA_RTOL)
    ends = bottom > 0 and lo <= bottom * (1 + _SIGMA_RTOL)
    return SigmaRange(lo, hi, starts, ends)


def _grid_from_log_snr(log_snr: Tensor, schedule: NoiseSchedule, rng: SigmaRange) -> Tensor:
    """Decreasing ``λ`` points ↦ times; exactly 1 / 0 at the schedule's own ends; ``t = 0`` appended unless the
    last point already is ``σ_e(0)``."""
    t = schedule_t_from_log_snr(schedule, log_snr)
    if rng.starts_at_one:
        t[0] = 1.0
    if rng.ends_at_min:
        t[-1] = 0.0
        return t
    return torch.cat([t, torch.zeros(1, dtype=F64)])


# Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, σ_N = 0.
@register_grid("karras", options=("rho", "sigma_min", "sigma_max"))
def karras_grid(steps: int, schedule: NoiseSchedule, options: GridOptions) -> Tensor:
    """Eq. 5 in ``σ_e = σ/α``, mapped to ``t`` by ``t_from_log_snr(−2 log σ_e)``; ``σ_N = 0`` is ``t = 0``.

    When ``sigma_min`` is the schedule's ``σ_e(0) > 0`` (VE: ``t = 0`` is not noise-free) ``σ = 0`` is unreachable
    and the ``N + 1`` points follow eq. 5 with ``i/N`` down to ``σ_min`` at ``t = 0``.
    """
    rng = sigma_range(schedule, options)
    rho = options.rho if options.rho is not None else DEFAULT_RHO
    ramp = torch.linspace(0.0, 1.0, steps + 1 if rng.ends_at_min else steps, dtype=F64)
    hi, lo = rng.sigma_max ** (1 / rho), rng.sigma_min ** (1 / rho)
    return _grid_from_log_snr(-2.0 * rho * torch.log(hi + ramp * (lo - hi)), schedule, rng)


# Uniform in λ (Lu et al. 2022, DPM-Solver §3.3 "logSNR" steps); the λ range is karras's σ range.
@register_grid("log_snr", options=("sigma_min", "sigma_max"))
def log_snr_grid(steps: int, schedule: NoiseSchedule, options: GridOptions) -> Tensor:
    """``λ_i`` evenly spaced from ``−2 log σ_max`` to ``−2 log σ_min`` (ρ → ∞ limit of ``karras``), then ``t = 0``."""
    rng = sigma_range(schedule, options)
    n = steps + 1 if rng.ends_at_min else steps
    log_snr = torch.linspace(-2.0 * math.log(rng.sigma_max), -2.0 * math.log(rng.sigma_min), n, dtype=F64)
    return _grid_from_log_snr(log_snr, schedule, rng)


# Karras et al. 2022 eq. 5's ramp applied to t: ρ = 2 is DPM-Solver's "time_quadratic" steps (Lu et al. 2022a §3.3).
@register_grid("time_power", options=("rho", "sigma_min"))
def time_power_grid(steps: int, schedule: NoiseSchedule, options: GridOptions) -> Tensor:
    """``t_i = (1 + i/(N−1)·(t_min^{1/ρ} − 1))^ρ`` for ``i < N``, then ``t = 0``; ``ρ`` defaults to 2.

    ``t_min`` is the time of ``sigma_min`` (the σ-grids' default: ``t = 1/T`` on a discrete schedule); on VE, where
    that is ``t = 0`` itself, the ``N + 1`` points run the ramp to 0. ``ρ = 1`` is uniform in t down to ``t_min``.
    """
    rng = sigma_range(schedule, GridOptions(sigma_min=options.sigma_min))
    rho = options.rho if options.rho is not None else 2.0
    t_min = (
        0.0
        if rng.ends_at_min
        else float(schedule_t_from_log_snr(schedule, torch.tensor(-2.0 * math.log(rng.sigma_min))))
    )
    ramp = torch.linspace(0.0, 1.0, steps + 1 if rng.ends_at_min else steps, dtype=F64)
    t = (1.0 + ramp * (t_min ** (1.0 / rho) - 1.0)) ** rho
    t[0] = 1.0
    return t if rng.ends_at_min else torch.cat([t, torch.zeros(1, dtype=F64)])


def time_grid(
    name: str,
    steps: int,
    schedule: NoiseSchedule,
    rho: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """The named ``(steps+1,)`` float64 grid, strictly decreasing to ``t = 0``; bad names or options raise."""
    options = GridOptions(rho, sigma_min, sigma_max)
    check_grid(name, options)
    if steps < 1:
        raise ValueError(f"sampler.steps must be a positive integer, got {steps}")
    if name == TUNED_GRID:
        raise ValueError(TUNED_GRID_HELP)
    grid = TIME_GRIDS[name](steps, schedule, options)
    if grid.shape != (steps + 1,) or not bool((grid[1:] < grid[:-1]).all()) or grid[-1] != 0 or grid[0] > 1:
        raise ValueError(
            f"sampler.grid={name!r} with steps={steps} gives no strictly decreasing grid in [0, 1] on this schedule "
            f"(too many steps for its σ range?): {grid.tolist()[:8]}…"
        )
    return grid


# ------------------------------------------------------------------------------------------------ samplers
