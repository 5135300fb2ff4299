"""Time samplers: draw training times ``t`` and the importance weight that keeps the loss unbiased.

A sampler returns ``(t, weight)`` with ``E[weight · ℓ(t)] = E_{t∼ref}[ℓ(t)]`` for every ``ℓ``, where the
reference is uniform over ``(t_min, 1]``, or over the integer timesteps ``{1..T}`` (``t = i/T``) of a
discrete schedule. A non-uniform proposal ``p`` therefore changes the variance of the loss estimate, never
its mean: ``weight = p_ref(t) / p(t)``.

Samplers defined by a density on ``t`` (log-normal, logit-normal, low-discrepancy) share
:class:`DensityTimeSampler`: it draws ``u`` and maps it through the inverse CDF, and for a discrete schedule
bins the draw to its integer step with that step's exact probability. Loss-aware samplers
(:class:`ImportanceTimeSampler`) learn from :meth:`TimeSampler.update` and checkpoint their state through
:meth:`TimeSampler.state_dict`. Every sampler reads the schedule only through ``log_snr`` and
``t_from_log_snr``. Adding one is a subclass plus one YAML file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule

StateDict = dict[str, Tensor | int | float]


class TimeSampler(ABC):
    """Draws ``(t, weight)``, each ``(batch_size,)`` float32 on ``device``.

    Stateful samplers override :meth:`update`, :meth:`state_dict` and :meth:`load_state_dict`; the training
    loop feeds :meth:`update` the per-example losses of every rank, so all ranks hold the same state.
    """

    name: str

    @abstractmethod
    def sample(
        self,
        batch_size: int,
        schedule: NoiseSchedule,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``t ∈ (0, 1]`` and the importance weight ``p_ref(t)/p(t)``."""

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses ``(B,)`` (before importance weighting) at times ``t`` ``(B,)``; no-op here."""
        del t, losses

    def state_dict(self) -> StateDict:
        """Everything needed to resume sampling exactly; empty for a stateless sampler."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore :meth:`state_dict`'s output; a stateless sampler ignores it."""
        del state


def _check_t_min(t_min: float) -> None:
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"time_sampler.t_min must be in [0, 1), got {t_min}")


# Ho et al. 2020 Alg. 1: t ~ Uniform({1, ..., T}); the continuous analogue t ~ U(t_min, 1].
class UniformTimeSampler(TimeSampler):
    """Uniform times; integer timesteps ``i/T`` for a discrete schedule. Weight is 1."""

    name = "uniform"

    def __init__(self, t_min: float = 1e-5) -> None:
        _check_t_min(t_min)
        self.t_min = t_min

    def sample(
        self,
        batch_size: int,
        schedule: NoiseSchedule,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        T = schedule.num_timesteps
        if T is not None:
            idx = torch.randint(1, T + 1, (batch_size,), device=device, generator=generator)
            t = idx.float() / T
        else:
            u = torch.rand(batch_size, device=device, generator=generator)
            t = self.t_min + (1.0 - self.t_min) * u
        return t, torch.ones_like(t)


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

    def __init__(self, t_min: float = 1e-5, importance_weight: bool = True) -> None:
        _check_t_min(t_min)
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
        self,
        batch_size: int,
        schedule: NoiseSchedule,
        device: torch.device,
        generator: torch.Generator | None = None,
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
                probs = self.step_probabilities(schedule, device)
                idx = torch.searchsorted(probs.cumsum(0), u, right=True).clamp(max=T - 1)
                return (idx + 1).float() / T, ((1.0 / T) / probs[idx]).float()
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


# Nichol & Dhariwal 2021 §3.3, eq. 18: p_t ∝ sqrt(E[L_t²]) over the last 10 losses of each t, 0.001 uniform mixed in.
class ImportanceTimeSampler(TimeSampler):
    """Loss-aware importance sampling over bins: the integer steps of a discrete schedule, else ``num_bins``
    equal bins of ``(t_min, 1]`` with ``t`` uniform inside its bin.

    Bins are drawn uniformly until every bin holds ``history`` losses, then with
    ``p = (1 − uniform_prob) · sqrt(E[L²]) / Σ sqrt(E[L²]) + uniform_prob / K``; ``weight = (1/K) / p(bin)``.
    The ring buffers of losses live in :meth:`state_dict` as tensors, so a resumed run draws the same times.

    Args:
        history: losses kept per bin.
        num_bins: bins of a continuous schedule (a discrete one uses its ``T`` steps).
        uniform_prob: probability mass of the uniform component.
        t_min: lower end of the continuous range.
    """

    name = "importance"

    def __init__(self, history: int = 10, num_bins: int = 100, uniform_prob: float = 0.001, t_min: float = 1e-5):
        _check_t_min(t_min)
        if history < 1 or num_bins < 1:
            raise ValueError(f"time_sampler.history and num_bins must be >= 1, got {history}, {num_bins}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"time_sampler.uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history, self.num_bins, self.uniform_prob, self.t_min = history, num_bins, uniform_prob, t_min
        self._discrete_T = 0  # T of a discrete schedule, 0 for continuous; fixed by the first schedule seen
        self._losses: Tensor | None = None  # (K, history) float32 ring buffers
        self._counts: Tensor | None = None  # (K,) int64, losses recorded per bin, capped at history
        self._positions: Tensor | None = None  # (K,) int64, next ring slot per bin

    def _allocate(self, schedule: NoiseSchedule, device: torch.device) -> None:
        """Create the buffers for ``schedule`` on first use; refuse a schedule with a different binning."""
        T = schedule.num_timesteps or 0
        K = T or self.num_bins
        if self._losses is not None and self._counts is not None and self._positions is not None:
            if (self._discrete_T, self._losses.shape[0]) != (T, K):
                raise ValueError(f"importance sampler state has {self._losses.shape[0]} bins, schedule needs {K}")
            self._losses, self._counts = self._losses.to(device), self._counts.to(device)
            self._positions = self._positions.to(device)
            return
        self._discrete_T = T
        self._losses = torch.zeros(K, self.history, device=device)
        self._counts = torch.zeros(K, dtype=torch.long, device=device)
        self._positions = torch.zeros(K, dtype=torch.long, device=device)

    @property
    def is_warm(self) -> bool:
        """Whether every bin holds a full history (before that, bins are drawn uniformly)."""
        return self._counts is not None and bool((self._counts == self.history).all())

    def probabilities(self) -> Tensor:
        """``(K,)`` float64 bin probabilities (uniform before warm-up); needs a schedule seen first."""
        assert self._losses is not None, "sample() or load_state_dict() first"
        K = self._losses.shape[0]
        uniform = torch.full((K,), 1.0 / K, dtype=torch.float64, device=self._losses.device)
        if not self.is_warm:
            return uniform
        rms = self._losses.double().square().mean(1).sqrt()
        if not rms.sum() > 0:
            return uniform
        return (1.0 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob * uniform

    def sample(
        self,
        batch_size: int,
        schedule: NoiseSchedule,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        self._allocate(schedule, device)
        probs = self.probabilities().to(device)
        K = probs.shape[0]
        u = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(probs.cumsum(0), u, right=True).clamp(max=K - 1)
        weight = ((1.0 / K) / probs[idx]).float()
        if self._discrete_T:
            return (idx + 1).float() / K, weight
        v = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
        t = self.t_min + (1.0 - self.t_min) * (idx + v) / K
        return t.float().clamp(self.t_min, 1.0), weight

    def bin_index(self, t: Tensor) -> Tensor:
        """Bin of each time, long, shape of ``t``: ``round(t·T) − 1`` (discrete) or its equal-width bin."""
        assert self._losses is not None, "sample() or load_state_dict() first"
        K = self._losses.shape[0]
        if self._discrete_T:
            pos = torch.round(t.double() * K) - 1
        else:
            pos = torch.floor((t.double() - self.t_min) / (1.0 - self.t_min) * K)
        return pos.clamp(0, K - 1).long()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push per-example losses ``(B,)`` at times ``t`` ``(B,)`` into their bins' ring buffers.

        Several losses may share a bin: they fill consecutive slots in batch order (only the last ``history``
        of them survive, as if pushed one at a time). Non-finite losses are skipped.
        """
        if self._losses is None or self._counts is None or self._positions is None:
            raise RuntimeError("ImportanceTimeSampler.update() before any sample() or load_state_dict()")
        dev = self._losses.device
        t, losses = t.detach().flatten().to(dev), losses.detach().flatten().to(dev, torch.float32)
        keep = torch.isfinite(losses)
        bins, losses = self.bin_index(t[keep]), losses[keep]
        order = torch.argsort(bins, stable=True)
        bins, losses = bins[order], losses[order]
        per_bin = torch.bincount(bins, minlength=self._losses.shape[0])
        first = torch.cumsum(per_bin, 0) - per_bin
        rank = torch.arange(bins.numel(), device=dev) - first[bins]  # occurrence number within its bin
        last = rank >= per_bin[bins] - self.history  # older ones would be overwritten within this batch
        slots = (self._positions[bins] + rank) % self.history
        self._losses[bins[last], slots[last]] = losses[last]
        self._positions = (self._positions + per_bin) % self.history
        self._counts = (self._counts + per_bin).clamp(max=self.history)

    def state_dict(self) -> StateDict:
        """``losses (K, history)``, ``counts (K,)``, ``positions (K,)`` and ``discrete_T``; empty before first use."""
        if self._losses is None or self._counts is None or self._positions is None:
            return {}
        return {
            "losses": self._losses.clone(),
            "counts": self._counts.clone(),
            "positions": self._positions.clone(),
            "discrete_T": self._discrete_T,
        }

    def load_state_dict(self, state: StateDict) -> None:
        """Restore :meth:`state_dict`'s output (an empty dict resets the sampler)."""
        if not state:
            self._losses = self._counts = self._positions = None
            return
        losses, counts, positions = state["losses"], state["counts"], state["positions"]
        assert isinstance(losses, Tensor) and isinstance(counts, Tensor) and isinstance(positions, Tensor)
        if losses.shape[1] != self.history:
            raise ValueError(f"checkpoint history {losses.shape[1]} != time_sampler.history {self.history}")
        self._losses, self._counts = losses.clone().float(), counts.clone().long()
        self._positions, self._discrete_T = positions.clone().long(), int(state["discrete_T"])
