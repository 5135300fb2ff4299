"""Parameterizations: invertible maps between the network output and (x̂0, ε̂).

For ``x_t = α x0 + σ ε`` every parameterization defines
- the regression target ``F(x0, ε)`` the network output is trained towards,
- the inverse ``(F, x_t) ↦ (x̂0, ε̂)``,
- ``eps_error_scale(α, σ)``: the factor ``c`` with ``‖ε̂ − ε‖² = c · ‖F̂ − F‖²``, so one canonical
  error (ε-MSE, Kingma & Gao 2023) is computed in the network's own output space without dividing
  by a vanishing α or σ,
- the network's input scaling ``c_in`` and noise conditioning ``c_noise`` (EDM's names).

Derived quantities follow from (x̂0, ε̂): ``v = α ε − σ x0``, ``score = −ε/σ``.
Adding one is a subclass of :class:`Parameterization` plus one YAML file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule

# Continuous-time models see ``c_noise = 1000·t`` (Song et al. 2021 feed 999·t): the same range as
# the integer timesteps of a T = 1000 discrete model, so a network's embedding works for both.
CONTINUOUS_TIME_SCALE = 1000.0


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example ``(B,)`` coefficient to broadcast against ``x`` of shape ``(B, ...)``."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


class Parameterization(ABC):
    """What the network predicts. Coefficients ``alpha``, ``sigma`` broadcast against ``x``."""

    name: str

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Regression target ``F(x0, ε)``, the shape of ``x0``."""

    @abstractmethod
    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the network output ``out`` at ``x_t`` into ``(x̂0, ε̂)``."""

    @abstractmethod
    def eps_error_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``c(α, σ)`` with ``‖ε̂ − ε‖² = c ‖F̂ − F‖²`` (shape of ``alpha``)."""

    def c_in(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Input scaling of ``x_t`` before the network (1 unless the parameterization preconditions)."""
        return torch.ones_like(alpha)

    def c_noise(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Noise conditioning fed to the network, ``(B,)``.

        Discrete models keep the paper's integer timestep index ``i − 1 ∈ {0..T−1}`` (Ho et al.'s
        code embeds the 0-based index of step ``i``); continuous models get ``1000·t``.
        """
        if schedule.num_timesteps is not None:
            return t * schedule.num_timesteps - 1.0
        return t * CONTINUOUS_TIME_SCALE


# Ho et al. 2020 eq. 11: the network predicts the noise ε.
class EpsParameterization(Parameterization):
    """ε-prediction: ``F = ε``, ``x̂0 = (x_t − σ ε̂)/α``."""

    name = "eps"

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return (x_t - sigma * out) / alpha, out

    def eps_error_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return torch.ones_like(alpha)


# The network predicts the clean data x0 directly (Kingma et al. 2021 use this for the VLB).
class X0Parameterization(Parameterization):
    """x₀-prediction: ``F = x0``, ``ε̂ = (x_t − α x̂0)/σ``; ``‖ε̂−ε‖² = SNR ‖x̂0−x0‖²``."""

    name = "x0"

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return out, (x_t - alpha * out) / sigma

    def eps_error_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (alpha / sigma) ** 2


# Salimans & Ho 2022 §4: v = α ε − σ x0; inverted here for any (α, σ), not only α² + σ² = 1.
class VParameterization(Parameterization):
    """v-prediction: ``F = α ε − σ x0``.

    Solving ``[x_t; v] = [[α, σ], [−σ, α]] [x0; ε]``: ``x̂0 = (α x_t − σ v̂)/(α²+σ²)``,
    ``ε̂ = (σ x_t + α v̂)/(α²+σ²)``, hence ``‖ε̂−ε‖² = α²/(α²+σ²)² ‖v̂−v‖²``.
    """

    name = "v"

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * eps - sigma * x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * out) / norm, (sigma * x_t + alpha * out) / norm

    def eps_error_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha**2 / (alpha**2 + sigma**2) ** 2


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``v = α ε − σ x0`` (Salimans & Ho 2022)."""
    return alpha * eps - sigma * x0


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """``∇ log p_t(x_t) = −ε/σ``."""
    return -eps / sigma
