import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.schedules import (
    CosineSchedule,
    DiscreteBetaSchedule,
    LinearSchedule,
    NoiseSchedule,
    RectifiedFlowSchedule,
    ShiftedSchedule,
    SigmoidSchedule,
    VESchedule,
)

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


# ---------------------------------------------------------------------------------------------- new schedules

F64 = torch.float64


def chen_alpha_bar(t, start=-3.0, end=3.0, tau=1.0, clip_min=1e-9):
    """Chen 2023, Alg. 1 sigmoid_schedule, transcribed to numpy."""

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    output = sigmoid((t * (end - start) + start) / tau)
    return np.clip((v_end - output) / (v_end - v_start), clip_min, 1.0)


CONTINUOUS = {
    "sigmoid": SigmoidSchedule,
    "sigmoid_chen": lambda: SigmoidSchedule(start=0.0, end=3.0, tau=0.7),
    "ve": VESchedule,
    "rectified_flow": RectifiedFlowSchedule,
    "shifted_cosine": lambda: ShiftedSchedule(CosineSchedule(discrete=False), 64, 256),
    "shifted_rf": lambda: ShiftedSchedule(RectifiedFlowSchedule(), 64, 32),
    "cosine_ztsnr": lambda: CosineSchedule(discrete=False, zero_terminal_snr=True),
}
DISCRETE = {
    "sigmoid_T": lambda: SigmoidSchedule(num_timesteps=100),
    "ve_T": lambda: VESchedule(num_timesteps=50),
    "linear": LinearSchedule,
    "linear_ztsnr": lambda: LinearSchedule(zero_terminal_snr=True),
    "shifted_linear": lambda: ShiftedSchedule(LinearSchedule(), 64, 128),
}
ALL = {**CONTINUOUS, **DISCRETE}


@pytest.mark.parametrize("name", list(ALL))
def test_log_snr_strictly_decreasing_and_family_map_consistent(name):
    s = ALL[name]()
    t = torch.linspace(0, 1, 20001, dtype=F64)
    lam = s.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must be strictly decreasing"
    alpha, sigma = s.alpha_sigma(t)
    assert alpha.dtype == F64 and lam.dtype == F64
    ref_alpha, ref_sigma = s.alpha_sigma_from_log_snr(lam)
    torch.testing.assert_close(ref_alpha, alpha, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_sigma, sigma, atol=1e-6, rtol=1e-6)
    # log-SNR of the (α, σ) pair is λ itself wherever both are positive.
    inner = (alpha > 1e-6) & (sigma > 1e-6)
    torch.testing.assert_close(2 * (alpha.log() - sigma.log())[inner], lam[inner], atol=1e-5, rtol=1e-5)
    lo, hi = s.log_snr_bounds()
    assert lo == pytest.approx(lam[-1].item(), rel=1e-6) and hi == pytest.approx(lam[0].item(), rel=1e-6)
    assert s.zero_terminal_snr == (lo == -math.inf)


@pytest.mark.parametrize("name", list(ALL))
def test_t_from_log_snr_round_trip_and_agrees_with_bisection(name):
    s = ALL[name]()
    t = torch.rand(500, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.998 + 0.001
    lam = s.log_snr(t)
    torch.testing.assert_close(s.t_from_log_snr(lam), t, atol=1e-6, rtol=0)
    torch.testing.assert_close(NoiseSchedule.t_from_log_snr(s, lam), t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_log_snr_rate_matches_finite_differences(name):
    s = ALL[name]()
    # Midpoints of the cells of a β-schedule, where its piecewise-linear log ᾱ is differentiable.
    t = (torch.randint(10, 990, (50,), generator=torch.Generator().manual_seed(1)).double() + 0.5) / 1000
    h = 1e-6
    fd = -(s.log_snr(t + h) - s.log_snr(t - h)) / (2 * h)
    rate = s.log_snr_rate(t)
    assert rate.shape == t.shape and bool((rate > 0).all())
    torch.testing.assert_close(rate, fd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.derivatives(t).d_log_snr.double(), -fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(DISCRETE))
def test_discrete_log_snr_rate_is_the_backward_difference(name):
    s = ALL[name]()
    T = s.num_timesteps
    i = torch.arange(1, T + 1)
    for dtype in (torch.float32, F64):
        t = i.to(dtype) / T
        expected = T * (s.log_snr((i - 1).to(dtype) / T) - s.log_snr(t))
        tol = 1e-4 if dtype == torch.float32 else 1e-9  # float32 λ differences cancel (shifted: base rate)
        torch.testing.assert_close(s.log_snr_rate(t), expected, rtol=tol, atol=tol)
    # Between grid points (a continuous-time ELBO on a discrete schedule) it is the derivative.
    t = (torch.arange(3, T - 2, dtype=F64) + 0.5) / T
    h = 1e-7
    fd = -(s.log_snr(t + h) - s.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(s.log_snr_rate(t), fd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{}, {"start": 0.0, "end": 3.0, "tau": 0.7}, {"start": -3.0, "end": 3.0, "tau": 1.1}]
)
def test_sigmoid_alpha_bar_matches_chen_algorithm_1(kwargs):
    s = SigmoidSchedule(**kwargs)
    t = np.array([0.0, 0.05, 0.3, 0.5, 0.77, 0.99, 0.9999, 1.0])
    alpha, sigma = s.alpha_sigma(torch.tensor(t))
    ref = chen_alpha_bar(t, **kwargs)
    np.testing.assert_allclose(alpha.numpy() ** 2, ref, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(sigma.numpy() ** 2, 1 - ref, rtol=1e-9, atol=1e-15)
    assert s.log_snr(torch.tensor([0.0])).item() == math.inf
    assert not s.zero_terminal_snr and s.num_timesteps is None


def test_sigmoid_zero_terminal_snr_drops_the_clip():
    s = SigmoidSchedule(zero_terminal_snr=True)
    out = s(torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert out.alpha[-1] == 0 and out.sigma[-1] == 1 and out.log_snr[-1] == -math.inf
    assert s.zero_terminal_snr and s.t_from_log_snr(torch.tensor([-math.inf])).item() == 1.0
    np.testing.assert_allclose(out.alpha.numpy()[:2] ** 2, chen_alpha_bar(np.array([0.0, 0.5])), rtol=1e-12)
    with pytest.raises(ValueError, match="start < end"):
        SigmoidSchedule(start=1.0, end=-1.0)


def test_ve_schedule_endpoints_and_identities():
    s = VESchedule()
    t = torch.linspace(0, 1, 1001, dtype=F64)
    alpha, sigma = s.alpha_sigma(t)
    assert bool((alpha == 1).all())
    torch.testing.assert_close(sigma, 0.002 * (80.0 / 0.002) ** t)
    assert sigma[0].item() == pytest.approx(0.002) and sigma[-1].item() == pytest.approx(80.0)
    assert s.log_snr_bounds() == pytest.approx((-2 * math.log(80.0), -2 * math.log(0.002)))
    assert math.isfinite(s.log_snr(t[:1]).item()) and not s.zero_terminal_snr
    torch.testing.assert_close(s.log_snr_rate(t), torch.full_like(t, 2 * math.log(80.0 / 0.002)))
    d = s.derivatives(t[1:-1])
    assert bool((d.d_alpha == 0).all())
    torch.testing.assert_close(d.d_sigma.double(), sigma[1:-1] * math.log(80.0 / 0.002), rtol=1e-5, atol=1e-5)


def test_rectified_flow_is_linear_interpolation_with_zero_terminal_snr():
    s = RectifiedFlowSchedule()
    t = torch.linspace(0, 1, 1001, dtype=F64)
    out = s(t)
    torch.testing.assert_close(out.alpha, 1 - t)
    torch.testing.assert_close(out.sigma, t)
    torch.testing.assert_close(out.alpha + out.sigma, torch.ones_like(t))
    assert out.log_snr[0] == math.inf and out.log_snr[-1] == -math.inf
    assert s.zero_terminal_snr and s.log_snr_bounds() == (-math.inf, math.inf)
    torch.testing.assert_close(s.t_from_log_snr(out.log_snr), t)
    torch.testing.assert_close(s.log_snr_rate(t[1:-1]), 2 / (t[1:-1] * (1 - t[1:-1])))
    d = s.derivatives(t[1:-1])
    assert bool((d.d_alpha == -1).all() and (d.d_sigma == 1).all())


@pytest.mark.parametrize(
    "base", [lambda: CosineSchedule(discrete=False), RectifiedFlowSchedule, VESchedule, SigmoidSchedule]
)
@pytest.mark.parametrize("resolution", [16, 64, 256])
def test_shifted_schedule_shifts_log_snr_and_keeps_the_family(base, resolution):
    b = base()
    s = ShiftedSchedule(b, reference_resolution=64, resolution=resolution)
    shift = 2 * math.log(64 / resolution)
    assert s.shift == shift and s.num_timesteps == b.num_timesteps and isinstance(s.base, NoiseSchedule)
    assert any(m is b for m in s.children())
    t = torch.linspace(0.001, 0.999, 4001, dtype=F64)
    torch.testing.assert_close(s.log_snr(t) - b.log_snr(t), torch.full_like(t, shift), atol=1e-12, rtol=0)
    alpha, sigma = s.alpha_sigma(t)
    if isinstance(b, RectifiedFlowSchedule):
        torch.testing.assert_close(alpha + sigma, torch.ones_like(t))
    elif isinstance(b, VESchedule):
        assert bool((alpha == 1).all())
    else:
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, atol=1e-6, rtol=0)
    if resolution == 64:
        assert torch.equal(s.log_snr(t), b.log_snr(t))
        assert all(torch.equal(x, y) for x, y in zip(s.alpha_sigma(t), b.alpha_sigma(t), strict=True))
    elif resolution > 64:
        base_alpha, base_sigma = b.alpha_sigma(t)
        assert bool((sigma / alpha > base_sigma / base_alpha).all())  # a larger image is noisier at every t


def test_shifted_discrete_base_keeps_timesteps():
    s = ShiftedSchedule(LinearSchedule(), 64, 128)
    assert s.num_timesteps == 1000 and s.is_discrete and not s.learnable
    assert s.timestep_index(torch.tensor([0.5])).item() == 500
    with pytest.raises(TypeError, match="learnable"):
        s.variance_reduction()


# ---------------------------------------------------------------------------------------------- zero terminal SNR


@pytest.mark.parametrize("cls", SCHEDULES)
@pytest.mark.parametrize("discrete", [True, False])
def test_zero_terminal_snr_endpoints_affine_rescale_and_no_nan(cls, discrete):
    s = cls(discrete=discrete, zero_terminal_snr=True)
    orig = cls(discrete=discrete)
    assert s.zero_terminal_snr and not orig.zero_terminal_snr
    assert s.betas[-1].item() == 1.0 and bool((s.betas[:-1] < 1).all())
    grid = torch.linspace(0, 1, 20001, dtype=F64)
    out = s(grid)
    assert out.alpha[-1] == 0 and out.sigma[-1] == 1 and out.log_snr[-1] == -math.inf
    assert out.alpha[0] == 1 and out.sigma[0] == 0 and out.log_snr[0] == math.inf
    assert bool((out.log_snr[1:] < out.log_snr[:-1]).all())
    torch.testing.assert_close(out.alpha**2 + out.sigma**2, torch.ones_like(grid), atol=1e-6, rtol=0)
    # √ᾱ' = (√ᾱ − √ᾱ_T)·√ᾱ_1/(√ᾱ_1 − √ᾱ_T): the first step is unchanged, and the map is affine.
    i = torch.tensor([1, 250, 700, 999, 1000], dtype=F64)
    new, old = s.alpha_sigma(i / 1000)[0], orig.alpha_sigma(i / 1000)[0]
    first, last = old[0], old[-1]
    assert new[0].item() == pytest.approx(first.item(), rel=1e-6)
    torch.testing.assert_close(new, (old - last) * first / (first - last), rtol=1e-5, atol=1e-7)
    # Every method is finite on the grid except the genuine λ(1) = −∞ (and its infinite rate).
    interior = grid[1:-1]
    checks = [*s.alpha_sigma(grid), s.log_snr(interior), s.t_from_log_snr(out.log_snr)]
    d = s.derivatives(grid)
    checks += [
        d.d_alpha,
        d.d_sigma[1:],
        d.d_log_snr[1:-1],
        s.log_snr_rate(grid[(grid > 1.5e-3) & (grid < 1)]),
    ]  # +∞ at i = 1
    for x in checks:
        assert bool(torch.isfinite(x).all()), x
    assert not bool(torch.isnan(d.d_log_snr).any() or torch.isnan(s.log_snr_rate(grid)).any())
    torch.testing.assert_close(s.t_from_log_snr(out.log_snr), grid, atol=1e-6, rtol=0)


def test_zero_terminal_snr_last_cell_interpolates_sqrt_alpha_bar_linearly():
    s = LinearSchedule(num_timesteps=10, zero_terminal_snr=True, discrete=False)
    t = torch.linspace(0.9, 1.0, 11, dtype=F64)
    alpha = s.alpha_sigma(t)[0]
    torch.testing.assert_close(alpha, alpha[0] * torch.linspace(1, 0, 11, dtype=F64))
    d = s.derivatives(torch.tensor([0.95, 1.0]))
    torch.testing.assert_close(d.d_alpha, torch.full((2,), -10 * alpha[0].item(), dtype=torch.float32))
    assert d.d_log_snr[-1].item() == -math.inf


def test_zero_terminal_snr_needs_two_steps():
    with pytest.raises(ValueError, match="num_timesteps >= 2"):
        LinearSchedule(num_timesteps=1, zero_terminal_snr=True)
