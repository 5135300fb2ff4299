"""Loss weightings ``w(λ)`` applied to one canonical error, the ε-MSE (Kingma & Gao 2023 view).

``L = E_{t∼U}[ f_w(t) · ‖ε̂ − ε‖² ]`` with ``‖·‖²`` a mean over data dimensions and the per-example
factor ``f_w`` given by :meth:`Weighting.factor`:

- an ordinary weighting (``density = False``) is the multiplier at a uniformly drawn ``t``:
  ``f_w = w(λ_t)``, so how much each λ counts also depends on how the schedule spreads λ over ``t``;
- a *density* weighting (``density = True``) is Kingma & Gao's ``w(λ)``, a weight per unit ``λ``
  (``L = ½ ∫ w(λ) E‖ε̂−ε‖² dλ``): changing variables to a uniform ``t`` gives
  ``f_w = ½ · w(λ_t) · (−dλ/dt)``, so the loss is the same for every schedule with the same end points.

With ``SNR = e^{λ}``, the familiar objectives are rows of one table:

=============  ===============================  ==================================================
name           w(λ)                             the same loss written classically
=============  ===============================  ==================================================
eps_mse        1                                L_simple (Ho et al. 2020); x0-space weight SNR
x0_mse         e^{−λ}                           ‖x̂0 − x0‖²
v_mse          1 + e^{−λ}                       ‖v̂ − v‖², variance-preserving schedules only
truncated_snr  max(1, e^{−λ})                   max(SNR, 1)·‖x̂0 − x0‖² (Salimans & Ho 2022 §4)
min_snr        min(1, γ e^{−λ})                 min(SNR, γ)·‖x̂0 − x0‖² (Hang et al. 2023)
p2             (k + e^{λ})^{−γ}                 P2 on L_simple (Choi et al. 2022 eq. 8)
elbo *         1                                VDM's L_∞ / the discrete VLB, in nats/dim
edm *          N(λ)·(e^{−λ} + σ_d²)/σ_d²        EDM (Karras et al. 2022) with its log-normal σ
sigmoid *      sigmoid(b − λ), b = 2            Kingma & Gao 2023 (experiments)
=============  ===============================  ==================================================

``*``: density weighting, factor ``½·w(λ)·(−dλ/dt)``; ``N(λ) = N(λ; −2·P_mean, (2·P_std)²)``.

Every ``__call__`` is computed in log space where it matters: finite for |λ| ≤ 40, and at λ = ±∞ wherever
the limit is finite. :data:`WEIGHTINGS` maps each ``name`` (the config switch ``weighting=<name>``) to
its class; adding a weighting is a subclass plus one YAML file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule

# λ beyond this is clamped inside Gaussians in λ: the density there is exactly 0 in any float dtype, and
# clamping keeps ±∞ from meeting ∓∞ (which would be nan) when it is multiplied by e^{−λ}.
_LOG_SNR_GAUSSIAN_CLAMP = 1.0e4


def _log_normal_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """``log(Φ(hi) − Φ(lo))`` of standardised ``lo ≤ hi``; ``−∞`` where ``lo = hi``. Evaluated in the lower tail."""
    flip = (lo + hi) > 0  # Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi): keeps relative precision in either tail
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


class Weighting(ABC):
    """A loss weighting ``w(λ) ≥ 0`` on the ε-MSE; called on a log-SNR of any shape, returns that shape.

    ``density = False``: ``w`` multiplies the ε-MSE at a uniformly drawn ``t``.
    ``density = True``: ``w`` is Kingma & Gao's weighting per unit ``λ``; :meth:`factor` multiplies it by
    ``½·(−dλ/dt)`` (the ``½`` is VDM eq. 17's, kept by Kingma & Gao, so ``w ≡ 1`` is the ELBO).
    """

    name: str
    density: bool = False

    @abstractmethod
    def __call__(self, log_snr: Tensor) -> Tensor:
        """``w(λ)`` with the shape of ``log_snr``."""

    def integral(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``∫_lo^hi w(λ) dλ`` elementwise for ``lo ≤ hi`` (broadcast shape); ``hi = +∞`` and ``lo = −∞`` allowed.

        Defined for density weightings only (a weight per unit λ); each implements it in closed form.
        """
        raise TypeError(f"integral() is defined for density weightings only, got weighting={self.name}")

    def factor(self, t: Tensor, log_snr: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Per-example multiplier of the ε-MSE at a uniformly drawn ``t`` ``(B,)``, shape ``(B,)``.

        ``w(λ)`` for an ordinary weighting. A density weighting on a continuous schedule: ``½·w(λ)·(−dλ/dt)``
        (where ``w = 0``, e.g. λ = +∞ at t = 0, the factor is 0 even if the rate is infinite). On a discrete
        schedule (``T`` steps) step ``i`` stands for the cell ``[λ_i, λ_{i−1}]``: :meth:`discrete_factor`.
        """
        w = self(log_snr)
        if not self.density:
            return w
        if schedule.num_timesteps is not None:
            return self.discrete_factor(t, log_snr, schedule)
        scaled = 0.5 * w * schedule.log_snr_rate(t)
        return torch.where(w == 0, torch.zeros_like(scaled), scaled)

    # Kingma & Gao 2023 eq. 7 (L = ½∫w(λ)E‖ε̂−ε‖²dλ) restricted to the cell of step i: the exact mass of ½w there.
    def discrete_factor(self, t: Tensor, log_snr: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``T·½∫_{λ(t)}^{λ_{i−1}} w(λ) dλ`` with ``i = round(t·T)``, shape of ``t`` (a density weighting).

        On the grid (``t = i/T``) this is the cell ``[λ_i, λ_{i−1}]``, so ``E_{i∼U{1..T}}[factor_i]`` is
        ``½∫ w dλ`` over the whole schedule, as in continuous time. Unlike ``½·w·T(λ_{i−1} − λ_i)`` it is finite
        at ``i = 1`` where ``λ_0 = +∞``: the cell's integral is the limit, finite wherever ``∫^∞ w`` is.
        """
        steps = schedule.num_timesteps
        assert steps is not None
        i = torch.round(t * steps).clamp(min=1)
        return 0.5 * steps * self.integral(log_snr, schedule.log_snr((i - 1) / steps))


# Ho et al. 2020 eq. 14, L_simple; the same loss is Hang et al. 2023's "SNR weighting" of the x0-MSE.
class EpsMSEWeighting(Weighting):
    """Uniform ε-MSE, ``w(λ) = 1``."""

    name = "eps_mse"

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.ones_like(log_snr)


# x0-MSE: ‖x̂0 − x0‖² = (σ/α)²‖ε̂ − ε‖² = e^{−λ}‖ε̂ − ε‖² (Kingma & Gao 2023, Table 1 "x-prediction").
class X0MSEWeighting(Weighting):
    """x0-MSE, ``w(λ) = e^{−λ}`` (``+∞`` at λ = −∞, where the x0-MSE of an ε-model is undefined)."""

    name = "x0_mse"

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.exp(-log_snr)


# Salimans & Ho 2022 §4 (v-prediction): ‖v̂ − v‖² = (α²+σ²)²/α² ‖ε̂ − ε‖², = 1 + e^{−λ} when α² + σ² = 1.
class VMSEWeighting(Weighting):
    """v-MSE, ``w(λ) = 1 + e^{−λ}``.

    Exact only for a variance-preserving schedule: in general ``‖v̂ − v‖² = α²(1 + e^{−λ})²‖ε̂ − ε‖²``,
    which is not a function of λ alone. This row is the VP value, used as a weighting of λ on any schedule.
    """

    name = "v_mse"

    def __call__(self, log_snr: Tensor) -> Tensor:
        return 1.0 + torch.exp(-log_snr)


# Salimans & Ho 2022 §4 "truncated SNR": x0-space weight max(SNR, 1), i.e. max(1, e^{−λ}) on the ε-MSE.
class TruncatedSNRWeighting(Weighting):
    """Truncated SNR, ``w(λ) = max(1, e^{−λ})``: the larger of the ε-MSE and the x0-MSE."""

    name = "truncated_snr"

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.exp(torch.clamp(-log_snr, min=0.0))


# Hang et al. 2023 eq. 10: x0-space weight min(SNR, γ), i.e. min(SNR, γ)/SNR on the ε-MSE.
class MinSNRWeighting(Weighting):
    """Min-SNR-γ: ``w(λ) = min(1, γ e^{−λ})``, computed in log space (finite at λ = ±∞)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"weighting.gamma must be > 0, got {gamma}")
        self.gamma = gamma

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.exp(torch.clamp(math.log(self.gamma) - log_snr, max=0.0))


# Choi et al. 2022 eq. 8: λ'_t = λ_t/(k + SNR(t))^γ applied to the L_simple terms (λ_t = 1 there).
class P2Weighting(Weighting):
    """Perception-prioritised weighting, ``w(λ) = (k + e^{λ})^{−γ} = exp(−γ·logaddexp(log k, λ))``.

    ``γ = 0`` is L_simple; the paper's defaults are ``k = 1`` and ``γ ∈ {0.5, 1}``.
    """

    name = "p2"

    def __init__(self, gamma: float = 1.0, k: float = 1.0) -> None:
        if gamma < 0:
            raise ValueError(f"weighting.gamma must be >= 0, got {gamma}")
        if k < 0:
            raise ValueError(f"weighting.k must be >= 0, got {k}")
        self.gamma, self.k = gamma, k

    def __call__(self, log_snr: Tensor) -> Tensor:
        if self.gamma == 0:
            return torch.ones_like(log_snr)
        log_k = torch.full_like(log_snr, math.log(self.k) if self.k > 0 else -math.inf)
        return torch.exp(-self.gamma * torch.logaddexp(log_k, log_snr))


# Kingma et al. 2021 eq. 17: L_∞ = ½ E_{t∼U(0,1)}[−λ'(t) ‖ε − ε̂‖²]; discrete T: eq. 13 (Ho et al. 2020 eq. 5).
class ELBOWeighting(Weighting):
    """The ELBO: ``w(λ) = 1`` per unit λ, so the loss is the diffusion term of the VLB in nats/dim.

    Continuous schedule: ``factor = ½·(−dλ/dt)`` (VDM's ``L_∞``). Discrete schedule (``T`` steps, ``t = i/T``):
    the exact discrete VLB weight, with the reverse variance ``σ² = β̃`` (Ho et al. 2020 eq. 5 / Kingma et
    al. 2021 eq. 13). Where ``λ_{i−1}`` is finite, ``L_{i−1} = KL(q(x_{i−1}|x_i, x0) ‖ p(x_{i−1}|x_i)) =
    ½(SNR_{i−1} − SNR_i)‖x̂0 − x0‖² = ½·expm1(λ_{i−1} − λ_i)·‖ε̂ − ε‖²`` (sums over dimensions). At ``i = 1``
    of a DDPM, where ``λ_0 = +∞``, ``L_0`` is the Gaussian decoder ``−log N(x0; x̂0, β̃_2)`` up to its constant
    normaliser: ``½·e^{−λ_1}/β̃_2·‖ε̂ − ε‖²``, with the same decoder variance as :func:`discrete_elbo` behind
    ``val/bpd`` (improved-diffusion's clipped ``β̃``, ``β̃_2 = σ_1²(1 − e^{λ_2 − λ_1})``; ``β_1`` if ``T = 1``).
    The factor is ``T`` times these, so ``E_{i∼U{1..T}}[factor_i · ε-MSE_i] = Σ_{i=1..T} L_{i−1} / D``: the
    whole VLB but the prior term, in nats/dim.
    """

    name = "elbo"
    density = True

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.ones_like(log_snr)

    def integral(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``∫_lo^hi 1 dλ = hi − lo``."""
        return hi - lo

    def discrete_factor(self, t: Tensor, log_snr: Tensor, schedule: NoiseSchedule) -> Tensor:
        steps = schedule.num_timesteps
        assert steps is not None
        i = torch.round(t * steps).clamp(min=1)
        log_snr_prev = schedule.log_snr((i - 1) / steps)
        decoder = torch.isposinf(log_snr_prev)
        # Keep inf out of both branches of the where (and of its gradient): the interior one sees λ_1 there.
        interior = 0.5 * steps * torch.expm1(torch.where(decoder, log_snr, log_snr_prev) - log_snr)
        return torch.where(
            decoder, 0.5 * steps * torch.exp(-log_snr - _decoder_log_variance(t, steps, schedule)), interior
        )


def _decoder_log_variance(t: Tensor, steps: int, schedule: NoiseSchedule) -> Tensor:
    """``log β̃_2 = log σ_1² + log(1 − e^{λ_2 − λ_1})`` at ``t`` (shape of ``t``); ``log β_1 = log σ_1²`` if T = 1."""
    # Nichol & Dhariwal 2021 code (posterior_log_variance_clipped), as likelihood.reverse_log_variance("small").
    log_var = 2.0 * torch.log(schedule.alpha_sigma(t)[1])
    if steps < 2:
        return log_var
    delta = schedule.log_snr(torch.clamp(t + 1.0 / steps, max=1.0)) - schedule.log_snr(t)
    return log_var + torch.log(-torch.expm1(delta))


# Kingma & Gao 2023, Table 1 (EDM row): EDM's training density p(λ) and loss weight as one weighting of λ.
class EDMWeighting(Weighting):
    """EDM (Karras et al. 2022) per unit λ: ``w(λ) = N(λ; −2·P_mean, (2·P_std)²)·(e^{−λ} + σ_d²)/σ_d²``.

    EDM draws ``ln σ_e ∼ N(P_mean, P_std²)`` with ``σ_e = σ/α = e^{−λ/2}``, i.e. ``λ ∼ N(−2P_mean, 4P_std²)``,
    and weights ``‖D − x0‖²`` by ``(σ_e² + σ_d²)/(σ_e σ_d)²``. Since ``‖D − x0‖² = σ_e²‖ε̂ − ε‖²``, EDM's
    per-sample loss is ``(σ_e² + σ_d²)/σ_d²·‖ε̂ − ε‖²``. Combined with the log-normal time sampler
    (importance weight ``p_uniform(t)/p(t) = 1/(N(λ)·(−dλ/dt))``) the factor ``½·w·(−dλ/dt)`` reproduces
    exactly that, up to Kingma & Gao's ``½``; with a uniform sampler it is the same loss in expectation.
    """

    name = "edm"
    density = True

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        if p_std <= 0:
            raise ValueError(f"weighting.p_std must be > 0, got {p_std}")
        if sigma_data <= 0:
            raise ValueError(f"weighting.sigma_data must be > 0, got {sigma_data}")
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(self, log_snr: Tensor) -> Tensor:
        lam = log_snr.clamp(-_LOG_SNR_GAUSSIAN_CLAMP, _LOG_SNR_GAUSSIAN_CLAMP)
        mean, std = -2.0 * self.p_mean, 2.0 * self.p_std
        log_normal = -0.5 * ((lam - mean) / std) ** 2 - math.log(std * math.sqrt(2.0 * math.pi))
        log_sd2 = 2.0 * math.log(self.sigma_data)
        log_weight = torch.logaddexp(-lam, torch.full_like(lam, log_sd2)) - log_sd2
        return torch.exp(log_normal + log_weight)

    # ∫N(λ; m, s²)(e^{−λ} + σ_d²)/σ_d² dλ: N(λ; m, s²)·e^{−λ} = e^{−m + s²/2}·N(λ; m − s², s²), so both parts are Φ's.
    def integral(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``P(lo ≤ λ ≤ hi)`` under ``N(m, s²)`` + ``e^{−m+s²/2}/σ_d²`` × that under ``N(m − s², s²)``.

        ``m = −2·P_mean``, ``s = 2·P_std``; computed in float64 and log space.
        """
        mean, std = -2.0 * self.p_mean, 2.0 * self.p_std
        lo64, hi64 = (x.double().clamp(-_LOG_SNR_GAUSSIAN_CLAMP, _LOG_SNR_GAUSSIAN_CLAMP) for x in (lo, hi))
        log_mass = _log_normal_mass((lo64 - mean) / std, (hi64 - mean) / std)
        shifted = mean - std**2
        log_shift = -mean + 0.5 * std**2 - 2.0 * math.log(self.sigma_data)
        log_tilted = log_shift + _log_normal_mass((lo64 - shifted) / std, (hi64 - shifted) / std)
        return torch.exp(torch.logaddexp(log_mass, log_tilted)).to(lo.dtype)


# Kingma & Gao 2023, experiments ("sigmoid weighting"): monotonic w(λ) = sigmoid(−λ + b), with b = 2.
class SigmoidWeighting(Weighting):
    """Sigmoid weighting per unit λ, ``w(λ) = sigmoid(b − λ)``: 1 at low SNR, ``≈ e^{b−λ}`` at high SNR, ``½`` at b.

    Monotone in λ, so by Kingma & Gao's result the loss is an ELBO under Gaussian noise augmentation. The
    default ``b = 2`` is the ``sigmoid(−λ + 2)`` of reference implementations of Kingma & Gao's weighting
    (e.g. BayesFlow's diffusion noise schedules); Hoogeboom et al. 2024 (SiD2) lower ``b`` as resolution
    grows, together with the schedule's log-SNR shift.
    """

    name = "sigmoid"
    density = True

    def __init__(self, bias: float = 2.0) -> None:
        self.bias = bias

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(self.bias - log_snr)

    # d/dλ softplus(b − λ) = −sigmoid(b − λ).
    def integral(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``softplus(b − lo) − softplus(b − hi)`` (float64 inside: a narrow cell is a difference of near equals)."""
        lo64, hi64 = lo.double(), hi.double()
        return (F.softplus(self.bias - lo64) - F.softplus(self.bias - hi64)).to(lo.dtype)


WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls
    for cls in (
        EpsMSEWeighting,
        X0MSEWeighting,
        VMSEWeighting,
        TruncatedSNRWeighting,
        MinSNRWeighting,
        P2Weighting,
        ELBOWeighting,
        EDMWeighting,
        SigmoidWeighting,
    )
}
