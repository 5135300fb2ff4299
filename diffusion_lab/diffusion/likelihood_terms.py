"""The closed-form terms of the likelihood bounds: Gaussian KLs, data decoders, the posterior, one VLB step.

Everything here is a formula in the schedule and the data, without a network: the Gaussian KL and NLL, the
8-bit discretised Gaussian and the categorical decoder, ``q(x_s | x_t, x0)`` and the reverse variances, the VLB
term of one step (also a training loss, :func:`vlb_term`) and the two end terms (:func:`prior_kl`,
:func:`reconstruction_nll`). The bounds of a denoiser built from them, and the conventions, are in
:mod:`diffusion_lab.diffusion.likelihood`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.parameterizations import expand_like
from diffusion_lab.diffusion.schedules import NoiseSchedule

DECODERS = ("discretized", "gaussian")
VARIANCES = ("small", "large")
NUM_LEVELS = 256
# Below this bin width (in standard deviations) a bin's mass is the midpoint density times the width:
# a CDF difference that close to zero has lost its precision.
_NARROW_BIN = 1e-3


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid choices: {list(DECODERS)}")


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − e^x)`` for ``x ≤ 0``, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _sum_dims(x: Tensor) -> Tensor:
    """Sum a ``(B, ...)`` tensor over all but the batch dimension → ``(B,)``."""
    return x.flatten(1).sum(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats; arguments broadcast."""
    # Closed-form KL between univariate Gaussians (Ho et al. 2020, eq. 5 terms are sums of these).
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _gaussian_nll(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Elementwise ``−log N(x; mean, e^log_var)`` (a density, nats); arguments broadcast."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _log_normal_interval(lo: Tensor, hi: Tensor) -> Tensor:
    """``log(Φ(hi) − Φ(lo))`` for ``lo < hi`` (standardised), without cancellation in either tail."""
    # Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi): evaluate in the lower tail, where both CDFs keep relative precision.
    flip = (lo + hi) > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    narrow = (b - a) < _NARROW_BIN
    b_safe = torch.where(narrow, a + 1.0, b)  # keeps the unused branch finite, so gradients stay finite
    log_b = torch.special.log_ndtr(b_safe)
    exact = log_b + _log1mexp(torch.special.log_ndtr(a) - log_b)
    mid = 0.5 * (a + b)
    midpoint = -0.5 * mid**2 - 0.5 * math.log(2 * math.pi) + torch.log(b - a)
    return torch.where(narrow, midpoint, exact)


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int = NUM_LEVELS
) -> Tensor:
    """Elementwise ``log P(x)`` of a Gaussian ``N(mean, e^{2 log_scale})`` discretised to ``num_levels`` bins.

    ``x`` holds values on the grid ``−1 + 2k/(num_levels−1)`` (8-bit images in ``[−1, 1]``); ``mean`` and
    ``log_scale`` broadcast against it; the result has the broadcast shape (nats). The bins are
    ``[x − h, x + h]`` with ``h = 1/(num_levels−1)``, the edge bins extended to ``±∞`` so the masses sum to 1.
    """
    # Ho et al. 2020, eq. 13.
    half = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper, lower = (x - mean + half) * inv_scale, (x - mean - half) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # first bin: (−∞, x + h]
    log_sf_lower = torch.special.log_ndtr(-lower)  # last bin: [x − h, +∞)
    inner = _log_normal_interval(lower, upper)
    return torch.where(x < -1.0 + half, log_cdf_upper, torch.where(x > 1.0 - half, log_sf_lower, inner))


def _posterior_coefficients(
    schedule: NoiseSchedule, t: Tensor, s: Tensor, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, b, log_var)`` with ``q(x_s | x_t, x0) = N(a·x_t + b·x0, e^log_var)``; each ``(B, 1, ...)``."""
    # Kingma et al. 2021, eq. 29-30, rewritten with δ = λ_t − λ_s so λ_s = +∞ (σ_s = 0) is exact.
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    delta = schedule.log_snr(t) - schedule.log_snr(s)
    a = alpha_t / alpha_s * (sigma_s / sigma_t) ** 2
    b = -alpha_s * torch.expm1(delta)
    log_var = 2.0 * torch.log(sigma_s) + _log1mexp(delta)
    return expand_like(a, like), expand_like(b, like), expand_like(log_var, like)


def posterior(schedule: NoiseSchedule, t: Tensor, s: Tensor, x_t: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and log variance of ``q(x_s | x_t, x0)`` for times ``s < t`` ``(B,)``; both the shape of ``x_t``.

    Any ``(α, σ)``, not only variance preserving; at ``λ_s = +∞`` the mean is ``α_s x0`` and the log variance ``−∞``.
    """
    # Kingma et al. 2021, eq. 29-30 (Ho et al. 2020, eq. 6-7 for a VP schedule).
    a, b, log_var = _posterior_coefficients(schedule, t, s, x_t)
    return a * x_t + b * x0, log_var.expand_as(x_t)


def _log_transition_variance(schedule: NoiseSchedule, t: Tensor, s: Tensor) -> Tensor:
    """``log β = log σ²_{t|s} = log(σ_t² − (α_t/α_s)² σ_s²)``, ``(B,)``."""
    # Kingma et al. 2021, eq. 29: σ²_{t|s} = σ_t²(1 − SNR_t/SNR_s).
    return 2.0 * torch.log(schedule.alpha_sigma(t)[1]) + _log1mexp(schedule.log_snr(t) - schedule.log_snr(s))


def _clipped_posterior_log_variance(schedule: NoiseSchedule, t: Tensor, s: Tensor) -> Tensor:
    """``log β̃`` of ``q(x_s | x_t, x0)``, ``(B,)``; where it is ``−∞`` (σ_s = 0) the next step's ``β̃``."""
    # improved-diffusion's posterior_log_variance_clipped: step 1 borrows step 2's β̃ (β̃_1 = 0).
    log_snr_t = schedule.log_snr(t)
    small = 2.0 * torch.log(schedule.alpha_sigma(s)[1]) + _log1mexp(log_snr_t - schedule.log_snr(s))
    after = (2.0 * t - s).clamp(max=1.0)
    following = 2.0 * torch.log(schedule.alpha_sigma(t)[1]) + _log1mexp(schedule.log_snr(after) - log_snr_t)
    return torch.where(torch.isfinite(small), small, following)


def reverse_log_variance(schedule: NoiseSchedule, t: Tensor, s: Tensor, variance: str | Tensor, like: Tensor) -> Tensor:
    """``log σ²`` of the reverse step ``p(x_s | x_t)`` for times ``s < t`` ``(B,)``; the shape of ``like``.

    ``"small"``: the posterior variance β̃ (clipped at the first step); ``"large"``: the transition
    variance ``β = σ²_{t|s}``; a tensor ``v`` (shape of ``like``, in ``[−1, 1]``): the learned interpolation.
    """
    # Nichol & Dhariwal 2021, eq. 15: Σ = exp(v' log β + (1 − v') log β̃), v' = (v + 1)/2.
    log_beta = expand_like(_log_transition_variance(schedule, t, s), like)
    log_small = expand_like(_clipped_posterior_log_variance(schedule, t, s), like)
    if isinstance(variance, Tensor):
        frac = (variance + 1.0) / 2.0
        return frac * log_beta + (1.0 - frac) * log_small
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; valid choices: {[*VARIANCES, '<tensor>']}")
    return (log_beta if variance == "large" else log_small).expand_as(like)


def _decoder_nll(x0: Tensor, mean: Tensor, log_var: Tensor, decoder: str) -> Tensor:
    """Elementwise ``−log p(x0)`` of a Gaussian decoder: discretised to 8 bits, or a density."""
    if decoder == "discretized":
        return -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    return _gaussian_nll(x0, mean, log_var)


def _vlb_elementwise(
    x0: Tensor,
    x_t: Tensor,
    x0_hat: Tensor,
    t: Tensor,
    s: Tensor,
    schedule: NoiseSchedule,
    log_var: Tensor,
    decoder: str,
) -> Tensor:
    """Elementwise VLB term of the step ``t → s`` (nats, shape of ``x0``): a KL, or the decoder where ``λ_s = +∞``."""
    # Ho et al. 2020, eq. 5: L_{t−1} = KL(q(x_s|x_t,x0) || p(x_s|x_t)); L_0 = −log p(x0|x_1).
    _check_decoder(decoder)
    a, b, log_var_q = _posterior_coefficients(schedule, t, s, x_t)
    is_decoder = expand_like(torch.isinf(schedule.log_snr(s)), x_t)
    log_var_q = torch.where(is_decoder, torch.zeros_like(log_var_q), log_var_q)  # unused there; keep it finite
    kl = normal_kl(a * x_t + b * x0, log_var_q, a * x_t + b * x0_hat, log_var)
    return torch.where(is_decoder, _decoder_nll(x0, x0_hat, log_var, decoder), kl)


def vlb_term(
    x0: Tensor,
    x_t: Tensor,
    x0_hat: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    log_variance: Tensor,
    decoder: str = "discretized",
    s: Tensor | None = None,
) -> Tensor:
    """One term of the discrete VLB, ``(B,)`` nats per data dimension (mean over dimensions).

    ``x0, x_t, x0_hat`` ``(B, ...)``; ``t`` ``(B,)`` at ``i/T`` of a discrete schedule and ``s = t − 1/T``
    unless given; ``log_variance`` broadcasts against ``x0``. ``KL(q(x_s|x_t,x0) || N(μ̃(x_t, x̂0), e^log_var))``,
    or where ``λ_s = +∞`` (the first step of a DDPM) the decoder NLL ``−log p(x0 | x_t)`` with mean ``x̂0``.
    Differentiable; pass ``x0_hat.detach()`` to train only the variance (improved DDPM's ``L_hybrid``).
    """
    # Nichol & Dhariwal 2021, eq. 16 uses this term with a stop-gradient on the mean.
    if s is None:
        if schedule.num_timesteps is None:
            raise ValueError("vlb_term needs s for a continuous-time schedule (schedule.num_timesteps is None)")
        s = t - 1.0 / schedule.num_timesteps
    return _vlb_elementwise(x0, x_t, x0_hat, t, s, schedule, log_variance, decoder).flatten(1).mean(1)


def prior_kl(x0: Tensor, schedule: NoiseSchedule, t_max: float = 1.0) -> Tensor:
    """``KL(q(x_{t_max} | x0) || N(0, σ_{t_max}² I))``, ``(B,)`` nats summed over dimensions; ``x0`` ``(B, ...)``."""
    # Kingma et al. 2021, eq. 11 (prior term); equal variances leave ½ (α_1 x0)²/σ_1² = ½ SNR_1 x0².
    log_snr_1 = schedule.log_snr(x0.new_full((x0.shape[0],), t_max))
    return 0.5 * _sum_dims(expand_like(torch.exp(log_snr_1), x0) * x0**2)


def _categorical_nll(x0: Tensor, u: Tensor, scale: Tensor, num_levels: int = NUM_LEVELS) -> Tensor:
    """Elementwise ``−log p(x0 | u)`` with ``p(x_k) ∝ exp(−½((u − x_k)/scale)²)`` over the grid ``x_k``."""
    levels = torch.linspace(-1.0, 1.0, num_levels, dtype=x0.dtype, device=x0.device)
    k = ((x0 + 1.0) * (num_levels - 1) / 2.0).round().clamp(0, num_levels - 1)
    x_k = -1.0 + 2.0 * k / (num_levels - 1)
    logits = -0.5 * ((u.unsqueeze(-1) - levels) / scale.unsqueeze(-1)) ** 2
    return torch.logsumexp(logits, dim=-1) + 0.5 * ((u - x_k) / scale) ** 2


def reconstruction_nll(
    x0: Tensor, schedule: NoiseSchedule, t0: Tensor, decoder: str, generator: torch.Generator | None = None
) -> Tensor:
    """``−log p(x0 | z_{t0})`` with ``z_{t0} ∼ q(z | x0)``, ``(B,)`` nats summed over dimensions.

    ``x0`` ``(B, ...)``, ``t0`` ``(B,)``. With ``u = z/α = x0 + (σ/α) ε``: ``"discretized"`` is the factorised
    categorical over the 256 levels with logits ``−½((u − x_k)/(σ/α))²``; ``"gaussian"`` is ``N(x0; u, (σ/α)²)``.
    Differentiable in the schedule (a learned schedule's ``λ_0`` trains through it).
    """
    # Kingma et al. 2021, eq. 11 (reconstruction term) and App. B's decoder (VDM code `decode`).
    _check_decoder(decoder)
    scale = expand_like(torch.exp(-0.5 * schedule.log_snr(t0)), x0).expand_as(x0)  # σ/α = e^{−λ/2}
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    u = x0 + scale * eps
    if decoder == "gaussian":
        return _sum_dims(_gaussian_nll(x0, u, 2.0 * torch.log(scale)))
    return _sum_dims(_categorical_nll(x0, u, scale))
