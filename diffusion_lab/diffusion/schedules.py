"""Noise schedules: continuous time ``t ∈ [0, 1] ↦ (α_t, σ_t, λ_t)``.

Convention (DESIGN.md): ``t = 0`` is data, ``t = 1`` is (almost) pure noise,
``x_t = α_t x0 + σ_t ε`` and ``λ_t = log(α_t² / σ_t²)`` is strictly decreasing in ``t``.

A discrete DDPM with ``T`` steps is the same object evaluated at ``t_i = i / T``
(``ᾱ_i = α_{t_i}²``). β-schedules are defined where their papers define them (as ``T`` betas) and
exposed through the continuous interface by interpolating ``log ᾱ`` linearly in ``t`` between grid
points, so the continuous schedule agrees with the paper's ``ᾱ_i`` exactly at every ``t_i``.

A schedule belongs to a *family*, the map ``λ ↦ (α, σ)`` (:meth:`NoiseSchedule.alpha_sigma_from_log_snr`):
variance preserving (``α² + σ² = 1``, the default), variance exploding (``α = 1``) or rectified flow
(``α + σ = 1``). Given ``λ_t`` and the family, ``α_t`` and ``σ_t`` follow.

Adding a schedule is one small subclass (implement :meth:`NoiseSchedule.log_snr`, or for a β-schedule
:meth:`DiscreteBetaSchedule.make_betas`) plus one YAML file under ``conf/schedule/``.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
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


def _logsigmoid(x: float) -> float:
    """``log sigmoid(x)`` of a python float, without overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


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


def _check_num_timesteps(num_timesteps: int | None) -> None:
    if num_timesteps is not None and num_timesteps < 1:
        raise ValueError(f"schedule.num_timesteps must be a positive integer or None, got {num_timesteps}")


# Lin et al. 2024, Alg. 1: shift √ᾱ so that √ᾱ_T = 0, then scale so the first step keeps its √ᾱ_1.
def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """``(T,)`` betas ↦ ``(T,)`` betas with ``ᾱ_T = 0`` (``β_T = 1``) and ``β_1`` unchanged (float64).

    ``√ᾱ_i' = (√ᾱ_i − √ᾱ_T)·√ᾱ_1/(√ᾱ_1 − √ᾱ_T)`` for ``i = 1..T``, an affine map of ``√ᾱ``. Lin et al.'s
    ``√ᾱ_0`` is their first timestep, our ``i = 1`` (as in diffusers' ``rescale_zero_terminal_snr``);
    ``ᾱ = 1`` at ``t = 0`` is unchanged as well.
    """
    if betas.numel() < 2:
        raise ValueError("zero_terminal_snr needs num_timesteps >= 2")
    sqrt_ab = torch.exp(0.5 * torch.cumsum(torch.log1p(-betas), 0))
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    alpha_bar = ((sqrt_ab - last) * first / (first - last)).square()
    return 1.0 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


class DiscreteBetaSchedule(NoiseSchedule):
    """A β-schedule ``β_1..β_T`` with ``ᾱ_i = ∏_{j≤i} (1 − β_j)`` at ``t_i = i/T`` (``ᾱ_0 = 1``).

    Between grid points ``log ᾱ`` is interpolated linearly in ``t``, which keeps ``λ_t`` strictly
    decreasing and makes a continuous-time model (``discrete=False``) a faithful refinement.

    ``zero_terminal_snr=True`` rescales the betas (Lin et al. 2024, :func:`rescale_zero_terminal_snr`) so
    ``ᾱ_T = 0`` (``β_T = 1``, ``λ(1) = −∞``). ``log ᾱ_T = −∞`` cannot be interpolated linearly, so the last
    cell ``[(T−1)/T, 1]`` interpolates ``√ᾱ`` linearly down to 0 instead; every value and derivative stays
    finite except ``λ(1) = −∞`` (and ``dλ/dt`` there).
    """

    log_alpha_bar: Tensor  # (T + 1,), log ᾱ_i for i = 0..T; −∞ at T with zero_terminal_snr

    def __init__(self, num_timesteps: int = 1000, discrete: bool = True, zero_terminal_snr: bool = False) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"schedule.num_timesteps must be a positive integer, got {num_timesteps}")
        betas = self.make_betas(num_timesteps).double()
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        if betas.shape != (num_timesteps,) or not bool(self._valid_betas(betas, zero_terminal_snr).all()):
            raise ValueError("betas must be a (T,) tensor with every β in (0, 1) (β_T = 1 with zero_terminal_snr)")
        log_alpha_bar = torch.cat([betas.new_zeros(1), torch.cumsum(torch.log1p(-betas), 0)])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("log_alpha_bar", log_alpha_bar.float(), persistent=False)
        self.T = num_timesteps
        self.num_timesteps = num_timesteps if discrete else None
        self._zero_terminal = zero_terminal_snr

    @staticmethod
    def _valid_betas(betas: Tensor, zero_terminal_snr: bool) -> Tensor:
        """Per-β validity ``(T,)``: ``0 < β < 1``, except ``β_T = 1`` exactly under zero terminal SNR."""
        valid = (betas > 0) & (betas < 1)
        if zero_terminal_snr and betas.numel() > 0:
            valid[-1] = bool(betas[-1] == 1)
        return valid

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the betas were rescaled to ``ᾱ_T = 0`` (``λ(1) = −∞``)."""
        return self._zero_terminal

    @abstractmethod
    def make_betas(self, num_timesteps: int) -> Tensor:
        """The paper's ``(T,)`` betas, float64."""

    def _cell(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Grid cell ``i = ⌊tT⌋ ∈ {0..T−1}`` (long) and the position ``tT − i ∈ [0, 1]`` in it; shape of ``t``."""
        pos = _clamp01(t) * self.T
        lo = pos.floor().clamp(max=self.T - 1)
        return lo.long(), pos - lo

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        """``log ᾱ(t)`` by linear interpolation in ``t`` of the grid values (shape of ``t``).

        Under zero terminal SNR the ``−∞`` entry is replaced by ``log ᾱ_{T−1}`` (``torch.lerp`` with ``−∞``
        gives nan at weight 0); the last cell's value is then overridden from :meth:`_tail_alpha`.
        """
        lo, frac = self._cell(t)
        table = self.log_alpha_bar.to(t.dtype)
        if self._zero_terminal:
            table = torch.cat([table[:-1], table[-2:-1]])
        return torch.lerp(table[lo], table[lo + 1], frac)

    def _tail_alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Zero terminal SNR: (whether in the last cell, ``α = √ᾱ_{T−1}·(1 − frac)`` there), each shape of ``t``."""
        lo, frac = self._cell(t)
        sqrt_last = torch.exp(0.5 * self.log_alpha_bar[-2].to(t.dtype))
        return lo == self.T - 1, sqrt_last * (1.0 - frac)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``α = √ᾱ``, ``σ = √(1 − ᾱ)`` computed from ``log ᾱ`` without cancellation."""
        log_ab = self._log_alpha_bar(t)
        alpha, sigma = torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))
        if not self._zero_terminal:
            return alpha, sigma
        last, tail = self._tail_alpha(t)
        return torch.where(last, tail, alpha), torch.where(last, torch.sqrt((1.0 - tail) * (1.0 + tail)), sigma)

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ = log ᾱ − log(1 − ᾱ)``; ``+∞`` at ``t = 0`` (and ``−∞`` at ``t = 1`` under zero terminal SNR)."""
        log_ab = self._log_alpha_bar(t)
        lam = log_ab - torch.log(-torch.expm1(log_ab))
        if not self._zero_terminal:
            return lam
        last, tail = self._tail_alpha(t)
        return torch.where(last, 2.0 * torch.log(tail) - torch.log1p(-tail.square()), lam)

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Exact inverse of the piecewise-linear ``log ᾱ(t)``: ``log ᾱ = log sigmoid(λ)``."""
        target = F.logsigmoid(log_snr)
        table = self.log_alpha_bar.to(log_snr.dtype)
        # table is decreasing; searchsorted needs increasing values, so search on −table.
        idx = torch.searchsorted(-table, -target.contiguous()).clamp(1, self.T - int(self._zero_terminal))
        hi, lo = table[idx], table[idx - 1]
        frac = (target - lo) / (hi - lo)
        t = ((idx - 1).to(log_snr.dtype) + frac.clamp(0, 1)) / self.T
        if not self._zero_terminal:
            return t
        # Last cell: √ᾱ = √ᾱ_{T−1}·(1 − frac), inverted in closed form.
        tail_frac = (1.0 - torch.exp(0.5 * (target - table[-2]))).clamp(0, 1)
        return torch.where(target < table[-2], (self.T - 1 + tail_frac) / self.T, t)


# Ho et al. 2020 §4: β linear from 1e-4 to 0.02 over T = 1000 steps.
class LinearSchedule(DiscreteBetaSchedule):
    """DDPM linear-β schedule, ``β_i = linspace(β_start, β_end, T)``; optionally zero terminal SNR."""

    def __init__(
        self,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        discrete: bool = True,
        zero_terminal_snr: bool = False,
    ) -> None:
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.beta_start, self.beta_end = beta_start, beta_end
        super().__init__(num_timesteps, discrete, zero_terminal_snr)

    def make_betas(self, num_timesteps: int) -> Tensor:
        """``(T,)`` linearly spaced betas."""
        return torch.linspace(self.beta_start, self.beta_end, num_timesteps, dtype=torch.float64)


# Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2), β clipped at 0.999.
class CosineSchedule(DiscreteBetaSchedule):
    """Improved-DDPM cosine schedule with offset ``s`` and ``β ≤ max_beta``; optionally zero terminal SNR."""

    def __init__(
        self,
        s: float = 0.008,
        max_beta: float = 0.999,
        num_timesteps: int = 1000,
        discrete: bool = True,
        zero_terminal_snr: bool = False,
    ) -> None:
        if s < 0 or not 0.0 < max_beta < 1.0:
            raise ValueError(f"cosine schedule needs s >= 0 and 0 < max_beta < 1, got {s}, {max_beta}")
        self.s, self.max_beta = s, max_beta
        super().__init__(num_timesteps, discrete, zero_terminal_snr)

    def make_betas(self, num_timesteps: int) -> Tensor:
        """``β_i = min(1 − ᾱ(i)/ᾱ(i−1), max_beta)``."""
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + self.s) / (1 + self.s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=self.max_beta)


# Chen 2023 ("On the importance of noise scheduling"), Alg. 1 sigmoid_schedule; Jabri et al. 2023.
class SigmoidSchedule(NoiseSchedule):
    """Variance-preserving ``ᾱ(t) = (v_end − sigmoid(u))/(v_end − v_start)``, clipped to ``[clip_min, 1]``.

    ``u = (t·(end − start) + start)/τ`` and ``v_* = sigmoid(*/τ)``, so ``ᾱ(0) = 1`` and (unclipped) ``ᾱ(1) = 0``.
    ``λ`` is computed in log space: ``λ = log(v_end − sigmoid(u)) − log(sigmoid(u) − v_start)`` with
    ``sigmoid(a) − sigmoid(b) = sigmoid(a)·sigmoid(−b)·(1 − e^{b−a})``. ``zero_terminal_snr=True`` drops the
    clip, leaving Chen's ``ᾱ(1) = 0`` exact (``λ(1) = −∞``). ``num_timesteps=T`` makes it a discrete-time
    model evaluated at ``t = i/T``.
    """

    def __init__(
        self,
        start: float = -3.0,
        end: float = 3.0,
        tau: float = 1.0,
        clip_min: float = 1e-9,
        num_timesteps: int | None = None,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        if not (start < end and tau > 0 and 0.0 <= clip_min < 1.0):
            raise ValueError(
                f"sigmoid schedule needs start < end, tau > 0, 0 <= clip_min < 1; got {start}, {end}, {tau}, {clip_min}"
            )
        _check_num_timesteps(num_timesteps)
        self.start, self.end, self.tau, self.clip_min = start, end, tau, clip_min
        self.num_timesteps = num_timesteps
        clip = 0.0 if zero_terminal_snr else clip_min
        # λ ≥ logit(clip_min): the clip ᾱ ≥ clip_min in log-SNR terms.
        self.log_snr_min = math.log(clip) - math.log1p(-clip) if clip > 0 else -math.inf

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ(t) = log ᾱ − log(1 − ᾱ)``, shape of ``t``; ``+∞`` at ``t = 0``."""
        u = (_clamp01(t) * (self.end - self.start) + self.start) / self.tau
        s, e = self.start / self.tau, self.end / self.tau
        log_num = _logsigmoid(e) + F.logsigmoid(-u) + torch.log(-torch.expm1(u - e))  # log(v_end − sigmoid(u))
        log_den = F.logsigmoid(u) + _logsigmoid(-s) + torch.log(-torch.expm1(s - u))  # log(sigmoid(u) − v_start)
        return (log_num - log_den).clamp(min=self.log_snr_min)

    def derivatives(self, t: Tensor) -> ScheduleDerivatives:
        """The base's autodiff derivatives, one-sided from the left where the clip ``ᾱ ≥ clip_min`` holds ``λ`` flat.

        The clip starts a few ``1e-9`` before ``t = 1``, below float32 resolution, so at ``t = 1`` the derivative of
        the clipped ``λ`` is 0 and a parameterization dividing by ``α σ' − σ α'`` (flow) would divide by 0; the
        derivatives are taken at ``min(t, 1 − 2⁻²⁴)`` instead, the last float32 time before the clip.
        """
        if self.log_snr_min == -math.inf:
            return super().derivatives(t)
        return super().derivatives(t.clamp(max=1.0 - 2.0**-24))

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Exact inverse: ``sigmoid(u) = ᾱ·v_start + (1 − ᾱ)·v_end`` with ``ᾱ = sigmoid(λ)``, in log space."""
        s, e = self.start / self.tau, self.end / self.tau
        la, lb = F.logsigmoid(log_snr), F.logsigmoid(-log_snr)  # log ᾱ, log(1 − ᾱ)
        log_p = torch.logaddexp(la + _logsigmoid(s), lb + _logsigmoid(e))
        log_q = torch.logaddexp(la + _logsigmoid(-s), lb + _logsigmoid(-e))  # log(1 − sigmoid(u))
        t = ((log_p - log_q) * self.tau - self.start) / (self.end - self.start)
        return t.clamp(0.0, 1.0)


# Song & Ermon 2019 (SMLD); Song et al. 2021 eq. 31 (VE-SDE σ(t) = σ_min (σ_max/σ_min)^t); range of Karras et al. 2022.
class VESchedule(NoiseSchedule):
    """Variance exploding: ``α = 1``, ``σ(t) = σ_min (σ_max/σ_min)^t``, ``λ = −2 log σ``.

    ``λ(0) = −2 log σ_min`` is finite: ``x_0`` already carries noise ``σ_min``. ``num_timesteps=T`` makes it a
    discrete-time model evaluated at ``t = i/T``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, num_timesteps: int | None = None) -> None:
        super().__init__()
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"VE schedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        _check_num_timesteps(num_timesteps)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.num_timesteps = num_timesteps
        self._log_sigma_min = math.log(sigma_min)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ(t) = −2 (log σ_min + t·log(σ_max/σ_min))``, shape of ``t``."""
        return -2.0 * (self._log_sigma_min + _clamp01(t) * self._log_ratio)

    def alpha_sigma_from_log_snr(self, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """VE family: ``α = 1``, ``σ = e^{−λ/2}``, each the shape of ``log_snr``."""
        return torch.ones_like(log_snr), torch.exp(-0.5 * log_snr)

    def log_snr_rate(self, t: Tensor) -> Tensor:
        """``−dλ/dt = 2 log(σ_max/σ_min)`` (continuous); the base's backward difference when discrete."""
        if self.num_timesteps is not None:
            return super().log_snr_rate(t)
        return torch.full_like(t, 2.0 * self._log_ratio)

    def log_snr_bounds(self) -> tuple[float, float]:
        """``(−2 log σ_max, −2 log σ_min)``."""
        return -2.0 * math.log(self.sigma_max), -2.0 * self._log_sigma_min

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Exact inverse ``t = (−λ/2 − log σ_min)/log(σ_max/σ_min)``, clamped to ``[0, 1]``."""
        return ((-0.5 * log_snr - self._log_sigma_min) / self._log_ratio).clamp(0.0, 1.0)


# Liu et al. 2023 (rectified flow); Lipman et al. 2023 eq. 20 (OT path with σ_min = 0): x_t = (1 − t) x0 + t ε.
class RectifiedFlowSchedule(NoiseSchedule):
    """Linear interpolation ``α = 1 − t``, ``σ = t``, ``λ = 2 log((1 − t)/t)``; zero SNR at ``t = 1``.

    Flow-matching texts put data at ``t = 1`` (``x_t = t·x1 + (1 − t)·x0`` with ``x1`` data); their ``t`` is
    our ``1 − t``. The family is ``α + σ = 1``: ``α = sigmoid(λ/2)``, ``σ = sigmoid(−λ/2)``.
    """

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ(t) = 2 (log(1 − t) − log t)``, shape of ``t``; ``±∞`` at the endpoints."""
        t = _clamp01(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def alpha_sigma_from_log_snr(self, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """Rectified-flow family: ``α = sigmoid(λ/2)``, ``σ = sigmoid(−λ/2)`` (so ``α + σ = 1``)."""
        return torch.sigmoid(0.5 * log_snr), torch.sigmoid(-0.5 * log_snr)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 − t, t)``, each the shape of ``t``."""
        t = _clamp01(t)
        return 1.0 - t, t

    def derivatives(self, t: Tensor) -> ScheduleDerivatives:
        """``dα/dt = −1``, ``dσ/dt = 1``, ``dλ/dt = −2/(t(1 − t))`` (float32, shape of ``t``)."""
        t = t.detach().float()
        ones = torch.ones_like(t)
        return ScheduleDerivatives(d_alpha=-ones, d_sigma=ones, d_log_snr=-self.log_snr_rate(t))

    def log_snr_rate(self, t: Tensor) -> Tensor:
        """``−dλ/dt = 2/(t(1 − t))``, shape of ``t``; ``+∞`` at the endpoints."""
        t = _clamp01(t)
        return 2.0 / (t * (1.0 - t))

    def log_snr_bounds(self) -> tuple[float, float]:
        """``(−∞, +∞)``."""
        return -math.inf, math.inf

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Exact inverse ``t = sigmoid(−λ/2)``."""
        return torch.sigmoid(-0.5 * log_snr)


# Hoogeboom et al. 2023 ("simple diffusion") §3.1: λ_shift(t) = λ(t) + 2 log(reference_resolution / resolution).
class ShiftedSchedule(NoiseSchedule):
    """``base`` with its log-SNR shifted by ``shift = 2 log(reference_resolution/resolution)``.

    ``(α, σ)`` come from ``base.alpha_sigma_from_log_snr(λ_shift)``, so the family is kept (VP stays VP,
    rectified flow keeps ``α + σ = 1``, VE keeps ``α = 1``); ``num_timesteps`` is the base's. A higher
    resolution than the reference gives a negative shift (more noise at every ``t``).
    """

    def __init__(self, base: NoiseSchedule, reference_resolution: int = 64, resolution: int = 64) -> None:
        super().__init__()
        if reference_resolution < 1 or resolution < 1:
            raise ValueError(f"resolutions must be positive, got {reference_resolution}, {resolution}")
        self.base = base
        self.reference_resolution, self.resolution = reference_resolution, resolution
        self.shift = 2.0 * math.log(reference_resolution / resolution)
        self.num_timesteps = base.num_timesteps
        self.learnable = base.learnable

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ_base(t) + shift``, shape of ``t``."""
        return self.base.log_snr(t) + self.shift

    def alpha_sigma_from_log_snr(self, log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """The base's family map."""
        return self.base.alpha_sigma_from_log_snr(log_snr)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``base.alpha_sigma_from_log_snr(λ_shift(t))``; exactly the base's ``(α, σ)`` when ``shift = 0``."""
        if self.shift == 0.0:
            return self.base.alpha_sigma(t)
        return self.alpha_sigma_from_log_snr(self.log_snr(t))

    def log_snr_rate(self, t: Tensor) -> Tensor:
        """The base's rate: a constant shift does not change ``dλ/dt`` (nor λ differences)."""
        return self.base.log_snr_rate(t)

    def log_snr_bounds(self) -> tuple[float, float]:
        """The base's bounds plus ``shift``."""
        lo, hi = self.base.log_snr_bounds()
        return lo + self.shift, hi + self.shift

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """The base's inverse of ``λ − shift``."""
        return self.base.t_from_log_snr(log_snr - self.shift, iters)

    def variance_reduction(self) -> contextlib.AbstractContextManager[VarianceReduction]:
        """The base's :meth:`variance_reduction` (``TypeError`` unless the base is learnable)."""
        return self.base.variance_reduction()


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
