"""Time samplers defined by a density on ``t``: low-discrepancy, log-normal (EDM) and logit-normal (SD3).

:class:`DensityTimeSampler` draws ``u``, maps it through the inverse CDF and, for a discrete schedule, bins
the draw to its integer step with that step's exact probability; :class:`TruncatedNormalTimeSampler` is the
shared form of a normal law on a monotone map ``y(t)``, truncated to ``(t_lo, 1]``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Annotated

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.diffusion.time_samplers.base import TimeSampler, _draw_bins
from diffusion_lab.schema.domains import UNIT_OPEN
from diffusion_lab.schema.signature import enforce_domains


class DensityTimeSampler(TimeSampler):
    """A proposal given by a density on ``(t_lo, 1]``: ``cdf``, ``icdf`` and ``log_pdf``, all normalised there.

    ``t_lo`` is ``t_min`` for a continuous schedule and 0 for a discrete one, whose bins ``((i−1)/T, i/T]``
    cover ``(0, 1]``. Continuous: ``t = icdf(u)``, ``weight = (1/(1 − t_min)) / pdf(t)``. Discrete: the draw is
    binned to ``i = ⌈t·T⌉`` with probability ``P(i) = cdf(i/T) − cdf((i−1)/T)``, ``weight = (1/T) / P(i)``.
    ``P`` is mixed with a uniform floor of ``mass_floor`` so that a step of (numerically) zero mass keeps a
    finite weight; the mixture is what is sampled, so the estimate stays exactly unbiased. Binning is done by
    searching ``u`` in the cumulative step masses (equivalent to ``⌈icdf(u)·T⌉``, without rounding error).
    Computations are float64; the schedule is called in float32.

    ``importance_weight=False`` returns weight 1: the proposal then becomes part of the objective, as in
    EDM (log-normal σ) and SD3 (logit-normal t) where the training distribution acts as a loss weighting.
    The default keeps the uniform-t objective unbiased, at the price of widely spread weights.
    """

    mass_floor: float = 1e-6

    @enforce_domains
    def __init__(self, t_min: Annotated[float, UNIT_OPEN] = 1e-5, importance_weight: bool = True) -> None:
        self.t_min = t_min
        self.importance_weight = importance_weight

    def t_lo(self, schedule: NoiseSchedule) -> float:
        """Lower end of the support: 0 for a discrete schedule, else ``t_min``."""
        return 0.0 if schedule.is_discrete else self.t_min

    @abstractmethod
    def cdf(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``P(τ ≤ t)`` for ``t`` of any shape in ``[t_lo, 1]``; float64, shape of ``t``."""

    @abstractmethod
    def icdf(self, u: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Inverse CDF: ``u ∈ [0, 1)`` (any shape, float64) to ``t ∈ [t_lo, 1]``, float64, shape of ``u``."""

    @abstractmethod
    def log_pdf(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Log density on ``(t_lo, 1]`` at ``t`` (any shape); float64, shape of ``t``."""

    def draw_u(self, batch_size: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """``(batch_size,)`` float64 uniforms in ``[0, 1)``; low-discrepancy samplers override this."""
        return torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)

    def step_probabilities(self, schedule: NoiseSchedule, device: torch.device) -> Tensor:
        """``(T,)`` float64 probabilities of the steps ``i = 1..T``, uniform floor mixed in."""
        T = schedule.num_timesteps
        assert T is not None
        edges = torch.arange(T + 1, device=device, dtype=torch.float64) / T
        mass = torch.diff(self.cdf(edges, schedule)).clamp(min=0.0)
        mass = mass / mass.sum()
        return (1.0 - self.mass_floor) * mass + self.mass_floor / T

    def sample(
        self, batch_size: int, schedule: NoiseSchedule, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        t, weight = self._draw(batch_size, schedule, device, generator)
        return t, (weight if self.importance_weight else torch.ones_like(weight))

    def _draw(
        self, batch_size: int, schedule: NoiseSchedule, device: torch.device, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``(t, p_ref(t)/p(t))``."""
        with torch.no_grad():  # a learned schedule must not receive gradients from the time draw
            u = self.draw_u(batch_size, device, generator)
            T = schedule.num_timesteps
            if T is not None:
                idx, weight = _draw_bins(self.step_probabilities(schedule, device), u)
                return (idx + 1).float() / T, weight
            t = self.icdf(u, schedule).clamp(self.t_min, 1.0).float()
            log_w = -self.log_pdf(t, schedule) - math.log(1.0 - self.t_min)
            return t, log_w.exp().float()


# Kingma et al. 2021 (VDM) App. I.1: t_i = (u_0 + i/B) mod 1 with one u_0 ~ U[0, 1) per batch.
class LowDiscrepancyTimeSampler(DensityTimeSampler):
    """Evenly spaced ("antithetic") times: each ``t`` is marginally uniform (weight 1), the batch covers
    ``(t_lo, 1]`` with spacing ``1/B``; a discrete schedule gets the steps ``⌈u·T⌉``."""

    name = "antithetic"

    def draw_u(self, batch_size: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """``(batch_size,)`` float64: ``(u_0 + i/B) mod 1``, one shared ``u_0``."""
        u0 = torch.rand((), device=device, generator=generator, dtype=torch.float64)
        return torch.remainder(u0 + torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size, 1.0)

    def cdf(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        lo = self.t_lo(schedule)
        return ((t.double() - lo) / (1.0 - lo)).clamp(0.0, 1.0)

    def icdf(self, u: Tensor, schedule: NoiseSchedule) -> Tensor:
        lo = self.t_lo(schedule)
        return lo + (1.0 - lo) * u.double()

    def log_pdf(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        return torch.full_like(t, -math.log(1.0 - self.t_lo(schedule)), dtype=torch.float64)


class TruncatedNormalTimeSampler(DensityTimeSampler):
    """Times with ``y(t) ∼ N(mean, std²)`` truncated to ``t ∈ (t_lo, 1]``, ``y`` increasing in ``t``.

    Subclasses give the map ``y(t)`` (:meth:`to_y`), its inverse (:meth:`from_y`) and ``log dy/dt``;
    ``pdf(t) = φ(z)/std · dy/dt / Z`` with ``z = (y − mean)/std`` and ``Z = Φ(z(1)) − Φ(z(t_lo))``.
    """

    def __init__(self, mean: float, std: float, t_min: float = 1e-5, importance_weight: bool = True) -> None:
        super().__init__(t_min, importance_weight)
        if not std > 0.0:
            raise ValueError(f"time_sampler std must be positive, got {std}")
        self.mean, self.std = mean, std

    @abstractmethod
    def to_y(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``y(t)``, float64, shape of ``t``."""

    @abstractmethod
    def from_y(self, y: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``t(y)``, float64, shape of ``y``."""

    @abstractmethod
    def log_dy_dt(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``log(dy/dt)``, float64, shape of ``t``."""

    def _z(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        return (self.to_y(t, schedule) - self.mean) / self.std

    def _cdf_ends(self, schedule: NoiseSchedule, device: torch.device) -> tuple[Tensor, Tensor]:
        """``Φ(z(t_lo))`` and ``Φ(z(1))``, float64 scalars."""
        ends = torch.tensor([self.t_lo(schedule), 1.0], device=device, dtype=torch.float64)
        phi = torch.special.ndtr(self._z(ends, schedule))
        return phi[0], phi[1]

    def cdf(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        lo, hi = self._cdf_ends(schedule, t.device)
        return ((torch.special.ndtr(self._z(t, schedule)) - lo) / (hi - lo)).clamp(0.0, 1.0)

    def icdf(self, u: Tensor, schedule: NoiseSchedule) -> Tensor:
        lo, hi = self._cdf_ends(schedule, u.device)
        tiny = torch.finfo(torch.float64).tiny
        p = (lo + u.double() * (hi - lo)).clamp(min=lo, max=hi).clamp(tiny, 1.0 - 2.0**-53)
        return self.from_y(self.mean + self.std * torch.special.ndtri(p), schedule)

    def log_pdf(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        lo, hi = self._cdf_ends(schedule, t.device)
        z = self._z(t, schedule)
        log_phi = -0.5 * z.square() - 0.5 * math.log(2.0 * math.pi)
        return log_phi - math.log(self.std) + self.log_dy_dt(t, schedule) - torch.log(hi - lo)


# Karras et al. 2022 (EDM) Table 1, p_train: ln σ ~ N(P_mean, P_std²), with σ = σ_t/α_t = exp(−λ_t/2).
class LogNormalTimeSampler(TruncatedNormalTimeSampler):
    """EDM's training noise levels on any schedule: ``t = t_from_log_snr(−2 ln σ)``, truncated to the
    schedule's ``σ`` range on ``(t_lo, 1]``; ``d ln σ/dt = −½ dλ/dt`` by autograd of ``log_snr`` (elementwise)."""

    name = "log_normal"

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, t_min: float = 1e-5, importance_weight: bool = True
    ) -> None:
        super().__init__(p_mean, p_std, t_min, importance_weight)
        self.p_mean, self.p_std = p_mean, p_std

    def to_y(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``ln σ = −λ_t/2``."""
        return -0.5 * schedule.log_snr(t.float()).double()

    def from_y(self, y: Tensor, schedule: NoiseSchedule) -> Tensor:
        return schedule.t_from_log_snr((-2.0 * y).float()).double()

    def log_dy_dt(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        # Left derivative at t = 1: a clamp inside log_snr can give a zero one-sided derivative there.
        t = t.float().clamp(max=1.0 - 2.0**-24).requires_grad_(True)
        with torch.enable_grad():
            (d_log_snr,) = torch.autograd.grad(schedule.log_snr(t).sum(), t)
        return torch.log(-0.5 * d_log_snr.double())


# Esser et al. 2024 (SD3) §3.1, eq. 19: t = sigmoid(m + s·z), z ~ N(0, 1).
class LogitNormalTimeSampler(TruncatedNormalTimeSampler):
    """Logit-normal times, ``logit t ∼ N(m, s²)``, truncated to ``(t_lo, 1]``. SD3 writes data at ``t = 0``
    too (rectified flow ``x_t = (1 − t) x0 + t ε``), so no flip is needed."""

    name = "logit_normal"

    # Keeps logit(t) finite where a float32 t rounds to 1.
    _t_max = 1.0 - 2.0**-24

    def __init__(self, m: float = 0.0, s: float = 1.0, t_min: float = 1e-5, importance_weight: bool = True) -> None:
        super().__init__(m, s, t_min, importance_weight)
        self.m, self.s = m, s

    def to_y(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``logit t``."""
        return torch.logit(t.double().clamp(max=self._t_max))

    def from_y(self, y: Tensor, schedule: NoiseSchedule) -> Tensor:
        return torch.sigmoid(y.double())

    def log_dy_dt(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``d logit t / dt = 1/(t(1 − t))``."""
        t = t.double().clamp(max=self._t_max)
        return -torch.log(t) - torch.log1p(-t)
