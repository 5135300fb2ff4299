"""DDPM ancestral sampling (Ho et al. 2020 Alg. 2), respaced to any grid (Nichol & Dhariwal 2021 §4)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusion_lab.samplers.base import (
    Coefs,
    CountingDenoiser,
    Generator,
    Sampler,
    noise_like,
    posterior_coefficients,
    transition_variance,
)
from diffusion_lab.schema.choices import DDPMVariance, values

VARIANCES = values(DDPMVariance)


# Ho et al. 2020 Alg. 2 with σ_t² = β̃_t ("small") or β_t ("large"); on a respaced grid the step's
# β is 1 − ᾱ_s/ᾱ_r (Nichol & Dhariwal 2021 eq. 19), i.e. σ²_{s|r} in the general form. "learned":
# Nichol & Dhariwal 2021 eq. 15, Σ = exp(v' log β + (1 − v') log β̃) with the network's v' = (v + 1)/2.
class DDPMSampler(Sampler):
    """Ancestral sampling: ``x_r ∼ N(μ̃(x_s, x̂0), σ²)``; no noise is added on the last step."""

    name = "ddpm"

    def __init__(self, steps: int = 1000, *, variance: DDPMVariance | str = DDPMVariance.small, **options: Any) -> None:
        super().__init__(steps, **options)
        variance = getattr(variance, "value", variance)  # a config enum member -> its name
        if variance not in VARIANCES:
            raise ValueError(f"unknown sampler.variance {variance!r}; valid choices: {list(VARIANCES)}")
        self.variance = variance

    def step(
        self, model: CountingDenoiser, x: Tensor, t: float, coefs: Coefs, y: Tensor | None, generator: Generator
    ) -> Tensor:
        alpha_s, sigma_s, alpha_r, sigma_r = coefs
        a, b, var = posterior_coefficients(alpha_s, sigma_s, alpha_r, sigma_r)
        x0_hat, v = model.with_variance(x, t, y)
        mean = a * x + b * x0_hat
        if float(sigma_r) == 0.0:
            return mean
        beta = float(transition_variance(alpha_s, sigma_s, alpha_r, sigma_r))
        if self.variance == "large":
            var = beta
        elif self.variance == "learned":
            if v is None:
                raise ValueError("sampler.variance=learned needs a model trained with loss.learned_variance=true")
            frac = (v + 1) / 2
            std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(var)))
            return mean + std * noise_like(x, generator)
        return mean + math.sqrt(var) * noise_like(x, generator)
