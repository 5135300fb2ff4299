"""FullCovarianceMixture (diffusion_lab/diffusion/analytic.py): density, Bayes denoiser and samples in closed form."""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.analytic import FullCovarianceMixture, GaussianMixture

F64 = torch.float64
D, K = 5, 3


def random_mixture(seed: int = 0, k: int = K) -> FullCovarianceMixture:
    g = torch.Generator().manual_seed(seed)
    rotations = torch.linalg.qr(torch.randn(k, D, D, generator=g, dtype=F64))[0]
    eigvals = 10 ** (-3 + 2 * torch.rand(k, D, generator=g, dtype=F64))  # 1e-3 … 1e-1
    weights = torch.rand(k, generator=g, dtype=F64) + 0.5
    means = 0.5 * torch.randn(k, D, generator=g, dtype=F64)
    return FullCovarianceMixture(weights / weights.sum(), means, rotations, eigvals)


def at(n: int, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n,), alpha, dtype=F64), torch.full((n,), sigma, dtype=F64)


def test_single_gaussian_denoiser_is_the_linear_posterior_mean() -> None:
    """K = 1: ``E[x0|x_t] = μ + α Σ (α² Σ + σ² I)⁻¹ (x_t − α μ)`` with the dense Σ."""
    gauss = random_mixture(k=1)
    cov, mu = gauss.covariances[0], gauss.means[0]
    x_t = torch.randn(7, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    for a, s in ((0.9, 0.3), (0.2, 0.98), (1.0, 1e-3)):
        alpha, sigma = at(7, a, s)
        want = mu + (a * cov @ torch.linalg.solve(a**2 * cov + s**2 * torch.eye(D, dtype=F64), (x_t - a * mu).T)).T
        torch.testing.assert_close(gauss.denoise(x_t, alpha, sigma), want, rtol=1e-10, atol=1e-12)


def test_log_prob_and_tweedie() -> None:
    """``log p_t`` equals the dense multivariate-normal mixture, and the denoiser is Tweedie's
    ``(x_t + σ² ∇ log p_t(x_t)) / α`` (the exact posterior mean of any data distribution)."""
    mix = random_mixture()
    x_t = torch.randn(9, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    a, s = 0.8, 0.6
    alpha, sigma = at(9, a, s)
    cov_t = a**2 * mix.covariances + s**2 * torch.eye(D, dtype=F64)
    comps = torch.distributions.MultivariateNormal(a * mix.means, cov_t)
    want = torch.logsumexp(comps.log_prob(x_t[:, None]) + mix.weights.log(), dim=1)
    torch.testing.assert_close(mix.log_prob(x_t, alpha, sigma), want, rtol=1e-10, atol=1e-10)
    x = x_t.clone().requires_grad_(True)
    score = torch.autograd.grad(mix.log_prob(x, alpha, sigma).sum(), x)[0]
    torch.testing.assert_close(mix.denoise(x_t, alpha, sigma), (x_t + s**2 * score) / a, rtol=1e-9, atol=1e-10)


def test_isotropic_case_equals_gaussian_mixture() -> None:
    mix = random_mixture()
    stds = torch.tensor([0.1, 0.2, 0.05], dtype=F64)
    iso = FullCovarianceMixture(mix.weights, mix.means, mix.rotations, stds[:, None].square().expand(K, D))
    ref = GaussianMixture(mix.weights, mix.means, stds)
    x_t = torch.randn(6, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    alpha, sigma = at(6, 0.7, 0.7)
    torch.testing.assert_close(iso.denoise(x_t, alpha, sigma), ref.denoise(x_t, alpha, sigma))
    torch.testing.assert_close(iso.log_prob(x_t, alpha, sigma), ref.log_prob(x_t, alpha, sigma))


def test_samples_have_the_component_covariance() -> None:
    gauss = random_mixture(k=1)
    x = gauss.sample(40_000, torch.Generator().manual_seed(4))
    torch.testing.assert_close(x.mean(0), gauss.means[0], rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(x.T), gauss.covariances[0], rtol=0, atol=0.004)
