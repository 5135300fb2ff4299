"""Noise schedules: continuous time ``t ∈ [0, 1] ↦ (α_t, σ_t, λ_t)``.

Convention (DESIGN.md): ``t = 0`` is data, ``t = 1`` is (almost) pure noise,
``x_t = α_t x0 + σ_t ε`` and ``λ_t = log(α_t² / σ_t²)`` is strictly decreasing in ``t``.

A discrete DDPM with ``T`` steps is the same object evaluated at ``t_i = i / T``
(``ᾱ_i = α_{t_i}²``). β-schedules are defined where their papers define them (as ``T`` betas) and
exposed through the continuous interface by interpolating ``log ᾱ`` linearly in ``t`` between grid
points, so the continuous schedule agrees with the paper's ``ᾱ_i`` exactly at every ``t_i``.

Adding a schedule is one small subclass (implement :meth:`NoiseSchedule.log_snr`, or for a β-schedule
:meth:`DiscreteBetaSchedule.make_betas`) plus one YAML file under ``conf/schedule/``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
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

    Subclasses implement :meth:`log_snr`; the default :meth:`alpha_sigma` is variance preserving
    (``α² = sigmoid(λ)``, ``σ² = sigmoid(−λ)``). ``num_timesteps`` is ``T`` for a discrete-time model
    (integer timesteps ``i ∈ {1..T}`` at ``t = i/T``) and ``None`` for a continuous-time model.
    """

    num_timesteps: int | None = None

    @property
    def is_discrete(self) -> bool:
        """Whether training and sampling use only the integer timesteps ``t = i / T``."""
        return self.num_timesteps is not None

    @abstractmethod
    def log_snr(self, t: Tensor) -> Tensor:
        """``λ_t = log(α_t²/σ_t²)`` for ``t`` of any shape, strictly decreasing in ``t``."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)``, each the shape of ``t``; variance preserving by default."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

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

    def timestep_index(self, t: Tensor) -> Tensor:
        """Integer timestep ``i = round(t·T) ∈ {0..T}`` of a discrete model (long, shape of ``t``)."""
        if self.num_timesteps is None:
            raise ValueError("timestep_index() needs a discrete schedule (schedule.num_timesteps is None)")
        return torch.round(t * self.num_timesteps).long()


class DiscreteBetaSchedule(NoiseSchedule):
    """A β-schedule ``β_1..β_T`` with ``ᾱ_i = ∏_{j≤i} (1 − β_j)`` at ``t_i = i/T`` (``ᾱ_0 = 1``).

    Between grid points ``log ᾱ`` is interpolated linearly in ``t``, which keeps ``λ_t`` strictly
    decreasing and makes a continuous-time model (``discrete=False``) a faithful refinement.
    """

    log_alpha_bar: Tensor  # (T + 1,), log ᾱ_i for i = 0..T

    def __init__(self, num_timesteps: int = 1000, discrete: bool = True) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"schedule.num_timesteps must be a positive integer, got {num_timesteps}")
        betas = self.make_betas(num_timesteps).double()
        if betas.shape != (num_timesteps,) or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a (T,) tensor with every β in (0, 1)")
        log_alpha_bar = torch.cat([betas.new_zeros(1), torch.cumsum(torch.log1p(-betas), 0)])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("log_alpha_bar", log_alpha_bar.float(), persistent=False)
        self.T = num_timesteps
        self.num_timesteps = num_timesteps if discrete else None

    @abstractmethod
    def make_betas(self, num_timesteps: int) -> Tensor:
        """The paper's ``(T,)`` betas, float64."""

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        """``log ᾱ(t)`` by linear interpolation in ``t`` of the grid values (shape of ``t``)."""
        pos = t.clamp(0.0, 1.0) * self.T
        lo = pos.floor().clamp(max=self.T - 1)
        frac = pos - lo
        table = self.log_alpha_bar.to(t.dtype)
        lo_i = lo.long()
        return torch.lerp(table[lo_i], table[lo_i + 1], frac)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``α = √ᾱ``, ``σ = √(1 − ᾱ)`` computed from ``log ᾱ`` without cancellation."""
        log_ab = self._log_alpha_bar(t)
        return torch.exp(0.5 * log_ab), torch.sqrt(torch.expm1(log_ab).abs())

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ = log ᾱ − log(1 − ᾱ)``; ``+∞`` at ``t = 0``."""
        log_ab = self._log_alpha_bar(t)
        return log_ab - torch.log(-torch.expm1(log_ab))

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Exact inverse of the piecewise-linear ``log ᾱ(t)``: ``log ᾱ = log sigmoid(λ)``."""
        target = torch.nn.functional.logsigmoid(log_snr)
        table = self.log_alpha_bar.to(log_snr.dtype)
        # table is decreasing; searchsorted needs increasing values, so search on −table.
        idx = torch.searchsorted(-table, -target.contiguous()).clamp(1, self.T)
        hi, lo = table[idx], table[idx - 1]
        frac = (target - lo) / (hi - lo)
        return ((idx - 1).to(log_snr.dtype) + frac.clamp(0, 1)) / self.T


# Ho et al. 2020 §4: β linear from 1e-4 to 0.02 over T = 1000 steps.
class LinearSchedule(DiscreteBetaSchedule):
    """DDPM linear-β schedule, ``β_i = linspace(β_start, β_end, T)``."""

    def __init__(
        self,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        discrete: bool = True,
    ) -> None:
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.beta_start, self.beta_end = beta_start, beta_end
        super().__init__(num_timesteps, discrete)

    def make_betas(self, num_timesteps: int) -> Tensor:
        """``(T,)`` linearly spaced betas."""
        return torch.linspace(self.beta_start, self.beta_end, num_timesteps, dtype=torch.float64)


# Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2), β clipped at 0.999.
class CosineSchedule(DiscreteBetaSchedule):
    """Improved-DDPM cosine schedule with offset ``s`` and ``β ≤ max_beta``."""

    def __init__(
        self,
        s: float = 0.008,
        max_beta: float = 0.999,
        num_timesteps: int = 1000,
        discrete: bool = True,
    ) -> None:
        if s < 0 or not 0.0 < max_beta < 1.0:
            raise ValueError(f"cosine schedule needs s >= 0 and 0 < max_beta < 1, got {s}, {max_beta}")
        self.s, self.max_beta = s, max_beta
        super().__init__(num_timesteps, discrete)

    def make_betas(self, num_timesteps: int) -> Tensor:
        """``β_i = min(1 − ᾱ(i)/ᾱ(i−1), max_beta)``."""
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + self.s) / (1 + self.s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=self.max_beta)
