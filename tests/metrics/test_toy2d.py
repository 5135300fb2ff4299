"""Tests for diffusion_lab.metrics.toy2d and the toy-2-D side of diffusion_lab.metrics.base."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import Tensor

from diffusion_lab.metrics import toy2d
from diffusion_lab.metrics.base import SampleMetric, Toy2DMetric, format_count, protocol_key
from diffusion_lab.metrics.prdc import PRDC_KEYS
from diffusion_lab.metrics.toy2d import (
    energy_distance,
    mean_log_prob,
    mmd_rbf,
    random_directions,
    sliced_wasserstein,
    wasserstein2_1d,
)


def _gaussians(n: int, seed: int, shift: float = 0.0) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _std_normal_log_prob(x: Tensor) -> Tensor:
    return -math.log(2 * math.pi) - 0.5 * (x**2).sum(dim=1)  # log N(x; 0, I_2)


# --- energy distance -------------------------------------------------------------------------------


def test_energy_distance_point_masses() -> None:
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert energy_distance(a, b) == pytest.approx(2 * 5.0)  # 2|a − b| − 0 − 0


def test_energy_distance_by_hand() -> None:
    # X = {0, 2}, Y = {1}: 2·E|X−Y| − E|X−X'| − E|Y−Y'| = 2·1 − (0+2+2+0)/4 − 0 = 1.
    assert energy_distance(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0]])) == pytest.approx(1.0)


def test_energy_distance_is_square_of_scipy_in_1d() -> None:
    x, y = torch.randn(50, 1, dtype=torch.float64), torch.randn(70, 1, dtype=torch.float64) + 0.3
    ref = scipy.stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert energy_distance(x, y) == pytest.approx(ref**2, rel=1e-9)


def test_energy_distance_same_vs_shifted() -> None:
    x, y = _gaussians(1500, 0), _gaussians(1500, 1)
    same, shifted = energy_distance(x, y), energy_distance(x, y + torch.tensor([0.5, 0.0]))
    assert 0.0 <= same < 0.01
    assert shifted > 10 * same and shifted > 0.05
    assert energy_distance(y, x) == pytest.approx(same, rel=1e-9)


def test_energy_distance_blockwise_matches_small_block(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _gaussians(300, 0), _gaussians(200, 1, shift=0.2)
    full = energy_distance(x, y)
    monkeypatch.setattr(toy2d, "_BLOCK", 7)
    assert energy_distance(x, y) == pytest.approx(full, rel=1e-12)


# --- MMD -------------------------------------------------------------------------------------------


def test_mmd_by_hand_single_bandwidth() -> None:
    # X = {0, 1}, Y = {0, 2}, h = 1, k(d) = exp(−d²/2):
    # MMD²_u = k(1) + k(2) − 2·(k(0) + k(2) + k(1) + k(1))/4.
    k = [math.exp(-(d**2) / 2) for d in range(3)]
    expected = k[1] + k[2] - (k[0] + k[2] + 2 * k[1]) / 2
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    assert mmd_rbf(x, y, bandwidths=(1.0,)) == pytest.approx(expected, rel=1e-12)


def test_mmd_sum_of_kernels_is_sum_of_single_kernel_mmds() -> None:
    x, y = _gaussians(100, 0), _gaussians(80, 1, shift=0.3)
    total = sum(mmd_rbf(x, y, bandwidths=(h,)) for h in (0.2, 1.0))
    assert mmd_rbf(x, y, bandwidths=(0.2, 1.0)) == pytest.approx(total, rel=1e-10)


def test_mmd_same_vs_shifted() -> None:
    x, y = _gaussians(1500, 0), _gaussians(1500, 1)
    same, shifted = mmd_rbf(x, y), mmd_rbf(x, y + torch.tensor([0.0, 0.5]))
    assert abs(same) < 0.005
    assert shifted > 0.05


def test_mmd_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        mmd_rbf(torch.zeros(1, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError):
        mmd_rbf(torch.zeros(3, 2), torch.zeros(5, 2), bandwidths=())
    with pytest.raises(ValueError):
        mmd_rbf(torch.zeros(3, 2), torch.zeros(5, 3))


# --- sliced Wasserstein ----------------------------------------------------------------------------


def test_sliced_wasserstein_of_shift_is_exact() -> None:
    # Projecting x + δe on θ shifts every 1-D sample by δ⟨θ, e⟩, so SW2 = δ·sqrt(mean_θ ⟨θ, e⟩²).
    x, delta, e = _gaussians(400, 0), 0.7, torch.tensor([0.6, 0.8], dtype=torch.float64)
    sw = sliced_wasserstein(x, x + delta * e, num_projections=64, generator=torch.Generator().manual_seed(5))
    theta = random_directions(64, 2, torch.Generator().manual_seed(5))
    assert sw == pytest.approx(delta * float(((theta @ e) ** 2).mean().sqrt()), rel=1e-10)


def test_random_directions_are_unit_and_reproducible() -> None:
    a = random_directions(100, 3, torch.Generator().manual_seed(1))
    b = random_directions(100, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(100, dtype=torch.float64))


def test_w2_1d_unequal_counts_matches_replicated_equal_counts() -> None:
    # Replicating each point lcm/n times leaves the empirical measure unchanged and equalises the counts.
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    expected = wasserstein2_1d(u.repeat_interleave(2, dim=1), v.repeat_interleave(3, dim=1))
    assert torch.allclose(wasserstein2_1d(u, v), expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(wasserstein2_1d(v, u), expected, rtol=1e-12, atol=1e-14)
    assert (expected > 0).all()


def test_w2_1d_equal_counts_is_sorted_pairing() -> None:
    u, v = torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[0.0, 10.0, 1.0]])
    assert wasserstein2_1d(u, v).item() == pytest.approx((1.0 + 1.0 + 49.0) / 3)


def test_sliced_wasserstein_unequal_counts_duplicate_set_is_zero() -> None:
    x = _gaussians(50, 0)
    assert sliced_wasserstein(x, torch.cat([x, x.flip(0)]), 32, torch.Generator().manual_seed(0)) < 1e-12


def test_sliced_wasserstein_same_vs_shifted() -> None:
    x, y = _gaussians(2000, 0), _gaussians(1500, 1)
    same = sliced_wasserstein(x, y, 128, torch.Generator().manual_seed(0))
    shifted = sliced_wasserstein(x, y + 1.0, 128, torch.Generator().manual_seed(0))
    assert same < 0.1 and shifted > 0.7  # shift (1, 1): SW2 = |shift| / sqrt(2) = 1 in 2-D


# --- mean log-prob ---------------------------------------------------------------------------------


def test_mean_log_prob_standard_normal() -> None:
    # E[log N(x; 0, I_2)] = −log(2π) − E||x||²/2 = −log(2π) − 1.
    out = mean_log_prob(_gaussians(200_000, 0), _std_normal_log_prob)
    assert out.mean_log_prob == pytest.approx(-math.log(2 * math.pi) - 1.0, abs=0.02)
    assert out.finite_density_fraction == 1.0


def test_mean_log_prob_with_zero_density_samples() -> None:
    def box_log_prob(x: Tensor) -> Tensor:  # uniform on [0, 1]²: log p = 0 inside, −inf outside
        inside = ((x >= 0) & (x <= 1)).all(dim=1)
        return torch.where(inside, 0.0, -math.inf)

    pts = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.1, 0.9], [-1.0, -1.0]])
    out = mean_log_prob(pts, box_log_prob)
    assert out.mean_log_prob == 0.0 and out.finite_density_fraction == 0.5
    none = mean_log_prob(pts[[1, 3]], box_log_prob)
    assert none.mean_log_prob == -math.inf and none.finite_density_fraction == 0.0


def test_mean_log_prob_rejects_nan() -> None:
    with pytest.raises(ValueError):
        mean_log_prob(torch.zeros(3, 2), lambda x: torch.full((3,), float("nan")))


# --- Toy2DMetric and protocol keys -----------------------------------------------------------------


def test_toy2d_metric_keys_and_determinism() -> None:
    x, y = _gaussians(300, 0), _gaussians(300, 1, shift=0.2)
    metric = Toy2DMetric(num_projections=32)
    assert isinstance(metric, SampleMetric)
    out = metric.compute(x, y)
    assert set(out) == {"energy_distance", "mmd_rbf", "sliced_wasserstein", *PRDC_KEYS}
    assert out == metric.compute(x, y)
    with_lp = Toy2DMetric(num_projections=32, log_prob=_std_normal_log_prob).compute(x, y)
    assert set(with_lp) == set(out) | {"mean_log_prob", "finite_density_fraction"}
    assert all(isinstance(v, float) for v in with_lp.values())


_COUNTS = [(1, "1"), (500, "500"), (1000, "1k"), (1500, "1500"), (10_000, "10k"), (50_000, "50k")]


@pytest.mark.parametrize(("n", "text"), [*_COUNTS, (2_000_000, "2M"), (1_500_000, "1500k")])
def test_format_count(n: int, text: str) -> None:
    assert format_count(n) == text


def test_protocol_key() -> None:
    assert protocol_key("val", "fd_digits", 1000, 50) == "val/fd_digits@1k_nfe50"
    assert protocol_key("test", "energy_distance", 500, 1) == "test/energy_distance@500_nfe1"
    assert protocol_key("", "mmd_rbf", 50_000, 18) == "mmd_rbf@50k_nfe18"
    with pytest.raises(ValueError):
        protocol_key("val", "fd_digits", 0, 50)
    with pytest.raises(ValueError):
        protocol_key("val", "fd_digits", 1000, 0)
