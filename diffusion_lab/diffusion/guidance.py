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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser, NetworkOutput
from diffusion_lab.diffusion.parameterizations import Coefficients


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
