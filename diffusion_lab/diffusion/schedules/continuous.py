"""Schedules with a closed-form ``λ_t``: sigmoid (VP), variance exploding, rectified flow, and the shift.

Each is defined in continuous time (``num_timesteps=T`` evaluates a discrete-time model at ``t = i/T`` where
offered); :class:`ShiftedSchedule` shifts the log-SNR of any schedule for a change of resolution.
"""

from __future__ import annotations

import contextlib
import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.schedules.base import (
    NoiseSchedule,
    ScheduleDerivatives,
    VarianceReduction,
    _clamp01,
)
from diffusion_lab.schema.domains import POSITIVE_INT
from diffusion_lab.schema.signature import enforce_domains


def _logsigmoid(x: float) -> float:
    """``log sigmoid(x)`` of a python float, without overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# Chen 2023 ("On the importance of noise scheduling"), Alg. 1 sigmoid_schedule; Jabri et al. 2023.
class SigmoidSchedule(NoiseSchedule):
    """Variance-preserving ``ᾱ(t) = (v_end − sigmoid(u))/(v_end − v_start)``, clipped to ``[clip_min, 1]``.

    ``u = (t·(end − start) + start)/τ`` and ``v_* = sigmoid(*/τ)``, so ``ᾱ(0) = 1`` and (unclipped) ``ᾱ(1) = 0``.
    ``λ`` is computed in log space: ``λ = log(v_end − sigmoid(u)) − log(sigmoid(u) − v_start)`` with
    ``sigmoid(a) − sigmoid(b) = sigmoid(a)·sigmoid(−b)·(1 − e^{b−a})``. ``zero_terminal_snr=True`` drops the
    clip, leaving Chen's ``ᾱ(1) = 0`` exact (``λ(1) = −∞``). ``num_timesteps=T`` makes it a discrete-time
    model evaluated at ``t = i/T``.
    """

    @enforce_domains
    def __init__(
        self,
        start: float = -3.0,
        end: float = 3.0,
        tau: float = 1.0,
        clip_min: float = 1e-9,
        num_timesteps: Annotated[int | None, POSITIVE_INT.or_null("continuous")] = None,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        if not (start < end and tau > 0 and 0.0 <= clip_min < 1.0):
            raise ValueError(
                f"sigmoid schedule needs start < end, tau > 0, 0 <= clip_min < 1; got {start}, {end}, {tau}, {clip_min}"
            )
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

    @enforce_domains
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        num_timesteps: Annotated[int | None, POSITIVE_INT.or_null("continuous")] = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"VE schedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
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
