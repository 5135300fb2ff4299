"""Learned schedule (Kingma et al. 2021, VDM): a monotone network for ``λ_t``, trained through the ELBO.

:class:`MonotoneLinear` is its building block; :meth:`LearnedSchedule.variance_reduction` trains the
schedule's shape to minimise the variance of the diffusion-loss estimate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.schedules.base import NoiseSchedule, ScheduleDerivatives, VarianceReduction, _clamp01


# Kingma et al. 2021 (VDM) App. H / official code's DenseMonotone: a dense layer with non-negative weights.
class MonotoneLinear(nn.Module):
    """``y = x·(|W| + min_weight)ᵀ + b``: ``(…, in_features) → (…, out_features)``, nondecreasing in ``x``.

    ``min_weight > 0`` makes it strictly increasing. Parameters are cast to the input's dtype.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, weight_std: float = 1.0, min_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * weight_std)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.min_weight = min_weight

    def effective_weight(self, dtype: torch.dtype) -> Tensor:
        """The non-negative weight ``|W| + min_weight`` ``(out_features, in_features)`` actually applied."""
        return self.weight.to(dtype).abs() + self.min_weight

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` ``(…, in_features)``."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.effective_weight(x.dtype), bias)


# Kingma et al. 2021 (VDM) §3.4, App. H: γ(t) = γ_0 + (γ_1 − γ_0)·(γ̃(t) − γ̃(0))/(γ̃(1) − γ̃(0)), λ(t) = −γ(t).
class LearnedSchedule(NoiseSchedule):
    """Learned variance-preserving schedule: a monotone network ``γ̃`` normalised between learned endpoints.

    ``γ̃(t) = l1(t) + l3(sigmoid(l2(l1(t))))`` with monotone dense layers ``l1: 1→1`` (strictly increasing),
    ``l2: 1→hidden``, ``l3: hidden→1``. The shape ``s(t) = (γ̃(t) − γ̃(0))/(γ̃(1) − γ̃(0))`` runs from 0 to 1, and
    the endpoints ``γ_0 = −λ(0)``, ``γ_1 = −λ(1)`` are parameters (``λ`` strictly decreasing while ``γ_1 > γ_0``).
    At init ``γ`` is close to linear from ``gamma_min`` to ``gamma_max``. Continuous time only.

    The continuous-time diffusion loss depends on the schedule only through its endpoints (Kingma et al. 2021
    eq. 17, §5.1): the interior shape does not change the ELBO, only the variance of its Monte-Carlo
    estimate. So inside :meth:`variance_reduction` the shape is trained to minimise that variance
    (App. I.2) while ``γ_0, γ_1`` follow the ELBO gradient.
    """

    learnable = True

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, hidden: int = 1024) -> None:
        super().__init__()
        if not gamma_min < gamma_max or hidden < 1:
            raise ValueError(
                f"learned schedule needs gamma_min < gamma_max and hidden >= 1, got {gamma_min}, {gamma_max}, {hidden}"
            )
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_max)))
        self.l1 = MonotoneLinear(1, 1, min_weight=1e-4)
        self.l2 = MonotoneLinear(1, hidden)
        self.l3 = MonotoneLinear(hidden, 1, bias=False, weight_std=1.0 / hidden)  # small nonlinear part at init
        with torch.no_grad():
            self.l1.weight.fill_(1.0)
        self._handle: VarianceReduction | None = None

    def _gamma_tilde(self, t_col: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised ``γ̃(t)`` and its analytic ``dγ̃/dt`` for ``t_col`` ``(M, 1)``; each ``(M,)``."""
        h = self.l1(t_col)
        act = torch.sigmoid(self.l2(h))  # (M, hidden)
        gamma = h[:, 0] + self.l3(act)[:, 0]
        # Chain rule: dγ̃/dt = w1·(1 + Σ_k w3_k σ_k(1 − σ_k) w2_k), all w ≥ 0 (w1 > 0).
        w1 = self.l1.effective_weight(t_col.dtype)[0, 0]
        w23 = self.l2.effective_weight(t_col.dtype)[:, 0] * self.l3.effective_weight(t_col.dtype)[0]
        return gamma, w1 * (1.0 + (act * (1.0 - act)) @ w23)

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised shape ``s(t) ∈ [0, 1]`` and ``s'(t)`` for ``t`` of any shape; each the shape of ``t``.

        ``s(0) = 0`` and ``s(1) = 1`` exactly. Inside :meth:`variance_reduction` both carry the gradient hook.
        """
        flat = _clamp01(t.reshape(-1))
        n = flat.numel()
        gamma, d_gamma = self._gamma_tilde(torch.cat([flat, flat.new_tensor([0.0, 1.0])]).unsqueeze(1))
        scale = gamma[n + 1] - gamma[n]
        s = (gamma[:n] - gamma[n]) / scale
        s = torch.where(flat <= 0, torch.zeros_like(s), torch.where(flat >= 1, torch.ones_like(s), s))
        return self._watch(s.reshape(t.shape)), self._watch((d_gamma[:n] / scale).reshape(t.shape))

    def _watch(self, x: Tensor) -> Tensor:
        """Register the variance-reduction hook on ``x`` if a context is active and ``x`` needs a gradient."""
        if self._handle is not None and x.requires_grad:
            x.register_hook(self._handle.scale_grad)
        return x

    def _endpoints(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.gamma_0.to(dtype), self.gamma_1.to(dtype)

    def gamma(self, t: Tensor) -> Tensor:
        """``γ(t) = (1 − s)γ_0 + s·γ_1 = −λ(t)``, shape of ``t`` (exactly ``γ_0``, ``γ_1`` at the endpoints)."""
        gamma_0, gamma_1 = self._endpoints(t.dtype)
        s = self.shape(t)[0]
        return (1.0 - s) * gamma_0 + s * gamma_1

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ(t) = −γ(t)``, shape of ``t``."""
        return -self.gamma(t)

    def log_snr_rate(self, t: Tensor) -> Tensor:
        """``−dλ/dt = γ'(t) = (γ_1 − γ_0)·s'(t)``, analytic and differentiable w.r.t. all parameters."""
        gamma_0, gamma_1 = self._endpoints(t.dtype)
        return (gamma_1 - gamma_0) * self.shape(t)[1]

    def derivatives(self, t: Tensor) -> ScheduleDerivatives:
        """Analytic VP derivatives: ``dα/dt = ½ασ²·dλ/dt``, ``dσ/dt = −½σα²·dλ/dt`` (float32, shape of ``t``)."""
        t = t.detach().float()
        d_log_snr = -self.log_snr_rate(t)
        alpha, sigma = self.alpha_sigma(t)
        return ScheduleDerivatives(
            d_alpha=0.5 * alpha * sigma.square() * d_log_snr,
            d_sigma=-0.5 * sigma * alpha.square() * d_log_snr,
            d_log_snr=d_log_snr,
        )

    def log_snr_bounds(self) -> tuple[float, float]:
        """``(−γ_1, −γ_0)``."""
        return -float(self.gamma_1.detach()), -float(self.gamma_0.detach())

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """The base bisection, without building a graph (and without variance-reduction hooks)."""
        with torch.no_grad():
            return super().t_from_log_snr(log_snr.detach(), iters)

    # Kingma et al. 2021 App. I.2 / §5: minimise the variance of the diffusion-loss estimator w.r.t. the shape.
    @contextlib.contextmanager
    def variance_reduction(self) -> Iterator[VarianceReduction]:
        """Context yielding a handle ``ctx``; call ``ctx.set_loss(per_example_loss.detach())`` before backward.

        While active, every ``s(t)`` and ``s'(t)`` that requires grad gets a hook multiplying its incoming
        gradient by ``2·ℓ`` (``ℓ`` of shape ``(B,)``, the shape of ``t``). With the loss ``mean(ℓ)``, the shape
        network then receives ``∇ mean(ℓ²)`` — the gradient of the estimator's variance up to the ELBO's own
        gradient, which is zero for the shape (the loss depends on the schedule only through ``γ_0, γ_1``) —
        while ``γ_0, γ_1`` receive ``∇ mean(ℓ)``. Hooks fire at ``backward()``, also after the context exits.
        """
        previous, self._handle = self._handle, VarianceReduction()
        try:
            yield self._handle
        finally:
            self._handle = previous
