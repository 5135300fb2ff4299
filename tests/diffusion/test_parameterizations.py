"""Parameterizations: invertibility, conversions, the ε-error scale, EDM's Table 1, zero SNR, noise conditioning."""

import math

import pytest
import torch

from diffusion_lab.diffusion.parameterizations import (
    CONTINUOUS_TIME_SCALE,
    LOG_SNR_CLAMP,
    NOISE_CONDITIONINGS,
    Coefficients,
    EDMParameterization,
    EpsParameterization,
    FlowParameterization,
    Parameterization,
    ScoreParameterization,
    VParameterization,
    X0Parameterization,
    score_from_eps,
    v_from_x0_eps,
)
from diffusion_lab.diffusion.schedules import CosineSchedule

PARAMS = [
    EpsParameterization(),
    X0Parameterization(),
    VParameterization(),
    FlowParameterization(),
    ScoreParameterization(),
    EDMParameterization(sigma_data=0.5),
    EDMParameterization(sigma_data=1.3),
]
ids = lambda p: p.name if not isinstance(p, EDMParameterization) else f"edm{p.sigma_data}"  # noqa: E731


def random_state(n=64, d=5, vp=True, seed=0):
    """``x0, ε`` ``(n, d)`` and Coefficients with derivatives, shaped ``(n, 1)``, float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    if vp:
        t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
        c = Coefficients.at(CosineSchedule(discrete=False), t, x0, derivatives=True)
    else:  # not variance preserving: nothing may assume α² + σ² = 1 (only α' < 0 < σ')
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=torch.float64)  # noqa: E731
        c = Coefficients(alpha=u(0.1, 1.1), sigma=u(0.1, 3.1), d_alpha=-u(0.1, 2.1), d_sigma=u(0.1, 2.1))
    return x0, eps, c


def x_t_of(x0, eps, c):
    return c.alpha * x0 + c.sigma * eps


@pytest.mark.parametrize("param", PARAMS, ids=ids)
@pytest.mark.parametrize("vp", [True, False], ids=["vp", "non_vp"])
def test_round_trip_target_to_x0_eps(param, vp):
    x0, eps, c = random_state(vp=vp)
    x0_hat, eps_hat = param.to_x0_eps(param.target(x0, eps, c), x_t_of(x0, eps, c), c)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src", PARAMS, ids=ids)
@pytest.mark.parametrize("dst", PARAMS, ids=ids)
def test_conversion_between_parameterizations(src, dst):
    """A prediction in one output space, taken to (x̂0, ε̂), into another space and back, is unchanged."""
    x0, eps, c = random_state(vp=False, seed=1)
    x_t = x_t_of(x0, eps, c)
    out = torch.randn_like(x0)  # an arbitrary (wrong) prediction
    x0_hat, eps_hat = src.to_x0_eps(out, x_t, c)
    torch.testing.assert_close(c.alpha * x0_hat + c.sigma * eps_hat, x_t, rtol=1e-9, atol=1e-9)
    out_dst = dst.target(x0_hat, eps_hat, c)
    back = src.target(*dst.to_x0_eps(out_dst, x_t, c), c)
    torch.testing.assert_close(back, out, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("param", PARAMS, ids=ids)
@pytest.mark.parametrize("vp", [True, False], ids=["vp", "non_vp"])
def test_eps_error_scale_converts_native_error_to_eps_error(param, vp):
    x0, eps, c = random_state(vp=vp, seed=2)
    x_t = x_t_of(x0, eps, c)
    target = param.target(x0, eps, c)
    out = target + 0.1 * torch.randn_like(target)
    _, eps_hat = param.to_x0_eps(out, x_t, c)
    eps_err = (eps_hat - eps).square().sum(1, keepdim=True)
    native = (out - target).square().sum(1, keepdim=True)
    torch.testing.assert_close(eps_err, param.eps_error_scale(c) * native, rtol=1e-9, atol=1e-12)


def test_targets_are_the_named_quantities():
    x0, eps, c = random_state(vp=False, seed=3)
    torch.testing.assert_close(EpsParameterization().target(x0, eps, c), eps)
    torch.testing.assert_close(X0Parameterization().target(x0, eps, c), x0)
    torch.testing.assert_close(VParameterization().target(x0, eps, c), c.alpha * eps - c.sigma * x0)
    torch.testing.assert_close(FlowParameterization().target(x0, eps, c), c.d_alpha * x0 + c.d_sigma * eps)
    torch.testing.assert_close(ScoreParameterization().target(x0, eps, c), -eps / c.sigma)
    torch.testing.assert_close(v_from_x0_eps(x0, eps, c.alpha, c.sigma), c.alpha * eps - c.sigma * x0)
    torch.testing.assert_close(score_from_eps(eps, c.sigma), -eps / c.sigma)


def test_v_inverse_is_salimans_ho_on_a_vp_schedule():
    """x0 = α x_t − σ v and ε = σ x_t + α v when α² + σ² = 1 (Salimans & Ho 2022 §4)."""
    x0, eps, c = random_state(vp=True, seed=4)
    x_t, v = x_t_of(x0, eps, c), v_from_x0_eps(x0, eps, c.alpha, c.sigma)
    torch.testing.assert_close(c.alpha * x_t - c.sigma * v, x0)
    torch.testing.assert_close(c.sigma * x_t + c.alpha * v, eps)


def test_flow_target_is_eps_minus_x0_for_rectified_flow_and_dx_dt_in_general():
    g = torch.Generator().manual_seed(5)
    t = torch.rand(32, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x0, eps = (torch.randn(32, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ones = torch.ones_like(t)
    rf = Coefficients(alpha=1 - t, sigma=t, d_alpha=-ones, d_sigma=ones)  # Liu et al. 2023: x_t = (1−t) x0 + t ε
    torch.testing.assert_close(FlowParameterization().target(x0, eps, rf), eps - x0)
    # In general the target is the path velocity dx_t/dt (checked on the cosine schedule by central differences).
    sched, h = CosineSchedule(discrete=False), 1e-6
    tt = t[:, 0] * 0.9 + 0.05
    c = Coefficients.at(sched, tt, x0, derivatives=True)
    hi, lo = (Coefficients.at(sched, tt + dh, x0) for dh in (h, -h))
    fd = (x_t_of(x0, eps, hi) - x_t_of(x0, eps, lo)) / (2 * h)
    torch.testing.assert_close(FlowParameterization().target(x0, eps, c), fd, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_matches_karras_table_1(sigma_data):
    """Karras et al. 2022 Table 1 on x̂ = x_t/α with σ_e = σ/α: x̂0 = c_skip·x̂ + c_out·F(c_in·x̂; c_noise)."""
    param = EDMParameterization(sigma_data=sigma_data)
    x0, eps, c = random_state(vp=False, seed=6)
    x_t = x_t_of(x0, eps, c)
    x_hat, sig = x_t / c.alpha, c.sigma / c.alpha
    c_skip = sigma_data**2 / (sig**2 + sigma_data**2)
    c_out = sig * sigma_data / (sig**2 + sigma_data**2).sqrt()
    c_in = 1 / (sig**2 + sigma_data**2).sqrt()
    f = torch.randn_like(x0)
    x0_hat, _ = param.to_x0_eps(f, x_t, c)
    torch.testing.assert_close(x0_hat, c_skip * x_hat + c_out * f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(param.c_in(c) * x_t, c_in * x_hat, rtol=1e-12, atol=1e-12)
    # EDM's training target F = (x0 − c_skip x̂)/c_out, and its loss weight λ(σ) = 1/c_out² on ‖F̂ − F‖².
    torch.testing.assert_close(param.target(x0, eps, c), (x0 - c_skip * x_hat) / c_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(param.eps_error_scale(c), c_out**2 / sig**2, rtol=1e-12, atol=0)


def test_edm_c_noise_is_quarter_log_sigma():
    sched = CosineSchedule(discrete=False)
    t = torch.linspace(0.05, 0.95, 9, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    param = EDMParameterization()
    assert param.noise_conditioning == "log_sigma"
    torch.testing.assert_close(param.c_noise(t, sched), 0.25 * torch.log(sigma / alpha), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param", PARAMS, ids=ids)
def test_zero_snr(param):
    """At α = 0 (rectified flow at t = 1, zero terminal SNR) only some parameterizations still give x̂0."""
    g = torch.Generator().manual_seed(7)
    eps, out = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    zeros, ones = torch.zeros(8, 1, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64)
    c = Coefficients(alpha=zeros, sigma=ones, d_alpha=-ones, d_sigma=ones)
    x0_hat, _ = param.to_x0_eps(out, eps, c)  # x_t = ε
    expected = {"x0": True, "v": True, "flow": True, "edm": True, "eps": False, "score": False}[param.name]
    assert param.defined_at_zero_snr is expected
    assert bool(torch.isfinite(x0_hat).all()) is expected
    if expected:
        assert torch.isfinite(param.eps_error_scale(c)).all()


@pytest.mark.parametrize("param", PARAMS, ids=ids)
def test_defaults_and_needs_derivatives(param):
    assert param.default_noise_conditioning == ("log_sigma" if param.name == "edm" else "time")
    assert param.noise_conditioning == param.default_noise_conditioning
    assert param.needs_derivatives is (param.name == "flow")


@pytest.mark.parametrize(
    "cls", [EpsParameterization, X0Parameterization, VParameterization, FlowParameterization, ScoreParameterization]
)
@pytest.mark.parametrize("conditioning", NOISE_CONDITIONINGS)
def test_noise_conditionings_on_a_schedule(cls, conditioning):
    param: Parameterization = cls(noise_conditioning=conditioning)
    T = 1000
    i = torch.tensor([0.0, 1.0, 10.0, 500.0, 1000.0], dtype=torch.float64)
    t = i / T
    for sched in (CosineSchedule(num_timesteps=T), CosineSchedule(discrete=False)):
        got = param.c_noise(t, sched)
        assert got.shape == t.shape and torch.isfinite(got).all()  # λ(0) = +∞ is clamped
        lam = sched.log_snr(t).clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP)
        if conditioning == "time":
            # Discrete: the 0-based index i − 1 of step i (Ho et al.'s embedding); continuous: 1000·t.
            expected = i - 1 if sched.is_discrete else CONTINUOUS_TIME_SCALE * t
        elif conditioning == "log_snr":
            expected = lam
        else:  # ¼ ln σ_e with σ_e = σ/α = e^{−λ/2}
            expected = -lam / 8
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_edm_accepts_other_noise_conditionings():
    assert EDMParameterization(noise_conditioning="log_snr").noise_conditioning == "log_snr"
    assert EDMParameterization(0.5, "time").noise_conditioning == "time"


@pytest.mark.parametrize("make", [lambda: EpsParameterization("sigma"), lambda: EDMParameterization(0.5, "t")])
def test_invalid_noise_conditioning_names_valid_choices(make):
    with pytest.raises(ValueError, match="noise_conditioning") as info:
        make()
    for choice in NOISE_CONDITIONINGS:
        assert choice in str(info.value)


def test_edm_rejects_bad_sigma_data():
    with pytest.raises(ValueError, match="sigma_data"):
        EDMParameterization(sigma_data=0.0)


def test_missing_derivatives_raise_a_clear_error():
    x0, eps, c = random_state(vp=False, seed=8)
    bare = Coefficients(alpha=c.alpha, sigma=c.sigma)
    with pytest.raises(ValueError, match="derivatives=True"):
        bare.derivatives()
    with pytest.raises(ValueError, match="dα/dt"):
        FlowParameterization().target(x0, eps, bare)
    assert torch.equal(c.derivatives()[0], c.d_alpha)


def test_coefficients_at_broadcast_against_images():
    sched = CosineSchedule(discrete=False)
    t = torch.tensor([0.1, 0.5, 0.9])
    x = torch.zeros(3, 2, 4, 4)
    c = Coefficients.at(sched, t, x, derivatives=True)
    for field in (c.alpha, c.sigma, c.d_alpha, c.d_sigma):
        assert field is not None and field.shape == (3, 1, 1, 1)
    alpha, sigma = sched.alpha_sigma(t)
    assert torch.equal(c.alpha.flatten(), alpha) and torch.equal(c.sigma.flatten(), sigma)
    assert c.d_alpha is not None and c.d_sigma is not None
    assert (c.d_alpha < 0).all() and (c.d_sigma > 0).all()
    plain = Coefficients.at(sched, t, x)
    assert plain.d_alpha is None and plain.d_sigma is None
    assert math.isclose(float(plain.alpha[0] ** 2 + plain.sigma[0] ** 2), 1.0, rel_tol=1e-5)
