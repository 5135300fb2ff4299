"""Tests for diffusion_lab.metrics.frechet."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion_lab.metrics.frechet import feature_statistics, frechet_distance, trace_sqrt_product


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0.0 if rank else 0.1 * np.eye(d))


def _pytorch_fid_reference(mu1, sigma1, mu2, sigma2) -> float:
    """The pytorch-fid formula (sqrtm of the product, real part), for cross-checking."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def test_identical_statistics_give_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), _random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_gaussians_closed_form() -> None:
    # Commuting covariances: d² = ||μ1 − μ2||² + Σ_i (√a_i − √b_i)².
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_singular_diagonal_covariances_closed_form() -> None:
    a, b = np.array([0.0, 1.0, 4.0, 0.0]), np.array([1.0, 0.0, 9.0, 0.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 1 + 1 + 1 = 3
    assert frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected)


def test_matches_scipy_sqrtm_formula_and_is_symmetric() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12)
    fd12, fd21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert fd12 == pytest.approx(_pytorch_fid_reference(mu1, s1, mu2, s2), rel=1e-8)
    assert fd12 == pytest.approx(fd21, rel=1e-10)
    assert fd12 > 0


def test_rank_deficient_covariances_finite_and_nonnegative() -> None:
    # Fewer samples than dimensions: both covariances singular, as for small reference sets.
    rng = np.random.default_rng(3)
    f1, f2 = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(f1), feature_statistics(f2)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    assert trace_sqrt_product(s1, s1) == pytest.approx(np.trace(s1), rel=1e-12)  # null space stays 0


@pytest.mark.parametrize("seed", range(5))
def test_nonnegative_for_random_statistics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 20))
    args = (rng.standard_normal(d), _random_spd(rng, d), rng.standard_normal(d), _random_spd(rng, d, rank=1))
    assert frechet_distance(*args) >= 0.0


def test_feature_statistics_float64_and_matches_numpy() -> None:
    feats = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    ref = feats.double().numpy()
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-12)


def test_feature_statistics_one_dimensional_features() -> None:
    mu, sigma = feature_statistics(torch.tensor([[0.0], [2.0]]))
    assert mu.shape == (1,) and sigma.shape == (1, 1) and sigma[0, 0] == pytest.approx(2.0)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        feature_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
