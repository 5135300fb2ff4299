"""Probability-flow ODE samplers: Euler, Heun with EDM's stochastic churn, and an adaptive RK45 reference.

Euler and Heun follow Karras et al. 2022 (Alg. 1, 2) in the scaled variable ``x̃ = x/α`` with noise level
``σ_e = σ/α = e^{−λ/2}``: since ``x̃ = x0 + σ_e ε``, every schedule (VP, VE, rectified flow, …) becomes EDM's
``s(t) = 1, σ(t) = σ_e`` process, whose PF-ODE is ``dx̃/dσ_e = (x̃ − D(x̃; σ_e))/σ_e = ε̂`` (eq. 3 and 4).
The updates are written with ``(x̂0, ε̂)`` so a first point with ``α = 0`` (zero terminal SNR) stays finite.
Euler on this ODE is DDIM with η = 0 (Song et al. 2021 eq. 12; Karras et al. 2022 §3).

:class:`RK45Sampler` integrates the same ODE adaptively (scipy's Dormand–Prince RK45, as score_sde) in the angle
``φ = arctan(σ/α)`` where ``x̄ = x/√(α² + σ²) = cos φ·x0 + sin φ·ε`` and ``dx̄/dφ = cos φ·ε̂ − sin φ·x̂0`` (the
``v`` of Salimans & Ho 2022 §4): finite at ``α = 0`` and free of the schedule's time warp.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from diffusion_lab.samplers.base import CountingDenoiser, Generator, Sampler, noise_like
from diffusion_lab.samplers.grids import schedule_alpha_sigma, schedule_t_from_log_snr
from diffusion_lab.schema.choices import Grid, RKMethod, values
from diffusion_lab.schema.domains import FINITE_NON_NEGATIVE, NON_NEGATIVE, POSITIVE
from diffusion_lab.schema.signature import enforce_domains

F64 = torch.float64
# Heun takes Karras et al.'s trapezoid on steps with σ_e/σ_e' up to this ratio (HeunSampler.ode_step): EDM's 18-step
# ρ = 7 grids stay below 3.5; karras and log_snr at 3 steps reach 591 and 125.
HEUN_MAX_SIGMA_RATIO = 10.0


def alpha_sigma_at(model: CountingDenoiser, t: float) -> tuple[float, float]:
    """``(α_t, σ_t)`` of the model's schedule at one time, as python floats (float64)."""
    alpha, sigma = schedule_alpha_sigma(model.schedule, torch.tensor([t], dtype=F64))
    return float(alpha[0]), float(sigma[0])


@dataclass(frozen=True)
class Point:
    """A grid point: time ``t`` and the schedule's ``α_t``, ``σ_t`` (python floats)."""

    t: float
    alpha: float
    sigma: float

    @property
    def sigma_e(self) -> float:
        """``σ/α`` (EDM's σ), ``+∞`` at ``α = 0``."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf


class ScaledODESampler(Sampler, ABC):
    """Shared loop of :class:`EulerSampler` and :class:`HeunSampler`: churn (Alg. 2 l. 4–6), then one ODE step.

    ``s_churn`` ≥ 0: total churn ``Σγ``; each step raises ``σ_e`` by ``γ = min(s_churn/N, √2 − 1)`` while
    ``s_tmin ≤ σ_e ≤ s_tmax``, adding fresh noise of std ``s_noise·√(σ̂² − σ_e²)``. ``s_churn = 0`` (the
    default) is the deterministic Alg. 1. ``σ_e`` thresholds are in units of ``σ/α`` (EDM's σ).
    """

    @enforce_domains
    def __init__(
        self,
        steps: int = 50,
        *,
        s_churn: Annotated[float, FINITE_NON_NEGATIVE] = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: Annotated[float, NON_NEGATIVE] = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(steps, **options)
        if not 0 <= s_tmin <= s_tmax:
            raise ValueError(f"sampler needs 0 <= s_tmin <= s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        alpha, sigma = schedule_alpha_sigma(model.schedule, grid)
        steps = grid.numel() - 1
        for i in self.intervals(grid, progress):
            cur = Point(float(grid[i]), float(alpha[i]), float(sigma[i]))
            cur, x = self.churn(model, x, cur, steps, generator)
            x = self.ode_step(model, x, cur, Point(float(grid[i + 1]), float(alpha[i + 1]), float(sigma[i + 1])), y)
        return x

    # Karras et al. 2022, Alg. 2 lines 4–6: σ̂ = (1 + γ)σ, x̂ = x + √(σ̂² − σ²)·S_noise·z, in x̃ = x/α.
    def churn(
        self, model: CountingDenoiser, x: Tensor, cur: Point, steps: int, generator: Generator
    ) -> tuple[Point, Tensor]:
        """``(t̂, x_t̂)``: the raised noise level and the state there (``(cur, x)`` unchanged when γ = 0)."""
        s = cur.sigma_e
        if self.s_churn == 0 or not (math.isfinite(s) and self.s_tmin <= s <= self.s_tmax):
            return cur, x
        gamma = min(self.s_churn / steps, math.sqrt(2.0) - 1.0)
        t_hat = float(schedule_t_from_log_snr(model.schedule, torch.tensor([-2.0 * math.log(s * (1 + gamma))]))[0])
        t_hat = min(max(t_hat, cur.t), 1.0)  # σ̂ beyond σ_e(1) is capped at t = 1
        hat = Point(t_hat, *alpha_sigma_at(model, t_hat))
        if not (math.isfinite(hat.sigma_e) and hat.sigma_e > s):
            return cur, x
        x_tilde = x / cur.alpha + math.sqrt(hat.sigma_e**2 - s**2) * self.s_noise * noise_like(x, generator)
        return hat, hat.alpha * x_tilde

    @abstractmethod
    def ode_step(self, model: CountingDenoiser, x: Tensor, cur: Point, nxt: Point, y: Tensor | None) -> Tensor:
        """One PF-ODE step from ``cur`` to ``nxt`` (``nxt.t < cur.t``)."""


# Karras et al. 2022, Alg. 1 without lines 6–8 (Euler); in (α, σ) form this is DDIM η = 0 (Song et al. 2021 eq. 12).
class EulerSampler(ScaledODESampler):
    """Euler on ``dx̃/dσ_e = ε̂``: ``x̃' = x̃ + (σ_e' − σ_e)·ε̂``, i.e. ``x' = α' x̂0 + σ' ε̂``. NFE = steps.

    With ``s_churn > 0`` it is k-diffusion's stochastic Euler (Alg. 2 with the Euler step only).
    """

    name = "euler"

    def ode_step(self, model: CountingDenoiser, x: Tensor, cur: Point, nxt: Point, y: Tensor | None) -> Tensor:
        x0_hat, eps_hat = model.x0_eps(x, cur.t, cur.alpha, cur.sigma, y)
        # x̃ + (σ_e' − σ_e)·ε̂ = x̂0 + σ_e'·ε̂ (as x̃ = x̂0 + σ_e ε̂), finite also at α = 0.
        return nxt.alpha * x0_hat + nxt.sigma * eps_hat


# Karras et al. 2022, Alg. 1 (and Alg. 2 with s_churn > 0): Heun's 2nd-order method, Euler on the step to σ = 0.
class HeunSampler(ScaledODESampler):
    """Heun (explicit trapezoid) on ``dx̃/dσ_e = ε̂``.

    NFE = 2·steps − 1 when the grid ends at ``σ = 0`` (VP, rectified flow: that step is Euler, Alg. 1 l. 6),
    2·steps when it ends at ``σ_e(0) > 0`` (VE); a first step from ``α = 0`` (``σ_e = ∞``, zero terminal SNR),
    where the trapezoid has no limit, is also Euler (one NFE less). A step dividing ``σ_e`` by more than
    ``HEUN_MAX_SIGMA_RATIO`` = 10 (only at a few steps) combines the same two evaluations by the exponential trapezoid
    instead of Alg. 1 l. 8, which diverges there (tests/samplers/test_step_ratios.py).
    """

    name = "heun"

    def ode_step(self, model: CountingDenoiser, x: Tensor, cur: Point, nxt: Point, y: Tensor | None) -> Tensor:
        x0_hat, eps_hat = model.x0_eps(x, cur.t, cur.alpha, cur.sigma, y)
        x_euler = nxt.alpha * x0_hat + nxt.sigma * eps_hat
        if nxt.sigma == 0 or cur.alpha == 0:
            return x_euler
        x0_next, eps_next = model.x0_eps(x_euler, nxt.t, nxt.alpha, nxt.sigma, y)
        ratio = nxt.sigma_e / cur.sigma_e
        if ratio < 1.0 / HEUN_MAX_SIGMA_RATIO:
            # The trapezoid's correction is (σ_e/σ_e' − 1)/2 times the change of x̂0 over the step, so over a large
            # ratio it overshoots (Heun diverged at NFE 5 on karras/log_snr, as k-diffusion's does). The same two
            # evaluations then enter the exponential trapezoid (DPM-Solver-2 of Lu et al. 2022a with r = 1, in
            # x̃ = x/α): x̃' = ρ x̃ + (1 − ρ)(x̂0 + x̂0')/2 with ρ = σ_e'/σ_e, a convex combination.
            return nxt.alpha * (ratio * x / cur.alpha + (1.0 - ratio) * 0.5 * (x0_hat + x0_next))
        # Alg. 1 l. 8: x̃' = x̃ + (σ_e' − σ_e)·(d + d')/2 with d = ε̂ at (x̃, σ_e), d' = ε̂ at the Euler point.
        h = nxt.sigma_e - cur.sigma_e
        return nxt.alpha * (x / cur.alpha + h * 0.5 * (eps_hat + eps_next))


# Karras et al. 2022, Alg. 2 with the paper's ImageNet-64 settings (Table 5; EDM README: 256 steps, S_churn = 40,
# S_min = 0.05, S_max = 50, S_noise = 1.003) on the ρ = 7 grid of eq. 5.
class EDMSampler(HeunSampler):
    """:class:`HeunSampler` with EDM's stochastic defaults: ``grid="karras"`` and churn switched on.

    ``s_churn=0`` makes it the deterministic EDM sampler (Alg. 1 on the eq. 5 grid).
    """

    name = "edm"

    def __init__(
        self,
        steps: int = 256,
        *,
        grid: Grid | str = Grid.karras,
        s_churn: float = 40.0,
        s_tmin: float = 0.05,
        s_tmax: float = 50.0,
        s_noise: float = 1.003,
        **options: Any,
    ) -> None:
        super().__init__(steps, grid=grid, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, **options)


RK_METHODS = values(RKMethod)


class AngleODE:
    """The PF-ODE in ``φ = arctan(σ/α)``: ``dx̄/dφ = cos φ·ε̂ − sin φ·x̂0`` with ``x̄ = x/√(α² + σ²)``.

    ``start``/``end``: the grid's end points; ``phi_end`` is ``end``'s angle, or ``arctan(sigma_stop)`` when
    ``end`` has ``σ = 0`` (the ODE is not evaluated at ``σ = 0``, where ``ε̂ = (x − αx̂0)/σ`` is undefined).
    """

    def __init__(self, model: CountingDenoiser, like: Tensor, y: Tensor | None, start: Point, end: Point, stop: float):
        self.model, self.like, self.y, self.start, self.end = model, like, y, start, end
        self.phi_start = math.atan2(start.sigma, start.alpha)
        self.phi_end = math.atan2(end.sigma, end.alpha) if end.sigma > 0 else math.atan(stop)
        if not self.phi_end < self.phi_start:
            raise ValueError(f"sampler.sigma_stop={stop} must be below σ/α at the grid's start")

    def point(self, phi: float) -> Point:
        """The grid point at angle ``phi`` (the end points exactly, else ``t = t(λ = −2 log tan φ)``)."""
        if phi >= self.phi_start:
            return self.start
        if self.end.sigma > 0 and phi <= self.phi_end:
            return self.end
        t = float(schedule_t_from_log_snr(self.model.schedule, torch.tensor([-2.0 * math.log(math.tan(phi))]))[0])
        return Point(t, *alpha_sigma_at(self.model, t))

    def to_x(self, x_bar: Tensor, point: Point) -> Tensor:
        """``x = √(α² + σ²)·x̄`` on the sampler's device and dtype."""
        return (math.hypot(point.alpha, point.sigma) * x_bar).to(device=self.like.device, dtype=self.like.dtype)

    def drift(self, phi: float, flat: np.ndarray) -> np.ndarray:
        """``dx̄/dφ`` for scipy: flat float64 ``x̄`` in, flat float64 drift out; one evaluation."""
        point = self.point(phi)
        x_t = self.to_x(torch.from_numpy(flat).reshape(self.like.shape), point)
        x0_hat, eps_hat = (v.double().cpu() for v in self.model.x0_eps(x_t, point.t, point.alpha, point.sigma, self.y))
        return (math.cos(phi) * eps_hat - math.sin(phi) * x0_hat).reshape(-1).numpy()


# Song et al. 2021, §4.3 / App. D.1 (score_sde's ODE sampler: scipy RK45, rtol = atol = 1e-5) in the angle φ.
class RK45Sampler(Sampler):
    """Adaptive Runge–Kutta reference solver of the PF-ODE (``scipy.integrate.solve_ivp``), see :class:`AngleODE`.

    Integrates from the grid's first to its last point (only the end points are used; by default ``t = 1 → 0``).
    ``rtol``, ``atol``: the solver's tolerances on ``x̄`` (data scale, > 0); ``method``: one of :data:`RK_METHODS`
    (``RK45`` = Dormand–Prince 5(4)). A grid ending at ``σ = 0`` is integrated to ``σ/α = sigma_stop`` (> 0) and
    finished with the Euler/DDIM step to ``σ = 0`` (``x ← α x̂0``, one more NFE, as Heun's last step). NFE is what
    the solver really used (every evaluation, rejected steps included). All examples share one step size (scipy's
    error norm runs over the whole batch) and the state goes through the CPU in float64.
    """

    name = "rk45"

    @enforce_domains
    def __init__(
        self,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        method: RKMethod | str = RKMethod.RK45,
        sigma_stop: Annotated[float, POSITIVE] = 1e-4,
        clip_x0: float | None = None,
    ) -> None:
        super().__init__(steps=1, grid="uniform", clip_x0=clip_x0)
        if not (rtol > 0 and atol > 0):  # one rule on the pair
            raise ValueError(f"sampler tolerances must be > 0, got rtol={rtol}, atol={atol}")
        method = getattr(method, "value", method)  # a config enum member -> its name
        if method not in RK_METHODS:
            raise ValueError(f"unknown sampler.method {method!r}; valid choices: {list(RK_METHODS)}")
        self.rtol, self.atol, self.method, self.sigma_stop = rtol, atol, method, sigma_stop

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        t_0, t_1 = float(grid[0]), float(grid[-1])
        start, end = Point(t_0, *alpha_sigma_at(model, t_0)), Point(t_1, *alpha_sigma_at(model, t_1))
        ode = AngleODE(model, x, y, start, end, self.sigma_stop)
        x_bar = (x.double().cpu() / math.hypot(start.alpha, start.sigma)).reshape(-1).numpy()
        span = (ode.phi_start, ode.phi_end)
        sol = solve_ivp(
            ode.drift, span, x_bar, method=self.method, t_eval=[ode.phi_end], rtol=self.rtol, atol=self.atol
        )
        if not sol.success:
            raise RuntimeError(f"{self.method} failed: {sol.message}")
        x_bar_end = torch.from_numpy(sol.y[:, -1]).reshape(x.shape)
        if end.sigma > 0:
            return ode.to_x(x_bar_end, end)
        stop = ode.point(ode.phi_end)
        return end.alpha * model(ode.to_x(x_bar_end, stop), stop.t, y)
