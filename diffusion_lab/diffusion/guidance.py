"""Classifier-free guidance (Ho & Salimans 2022): label dropout for training, a guided denoiser for sampling.

Training replaces each label by the null label with probability ``p_uncond`` (:func:`drop_labels`),
so one network learns both ``x̂0(x_t, y)`` and ``x̂0(x_t, ∅)``. Sampling combines the two
(:class:`GuidedDenoiser`) with guidance scale ``w``:

    x̂0_w = x̂0(x_t, ∅) + w · (x̂0(x_t, y) − x̂0(x_t, ∅)).

Ho & Salimans 2022 eq. 6 write the same rule on ε with their ``w_HS = w − 1``:
``ε̃ = (1 + w_HS) ε̂(x_t, y) − w_HS ε̂(x_t, ∅)``; our ``w`` is the "scale" of GLIDE / diffusers, so
``w = 1`` is plain conditional sampling and ``w = 0`` unconditional. Guiding x̂0 equals guiding ε:
at a fixed ``x_t``, ``ε̂ = (x_t − α_t x̂0) / σ_t`` is an affine map of x̂0, and the combination's weights
``(1 − w, w)`` sum to 1, so the ``x_t / σ_t`` terms cancel. (The same holds for v, the score and the
flow velocity, which are all affine in x̂0 at fixed ``x_t``.)

Autoguidance (Karras et al. 2024, :class:`AutoGuidedDenoiser`) extrapolates from a weaker model of the same task
instead of the unconditional branch, ``D_w = D_guide + w·(D_main − D_guide)``; the guidance interval (Kynkäänniemi et
al. 2024, :class:`IntervalGuidance`) applies either only where ``σ/α`` lies in ``(σ_lo, σ_hi]``. :class:`Guidance`
says which, and wraps a denoiser accordingly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser, NetworkOutput
from diffusion_lab.diffusion.parameterizations import Coefficients
from diffusion_lab.diffusion.schedules.base import NoiseSchedule


def drop_labels(y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_label`` independently with probability ``p_uncond`` (Ho & Salimans 2022 Alg. 1).

    Args:
        y: ``(B,)`` long labels.
        p_uncond: the dropout probability, in ``[0, 1]``; 0 returns ``y`` unchanged, 1 all null labels.
        null_label: index of the unconditional label (the network's ``num_classes``).
        generator: RNG of the coin flips (on ``y``'s device); None uses the global torch RNG, which
            ``lightning.seed_everything`` seeds, as it does the loss's noise and time draws.

    Returns:
        ``(B,)`` long labels, a new tensor.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be a probability in [0, 1], got {p_uncond}")
    if p_uncond == 0.0:
        return y.clone()
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def null_label_of(denoiser: Denoiser) -> int:
    """The null label of ``denoiser``'s network (its ``num_classes``); raises if the network is unconditional."""
    num_classes = getattr(denoiser.net, "num_classes", None)
    if num_classes is None:
        raise ValueError(
            "classifier-free guidance needs a class-conditional network (num_classes set; train with "
            "cond.enabled=true), got an unconditional one"
        )
    return int(num_classes)


# Ho & Salimans 2022 eq. 6 in x̂0 form, one batched 2B network call per evaluation (as GLIDE's
# text2im notebook `model_fn` and DiT's `forward_with_cfg` do).
class GuidedDenoiser(Denoiser):
    """A :class:`Denoiser` whose prediction is the classifier-free-guided ``x̂0_w`` (see module docstring).

    Shares the network, schedule and parameterization of ``denoiser`` (no copy); samplers, the
    probability-flow ``velocity`` and NFE counting see it as any other denoiser. Every call runs the
    network once on a ``2B`` batch ``[x_t; x_t]`` with labels ``[y; ∅]``, so one denoiser call costs
    :attr:`network_evals_per_call` = 2 network evaluations.

    A learned reverse variance is taken from the conditional branch, as in GLIDE's and DiT's sampling
    code (they guide ε and keep each half's variance channels, then return the conditional half).

    Args:
        denoiser: the class-conditional denoiser (its network embeds ``num_classes + 1`` labels).
        scale: guidance scale ``w >= 0``: 0 unconditional, 1 conditional, > 1 guided.
        null_label: index of the null label; defaults to the network's ``num_classes``.
    """

    network_evals_per_call = 2

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int | None = None) -> None:
        super().__init__(denoiser.net, denoiser.schedule, denoiser.parameterization, denoiser.learned_variance)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(
                f"guidance scale must be a finite number >= 0 (0: unconditional, 1: conditional), got {scale}"
            )
        self.scale = float(scale)
        self.null_label = null_label_of(denoiser) if null_label is None else int(null_label)
        self.train(denoiser.training)

    def guided(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(x̂0_w, v)``: guided x̂0 ``(B, ...)`` float32 and the conditional branch's variance interpolation or None.

        ``x_t (B, ...)``, ``t (B,)``, ``y (B,)`` long labels (required: guidance needs a condition).
        """
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y of shape (B,), got None")
        batch = x_t.shape[0]
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        y2 = torch.cat([y, torch.full_like(y, self.null_label)])
        net_out = Denoiser.network_output(self, x2, t2, y2)
        x0_hat, _ = self.parameterization.to_x0_eps(net_out.out, x2.float(), net_out.coefs)
        x0_cond, x0_uncond = x0_hat.split(batch)
        x0_guided = x0_uncond + self.scale * (x0_cond - x0_uncond)
        variance = None if net_out.variance is None else net_out.variance[:batch]
        return x0_guided, variance

    def network_output(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, coefs: Coefficients | None = None
    ) -> NetworkOutput:
        """Refused: a guided prediction combines two network outputs; use ``predict``/``predict_with_variance``."""
        raise TypeError(
            "GuidedDenoiser has no single network output (it combines a conditional and an unconditional one); "
            "call predict / predict_with_variance, or network_output on the wrapped Denoiser"
        )

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.guided(x_t, t, y)[0]

    @torch.no_grad()
    def predict_with_variance(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(x̂0_w, v)`` without gradients (``v`` from the conditional branch; None unless learned)."""
        return self.guided(x_t, t, y)


def sigma_over_alpha(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The noise level ``σ_t/α_t = exp(−λ_t/2)`` at ``t (B,)`` (EDM's σ for a VP schedule), float64 ``(B,)``."""
    return torch.exp(-0.5 * schedule.log_snr(t.double()))


def prediction(denoiser: Denoiser, x_t: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(x̂0, v)`` of any denoiser with gradients kept: a guided one's combination, a plain one's network output."""
    if isinstance(denoiser, GuidedDenoiser | AutoGuidedDenoiser | IntervalGuidance):
        return denoiser.guided(x_t, t, y)
    net_out = denoiser.network_output(x_t, t, y)
    return denoiser.parameterization.to_x0_eps(net_out.out, x_t.float(), net_out.coefs)[0], net_out.variance


def at_noise_level(guide: Denoiser, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """``guide``'s x̂0 ``(B, ...)`` for ``x_t`` at time ``t`` of ``schedule`` (another model's): evaluated at the
    guide's time ``t'`` of the same log-SNR λ, on ``x_t·α'/α`` (``x_t/α = x0 + (σ/α)ε`` depends on λ alone), so two
    models trained with different schedules denoise the same noisy image. The same schedule needs no change."""
    log_snr = schedule.log_snr(t)
    if torch.allclose(guide.schedule.log_snr(t), log_snr):
        return prediction(guide, x_t, t, y)[0]
    t_guide = guide.schedule.t_from_log_snr(log_snr).to(t.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha_g, sigma_g = guide.schedule.alpha_sigma(t_guide)
    # α'/α = σ'/σ at equal λ; the better-conditioned ratio avoids 0/0 at λ = ±∞.
    ratio = torch.where(alpha > sigma, alpha_g / alpha, sigma_g / sigma).view(-1, *[1] * (x_t.dim() - 1))
    return prediction(guide, (x_t * ratio).to(x_t.dtype), t_guide, y)[0]


# Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2 (and NVlabs/edm2
# generate_images.py: the guide's D lerped towards the main model's by the guidance weight).
class AutoGuidedDenoiser(Denoiser):
    """Autoguidance: ``D_w = D_guide + w·(D_main − D_guide)``, ``D_guide`` a weaker model of the same task (smaller, or
    trained less), both given the same labels ``y`` (or none). One call runs each network once:
    :attr:`network_evals_per_call` = 2. The main model's learned variance, if any, is kept.

    Args:
        denoiser: the main model.
        guide: the guide (same data shape and conditioning; its schedule may differ: :func:`at_noise_level`).
        scale: guidance weight ``w >= 0``: 1 is the main model alone, 0 the guide alone.
    """

    network_evals_per_call = 2

    def __init__(self, denoiser: Denoiser, guide: Denoiser, scale: float) -> None:
        super().__init__(denoiser.net, denoiser.schedule, denoiser.parameterization, denoiser.learned_variance)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"autoguidance weight must be a finite number >= 0 (1: the main model), got {scale}")
        self.scale = float(scale)
        self.main = denoiser
        self.guide = guide
        self.train(denoiser.training)

    def guided(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(D_w, v)``: guided x̂0 ``(B, ...)`` float32 and the main model's variance interpolation or None."""
        x0_main, variance = prediction(self.main, x_t, t, y)
        x0_guide = at_noise_level(self.guide, self.schedule, x_t, t, y)
        return x0_guide + self.scale * (x0_main - x0_guide), variance

    def network_output(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, coefs: Coefficients | None = None
    ) -> NetworkOutput:
        """Refused: the guided prediction combines two networks' outputs; use ``predict``/``predict_with_variance``."""
        raise TypeError(
            "AutoGuidedDenoiser has no single network output (it combines the main model's and the guide's); "
            "call predict / predict_with_variance, or network_output on one of the wrapped Denoisers"
        )

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.guided(x_t, t, y)[0]

    @torch.no_grad()
    def predict_with_variance(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(D_w, v)`` without gradients (``v`` from the main model; None unless learned)."""
        return self.guided(x_t, t, y)


# Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality" §3:
# guidance only for σ in (σ_lo, σ_hi]; elsewhere the plain conditional denoiser.
class IntervalGuidance(Denoiser):
    """A guided denoiser applied only where ``σ_lo < σ_t/α_t <= σ_hi``; elsewhere ``plain`` (one network evaluation).

    Counts what it runs: :attr:`calls` denoiser calls, of which :attr:`guided_calls` guided (a call whose batch
    straddles the interval counts the guided fraction of its rows; samplers give every row the same ``t``).

    Args:
        guided: a :class:`GuidedDenoiser` or :class:`AutoGuidedDenoiser` around ``plain``.
        plain: the unguided denoiser (the conditional model under CFG, the main model under autoguidance).
        interval: ``(σ_lo, σ_hi)`` in ``σ/α``, ``0 <= σ_lo < σ_hi`` (``σ_hi`` may be ``inf``).
    """

    network_evals_per_call = 2  # at most; guided_calls says how many calls paid it

    def __init__(self, guided: GuidedDenoiser | AutoGuidedDenoiser, plain: Denoiser, interval: tuple[float, float]):
        super().__init__(plain.net, plain.schedule, plain.parameterization, plain.learned_variance)
        lo, hi = (float(v) for v in interval)
        if not 0 <= lo < hi:
            raise ValueError(f"guidance_interval must be [σ_lo, σ_hi] with 0 <= σ_lo < σ_hi (in σ/α), got {interval}")
        self.inner, self.plain, self.interval = guided, plain, (lo, hi)
        self.calls, self.guided_calls = 0, 0.0
        self.train(plain.training)

    def inside(self, t: Tensor) -> Tensor:
        """``(B,)`` bool: whether each row's noise level lies in ``(σ_lo, σ_hi]``."""
        level = sigma_over_alpha(self.schedule, t)
        return (level > self.interval[0]) & (level <= self.interval[1])

    def guided(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(x̂0, v)``: the guided prediction on the rows inside the interval, the plain one on the others."""
        inside = self.inside(t)
        self.calls += 1
        self.guided_calls += float(inside.float().mean())
        if bool(inside.all()) or not bool(inside.any()):
            return prediction(self.inner if bool(inside.all()) else self.plain, x_t, t, y)
        x0, variance = torch.empty_like(x_t, dtype=torch.float32), None
        for rows, denoiser in ((inside, self.inner), (~inside, self.plain)):
            part, v = prediction(denoiser, x_t[rows], t[rows], None if y is None else y[rows])
            x0[rows] = part
            if v is not None:
                variance = torch.empty_like(x0) if variance is None else variance
                variance[rows] = v
        return x0, variance

    def network_output(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, coefs: Coefficients | None = None
    ) -> NetworkOutput:
        """Refused, as for the guided denoiser it wraps."""
        raise TypeError("IntervalGuidance has no single network output; call predict / predict_with_variance")

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.guided(x_t, t, y)[0]

    @torch.no_grad()
    def predict_with_variance(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(x̂0, v)`` without gradients."""
        return self.guided(x_t, t, y)


@dataclass(frozen=True)
class Guidance:
    """How a sampler's denoiser is guided: weight ``scale``; ``guide`` None is classifier-free guidance (the null
    label), a denoiser autoguidance; ``interval`` ``(σ_lo, σ_hi)`` in σ/α limits it there (None: everywhere)."""

    scale: float
    guide: Denoiser | None = None
    interval: tuple[float, float] | None = None

    @property
    def kind(self) -> str:
        """``"cfg"`` or ``"auto"``."""
        return "cfg" if self.guide is None else "auto"

    def wrap(self, denoiser: Denoiser, null_label: int | None = None) -> Denoiser:
        """``denoiser`` guided as this says (every sampler takes the result)."""
        guided: GuidedDenoiser | AutoGuidedDenoiser
        if self.guide is None:
            guided = GuidedDenoiser(denoiser, self.scale, null_label)
        else:
            guided = AutoGuidedDenoiser(denoiser, self.guide, self.scale)
        return guided if self.interval is None else IntervalGuidance(guided, denoiser, self.interval)
