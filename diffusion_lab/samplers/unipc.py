"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the unified predictor (UniP-p) and corrector (UniC-p) in
data-prediction (x̂0) form, on any decreasing time grid.

``λ`` here is DPM-Solver's half log-SNR ``log(α/σ)`` (:mod:`diffusion_lab.samplers.dpm_solver`), HALF of DESIGN.md's
``λ_t``. For a step ``s → r`` with ``h = λ_r − λ_s > 0`` the exact PF-ODE solution is

    x_r = (σ_r/σ_s) x_s + α_r ∫_0^h e^{−(h−τ)} x̂0(λ_s + τ) dτ,

and Taylor-expanding x̂0 gives ``α_r Σ_n h^{n+1} φ_{n+1}(−h) x̂0^{(n)}(λ_s)`` with ``φ_1(z) = (e^z − 1)/z``,
``φ_{k+1}(z) = (φ_k(z) − 1/k!)/z``. Both UniP and UniC replace the derivatives by the divided differences
``D_m = (x̂0_m − x̂0_s)/r_m`` over other nodes at ``λ_m = λ_s + r_m h``:

    x_r = (σ_r/σ_s) x_s + α_r (φ1 x̂0_s + B(h) Σ_m a_m D_m),      φ1 = 1 − e^{−h},

with ``a`` solving the order conditions ``Σ_m a_m r_m^{k−1} = k! h φ_{k+1}(−h)/B(h)``, ``k = 1..K`` (K nodes), and
``B(h) = h`` (``bh1``) or ``1 − e^{−h}`` (``bh2``) — the paper's B(h) under its ``h ↦ −h`` of the data-prediction
form, with the signs folded so that both are positive. For ``K = 1`` the paper (and its code) uses ``a_1 = 1/2``,
the ``h → 0`` limit of the condition, which keeps the order.

- UniP-p (predictor, order p): nodes are the ``p − 1`` earlier evaluations (``r_m < 0``).
- UniC-p (corrector, order p + 1): after a predictor of order p gives ``x̃_r``, the model is evaluated there once,
  and ``x_r`` is recomputed from ``x_s`` with nodes = the predictor's ``p − 1`` earlier evaluations and ``r = 1``
  (``x̂0(x̃_r)``). That evaluation is also the next step's ``x̂0_r``, so the corrector costs no extra NFE; the final
  state is not corrected (it would need an evaluation at the last grid point).

Any multistep predictor of the ``(σ_r/σ_s) x_s + α_r Σ_j w_j x̂0_j`` form can precede UniC (:data:`PREDICTORS`);
``dpm_solver`` is our DPM-Solver++ 1/2M/3M (:func:`multistep_weights`, 3M with the quadratic integrated exactly).

Endpoints as in DPM-Solver++: the step to ``σ = 0`` is first order, ``x = α_r x̂0_s``, and is not corrected; a step
from ``α = 0`` (``λ_s = −∞``) is first order with ``φ1 = 1``, is not corrected, and its evaluation never enters a
divided difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lab.samplers.base import CountingDenoiser, Generator, Sampler
from diffusion_lab.samplers.dpm_solver import (
    GridNodes,
    extrapolation_order_cap,
    linear_combination,
    multistep_weights,
)
from diffusion_lab.schema.choices import UniPCPredictor, UniPCVariant

# Zhao et al. 2023, §3.1: B(h) = h (bh1) or e^h − 1 (bh2), here of the data-prediction form (positive, see above).
B_FUNCTIONS: dict[str, Callable[[float], float]] = {
    "bh1": lambda h: h,
    "bh2": lambda h: -math.expm1(-h),
}


def order_condition_rhs(h: float, b_h: float, k_max: int) -> list[float]:
    """``[k! h φ_{k+1}(−h)/B(h) for k = 1..k_max]``, the right-hand sides of UniPC's order conditions.

    ``φ_{k+1}`` by the recurrence of the module docstring from ``φ_1(−h) = (1 − e^{−h})/h`` (as the paper's code).
    """
    z = -h
    phi = math.expm1(z) / z  # φ_1(z)
    rhs, factorial = [], 1.0  # factorial = k!
    for k in range(1, k_max + 1):
        phi = (phi - 1.0 / factorial) / z  # φ_{k+1} = (φ_k − 1/k!)/z
        rhs.append(factorial * h * phi / b_h)
        factorial *= k + 1
    return rhs


# Zhao et al. 2023, §3.1–3.2 (UniC-p, UniP-p) in data-prediction form: x̂0 weights of one unified update.
def unified_weights(lam_s: float, lam_r: float, nodes: Sequence[float], variant: str) -> tuple[float, list[float]]:
    """``(w_s, w)`` of ``x_r = (σ_r/σ_s) x_s + α_r (w_s x̂0_s + Σ_m w_m x̂0_m)`` over ``nodes`` (λ_m, oldest first).

    ``λ_s``, ``λ_r``, ``nodes`` finite, except that with no nodes ``λ_s = −∞`` gives the first-order ``(1, [])``.
    """
    h = lam_r - lam_s
    phi1 = -math.expm1(-h)
    if not nodes:
        return phi1, []
    r = [(lam_m - lam_s) / h for lam_m in nodes]
    b_h = B_FUNCTIONS[variant](h)
    if len(r) == 1:
        a = [0.5]
    else:  # Σ_m a_m r_m^{k−1} = rhs_k, a Vandermonde system of size K ≤ 3
        vander = torch.tensor([[r_m ** (k - 1) for r_m in r] for k in range(1, len(r) + 1)], dtype=torch.float64)
        a = torch.linalg.solve(vander, torch.tensor(order_condition_rhs(h, b_h, len(r)), dtype=torch.float64)).tolist()
    w = [b_h * a_m / r_m for a_m, r_m in zip(a, r, strict=True)]
    return phi1 - sum(w), w


def unip_weights(lams: Sequence[float], lam_r: float, variant: str) -> list[float]:
    """UniP-p, ``p = len(lams)``: x̂0 weights (oldest first) of ``x_r = (σ_r/σ_s) x_s + α_r Σ_j w_j x̂0_j``."""
    w_s, w = unified_weights(lams[-1], lam_r, lams[:-1], variant)
    return [*w, w_s]


def dpm_solver_weights(lams: Sequence[float], lam_r: float, variant: str) -> list[float]:
    """DPM-Solver++ multistep of order ``len(lams)`` (:func:`multistep_weights`); ``variant`` is not used."""
    return multistep_weights(lams, lam_r)


# Predictor name -> x̂0 weights (oldest first) of a multistep step ``(lams, λ_r, variant)``.
PREDICTORS: dict[str, Callable[[Sequence[float], float, str], list[float]]] = {
    "unip": unip_weights,
    "dpm_solver": dpm_solver_weights,
}


# Zhao et al. 2023 (UniPC-p): a multistep predictor (UniP-p or DPM-Solver++) followed by UniC-p, one NFE per step.
class UniPCSampler(Sampler):
    """UniPC on any decreasing time grid; NFE = ``steps`` (one x̂0 per grid point but the last).

    ``order`` ∈ {1, 2, 3}: the predictor's order p (with ``corrector`` the scheme is of order p + 1); step ``i``
    reuses the x̂0 of the previous ``p − 1`` grid points, warming up with lower orders. ``variant``: ``bh1`` or
    ``bh2`` (diffusers recommends bh1 for unconditional sampling below 10 steps, bh2 otherwise; on the ring benchmark
    bh1 is worse up to NFE 20 and equal beyond). ``predictor``: ``unip`` or ``dpm_solver`` (DPM-Solver++
    multistep, then UniC). ``corrector``: apply UniC-p after every step but the last
    (``false``: the predictor alone). ``lower_order_final`` (as diffusers' ``UniPCMultistepScheduler``, for any
    number of steps): step ``i`` of ``N`` has order at most ``N − i``. A step to ``σ = 0`` is first order regardless,
    and a third-order step more than twice as long in λ as the one before is second order (as in DPM-Solver++).
    """

    name = "unipc"

    def __init__(
        self,
        steps: int = 20,
        *,
        order: int = 2,
        variant: UniPCVariant | str = UniPCVariant.bh2,
        predictor: UniPCPredictor | str = UniPCPredictor.unip,
        corrector: bool = True,
        lower_order_final: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(steps, **options)
        variant, predictor = getattr(variant, "value", variant), getattr(predictor, "value", predictor)
        if variant not in B_FUNCTIONS:
            raise ValueError(f"unknown sampler.variant {variant!r}; valid choices: {sorted(B_FUNCTIONS)}")
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown sampler.predictor {predictor!r}; valid choices: {sorted(PREDICTORS)}")
        if order not in (1, 2, 3):
            raise ValueError(f"sampler.order must be 1, 2 or 3, got {order}")
        self.order, self.variant, self.predictor = order, variant, predictor
        self.corrector, self.lower_order_final = corrector, lower_order_final

    def step_orders(self, lam: Sequence[float]) -> list[int]:
        """The predictor order on each of the ``len(lam) − 1`` grid intervals, given DPM-Solver λ at the points."""
        n, orders = len(lam) - 1, []
        for i in range(n):
            usable = i + 1 if not math.isinf(lam[0]) else max(i, 1)  # x̂0 at λ = −∞ enters no divided difference
            cap = n - i if self.lower_order_final else self.order
            cap = min(cap, extrapolation_order_cap(lam, i))
            orders.append(1 if math.isinf(lam[i + 1]) else min(self.order, usable, cap))
        return orders

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        """Integrate the PF-ODE from ``grid[0]`` to ``grid[-1]``; deterministic (``generator`` is not used)."""
        nodes = GridNodes.of(model.schedule, grid)
        history: list[Tensor] = []  # x̂0 at the latest grid points (at most `order`), oldest first
        x_prev, prev_order = x, 0
        for i, order in enumerate(tqdm(self.step_orders(nodes.lam), disable=not progress, desc=self.name, leave=False)):
            x0_hat = model(x, nodes.t[i], y)
            if self.corrector and prev_order and not math.isinf(nodes.lam[i - 1]):
                x = self.correct(x_prev, history[-prev_order:], x0_hat, nodes, i)
            history = [*history[max(0, len(history) - self.order + 1) :], x0_hat]
            x_prev, prev_order = x, order
            x = self.predict(x, history[-order:], nodes, i)
        return x

    def predict(self, x: Tensor, x0_hats: Sequence[Tensor], nodes: GridNodes, i: int) -> Tensor:
        """The predictor from grid point ``i`` to ``i + 1`` with the latest ``len(x0_hats)`` x̂0 (oldest first)."""
        alpha_r, sigma_r = nodes.alpha[i + 1], nodes.sigma[i + 1]
        if sigma_r == 0.0:
            return alpha_r * x0_hats[-1]  # h → ∞ limit of the first-order step
        lams = nodes.lam[i + 1 - len(x0_hats) : i + 1]
        weights = [alpha_r * w for w in PREDICTORS[self.predictor](lams, nodes.lam[i + 1], self.variant)]
        return linear_combination([sigma_r / nodes.sigma[i], *weights], [x, *x0_hats])

    # Zhao et al. 2023, §3.1 (UniC-p): recompute x_r from x_s with x̂0 at the predicted point as the node r = 1.
    def correct(self, x_s: Tensor, x0_hats: Sequence[Tensor], x0_hat_r: Tensor, nodes: GridNodes, r: int) -> Tensor:
        """UniC-p, ``p = len(x0_hats)``, of the step from grid point ``r − 1`` (state ``x_s``) to ``r``."""
        lams = nodes.lam[r - len(x0_hats) : r]
        w_s, w = unified_weights(lams[-1], nodes.lam[r], [*lams[:-1], nodes.lam[r]], self.variant)
        weights = [nodes.alpha[r] * c for c in (*w[:-1], w_s, w[-1])]
        return linear_combination([nodes.sigma[r] / nodes.sigma[r - 1], *weights], [x_s, *x0_hats, x0_hat_r])
