"""Analytic oracles: isotropic Gaussian mixtures, whose diffused marginals and Bayes denoiser are exact.

For ``x0 ∼ Σ_k π_k N(μ_k, s_k² I)`` and ``x_t = α x0 + σ ε``:
``x_t | k ∼ N(α μ_k, (α² s_k² + σ²) I)`` and
``E[x0 | x_t, k] = μ_k + α s_k² / (α² s_k² + σ²) · (x_t − α μ_k)``; the Bayes denoiser mixes these
with the posterior responsibilities. Used by tests and benchmarks as ground truth for losses,
samplers and likelihoods; works for any data dimension.

:class:`FullCovarianceMixture` is the same with ``Σ_k = U_k diag(e_k) U_kᵀ`` per component:
``x_t | k ∼ N(α μ_k, α² Σ_k + σ² I)`` and ``E[x0 | x_t, k] = μ_k + α Σ_k (α² Σ_k + σ² I)⁻¹ (x_t − α μ_k)``,
which in the eigenbasis is ``U_k diag(α e_k / (α² e_k + σ²)) U_kᵀ (x_t − α μ_k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.parameterizations import CONTINUOUS_TIME_SCALE, Coefficients, Parameterization
from diffusion_lab.diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class GaussianMixture:
    """``weights (K,)``, ``means (K, D)``, ``stds (K,)``: an isotropic Gaussian mixture in ``D`` dims."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, D)`` samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * noise

    def _component_log_prob(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``log π_k N(x; α μ_k, v_k I)`` as ``(B, K)`` and the variances ``v_k`` as ``(B, K)``."""
        var = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
        sq = (x[:, None, :] - alpha[:, None, None] * self.means[None]).square().sum(-1)
        logp = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var) + self.weights.log()[None]
        return logp, var

    def log_prob(self, x: Tensor, alpha: Tensor | None = None, sigma: Tensor | None = None) -> Tensor:
        """Log-density ``(B,)`` of the diffused marginal ``p_t`` (of the data when α = 1, σ = 0)."""
        alpha = torch.ones(x.shape[0], dtype=x.dtype) if alpha is None else alpha
        sigma = torch.zeros(x.shape[0], dtype=x.dtype) if sigma is None else sigma
        return torch.logsumexp(self._component_log_prob(x, alpha, sigma)[0], dim=1)

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Bayes denoiser ``E[x0 | x_t]``; ``x_t (B, D)``, ``alpha, sigma (B,)`` → ``(B, D)``."""
        logp, var = self._component_log_prob(x_t, alpha, sigma)
        resp = torch.softmax(logp, dim=1)  # (B, K)
        gain = alpha[:, None] * self.stds[None] ** 2 / var  # (B, K)
        resid = x_t[:, None, :] - alpha[:, None, None] * self.means[None]  # (B, K, D)
        cond_means = self.means[None] + gain[..., None] * resid
        return (resp[..., None] * cond_means).sum(1)

    def min_eps_mse(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Bayes-optimal per-dimension ε-MSE at ``(α, σ)`` for a single Gaussian (K = 1): ``α²s²/(α²s²+σ²)``."""
        if self.weights.numel() != 1:
            raise ValueError("min_eps_mse is closed-form only for a single Gaussian (K = 1)")
        a2s2 = alpha**2 * self.stds[0] ** 2
        return a2s2 / (a2s2 + sigma**2)


@dataclass(frozen=True)
class FullCovarianceMixture:
    """``weights (K,)``, ``means (K, D)``, ``rotations (K, D, D)`` (orthogonal ``U_k``) and ``eigvals (K, D)``
    (``e_k > 0``): a Gaussian mixture in ``D`` dims with covariances ``Σ_k = U_k diag(e_k) U_kᵀ`` (module docstring)."""

    weights: Tensor
    means: Tensor
    rotations: Tensor
    eigvals: Tensor

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def covariances(self) -> Tensor:
        """``Σ_k`` as ``(K, D, D)``."""
        return self.rotations @ (self.eigvals[..., None] * self.rotations.transpose(1, 2))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, D)`` samples: ``μ_k + U_k (√e_k ⊙ z)``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + (self.rotations[k] @ (self.eigvals[k].sqrt() * noise)[..., None])[..., 0]

    def _rotated(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Residuals in each eigenbasis ``U_kᵀ(x − α μ_k)`` and variances ``α² e_k + σ²``, both ``(B, K, D)``."""
        resid = x[:, None, :] - alpha[:, None, None] * self.means[None]
        var = alpha[:, None, None] ** 2 * self.eigvals[None] + sigma[:, None, None] ** 2
        return torch.einsum("kdj,bkd->bkj", self.rotations, resid), var

    def _component_log_prob(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``log π_k N(x; α μ_k, α² Σ_k + σ² I)`` ``(B, K)``, with :meth:`_rotated`'s two ``(B, K, D)``."""
        rot, var = self._rotated(x, alpha, sigma)
        logp = -0.5 * (rot.square() / var + torch.log(2 * math.pi * var)).sum(-1) + self.weights.log()[None]
        return logp, rot, var

    def log_prob(self, x: Tensor, alpha: Tensor | None = None, sigma: Tensor | None = None) -> Tensor:
        """Log-density ``(B,)`` of the diffused marginal ``p_t`` (of the data when α = 1, σ = 0)."""
        alpha = torch.ones(x.shape[0], dtype=x.dtype) if alpha is None else alpha
        sigma = torch.zeros(x.shape[0], dtype=x.dtype) if sigma is None else sigma
        return torch.logsumexp(self._component_log_prob(x, alpha, sigma)[0], dim=1)

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Bayes denoiser ``E[x0 | x_t]``; ``x_t (B, D)``, ``alpha, sigma (B,)`` → ``(B, D)``."""
        logp, rot, var = self._component_log_prob(x_t, alpha, sigma)
        resp = torch.softmax(logp, dim=1)  # (B, K)
        shrunk = alpha[:, None, None] * self.eigvals[None] / var * rot  # (B, K, D), eigenbasis
        cond_means = self.means[None] + torch.einsum("kdj,bkj->bkd", self.rotations, shrunk)
        return (resp[..., None] * cond_means).sum(1)


Mixture = GaussianMixture | FullCovarianceMixture


def times_from_noise_conditioning(c_noise: Tensor, schedule: NoiseSchedule, param: Parameterization) -> Tensor:
    """Invert :meth:`Parameterization.c_noise` back to ``t``."""
    if param.noise_conditioning == "log_snr":
        return schedule.t_from_log_snr(c_noise)
    if param.noise_conditioning == "log_sigma":
        return schedule.t_from_log_snr(-8.0 * c_noise)
    if schedule.num_timesteps is not None:
        return (c_noise + 1.0) / schedule.num_timesteps
    return c_noise / CONTINUOUS_TIME_SCALE


class OracleNetwork(nn.Module):
    """A "network" that outputs the exact Bayes prediction in ``parameterization``'s output space.

    Follows the network contract ``net(x, c_noise, y) -> F̂``; ``x`` is ``(B, D)``.
    """

    def __init__(self, mixture: Mixture, schedule: NoiseSchedule, parameterization: Parameterization) -> None:
        super().__init__()
        self.mixture, self.schedule, self.parameterization = mixture, schedule, parameterization

    def forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        param = self.parameterization
        t = times_from_noise_conditioning(c_noise.double(), self.schedule, param).to(x.dtype)
        c = Coefficients.at(self.schedule, t, x, derivatives=param.needs_derivatives)
        x_t = x / param.c_in(c)
        x0 = self.mixture.denoise(x_t, c.alpha.reshape(-1), c.sigma.reshape(-1))
        eps = (x_t - c.alpha * x0) / c.sigma
        return param.target(x0, eps, c)
