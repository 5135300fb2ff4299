"""Likelihood bounds: the discrete-time VLB and the continuous-time ELBO, in nats (and bits/dim).

Convention (DESIGN.md): ``t ∈ [0, 1]``, ``t = 0`` data, ``x_t = α_t x0 + σ_t ε``, ``λ_t = log(α_t²/σ_t²)``.
For ``s < t``, ``q(x_s | x_t, x0)`` is Gaussian for any ``(α, σ)`` (Kingma et al. 2021, eq. 29-30); written
with ``δ = λ_t − λ_s ≤ 0`` (``e^δ = SNR_t/SNR_s``) it is finite at both ends, including ``λ_0 = +∞``:

    mean = (α_t/α_s)(σ_s²/σ_t²)·x_t + α_s(1 − e^δ)·x0,    var = σ_s²(1 − e^δ),    β = σ²_{t|s} = σ_t²(1 − e^δ).

Two discrete bounds, chosen by whether ``λ_0`` is finite:
- ``λ_0 = +∞`` (DDPM β-schedules): Ho et al. 2020 eq. 5, prior + Σ_{i≥2} KL_i + a decoder at ``i = 1``;
- ``λ_0 < ∞`` (VE, learned schedules): Kingma et al. 2021 eq. 11-13, prior + Σ_{i≥1} KL_i + reconstruction at 0.
The continuous bound is Kingma et al. 2021 eq. 17-19. Every ELBO field is ``(B,)`` nats summed over data
dimensions; :func:`vlb_term` (a training loss) is a mean over dimensions. Data decoders: ``"discretized"``
for 8-bit images on ``[−1, 1]`` (256 levels ``x_k = −1 + 2k/255``), ``"gaussian"`` for continuous data.

The closed-form terms live in :mod:`diffusion_lab.diffusion.likelihood_terms`; they are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.likelihood_terms import (
    _check_decoder,
    _sum_dims,
    _vlb_elementwise,
    prior_kl,
    reconstruction_nll,
    reverse_log_variance,
)
from diffusion_lab.diffusion.parameterizations import expand_like
from diffusion_lab.diffusion.schedules import NoiseSchedule

__all__ = [
    "ELBOOutput",
    "continuous_elbo",
    "discrete_elbo",
    "elbo_time_range",
]


@dataclass(frozen=True)
class ELBOOutput:
    """Negative ELBO and its terms; every field ``(B,)`` in nats, summed over data dimensions."""

    total: Tensor
    prior: Tensor
    diffusion: Tensor
    decoder: Tensor

    def bits_per_dim(self, num_dims: int) -> Tensor:
        """``total / (num_dims · ln 2)``, ``(B,)``."""
        return self.total / (num_dims * math.log(2.0))


def _finite_at_zero(schedule: NoiseSchedule, like: Tensor) -> bool:
    """Whether ``λ_0`` is finite (VE, learned schedules) rather than ``+∞`` (DDPM β-schedules)."""
    return bool(torch.isfinite(schedule.log_snr(like.new_zeros(1))).all())


def _num_steps(schedule: NoiseSchedule, num_steps: int | None) -> int:
    """The number of VLB steps; a discrete schedule's ``T`` unless given (then it must divide ``T``)."""
    T = schedule.num_timesteps
    n = num_steps if num_steps is not None else T
    if n is None:
        raise ValueError("discrete_elbo needs num_steps for a continuous-time schedule")
    if n < 1 or (T is not None and T % n != 0):
        raise ValueError(f"num_steps must be a positive integer dividing the schedule's T={T}, got {n}")
    return n


def _step_term(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None,
    idx: Tensor,
    n: int,
    variance: str,
    decoder: str,
    clip_x0: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """VLB term of step ``i → i−1`` (``idx`` ``(B,)`` in ``1..n``) at a fresh ``x_t ∼ q``, ``(B,)`` summed nats."""
    schedule = denoiser.schedule
    t, s = idx.to(x0.dtype) / n, (idx - 1).to(x0.dtype) / n
    alpha, sigma = (expand_like(c, x0) for c in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x0_hat, v = denoiser.predict_with_variance(x_t, t, y)
    x0_hat = x0_hat.to(x0.dtype)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
    log_var = reverse_log_variance(schedule, t, s, variance if v is None else v.to(x0.dtype), x_t)
    return _sum_dims(_vlb_elementwise(x0, x_t, x0_hat, t, s, schedule, log_var, decoder))


@torch.no_grad()
def discrete_elbo(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None = None,
    *,
    num_steps: int | None = None,
    variance: str = "small",
    decoder: str = "discretized",
    num_t_samples: int | None = None,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
) -> ELBOOutput:
    """Negative discrete-time ELBO of ``x0`` ``(B, ...)`` on the grid ``t_i = i/n``; fields ``(B,)`` nats.

    ``n = num_steps`` (default ``schedule.num_timesteps``). ``λ_0 = +∞``: prior + Σ_{i=2}^n KL_i + decoder at
    ``i = 1`` (``decoder`` field); ``λ_0 < ∞``: prior + Σ_{i=1}^n KL_i + reconstruction at ``t = 0``.
    ``num_t_samples=None`` evaluates every term (n denoiser calls); otherwise the KL sum is estimated without
    bias by ``#terms`` × the mean of ``num_t_samples`` uniformly drawn terms per example. The reverse variance
    is the denoiser's learned one if it has one, else ``variance`` (``"small"``/``"large"``).
    """
    # Ho et al. 2020, eq. 5 (λ_0 = +∞); Kingma et al. 2021, eq. 11-13 (λ_0 finite).
    _check_decoder(decoder)
    schedule, batch = denoiser.schedule, x0.shape[0]
    n = _num_steps(schedule, num_steps)
    first_is_decoder = not _finite_at_zero(schedule, x0)
    lo = 2 if first_is_decoder else 1  # first index of the KL terms

    def term(idx: Tensor) -> Tensor:
        return _step_term(denoiser, x0, y, idx, n, variance, decoder, clip_x0, generator)

    def index(i: int) -> Tensor:
        return torch.full((batch,), i, device=x0.device, dtype=torch.long)

    diffusion = x0.new_zeros(batch)
    if num_t_samples is None:
        for i in range(lo, n + 1):
            diffusion = diffusion + term(index(i))
    elif n >= lo:
        if num_t_samples < 1:
            raise ValueError(f"num_t_samples must be None or a positive integer, got {num_t_samples}")
        draw = (torch.randint(lo, n + 1, (batch,), device=x0.device, generator=generator) for _ in range(num_t_samples))
        draws = [term(idx) for idx in draw]
        diffusion = (n - lo + 1) * torch.stack(draws).mean(0)
    if first_is_decoder:
        dec = term(index(1))
    else:
        dec = reconstruction_nll(x0, schedule, x0.new_zeros(batch), decoder, generator)
    prior = prior_kl(x0, schedule)
    return ELBOOutput(total=prior + diffusion + dec, prior=prior, diffusion=diffusion, decoder=dec)


# 1 − t_max where λ(1) = −∞ and t_min where λ(0) = +∞: the bound is taken over [t_min, t_max], where λ is finite.
_T_EPS = 1e-5


def elbo_time_range(
    schedule: NoiseSchedule, t_min: float | None = None, t_max: float | None = None
) -> tuple[float, float]:
    """``(t_min, t_max)`` of the continuous ELBO: 0 and 1 where ``λ`` is finite there, else 1e-5 and 1 − 1e-5."""
    lam_1, lam_0 = schedule.log_snr_bounds()
    t_min = (0.0 if math.isfinite(lam_0) else _T_EPS) if t_min is None else t_min
    t_max = (1.0 if math.isfinite(lam_1) else 1.0 - _T_EPS) if t_max is None else t_max
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"continuous_elbo needs 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    return t_min, t_max


def _stratified_log_snr(
    lam_lo: float, lam_hi: float, batch: int, k: int, like: Tensor, gen: torch.Generator | None
) -> Tensor:
    """``(k, batch)`` log-SNRs, uniform on ``[lam_lo, lam_hi]``: per example its own offset ``u``, points ``(u + j)/k``.

    Examples are independent of each other (unlike one offset for the whole batch, VDM App. F), so the spread of
    per-example estimates measures the error of their mean; the ``k`` draws of one example are stratified.
    """
    u = torch.rand(batch, generator=gen, device=like.device, dtype=like.dtype)
    j = torch.arange(k, device=like.device, dtype=like.dtype)[:, None]
    return lam_hi - (lam_hi - lam_lo) * (u + j) / k


def _eps_error(denoiser: Denoiser, x0: Tensor, y: Tensor | None, t: Tensor, gen: torch.Generator | None) -> Tensor:
    """``‖ε − ε̂(x_t, t)‖²`` at a fresh ``x_t ∼ q(x_t | x0)``, ``(B,)`` summed over dimensions; ``t`` ``(B,)``."""
    alpha, sigma = (expand_like(c, x0) for c in denoiser.schedule.alpha_sigma(t))
    eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    x_t = alpha * x0 + sigma * eps
    x0_hat = denoiser(x_t, t, y).to(x0.dtype)
    return _sum_dims((eps - (x_t - alpha * x0_hat) / sigma) ** 2)


@torch.no_grad()
def continuous_elbo(
    denoiser: Denoiser,
    x0: Tensor,
    y: Tensor | None = None,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    decoder: str = "discretized",
    num_t_samples: int = 1,
    generator: torch.Generator | None = None,
) -> ELBOOutput:
    """Negative continuous-time ELBO of ``x0`` ``(B, ...)``; fields ``(B,)`` nats summed over dimensions.

    Prior KL at ``t_max`` + reconstruction at ``t_min`` + ``L = ½∫_{λ(t_max)}^{λ(t_min)} E‖ε − ε̂‖² dλ``, the
    diffusion term written in λ. It is estimated by drawing ``λ`` uniformly on that interval, ``num_t_samples``
    stratified draws per example and independent across examples: ``½(λ(t_min) − λ(t_max))·mean_k ‖ε − ε̂‖²``.
    In ``t`` the integrand ``½(−λ')‖ε − ε̂‖²`` grows like ``1/t`` where ``λ(0) = +∞`` and the uniform-t estimator
    has an enormous variance; in λ it is bounded. Defaults (:func:`elbo_time_range`): ``t_min = 0`` if ``λ(0)``
    is finite, else ``1e-5``; ``t_max = 1`` if ``λ(1)`` is finite, else ``1 − 1e-5`` (zero terminal SNR).
    """
    # Kingma et al. 2021, eq. 17-19, in λ by their §5.1 change of variables (L_∞ depends on λ_min, λ_max only).
    _check_decoder(decoder)
    if num_t_samples < 1:
        raise ValueError(f"continuous_elbo needs num_t_samples >= 1, got {num_t_samples}")
    schedule, batch = denoiser.schedule, x0.shape[0]
    t_min, t_max = elbo_time_range(schedule, t_min, t_max)
    ends = schedule.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64, device=x0.device))
    lam_lo, lam_hi = float(ends[0]), float(ends[1])
    lams = _stratified_log_snr(lam_lo, lam_hi, batch, num_t_samples, x0, generator)
    times = schedule.t_from_log_snr(lams).clamp(t_min, t_max)
    errors = torch.stack([_eps_error(denoiser, x0, y, t, generator) for t in times])
    diffusion = 0.5 * (lam_hi - lam_lo) * errors.mean(0)
    recon = reconstruction_nll(x0, schedule, x0.new_full((batch,), t_min), decoder, generator)
    prior = prior_kl(x0, schedule, t_max)
    return ELBOOutput(total=prior + diffusion + recon, prior=prior, diffusion=diffusion, decoder=recon)
