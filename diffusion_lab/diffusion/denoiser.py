"""The denoiser contract ``D(x_t, t) -> x̂0``: the only thing a sampler sees of a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.parameterizations import Coefficients, Parameterization
from diffusion_lab.diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class NetworkOutput:
    """``out``: the network's prediction ``F̂`` (float32, shape of ``x_t``); ``variance``: the learned
    reverse-variance interpolation ``v`` (Nichol & Dhariwal 2021 eq. 15, shape of ``x_t``) or None;
    ``coefs``: the schedule values used to invert ``out``."""

    out: Tensor
    variance: Tensor | None
    coefs: Coefficients


class Denoiser(nn.Module):
    """Wraps a network with its schedule and parameterization.

    ``forward(x_t (B, ...), t (B,), y (B,) | None) -> x̂0 (B, ...)``. The network is called as
    ``net(c_in·x_t, c_noise, y)``; its output dtype may be reduced (autocast), the returned x̂0 is
    float32. ``schedule`` is exposed because samplers need ``α_t, σ_t`` on their time grid.
    With ``learned_variance`` the network returns twice the channels (dim 1): the prediction, then
    the interpolation ``v`` of the reverse variance ``Σ = exp(v' log β + (1 − v') log β̃)``,
    ``v' = (v + 1)/2`` as in improved-diffusion.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        parameterization: Parameterization,
        learned_variance: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterization = parameterization
        self.learned_variance = learned_variance

    def coefficients(self, t: Tensor, like: Tensor) -> Coefficients:
        """The schedule at ``t`` ``(B,)`` broadcast against ``like`` (with derivatives if needed)."""
        return Coefficients.at(self.schedule, t, like, derivatives=self.parameterization.needs_derivatives)

    def network_output(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, coefs: Coefficients | None = None
    ) -> NetworkOutput:
        """Run the network on ``c_in·x_t`` with ``c_noise(t)``; ``coefs`` may be passed to avoid recomputing."""
        param = self.parameterization
        coefs = coefs or self.coefficients(t, x_t)
        x_in = (param.c_in(coefs) * x_t).to(x_t.dtype)
        out = self.net(x_in, param.c_noise(t, self.schedule), y).float()
        variance = None
        if self.learned_variance:
            if out.shape[1] != 2 * x_t.shape[1]:
                raise ValueError(
                    f"learned_variance needs a network with 2×{x_t.shape[1]} output channels, got {out.shape[1]}"
                )
            out, variance = out.chunk(2, dim=1)
        return NetworkOutput(out, variance, coefs)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        net_out = self.network_output(x_t, t, y)
        x0_hat, _ = self.parameterization.to_x0_eps(net_out.out, x_t.float(), net_out.coefs)
        return x0_hat

    @torch.no_grad()
    def predict(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``forward`` without gradients, for samplers."""
        return self(x_t, t, y)

    @torch.no_grad()
    def predict_with_variance(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(x̂0, v)`` without gradients; ``v`` is None unless the variance is learned."""
        net_out = self.network_output(x_t, t, y)
        x0_hat, _ = self.parameterization.to_x0_eps(net_out.out, x_t.float(), net_out.coefs)
        return x0_hat, net_out.variance

    @torch.no_grad()
    def velocity(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Probability-flow ODE drift ``dx/dt = α'·x̂0 + σ'·ε̂`` at ``t`` ``(B,)`` (Karras et al. 2022 eq. 4 in
        ``(α, σ)`` form: ``x_t = α x̂0 + σ ε̂`` with ``x̂0, ε̂`` held fixed), float32, shape of ``x_t``."""
        x_t = x_t.float()
        coefs = Coefficients.at(self.schedule, t, x_t, derivatives=True)
        x0_hat = self(x_t, t, y)
        eps_hat = (x_t - coefs.alpha * x0_hat) / coefs.sigma
        d_alpha, d_sigma = coefs.derivatives()
        return d_alpha * x0_hat + d_sigma * eps_hat
