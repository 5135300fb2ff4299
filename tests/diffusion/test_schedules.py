import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.schedules import CosineSchedule, DiscreteBetaSchedule, LinearSchedule

SCHEDULES = [LinearSchedule, CosineSchedule]


def numpy_alpha_bar_linear(T=1000, b0=1e-4, b1=0.02):
    return np.cumprod(1.0 - np.linspace(b0, b1, T))


def test_linear_matches_ddpm_alpha_bar_at_integer_steps():
    s = LinearSchedule()
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    alpha, sigma = s.alpha_sigma(t)
    ref = numpy_alpha_bar_linear()
    np.testing.assert_allclose(alpha.numpy() ** 2, ref, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(sigma.numpy() ** 2, 1 - ref, rtol=2e-5, atol=1e-9)
    # Known number: ᾱ_T of the DDPM linear schedule is ≈ 4.04e-5.
    assert alpha[-1].item() ** 2 == pytest.approx(4.036e-5, rel=1e-3)


def test_cosine_matches_paper_formula_where_unclipped():
    s = CosineSchedule()
    i = torch.arange(0, 990, dtype=torch.float64)
    f = torch.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    alpha, _ = s.alpha_sigma(i / 1000)
    torch.testing.assert_close(alpha**2, alpha_bar, rtol=1e-5, atol=1e-7)
    assert float(s.betas.max()) == pytest.approx(0.999)  # the last β is clipped


@pytest.mark.parametrize("cls", SCHEDULES)
@pytest.mark.parametrize("discrete", [True, False])
def test_endpoints_variance_preserving_and_monotone(cls, discrete):
    s = cls(discrete=discrete)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    out = s(t)
    assert out.alpha[0] == 1 and out.sigma[0] == 0 and math.isinf(out.log_snr[0].item())
    assert out.alpha[-1] < 0.01 and out.sigma[-1] > 0.9999
    torch.testing.assert_close(out.alpha**2 + out.sigma**2, torch.ones_like(t), atol=1e-6, rtol=0)
    assert bool((out.log_snr[1:] < out.log_snr[:-1]).all()), "log-SNR must be strictly decreasing"
    assert s.is_discrete == discrete


@pytest.mark.parametrize("cls", SCHEDULES)
def test_log_snr_inverse_round_trip(cls):
    s = cls()
    t = torch.rand(500, dtype=torch.float64) * 0.998 + 0.001
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, atol=1e-6, rtol=0)
    # The generic bisection of the base class agrees with the exact inverse.
    bisect = super(DiscreteBetaSchedule, s).t_from_log_snr(s.log_snr(t))
    torch.testing.assert_close(bisect, t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", SCHEDULES)
def test_derivatives_match_finite_differences(cls):
    s = cls(discrete=False)
    # Midpoints of grid cells, where the piecewise-linear log ᾱ is differentiable.
    t = (torch.randint(10, 990, (50,)).double() + 0.5) / 1000
    h = 1e-6
    d = s.derivatives(t)
    for name, fn in [
        ("d_alpha", lambda u: s.alpha_sigma(u)[0]),
        ("d_sigma", lambda u: s.alpha_sigma(u)[1]),
        ("d_log_snr", s.log_snr),
    ]:
        fd = (fn(t + h) - fn(t - h)) / (2 * h)
        torch.testing.assert_close(getattr(d, name).double(), fd, rtol=1e-3, atol=1e-4)
    assert bool((d.d_log_snr < 0).all())


def test_timestep_index_and_bad_arguments():
    s = LinearSchedule()
    assert s.timestep_index(torch.tensor([0.001, 0.5, 1.0])).tolist() == [1, 500, 1000]
    with pytest.raises(ValueError, match="discrete"):
        LinearSchedule(discrete=False).timestep_index(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="beta_start"):
        LinearSchedule(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="num_timesteps"):
        CosineSchedule(num_timesteps=0)
