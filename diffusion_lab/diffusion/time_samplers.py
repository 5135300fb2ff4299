"""Time samplers: draw training times ``t`` and the importance weight that keeps the loss unbiased.

A sampler returns ``(t, weight)`` with ``E[weight · ℓ(t)] = E_{t∼U}[ℓ(t)]`` for the reference
distribution (uniform over ``(t_min, 1]``, or over the integer timesteps ``{1..T}`` of a discrete
schedule), so a non-uniform proposal changes the variance of the estimate, never its mean.
Adding one is a subclass plus one YAML file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule


class TimeSampler(ABC):
    """Draws ``(t, weight)``, each ``(batch_size,)`` float32 on ``device``."""

    name: str

    @abstractmethod
    def sample(
        self,
        batch_size: int,
        schedule: NoiseSchedule,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``t ∈ (0, 1]`` and the importance weight ``p_ref(t)/p(t)``."""


# Ho et al. 2020 Alg. 1: t ~ Uniform({1, ..., T}); the continuous analogue t ~ U(t_min, 1].
class UniformTimeSampler(TimeSampler):
    """Uniform times; integer timesteps ``i/T`` for a discrete schedule. Weight is 1."""

    name = "uniform"

    def __init__(self, t_min: float = 1e-5) -> None:
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"time_sampler.t_min must be in [0, 1), got {t_min}")
        self.t_min = t_min

    def sample(
        self,
        batch_size: int,
        schedule: NoiseSchedule,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        T = schedule.num_timesteps
        if T is not None:
            idx = torch.randint(1, T + 1, (batch_size,), device=device, generator=generator)
            t = idx.float() / T
        else:
            u = torch.rand(batch_size, device=device, generator=generator)
            t = self.t_min + (1.0 - self.t_min) * u
        return t, torch.ones_like(t)
