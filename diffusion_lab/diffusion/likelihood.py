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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.parameterizations import expand_like
from diffusion_lab.diffusion.schedules import NoiseSchedule

DECODERS = ("discretized", "gaussian")
VARIANCES = ("small", "large")
NUM_LEVELS = 256
# Below this bin width (in standard deviations) a bin's mass is the midpoint density times the width:
# a CDF difference that close to zero has lost its precision.
_NARROW_BIN = 1e-3


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
