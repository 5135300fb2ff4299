"""The flow-matching toy pair of C2OT Fig. 1: 8 Gaussians (radius 5, covariance √0.1·I) and torchdyn's moons."""

import math

import numpy as np
import pytest
import torch

from diffusion_lab.data.toy2d import (
    Toy2DPrior,
    c2ot_source_means,
    sample_c2ot_eight_gaussians,
    sample_torchdyn_moons,
)
from diffusion_lab.samplers.base import IndexedGenerator, draw_source


def torchdyn_generate_moons(n_samples, noise, uniform):
    """torchdyn.datasets.generate_moons transcribed (numpy), with its ``np.random.rand(n, 1)`` passed in."""
    n_out = n_samples // 2
    n_in = n_samples - n_out
    outer_x, outer_y = np.cos(np.linspace(0, np.pi, n_out)), np.sin(np.linspace(0, np.pi, n_out))
    inner_x, inner_y = 1 - np.cos(np.linspace(0, np.pi, n_in)), 1 - np.sin(np.linspace(0, np.pi, n_in)) - 0.5
    X = np.vstack([np.append(outer_x, inner_x), np.append(outer_y, inner_y)]).T
    X += uniform * noise
    return torch.Tensor(X)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_moons_are_generate_moons_times_3_minus_1_in_a_random_order(n):
    ours = sample_torchdyn_moons(n, torch.Generator().manual_seed(n))
    replay = torch.Generator().manual_seed(n)  # the same draws: the shifts, then the order
    uniform = torch.rand(n, 1, generator=replay, dtype=torch.float64).numpy()
    order = torch.randperm(n, generator=replay)
    expected = torchdyn_generate_moons(n, 0.2, uniform) * 3 - 1
    torch.testing.assert_close(ours, expected[order], rtol=0, atol=1e-6)


def test_eight_gaussians_means_on_the_radius_5_circle_and_covariance_sqrt_point_1():
    n = 200_000
    x = sample_c2ot_eight_gaussians(n, torch.Generator().manual_seed(0)).double()
    means = c2ot_source_means().double()
    assert torch.allclose(means.norm(dim=1), torch.full((8,), 5.0, dtype=torch.float64))
    k = torch.cdist(x, means).argmin(dim=1)  # components are ≥ 3.8 apart, std 0.56: assignment is exact to ~1e-4
    for j in range(8):
        pts = x[k == j]
        assert abs(len(pts) / n - 1 / 8) < 0.005
        assert torch.allclose(pts.mean(0), means[j], atol=0.02)
        cov = torch.cov(pts.T)
        torch.testing.assert_close(cov, math.sqrt(0.1) * torch.eye(2, dtype=torch.float64), rtol=0, atol=0.015)


def test_prior_refuses_non_2d_data_and_draws_per_example_seeds():
    prior = Toy2DPrior("c2ot_eight_gaussians")
    with pytest.raises(
        ValueError, match=r"prior=c2ot_eight_gaussians draws 2-D points \(B, 2\); the data has shape \(3,\)"
    ):
        prior.sample((4, 3), None, "cpu")
    a = draw_source(prior, (3, 2), IndexedGenerator([5, 6, 7]), "cpu")
    b = draw_source(prior, (2, 2), IndexedGenerator([6, 7]), "cpu")
    assert torch.equal(a[1:], b)  # example i depends only on its own seed
    with pytest.raises(ValueError, match="unknown toy dataset name='moons'"):
        Toy2DPrior("moons")
