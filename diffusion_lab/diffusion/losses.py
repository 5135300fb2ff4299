"""DiffusionLoss = schedule ∘ time sampler ∘ parameterization ∘ weighting.

``L(θ) = E_{x0, t, ε}[ ŵ(t) · w(λ_t) · ‖ε̂_θ(x_t, t) − ε‖² ]`` with ``ŵ`` the time sampler's
importance weight and ``w`` the loss weighting; the ε-MSE is computed in the network's output space
as ``c(α, σ)·‖F̂ − F‖²`` (see :mod:`parameterizations`). The squared norm is a mean over data
dimensions, as in Ho et al. 2020's code. All loss arithmetic is float32, whatever the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.parameterizations import expand_like
from diffusion_lab.diffusion.time_samplers import TimeSampler
from diffusion_lab.diffusion.weightings import Weighting


@dataclass(frozen=True)
class LossOutput:
    """``loss``: scalar; ``per_example``, ``eps_mse``, ``t``, ``log_snr``: each ``(B,)``."""

    loss: Tensor
    per_example: Tensor
    eps_mse: Tensor
    t: Tensor
    log_snr: Tensor


class DiffusionLoss:
    """The training objective; ``loss(denoiser, x0 (B, ...), y) -> LossOutput``.

    Holds no parameters: everything learnable (network, a learned schedule) lives in the denoiser.
    """

    def __init__(self, weighting: Weighting, time_sampler: TimeSampler) -> None:
        self.weighting = weighting
        self.time_sampler = time_sampler

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        schedule, param = denoiser.schedule, denoiser.parameterization
        x0 = x0.float()
        t, importance = self.time_sampler.sample(x0.shape[0], schedule, x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        alpha, sigma = (expand_like(c, x0) for c in schedule.alpha_sigma(t))
        x_t = alpha * x0 + sigma * eps
        out, _, _ = denoiser.network_output(x_t, t, y)
        sq_err = (out - param.target(x0, eps, alpha, sigma)).square().flatten(1).mean(1)
        eps_mse = param.eps_error_scale(alpha, sigma).flatten(1)[:, 0] * sq_err
        log_snr = schedule.log_snr(t)
        per_example = importance * self.weighting(log_snr) * eps_mse
        return LossOutput(per_example.mean(), per_example, eps_mse.detach(), t, log_snr.detach())
