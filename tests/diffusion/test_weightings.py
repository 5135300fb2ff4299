import math

import pytest
import torch

from diffusion_lab.diffusion.weightings import EpsMSEWeighting, MinSNRWeighting


def test_eps_mse_is_one():
    lam = torch.tensor([-20.0, 0.0, 20.0])
    assert EpsMSEWeighting()(lam).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("lam", [-10.0, -1.0, 0.0, math.log(5.0), 3.0, 12.0])
def test_min_snr_matches_hang_et_al(gamma, lam):
    snr = math.exp(lam)
    expected = min(snr, gamma) / snr  # Hang et al. 2023: x0-space weight min(SNR, γ), i.e. /SNR on ε-MSE
    got = MinSNRWeighting(gamma)(torch.tensor([lam], dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_min_snr_finite_at_infinite_log_snr_and_rejects_bad_gamma():
    w = MinSNRWeighting(5.0)(torch.tensor([float("inf"), -float("inf")]))
    assert w.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="gamma"):
        MinSNRWeighting(0.0)
