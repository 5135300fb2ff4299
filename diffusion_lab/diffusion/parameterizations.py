"""Parameterizations: invertible maps between the network output and (x̂0, ε̂).

For ``x_t = α x0 + σ ε`` every parameterization defines
- the regression target ``F(x0, ε)`` the network output is trained towards,
- the inverse ``(F, x_t) ↦ (x̂0, ε̂)``,
- ``eps_error_scale(c)``: the factor ``k`` with ``‖ε̂ − ε‖² = k · ‖F̂ − F‖²``, so one canonical
  error (ε-MSE, Kingma & Gao 2023) is computed in the network's own output space without dividing
  by a vanishing α or σ,
- the network's input scaling ``c_in`` and noise conditioning ``c_noise`` (EDM's names).

Every method takes the schedule values as :class:`Coefficients` broadcast against ``x``; the flow
velocity also needs their time derivatives (``needs_derivatives``). Derived quantities follow from
(x̂0, ε̂): ``v = α ε − σ x0``, ``score = −ε/σ``, ``u = α' x0 + σ' ε``.
Adding one is a subclass of :class:`Parameterization` plus one YAML file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.schema.choices import NoiseConditioning, values

# Continuous-time models see ``c_noise = 1000·t`` (Song et al. 2021 feed 999·t): the same range as
# the integer timesteps of a T = 1000 discrete model, so a network's embedding works for both.
CONTINUOUS_TIME_SCALE = 1000.0
# λ-based conditionings are clamped here so λ = ±∞ at the ends of a grid stays finite.
LOG_SNR_CLAMP = 30.0
NOISE_CONDITIONINGS = values(NoiseConditioning)


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example ``(B,)`` coefficient to broadcast against ``x`` of shape ``(B, ...)``."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


@dataclass(frozen=True)
class Coefficients:
    """``α_t, σ_t`` (and ``dα/dt, dσ/dt`` when requested), each shaped to broadcast against ``x``."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor | None = None
    d_sigma: Tensor | None = None

    @classmethod
    def at(cls, schedule: NoiseSchedule, t: Tensor, like: Tensor, derivatives: bool = False) -> Coefficients:
        """Evaluate ``schedule`` at ``t`` ``(B,)`` and reshape every value to broadcast against ``like``."""
        alpha, sigma = schedule.alpha_sigma(t)
        if not derivatives:
            return cls(expand_like(alpha, like), expand_like(sigma, like))
        d = schedule.derivatives(t)
        return cls(*(expand_like(c.to(alpha.dtype), like) for c in (alpha, sigma, d.d_alpha, d.d_sigma)))

    def derivatives(self) -> tuple[Tensor, Tensor]:
        """``(dα/dt, dσ/dt)``; raises if they were not computed."""
        if self.d_alpha is None or self.d_sigma is None:
            raise ValueError("this parameterization needs dα/dt and dσ/dt: build Coefficients with derivatives=True")
        return self.d_alpha, self.d_sigma


class Parameterization(ABC):
    """What the network predicts, and how it is conditioned on the noise level.

    Args:
        noise_conditioning: what the network's ``c_noise`` is: ``"time"`` (the integer timestep of a
            discrete model, ``1000·t`` of a continuous one), ``"log_snr"`` (λ) or ``"log_sigma"``
            (EDM's ``¼ ln σ`` with ``σ = σ_t/α_t = e^{−λ/2}``, i.e. ``−λ/8``).
    """

    name: str
    needs_derivatives: bool = False
    # Whether x̂0 stays finite at α = 0 (zero terminal SNR, rectified flow at t = 1).
    defined_at_zero_snr: bool = False
    default_noise_conditioning: str = "time"

    def __init__(self, noise_conditioning: NoiseConditioning | str | None = None) -> None:
        noise_conditioning = noise_conditioning or self.default_noise_conditioning
        if noise_conditioning not in NOISE_CONDITIONINGS:
            raise ValueError(
                f"unknown parameterization.noise_conditioning {noise_conditioning!r}; "
                f"valid choices: {list(NOISE_CONDITIONINGS)}"
            )
        self.noise_conditioning = noise_conditioning

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        """Regression target ``F(x0, ε)``, the shape of ``x0``."""

    @abstractmethod
    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        """Invert the network output ``out`` at ``x_t`` into ``(x̂0, ε̂)``."""

    @abstractmethod
    def eps_error_scale(self, c: Coefficients) -> Tensor:
        """``k`` with ``‖ε̂ − ε‖² = k ‖F̂ − F‖²`` (broadcast shape of ``c.alpha``)."""

    def c_in(self, c: Coefficients) -> Tensor:
        """Input scaling of ``x_t`` before the network (1 unless the parameterization preconditions)."""
        return torch.ones_like(c.alpha)

    def c_noise(self, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Noise conditioning fed to the network, ``(B,)``.

        ``"time"``: discrete models keep the paper's integer timestep index ``i − 1 ∈ {0..T−1}`` (Ho et
        al.'s code embeds the 0-based index of step ``i``); continuous models get ``1000·t``.
        """
        if self.noise_conditioning == "time":
            if schedule.num_timesteps is not None:
                return t * schedule.num_timesteps - 1.0
            return t * CONTINUOUS_TIME_SCALE
        log_snr = schedule.log_snr(t).clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP)
        return log_snr if self.noise_conditioning == "log_snr" else -log_snr / 8.0


# Ho et al. 2020 eq. 11: the network predicts the noise ε.
class EpsParameterization(Parameterization):
    """ε-prediction: ``F = ε``, ``x̂0 = (x_t − σ ε̂)/α``."""

    name = "eps"

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return eps

    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        return (x_t - c.sigma * out) / c.alpha, out

    def eps_error_scale(self, c: Coefficients) -> Tensor:
        return torch.ones_like(c.alpha)


# The network predicts the clean data x0 directly (Kingma et al. 2021 use this for the VLB).
class X0Parameterization(Parameterization):
    """x₀-prediction: ``F = x0``, ``ε̂ = (x_t − α x̂0)/σ``; ``‖ε̂−ε‖² = SNR ‖x̂0−x0‖²``."""

    name = "x0"
    defined_at_zero_snr = True

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        return out, (x_t - c.alpha * out) / c.sigma

    def eps_error_scale(self, c: Coefficients) -> Tensor:
        return (c.alpha / c.sigma) ** 2


# Salimans & Ho 2022 §4: v = α ε − σ x0; inverted here for any (α, σ), not only α² + σ² = 1.
class VParameterization(Parameterization):
    """v-prediction: ``F = α ε − σ x0``.

    Solving ``[x_t; v] = [[α, σ], [−σ, α]] [x0; ε]``: ``x̂0 = (α x_t − σ v̂)/(α²+σ²)``,
    ``ε̂ = (σ x_t + α v̂)/(α²+σ²)``, hence ``‖ε̂−ε‖² = α²/(α²+σ²)² ‖v̂−v‖²``.
    """

    name = "v"
    defined_at_zero_snr = True

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return c.alpha * eps - c.sigma * x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        norm = c.alpha**2 + c.sigma**2
        return (c.alpha * x_t - c.sigma * out) / norm, (c.sigma * x_t + c.alpha * out) / norm

    def eps_error_scale(self, c: Coefficients) -> Tensor:
        return c.alpha**2 / (c.alpha**2 + c.sigma**2) ** 2


# Lipman et al. 2023 / Liu et al. 2023: the network predicts the velocity u = dx_t/dt = α' x0 + σ' ε.
# Flow-matching texts put data at t = 1 (their t is our 1 − t), so their velocity is our −u.
class FlowParameterization(Parameterization):
    """Flow velocity: ``F = α' x0 + σ' ε``; for rectified flow (α = 1 − t, σ = t) ``F = ε − x0``.

    Solving ``[x_t; u] = [[α, σ], [α', σ']] [x0; ε]`` with ``det = α σ' − σ α' > 0`` (α falls, σ rises):
    ``x̂0 = (σ' x_t − σ û)/det``, ``ε̂ = (α û − α' x_t)/det``, hence ``‖ε̂−ε‖² = (α/det)² ‖û−u‖²``.
    """

    name = "flow"
    needs_derivatives = True
    defined_at_zero_snr = True

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        d_alpha, d_sigma = c.derivatives()
        return d_alpha * x0 + d_sigma * eps

    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        d_alpha, d_sigma = c.derivatives()
        det = c.alpha * d_sigma - c.sigma * d_alpha
        return (d_sigma * x_t - c.sigma * out) / det, (c.alpha * out - d_alpha * x_t) / det

    def eps_error_scale(self, c: Coefficients) -> Tensor:
        d_alpha, d_sigma = c.derivatives()
        return (c.alpha / (c.alpha * d_sigma - c.sigma * d_alpha)) ** 2


# Song et al. 2021 (score SDE): the network predicts the score ∇ log p_t(x_t) = −ε/σ.
class ScoreParameterization(Parameterization):
    """Score prediction: ``F = −ε/σ``, ``ε̂ = −σ F̂``; ``‖ε̂−ε‖² = σ² ‖F̂−F‖²``."""

    name = "score"

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return -eps / c.sigma

    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        eps = -c.sigma * out
        return (x_t - c.sigma * eps) / c.alpha, eps

    def eps_error_scale(self, c: Coefficients) -> Tensor:
        return c.sigma**2


# Karras et al. 2022 Table 1 (EDM preconditioning) on x̂ = x_t/α with σ_e = σ/α, written in (α, σ) so it
# stays finite at α = 0: c_skip/α = α σ_d²/(σ² + α²σ_d²), c_out = σ σ_d/√(σ² + α²σ_d²),
# c_in/α = 1/√(σ² + α²σ_d²), c_noise = ¼ ln σ_e.
class EDMParameterization(Parameterization):
    """EDM: ``x̂0 = c_skip·x̂ + c_out·F(c_in·x̂, c_noise)``; ``‖ε̂−ε‖² = σ_d²/(σ_e²+σ_d²) ‖F̂−F‖²``."""

    name = "edm"
    defined_at_zero_snr = True
    default_noise_conditioning = "log_sigma"

    def __init__(self, sigma_data: float = 0.5, noise_conditioning: NoiseConditioning | str | None = None) -> None:
        super().__init__(noise_conditioning)
        if sigma_data <= 0:
            raise ValueError(f"parameterization.sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def _norm2(self, c: Coefficients) -> Tensor:
        return c.sigma**2 + (c.alpha * self.sigma_data) ** 2

    def _skip_out(self, c: Coefficients) -> tuple[Tensor, Tensor]:
        """``(c_skip/α, c_out)``: x̂0 = skip·x_t + out·F."""
        norm2 = self._norm2(c)
        return c.alpha * self.sigma_data**2 / norm2, c.sigma * self.sigma_data / norm2.sqrt()

    def c_in(self, c: Coefficients) -> Tensor:
        return self._norm2(c).rsqrt()

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        skip, out = self._skip_out(c)
        return (x0 - skip * (c.alpha * x0 + c.sigma * eps)) / out

    def to_x0_eps(self, out: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
        skip, c_out = self._skip_out(c)
        x0 = skip * x_t + c_out * out
        return x0, (x_t - c.alpha * x0) / c.sigma

    def eps_error_scale(self, c: Coefficients) -> Tensor:
        return (c.alpha * self.sigma_data) ** 2 / self._norm2(c)


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``v = α ε − σ x0`` (Salimans & Ho 2022)."""
    return alpha * eps - sigma * x0


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """``∇ log p_t(x_t) = −ε/σ``."""
    return -eps / sigma
