"""The schedule interface: :class:`NoiseSchedule` maps ``t ∈ [0, 1]`` to ``(α_t, σ_t, λ_t)`` and derivatives.

Also the frozen outputs (:class:`ScheduleOutput`, :class:`ScheduleDerivatives`), the handle of a learnable
schedule's variance reduction (:class:`VarianceReduction`, the type :meth:`NoiseSchedule.variance_reduction`
returns) and the helpers every family shares. Conventions: see :mod:`diffusion_lab.diffusion.schedules`.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ScheduleOutput:
    """Schedule values at times ``t``; every field has the shape of ``t``."""

    alpha: Tensor
    sigma: Tensor
    log_snr: Tensor


@dataclass(frozen=True)
class ScheduleDerivatives:
    """Time derivatives ``dα/dt``, ``dσ/dt`` and ``dλ/dt``; every field has the shape of ``t``."""

    d_alpha: Tensor
    d_sigma: Tensor
    d_log_snr: Tensor


class NoiseSchedule(nn.Module, ABC):
    """Base class: a map ``t ↦ (α_t, σ_t, λ_t)``.

    Subclasses implement :meth:`log_snr`; :meth:`alpha_sigma` applies the family's map
    :meth:`alpha_sigma_from_log_snr`, variance preserving by default (``α² = sigmoid(λ)``,
    ``σ² = sigmoid(−λ)``). ``num_timesteps`` is ``T`` for a discrete-time model (integer timesteps
    ``i ∈ {1..T}`` at ``t = i/T``) and ``None`` for a continuous-time model. ``learnable`` marks a schedule
    with trainable parameters (trained through the continuous ELBO).
    """

    num_timesteps: int | None = None
    learnable: bool = False

    @property
    def is_discrete(self) -> bool:
        """Whether training and sampling use only the integer timesteps ``t = i / T``."""
        return self.num_timesteps is not None

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether ``λ(1) = −∞``, i.e. ``α_1 = 0``: ``x_1`` carries no information about ``x0``."""
        return self.log_snr_bounds()[0] == -math.inf

    @abstractmethod
    def log_snr(self, t: Tensor) -> Tensor:
        """``λ_t = log(α_t²/σ_t²)`` for ``t`` of any shape, strictly decreasing in ``t``."""

    def alpha_sigma_from_log_snr(self, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """The family's map ``λ ↦ (α, σ)``, each the shape of ``log_snr``; variance preserving here.

        ``α = √sigmoid(λ)``, ``σ = √sigmoid(−λ)``, computed in log space (exact at ``λ = ±∞``).
        """
        return torch.exp(0.5 * F.logsigmoid(log_snr)), torch.exp(0.5 * F.logsigmoid(-log_snr))

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)``, each the shape of ``t``: the family's map applied to ``λ_t``."""
        return self.alpha_sigma_from_log_snr(self.log_snr(t))

    def forward(self, t: Tensor) -> ScheduleOutput:
        """All schedule values at ``t`` (any shape)."""
        alpha, sigma = self.alpha_sigma(t)
        return ScheduleOutput(alpha=alpha, sigma=sigma, log_snr=self.log_snr(t))

    def derivatives(self, t: Tensor) -> ScheduleDerivatives:
        """``dα/dt, dσ/dt, dλ/dt`` at ``t`` by forward-mode autodiff; subclasses may override."""
        t = t.detach().float()
        ones = torch.ones_like(t)
        d_alpha, d_sigma = torch.func.jvp(self.alpha_sigma, (t,), (ones,))[1]
        d_log_snr = torch.func.jvp(self.log_snr, (t,), (ones,))[1]
        return ScheduleDerivatives(d_alpha=d_alpha, d_sigma=d_sigma, d_log_snr=d_log_snr)

    def log_snr_rate(self, t: Tensor) -> Tensor:
        """The positive rate ``−dλ/dt`` at ``t`` (shape of ``t``), as the ELBO integrand uses it.

        Continuous time: ``−dλ/dt`` by forward-mode autodiff (differentiable w.r.t. parameters).
        Discrete time (``T`` steps): on the model's own timesteps ``t = i/T`` (up to a few ulps) the backward
        difference ``T·(λ((i−1)/T) − λ(i/T))``, ``+∞`` at ``i = 1`` when ``λ(0) = +∞``; between grid points
        (e.g. a continuous-time ELBO on a discrete schedule) the derivative of the interpolated ``λ``.
        """
        derivative = -torch.func.jvp(self.log_snr, (t,), (torch.ones_like(t),))[1]
        steps = self.num_timesteps
        if steps is None:
            return derivative
        i = torch.round(t * steps).clamp(1, steps)
        on_grid = torch.isclose(t, i / steps, rtol=4 * torch.finfo(t.dtype).eps, atol=0.0)
        backward = steps * (self.log_snr((i - 1) / steps) - self.log_snr(i / steps))
        return torch.where(on_grid, backward, derivative)

    def log_snr_bounds(self) -> tuple[float, float]:
        """``(λ(1), λ(0))`` as python floats (either may be infinite)."""
        ref = next(iter(self.parameters()), next(iter(self.buffers()), None))
        device = ref.device if ref is not None else None
        with torch.no_grad():
            lam = self.log_snr(torch.tensor([1.0, 0.0], dtype=torch.float64, device=device))
        return float(lam[0]), float(lam[1])

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Inverse ``λ ↦ t`` by bisection on the monotone ``λ_t`` (subclasses may be exact)."""
        lo = torch.zeros_like(log_snr)
        hi = torch.ones_like(log_snr)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            too_early = self.log_snr(mid) > log_snr  # λ decreasing: still before the target
            lo = torch.where(too_early, mid, lo)
            hi = torch.where(too_early, hi, mid)
        return 0.5 * (lo + hi)

    def variance_reduction(self) -> contextlib.AbstractContextManager[VarianceReduction]:
        """Variance-minimising gradients for a learnable schedule's shape (:meth:`LearnedSchedule.variance_reduction`).

        Raises ``TypeError`` unless the schedule is learnable (check ``schedule.learnable`` first).
        """
        raise TypeError(f"variance_reduction() needs a learnable schedule, got {type(self).__name__}")

    def timestep_index(self, t: Tensor) -> Tensor:
        """Integer timestep ``i = round(t·T) ∈ {0..T}`` of a discrete model (long, shape of ``t``)."""
        if self.num_timesteps is None:
            raise ValueError("timestep_index() needs a discrete schedule (schedule.num_timesteps is None)")
        return torch.round(t * self.num_timesteps).long()


def _clamp01(t: Tensor) -> Tensor:
    """``t`` clipped to ``[0, 1]`` (shape of ``t``) with derivative 1 at 0 and 1 themselves.

    ``torch.clamp`` has derivative 0 at its bounds, which would turn one-sided derivatives at the endpoints
    (e.g. ``dλ/dt = −∞`` at ``t = 0``) into 0 or nan.
    """
    return torch.where(t < 0, torch.zeros_like(t), torch.where(t > 1, torch.ones_like(t), t))


class VarianceReduction:
    """Handle of :meth:`LearnedSchedule.variance_reduction`; call :meth:`set_loss` before ``backward()``."""

    def __init__(self) -> None:
        self.loss: Tensor | None = None

    def set_loss(self, loss: Tensor) -> None:
        """Register the per-example loss ``ℓ`` ``(B,)`` (the shape of the ``t`` the schedule was evaluated at)."""
        self.loss = loss.detach()

    def scale_grad(self, grad: Tensor) -> Tensor:
        """Tensor hook: the incoming gradient (shape of ``t``) times ``2·ℓ`` elementwise."""
        if self.loss is None:
            raise RuntimeError(
                "LearnedSchedule.variance_reduction(): call ctx.set_loss(per_example_loss.detach()) after computing "
                "the loss and before backward()"
            )
        loss = self.loss.to(grad.dtype).reshape(self.loss.shape + (1,) * max(grad.dim() - self.loss.dim(), 0))
        try:
            return grad * (2.0 * loss)
        except RuntimeError as err:
            raise ValueError(
                f"set_loss got shape {tuple(self.loss.shape)}, the schedule was evaluated at "
                f"t of shape {tuple(grad.shape)}"
            ) from err
