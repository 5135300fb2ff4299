"""Pins of diffusion_lab.diffusion.weightings: the sigmoid weighting's cell integral keeps float64 accuracy for
float32 log-SNRs on narrow cells near t = 1 (low SNR), where it is a difference of two nearly equal softplus values."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_lab.diffusion.schedules.beta import LinearSchedule
from diffusion_lab.diffusion.weightings import SigmoidWeighting

F32, F64 = torch.float32, torch.float64


def closed_form(lo: np.ndarray, hi: np.ndarray, bias: float) -> np.ndarray:
    """``∫_lo^hi sigmoid(b − λ) dλ = softplus(b − lo) − softplus(b − hi)`` (Kingma & Gao 2023's sigmoid weighting),
    written for ``λ ≪ b`` without cancellation: ``(hi − lo) + log1p(e^{lo−b}) − log1p(e^{hi−b})``."""
    return (hi - lo) + np.log1p(np.exp(lo - bias)) - np.log1p(np.exp(hi - bias))


def test_sigmoid_cell_integral_in_float32_equals_float64_on_narrow_low_snr_cells():
    """λ ≈ −10 … −30 (t near 1): softplus(b − λ) ≈ 12 … 32, so a float32 difference over a cell of width 1e-4 would
    keep only 2–3 digits; the integral is computed in float64 inside and rounded once to float32."""
    lo = torch.tensor([-30.0, -12.0, -10.1, -10.1, -4.0], dtype=F32)
    hi = lo + torch.tensor([1e-3, 1e-4, 2e-2, 3e-5, 1e-4], dtype=F32)
    weighting = SigmoidWeighting()  # b = 2
    got = weighting.integral(lo, hi)
    assert got.dtype == F32
    same_endpoints_f64 = weighting.integral(lo.double(), hi.double())
    torch.testing.assert_close(got, same_endpoints_f64.float(), rtol=1.2e-7, atol=0)  # one rounding to float32
    expected = closed_form(lo.double().numpy(), hi.double().numpy(), 2.0)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-7, atol=0)


def test_sigmoid_discrete_factor_near_t_1_in_float32_is_the_float64_cell_mass():
    """DDPM's linear schedule (T = 1000): the last steps' cells ``[λ_i, λ_{i−1}]`` are ~0.02 wide at λ ≈ −10; the
    float32 factor ``½·T·∫ w`` equals the float64 integral over the same float32 cell ends (to one rounding)."""
    schedule, weighting = LinearSchedule(), SigmoidWeighting(bias=-1.0)
    steps = schedule.num_timesteps
    i = torch.arange(990, 1001, dtype=F32)
    t = i / steps
    lam, lam_prev = schedule.log_snr(t), schedule.log_snr((i - 1) / steps)
    assert lam.dtype == F32 and bool((lam < -8.0).all()) and bool((lam_prev - lam < 0.05).all())
    got = weighting.factor(t, lam, schedule)
    assert got.dtype == F32
    mass = closed_form(lam.double().numpy(), lam_prev.double().numpy(), -1.0)
    np.testing.assert_allclose(got.double().numpy(), 0.5 * steps * mass, rtol=3e-7, atol=0)
