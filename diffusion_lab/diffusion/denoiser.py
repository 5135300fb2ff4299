"""The denoiser contract ``D(x_t, t) -> x̂0``: the only thing a sampler sees of a model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.parameterizations import Parameterization, expand_like
from diffusion_lab.diffusion.schedules import NoiseSchedule


class Denoiser(nn.Module):
    """Wraps a network with its schedule and parameterization.

    ``forward(x_t (B, ...), t (B,), y (B,) | None) -> x̂0 (B, ...)``. The network is called as
    ``net(c_in·x_t, c_noise, y)``; its output dtype may be reduced (autocast), the returned x̂0 is
    float32. ``schedule`` is exposed because samplers need ``α_t, σ_t`` on their time grid.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, parameterization: Parameterization) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterization = parameterization

    def network_output(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Raw network output ``F̂`` (float32) and the broadcast ``(α, σ)`` used to invert it."""
        param = self.parameterization
        alpha, sigma = (expand_like(c, x_t) for c in self.schedule.alpha_sigma(t))
        x_in = (param.c_in(alpha, sigma) * x_t).to(x_t.dtype)
        out = self.net(x_in, param.c_noise(t, self.schedule), y).float()
        return out, alpha, sigma

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out, alpha, sigma = self.network_output(x_t, t, y)
        x0_hat, _ = self.parameterization.to_x0_eps(out, x_t.float(), alpha, sigma)
        return x0_hat

    @torch.no_grad()
    def predict(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``forward`` without gradients, for samplers."""
        return self(x_t, t, y)
