"""DDIM (Song, Meng & Ermon 2021): η = 0 deterministic, η = 1 matches DDPM's β̃ ancestral sampler."""

from __future__ import annotations

import math

from torch import Tensor

from diffusion_lab.samplers.base import (
    CountingDenoiser,
    Generator,
    Sampler,
    noise_like,
    posterior_coefficients,
)


# Song et al. 2021 eq. 12: x_r = α_r x̂0 + √(σ_r² − c²) ε̂ + c z, with c² = η² · β̃ (eq. 16).
class DDIMSampler(Sampler):
    """DDIM with stochasticity ``eta`` ∈ [0, 1] (larger values are allowed, as in the paper's σ̂)."""

    name = "ddim"

    def __init__(
        self,
        steps: int = 50,
        grid: str = "uniform",
        clip_x0: float | None = None,
        eta: float = 0.0,
        rho: float | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        super().__init__(steps, grid, clip_x0, rho, sigma_min, sigma_max)
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {eta}")
        self.eta = eta

    def step(
        self,
        model: CountingDenoiser,
        x: Tensor,
        t: float,
        coefs: tuple[Tensor, Tensor, Tensor, Tensor],
        y: Tensor | None,
        generator: Generator,
    ) -> Tensor:
        alpha_s, sigma_s, alpha_r, sigma_r = coefs
        _, _, posterior_var = posterior_coefficients(alpha_s, sigma_s, alpha_r, sigma_r)
        c2 = min(self.eta**2 * posterior_var, float(sigma_r**2))
        x0_hat = model(x, t, y)
        eps_hat = (x - float(alpha_s) * x0_hat) / float(sigma_s)
        x = float(alpha_r) * x0_hat + math.sqrt(float(sigma_r**2) - c2) * eps_hat
        if c2 > 0:
            x = x + math.sqrt(c2) * noise_like(x, generator)
        return x
