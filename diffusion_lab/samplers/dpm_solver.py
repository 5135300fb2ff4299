"""DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095): exponential integrators of the probability-flow ODE in
data-prediction (x̂0) form — multistep 2M / 3M and single-step 2S.

``λ`` in this module is DPM-Solver's half log-SNR ``λ = log(α/σ)``, HALF of DESIGN.md's ``λ_t = log(α²/σ²)``.
In it the PF-ODE has the exact solution (Lu et al. 2022b §4: the data-prediction form of Lu et al. 2022a, Prop. 3.1)

    x_r = (σ_r/σ_s) x_s + σ_r ∫_{λ_s}^{λ_r} e^{λ} x̂0(x_λ, λ) dλ,

so the linear part is integrated exactly and only x̂0 is approximated, by a polynomial ``P`` in λ through
earlier evaluations (multistep) or an intermediate one (single-step). With ``h = λ_r − λ_s`` and
``σ_r e^{λ} = α_r e^{−(λ_r − λ)}``, integrating the Taylor expansion of ``P`` around ``λ_s`` gives

    x_r = (σ_r/σ_s) x_s + α_r (φ1 P(λ_s) + φ2 h P'(λ_s) + φ3 h² P''(λ_s)),
    φ1 = 1 − e^{−h},  φ2 = 1 − φ1/h,  φ3 = 1/2 − φ2/h.

Only ``α, σ`` on the time grid enter, so VP, VE and rectified-flow schedules are all handled.

Endpoints: where ``σ_r = 0`` (``λ_r = +∞``: ``t = 0`` of VP and rectified flow) the exact ``h → ∞`` limit of the
first-order step is ``x_r = α_r x̂0``: the last step returns x̂0 at the previous grid point (diffusers'
``final_sigmas_type="zero"``). Where ``α_s = 0`` (``λ_s = −∞``: ``t = 1`` of rectified flow or a zero-terminal-SNR
schedule) the step is first order with ``φ1 = 1``, and that evaluation never enters a divided difference.

Third order: diffusers, k-diffusion and the official code weight ``D2 = h² P''/2`` by ``φ3`` instead of ``2φ3``,
which leaves a local error ``O(h³)`` — global order 2. We integrate the quadratic exactly (global order 3;
tests/samplers/test_dpm_solver.py measures it); 1st and 2nd-order steps are identical to diffusers'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lab.samplers.base import CountingDenoiser, Generator, Sampler
from diffusion_lab.samplers.grids import schedule_alpha_sigma
from diffusion_lab.schema.choices import DPMSolverMethod, values

METHODS = values(DPMSolverMethod)
# diffusers' DPMSolverMultistepScheduler lowers the final orders only below this many steps.
LOWER_ORDER_FINAL_BELOW = 15
# A third-order multistep step extrapolates the quadratic through the last three x̂0 over h_i; more than this many
# times the previous step h_{i−1} in λ it is taken at second order (:func:`extrapolation_order_cap`).
MAX_THIRD_ORDER_STEP_RATIO = 2.0


def half_log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """DPM-Solver's ``λ = log α − log σ`` (shape of ``alpha``): ``+∞`` where ``σ = 0``, ``−∞`` where ``α = 0``."""
    return torch.log(alpha) - torch.log(sigma)


def extrapolation_order_cap(lam: Sequence[float], i: int) -> int:
    """The highest multistep order for the step ``lam[i] → lam[i+1]``: 2 where ``h_i > 2·h_{i−1}``, else 3.

    On diffusers' ``leading`` spacing the step into ``t = 1/T`` is 2.9–4.7 times the previous one in λ (``trailing``,
    ``karras``: ≤ 1.6, ``log_snr``: 1), and a quadratic extrapolated that far made 3M's error grow with the step
    count on the ring benchmark (0.31 at 14 steps, 1.05 at 15, where ``lower_order_final`` stops applying; 2M: 0.30,
    0.27; 3M with the cap: 0.31, 0.28). tests/samplers/test_step_ratios.py checks it.
    """
    if i == 0 or math.isinf(lam[i + 1]):
        return 3
    return 2 if lam[i + 1] - lam[i] > MAX_THIRD_ORDER_STEP_RATIO * (lam[i] - lam[i - 1]) else 3


def phi_coefficients(h: float) -> tuple[float, float, float]:
    """``(φ1, φ2, φ3)`` of a step of length ``h > 0`` in λ (module docstring); ``h = ∞`` gives ``(1, 1, 1/2)``."""
    phi1 = -math.expm1(-h)
    phi2 = 1.0 - phi1 / h
    return phi1, phi2, 0.5 - phi2 / h


def midpoint_weights(lam_a: float, lam_b: float, h: float) -> tuple[float, float]:
    """Weights ``(w_a, w_b)`` of ``m_a, m_b`` giving the line through ``(λ_a, m_a)``, ``(λ_b, m_b)`` at ``λ_a + h/2``.

    Times ``φ1`` this is the second-order estimate of Lu et al. 2022b Alg. 1 (2S, ``b`` the intermediate point) and
    Alg. 2 (2M, ``b`` the previous point): ``D = m_a + (m_b − m_a)/(2r)``, ``r = (λ_b − λ_a)/h``.
    """
    c = 0.5 * h / (lam_b - lam_a)
    return 1.0 - c, c


def multistep_weights(lams: Sequence[float], lam_r: float) -> list[float]:
    """Weights ``w`` (oldest first) of ``x_r = (σ_r/σ_s) x_s + α_r Σ_j w_j x̂0_j`` for a step to a finite ``λ_r``.

    ``lams``: λ of the last ``k = len(lams)`` ∈ {1, 2, 3} evaluations, ``λ_s = lams[-1]``; all finite for ``k > 1``.
    """
    h = lam_r - lams[-1]
    phi1, phi2, phi3 = phi_coefficients(h)
    if len(lams) == 1:  # Lu et al. 2022b, DPM-Solver++1 (= DDIM with η = 0, Song et al. 2021 eq. 12)
        return [phi1]
    if len(lams) == 2:  # Lu et al. 2022b Alg. 2 (2M)
        w0, w1 = midpoint_weights(lams[-1], lams[-2], h)
        return [phi1 * w1, phi1 * w0]
    if len(lams) == 3:
        # Quadratic P through the last three x̂0, integrated exactly: φ1 m0 + φ2 h P'(λ_s) + φ3 h² P''(λ_s) with
        # slope_j = (m_j − m_{j+1})/h_j, q = P''/2 = (slope0 − slope1)/(h0 + h1), P'(λ_s) = slope0 + h0 q, so
        # d = φ1 m0 + a·slope0 + b·q with a = φ2 h, b = φ2 h h0 + 2 φ3 h².
        h0, h1 = lams[-1] - lams[-2], lams[-2] - lams[-3]
        a, b = phi2 * h, phi2 * h * h0 + 2.0 * phi3 * h * h
        c0, c1 = (a + b / (h0 + h1)) / h0, b / ((h0 + h1) * h1)  # weights of (m0 − m1) and −(m1 − m2)
        return [c1, -c0 - c1, phi1 + c0]
    raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {len(lams)}")


def linear_combination(weights: Sequence[float], tensors: Sequence[Tensor]) -> Tensor:
    """``Σ_j w_j·tensors_j``, one fused pass per term (``add_`` with a python-float ``alpha``)."""
    out = tensors[0] * weights[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def multistep_update(
    x: Tensor,
    x0_hats: Sequence[Tensor],
    lams: Sequence[float],
    alpha_r: float,
    sigma_r: float,
    lam_r: float,
    sigma_s: float,
) -> Tensor:
    """One DPM-Solver++ multistep update ``x_s → x_r`` of order ``len(x0_hats)`` ∈ {1, 2, 3}.

    ``x0_hats``/``lams``: the latest evaluations and their λ, oldest first, the last one at ``s``; every λ finite
    except that a first-order step may start at ``λ_s = −∞``. ``σ_r = 0`` returns ``α_r x̂0_s`` (any order).
    """
    if sigma_r == 0.0:
        return alpha_r * x0_hats[-1]  # h → ∞ limit of the first-order step; higher orders have no limit there
    weights = [alpha_r * w for w in multistep_weights(lams, lam_r)]
    return linear_combination([sigma_r / sigma_s, *weights], [x, *x0_hats])


# Lu et al. 2022b (DPM-Solver++), Alg. 1 (2S) and Alg. 2 (2M); 3M with the quadratic integrated exactly.
class DPMSolverSampler(Sampler):
    """DPM-Solver++ on any decreasing time grid; NFE = ``steps`` (one x̂0 per grid point but the last).

    ``order`` ∈ {1, 2, 3} (1 is DDIM with η = 0). ``method="multistep"``: step ``i`` reuses the x̂0 of the
    previous ``order − 1`` grid points, warming up with lower orders. ``method="singlestep"`` (order ≤ 2): grid
    intervals are taken in pairs ``s → u → r``; a first-order step gives ``x_u`` and ``x̂0(x_u)``, then the 2S
    update restarts from ``x_s`` (intermediate ratio ``r = (λ_u − λ_s)/(λ_r − λ_s)``, 1/2 on a log-SNR grid);
    an odd interval left over at the end is first order, as in diffusers' ``DPMSolverSinglestepScheduler``.

    ``lower_order_final`` (diffusers' default, stabler for few steps): multistep with fewer than 15 steps caps
    the order at ``steps − i`` on step ``i`` (2 on the penultimate step, 1 on the last); single-step makes the
    last pair two first-order steps. A step to ``σ = 0`` is first order regardless (module docstring), and a
    third-order step more than twice as long in λ as the one before is second order (:func:`extrapolation_order_cap`).
    ``rho``, ``sigma_min``, ``sigma_max``: options of the σ-grids (``karras``, ``log_snr``), as every sampler's.
    """

    name = "dpm_solver"

    def __init__(
        self,
        steps: int = 20,
        *,
        order: int = 2,
        method: DPMSolverMethod | str = DPMSolverMethod.multistep,
        lower_order_final: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(steps, **options)
        method = getattr(method, "value", method)  # a config enum member -> its name
        if method not in METHODS:
            raise ValueError(f"unknown sampler.method {method!r}; valid choices: {list(METHODS)}")
        max_order = 3 if method == "multistep" else 2
        if order not in range(1, max_order + 1):
            raise ValueError(f"sampler.order must be in 1..{max_order} for method={method!r}, got {order}")
        self.order, self.method, self.lower_order_final = order, method, lower_order_final

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        """Integrate the PF-ODE from ``grid[0]`` to ``grid[-1]``; deterministic (``generator`` is not used)."""
        nodes = GridNodes.of(model.schedule, grid)
        with tqdm(total=nodes.steps, disable=not progress, desc=self.name, leave=False) as bar:
            run = self._multistep if self.method == "multistep" else self._singlestep
            return run(model, x, nodes, y, bar)

    def step_orders(self, lam: Sequence[float]) -> list[int]:
        """The order used on each of the ``len(lam) − 1`` grid intervals, given DPM-Solver λ at the grid points.

        Multistep: the order of each update. Single-step: diffusers' ``order_list`` convention, ``[1, 2]`` for a
        pair of intervals joined into one 2S step (its first interval is the first-order intermediate), ``1`` alone.
        """
        n = len(lam) - 1
        if self.method == "singlestep":
            orders: list[int] = []
            while len(orders) < n:
                i = len(orders)
                last_pair = i + 2 == n and (self.lower_order_final or math.isinf(lam[n]))
                pair = self.order == 2 and i + 2 <= n and not last_pair and not math.isinf(lam[i])
                orders += [1, 2] if pair else [1]
            return orders
        orders = []
        for i in range(n):
            usable = i + 1 if not math.isinf(lam[0]) else max(i, 1)  # x̂0 at λ = −∞ enters no divided difference
            cap = n - i if self.lower_order_final and n < LOWER_ORDER_FINAL_BELOW else self.order
            cap = min(cap, extrapolation_order_cap(lam, i))
            orders.append(1 if math.isinf(lam[i + 1]) else min(self.order, usable, cap))
        return orders

    def _multistep(self, model: CountingDenoiser, x: Tensor, nodes: GridNodes, y: Tensor | None, bar: tqdm) -> Tensor:
        history: list[Tensor] = []  # x̂0 at the latest grid points (at most `order`), oldest first
        for i, order in enumerate(self.step_orders(nodes.lam)):
            history = [*history[max(0, len(history) - self.order + 1) :], model(x, nodes.t[i], y)]
            x = nodes.update(x, history[-order:], nodes.lam[i + 1 - order : i + 1], i + 1)
            bar.update(1)
        return x

    def _singlestep(self, model: CountingDenoiser, x: Tensor, nodes: GridNodes, y: Tensor | None, bar: tqdm) -> Tensor:
        x_s = m_s = x  # start and x̂0 of the current 2S step, set on its first interval
        for i, order in enumerate(self.step_orders(nodes.lam)):
            if order == 2:  # Lu et al. 2022b Alg. 1: restart from x_s with x̂0 at s (i − 1) and at u (i)
                s, lam = i - 1, nodes.lam
                m_u = model(x, nodes.t[i], y)
                h = lam[i + 1] - lam[s]
                scale = nodes.alpha[i + 1] * phi_coefficients(h)[0]
                w_s, w_u = midpoint_weights(lam[s], lam[i], h)
                x = linear_combination([nodes.sigma[i + 1] / nodes.sigma[s], scale * w_s, scale * w_u], [x_s, m_s, m_u])
            else:  # first order; x_s, m_s kept in case the next interval completes a 2S step
                x_s, m_s = x, model(x, nodes.t[i], y)
                x = nodes.update(x, [m_s], [nodes.lam[i]], i + 1)
            bar.update(1)
        return x


class GridNodes:
    """The grid as python floats: ``t``, ``alpha``, ``sigma``, ``lam`` (DPM-Solver λ), each ``steps + 1`` long."""

    def __init__(self, t: list[float], alpha: list[float], sigma: list[float], lam: list[float]) -> None:
        self.t, self.alpha, self.sigma, self.lam = t, alpha, sigma, lam
        self.steps = len(t) - 1

    @classmethod
    def of(cls, schedule: Any, grid: Tensor) -> GridNodes:
        """The nodes of a time ``grid`` (float64, decreasing) on ``schedule``."""
        alpha, sigma = schedule_alpha_sigma(schedule, grid)
        return cls(grid.tolist(), alpha.tolist(), sigma.tolist(), half_log_snr(alpha, sigma).tolist())

    def update(self, x: Tensor, x0_hats: Sequence[Tensor], lams: Sequence[float], r: int) -> Tensor:
        """:func:`multistep_update` from the grid point of ``lams[-1]`` (index ``r − 1``) to grid point ``r``."""
        return multistep_update(x, x0_hats, lams, self.alpha[r], self.sigma[r], self.lam[r], self.sigma[r - 1])
