"""Exact W2²: 0 on identical sets, the brute-force optimum on small sets, the Gaussian closed form on large ones."""

import itertools

import pytest
import torch

from diffusion_lab.metrics.base import Toy2DMetric
from diffusion_lab.metrics.toy2d import wasserstein2_squared


def test_identical_and_permuted_sets_are_at_distance_zero():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert wasserstein2_squared(x, x) == 0.0
    assert wasserstein2_squared(x, x[torch.randperm(500)]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_small_sets_match_the_brute_force_minimum_over_permutations(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 3 + seed % 4
    x, y = torch.randn(n, 2, generator=gen, dtype=torch.float64), torch.randn(n, 2, generator=gen, dtype=torch.float64)
    brute = min(float((x - y[list(p)]).square().sum(1).mean()) for p in itertools.permutations(range(n)))
    assert wasserstein2_squared(x, y) == pytest.approx(brute, rel=1e-12)


def whitened(z):
    """``z`` moved and linearly mapped to sample mean 0 and (ddof = 0) sample covariance I exactly."""
    z = z - z.mean(0)
    return z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T, correction=0))).T


def test_two_gaussians_match_the_closed_form():
    # W2²(N(m1, s1² I), N(m2, s2² I)) = |m1 − m2|² + d (s1 − s2)² (Dowson & Landau 1982); here 9 + 2·1 = 11.
    # The samples are moment-matched, so by Gelbrich's bound W2² ≥ 11 exactly; what is left above it is the
    # samples' non-Gaussian shape, 0.04 at 1,500 points (4 seeds: 11.041–11.047), hence the 1 % tolerance.
    gen = torch.Generator().manual_seed(0)
    x = whitened(torch.randn(1500, 2, generator=gen, dtype=torch.float64))
    y = torch.tensor([3.0, 0.0], dtype=torch.float64) + 2 * whitened(
        torch.randn(1500, 2, generator=gen, dtype=torch.float64)
    )
    assert 11.0 <= wasserstein2_squared(x, y) <= 11.0 * 1.01


def test_unequal_sets_are_refused_and_the_metric_reports_w2_and_its_square():
    with pytest.raises(ValueError, match="exact W2 needs two sets of equal size, got 3 and 4 points"):
        wasserstein2_squared(torch.zeros(3, 2), torch.zeros(4, 2))
    gen = torch.Generator().manual_seed(1)
    samples, reference = torch.randn(50, 2, generator=gen), torch.randn(80, 2, generator=gen)
    out = Toy2DMetric(num_projections=8, exact_w2=True).compute(samples, reference)
    assert out["w2_sq"] == pytest.approx(wasserstein2_squared(samples, reference[:50]))
    assert out["w2"] == pytest.approx(out["w2_sq"] ** 0.5)
    assert "w2" not in Toy2DMetric(num_projections=8).compute(samples, reference)
    with pytest.raises(ValueError, match=r"metrics.exact_w2 needs at least as many reference points as samples \(80\)"):
        Toy2DMetric(exact_w2=True).compute(reference, samples)
