"""Loss weightings: each row against its paper's formula, and the identities that define it."""

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import (
    CosineSchedule,
    LinearSchedule,
    NoiseSchedule,
    RectifiedFlowSchedule,
    SigmoidSchedule,
    VESchedule,
)
from diffusion_lab.diffusion.weightings import (
    WEIGHTINGS,
    EDMWeighting,
    ELBOWeighting,
    EpsMSEWeighting,
    MinSNRWeighting,
    P2Weighting,
    SigmoidWeighting,
    TruncatedSNRWeighting,
    VMSEWeighting,
    Weighting,
    X0MSEWeighting,
)

LAMS = np.array([-40.0, -12.0, -3.0, -0.5, 0.0, math.log(5.0), 1.7, 5.0, 12.0, 40.0])


class StandInCosine(NoiseSchedule):
    """A tiny continuous VP schedule with a closed-form rate: λ = −2 log tan(πt/2), −dλ/dt = 2π/sin(πt)."""

    def log_snr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(0.5 * math.pi * t))

    def log_snr_rate(self, t: Tensor) -> Tensor:
        return 2.0 * math.pi / torch.sin(math.pi * t)


# ---- independent numpy transcriptions of each paper's formula (SNR = e^λ) ----
def _np_edm(lam, p_mean=-1.2, p_std=1.2, sd=0.5):
    # Karras et al. 2022: ln σ ∼ N(P_mean, P_std²), weight (σ² + σ_d²)/(σ σ_d)² on ‖D − x0‖² = σ²‖ε̂ − ε‖²;
    # as a density in λ = −2 ln σ: N(λ; −2 P_mean, (2 P_std)²).
    sigma2 = np.exp(-lam)
    mean, std = -2 * p_mean, 2 * p_std
    pdf = np.exp(-0.5 * ((lam - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    return pdf * (sigma2 + sd**2) / sd**2


NUMPY_FORMULAS = [
    (EpsMSEWeighting(), lambda lam: np.ones_like(lam)),
    (X0MSEWeighting(), lambda lam: 1.0 / np.exp(lam)),
    (VMSEWeighting(), lambda lam: (np.exp(lam) + 1.0) / np.exp(lam)),
    (TruncatedSNRWeighting(), lambda lam: np.maximum(np.exp(lam), 1.0) / np.exp(lam)),
    (MinSNRWeighting(5.0), lambda lam: np.minimum(np.exp(lam), 5.0) / np.exp(lam)),
    (MinSNRWeighting(1.0), lambda lam: np.minimum(np.exp(lam), 1.0) / np.exp(lam)),
    (P2Weighting(1.0, 1.0), lambda lam: 1.0 / (1.0 + np.exp(lam)) ** 1.0),
    (P2Weighting(0.5, 1.0), lambda lam: 1.0 / (1.0 + np.exp(lam)) ** 0.5),
    (P2Weighting(1.0, 0.0), lambda lam: 1.0 / np.exp(lam)),
    (ELBOWeighting(), lambda lam: np.ones_like(lam)),
    (EDMWeighting(), _np_edm),
    (EDMWeighting(p_mean=0.4, p_std=0.8, sigma_data=1.0), lambda lam: _np_edm(lam, 0.4, 0.8, 1.0)),
    (SigmoidWeighting(), lambda lam: 1.0 / (1.0 + np.exp(lam - 2.0))),
    (SigmoidWeighting(bias=-3.0), lambda lam: 1.0 / (1.0 + np.exp(lam + 3.0))),
]


@pytest.mark.parametrize(("weighting", "formula"), NUMPY_FORMULAS, ids=lambda x: getattr(x, "name", ""))
def test_matches_paper_formula(weighting, formula):
    got = weighting(torch.tensor(LAMS, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, formula(LAMS), rtol=1e-10, atol=0)
    got32 = weighting(torch.tensor(LAMS, dtype=torch.float32))
    assert torch.isfinite(got32).all(), f"{weighting.name} overflows in float32 at |λ| <= 40"
    np.testing.assert_allclose(got32.double().numpy(), formula(LAMS), rtol=1e-5, atol=1e-30)


# Limits at λ = +∞ (t = 0, data) and λ = −∞ (zero SNR); +∞ only where the weight itself diverges.
INF_LIMITS = [
    (EpsMSEWeighting(), [1.0, 1.0]),
    (X0MSEWeighting(), [0.0, math.inf]),
    (VMSEWeighting(), [1.0, math.inf]),
    (TruncatedSNRWeighting(), [1.0, math.inf]),
    (MinSNRWeighting(5.0), [0.0, 1.0]),
    (P2Weighting(1.0, 1.0), [0.0, 1.0]),
    (P2Weighting(0.5, 4.0), [0.0, 0.5]),
    (ELBOWeighting(), [1.0, 1.0]),
    (EDMWeighting(), [0.0, 0.0]),
    (SigmoidWeighting(), [0.0, 1.0]),
]


@pytest.mark.parametrize(("weighting", "limits"), INF_LIMITS, ids=lambda x: getattr(x, "name", ""))
def test_limits_at_infinite_log_snr(weighting, limits):
    got = weighting(torch.tensor([math.inf, -math.inf]))
    assert not torch.isnan(got).any()
    assert got.tolist() == limits


def test_registry_names_and_density_flags():
    assert set(WEIGHTINGS) == {
        "eps_mse", "x0_mse", "v_mse", "truncated_snr", "min_snr", "p2", "elbo", "edm", "sigmoid",
    }  # fmt: skip
    for name, cls in WEIGHTINGS.items():
        assert cls.name == name and issubclass(cls, Weighting)
        assert cls.density == (name in {"elbo", "edm", "sigmoid"})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MinSNRWeighting(0.0), "gamma"),
        (lambda: P2Weighting(gamma=-1.0), "gamma"),
        (lambda: P2Weighting(k=-1.0), "k"),
        (lambda: EDMWeighting(p_std=0.0), "p_std"),
        (lambda: EDMWeighting(sigma_data=-1.0), "sigma_data"),
    ],
)
def test_rejects_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- identities on a concrete VP schedule ----
def _vp_errors(n=256, d=7):
    """Per-example (λ, ε-MSE, x0-MSE, v-MSE) for random (x0, ε, x̂0) on the continuous cosine schedule."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.99 + 0.005
    sched = CosineSchedule(discrete=False)
    alpha, sigma = (c[:, None] for c in sched.alpha_sigma(t))
    lam = sched.log_snr(t)
    x0, eps, x0_hat = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = alpha * x0 + sigma * eps
    eps_hat = (x_t - alpha * x0_hat) / sigma
    v, v_hat = alpha * eps - sigma * x0, alpha * eps_hat - sigma * x0_hat
    mse = lambda a, b: (a - b).square().mean(1)  # noqa: E731
    return lam, mse(eps_hat, eps), mse(x0_hat, x0), mse(v_hat, v)


def test_x0_v_and_truncated_weightings_are_those_losses():
    lam, eps_mse, x0_mse, v_mse = _vp_errors()
    torch.testing.assert_close(X0MSEWeighting()(lam) * eps_mse, x0_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(VMSEWeighting()(lam) * eps_mse, v_mse, rtol=1e-9, atol=0)  # VP only
    trunc = TruncatedSNRWeighting()(lam) * eps_mse
    torch.testing.assert_close(trunc, torch.maximum(x0_mse, eps_mse), rtol=1e-9, atol=0)
    # Salimans & Ho's form: max(SNR, 1) on the x0-MSE.
    torch.testing.assert_close(trunc, torch.clamp(lam.exp(), min=1.0) * x0_mse, rtol=1e-9, atol=0)


def test_min_snr_is_hang_et_al_and_capped():
    lam, eps_mse, x0_mse, _ = _vp_errors()
    gamma = 5.0
    w = MinSNRWeighting(gamma)(lam)
    assert (w <= 1).all()
    torch.testing.assert_close(w * eps_mse, torch.clamp(lam.exp(), max=gamma) * x0_mse, rtol=1e-9, atol=0)
    high = lam.exp() > gamma
    assert high.any() and (~high).any()
    torch.testing.assert_close(w[high], gamma * X0MSEWeighting()(lam[high]), rtol=1e-12, atol=0)
    assert (w[~high] == 1).all()


def test_p2_with_gamma_zero_is_eps_mse():
    lam = torch.tensor(LAMS)
    assert torch.equal(P2Weighting(gamma=0.0, k=1.0)(lam), EpsMSEWeighting()(lam))
    assert torch.equal(P2Weighting(gamma=0.0, k=0.0)(torch.tensor([-math.inf, math.inf])), torch.ones(2))


def test_sigmoid_is_monotone_decreasing_with_half_at_bias():
    lam = torch.linspace(-40, 40, 2001, dtype=torch.float64)
    for bias in (-3.0, 0.0, 2.0):
        w = SigmoidWeighting(bias)(lam)
        assert (w[1:] <= w[:-1]).all()
        mid = lam.abs() <= 20  # strictly decreasing wherever float64 resolves it
        assert (w[mid][1:] < w[mid][:-1]).all()
        assert SigmoidWeighting(bias)(torch.tensor([bias])).item() == 0.5


# ---- factor(): uniform-t weightings vs weightings per unit λ ----
CONTINUOUS_SCHEDULES = [
    StandInCosine(),
    CosineSchedule(discrete=False),
    LinearSchedule(discrete=False),
    SigmoidSchedule(),
    VESchedule(),
    RectifiedFlowSchedule(),
]


def test_ordinary_weighting_factor_is_w():
    sched, t = StandInCosine(), torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    lam = sched.log_snr(t)
    for w in (EpsMSEWeighting(), X0MSEWeighting(), MinSNRWeighting(), P2Weighting(0.5)):
        assert torch.equal(w.factor(t, lam, sched), w(lam))


@pytest.mark.parametrize("sched", CONTINUOUS_SCHEDULES, ids=lambda s: type(s).__name__)
def test_elbo_factor_is_half_log_snr_rate_on_a_continuous_schedule(sched):
    # VDM eq. 17: ½·(−dλ/dt), checked against a central finite difference of λ(t).
    t = torch.linspace(0.0305, 0.9705, 23, dtype=torch.float64)  # off a β-schedule's grid knots
    h = 1e-6
    fd = -(sched.log_snr(t + h) - sched.log_snr(t - h)) / (2 * h)
    got = ELBOWeighting().factor(t, sched.log_snr(t), sched)
    torch.testing.assert_close(got, 0.5 * fd, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "weighting", [EDMWeighting(), SigmoidWeighting(), SigmoidWeighting(-1.0)], ids=lambda w: w.name
)
def test_density_factor_is_half_w_times_rate(weighting):
    sched = StandInCosine()
    t = torch.linspace(0.02, 0.98, 17, dtype=torch.float64)
    lam = sched.log_snr(t)
    expected = 0.5 * weighting(lam) * 2 * math.pi / torch.sin(math.pi * t)
    torch.testing.assert_close(weighting.factor(t, lam, sched), expected, rtol=1e-12, atol=0)


def test_density_factor_is_zero_where_w_vanishes_even_at_infinite_rate():
    sched = StandInCosine()
    t = torch.tensor([0.0], dtype=torch.float64)  # λ = +∞, −dλ/dt = +∞
    for weighting in (EDMWeighting(), SigmoidWeighting()):
        assert weighting.factor(t, sched.log_snr(t), sched).tolist() == [0.0]


def test_edm_weighting_with_log_normal_sampling_is_karras_loss():
    """factor · p_uniform(t)/p(t) = ½·λ(σ)·‖D − x0‖²/‖ε̂ − ε‖² = ½·(σ_e² + σ_d²)/σ_d² (Karras et al. 2022 eq. 8)."""
    p_mean, p_std, sd = -1.2, 1.2, 0.5
    weighting, sched = EDMWeighting(p_mean, p_std, sd), StandInCosine()
    t = torch.linspace(0.02, 0.98, 31, dtype=torch.float64)
    lam = sched.log_snr(t)
    sigma_e = torch.exp(-lam / 2)
    rate = sched.log_snr_rate(t)
    # The log-normal sampler's density on λ (ln σ_e ∼ N(P_mean, P_std²), λ = −2 ln σ_e), and on t.
    p_lam = torch.exp(-0.5 * ((lam + 2 * p_mean) / (2 * p_std)) ** 2) / (2 * p_std * math.sqrt(2 * math.pi))
    karras = (sigma_e**2 + sd**2) / sd**2
    torch.testing.assert_close(weighting.factor(t, lam, sched) / (0.5 * rate) / p_lam, karras, rtol=1e-10, atol=0)
    importance = 1.0 / (p_lam * rate)  # p_uniform(t)/p(t) with p(t) = p(λ)·|dλ/dt|
    torch.testing.assert_close(weighting.factor(t, lam, sched) * importance, 0.5 * karras, rtol=1e-10, atol=0)
    # And in EDM's own terms: λ(σ)‖D − x0‖² with ‖D − x0‖² = σ_e²‖ε̂ − ε‖².
    lambda_sigma = (sigma_e**2 + sd**2) / (sigma_e * sd) ** 2
    torch.testing.assert_close(karras, lambda_sigma * sigma_e**2, rtol=1e-12, atol=0)


# ---- the exact discrete VLB (Kingma et al. 2021 eq. 13; Ho et al. 2020 eq. 5) ----
def _gaussian_kl(mu_q: Tensor, var_q: Tensor, mu_p: Tensor, var_p: Tensor) -> Tensor:
    """KL(N(μ_q, var_q I) ‖ N(μ_p, var_p I)) of D-dimensional isotropic Gaussians, summed over dims ``(B,)``."""
    d = mu_q.shape[-1]
    ratio = var_q / var_p
    return 0.5 * (d * (ratio - 1 - torch.log(ratio)) + (mu_q - mu_p).square().sum(-1) / var_p)


def _posterior(x0: Tensor, x_t: Tensor, a_s, s_s, a_t, s_t) -> tuple[Tensor, Tensor]:
    """q(x_s | x_t, x0) for x_t = α_t x0 + σ_t ε (Kingma et al. 2021 eq. 24–26): mean and variance β̃."""
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mean = (a_ts * s_s**2 / s_t**2) * x_t + (a_s * var_ts / s_t**2) * x0
    return mean, var_ts * s_s**2 / s_t**2


def test_elbo_factor_on_a_discrete_schedule_is_the_exact_vlb():
    T, D = 20, 6
    sched = LinearSchedule(beta_start=1e-3, beta_end=0.2, num_timesteps=T)
    g = torch.Generator().manual_seed(1)
    i = torch.arange(1, T + 1, dtype=torch.float64)
    t, s = i / T, (i - 1) / T
    a_t, s_t = (c[:, None] for c in sched.alpha_sigma(t))
    a_s, s_s = (c[:, None] for c in sched.alpha_sigma(s))
    x0 = torch.randn(T, D, generator=g, dtype=torch.float64)
    eps = torch.randn(T, D, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(T, D, generator=g, dtype=torch.float64)  # x̂0 = x0 + δ
    x_t = a_t * x0 + s_t * eps
    eps_hat = (x_t - a_t * x0_hat) / s_t
    m = (eps_hat - eps).square().mean(-1)  # the ε-MSE, mean over dims

    factor = ELBOWeighting().factor(t, sched.log_snr(t), sched)

    # i >= 2: L_{i-1} = KL(q(x_{i-1}|x_i, x0) ‖ p(x_{i-1}|x_i)), p with x̂0 in place of x0 and σ² = β̃.
    mu_q, var = _posterior(x0, x_t, a_s, s_s, a_t, s_t)
    mu_p, _ = _posterior(x0_hat, x_t, a_s, s_s, a_t, s_t)
    kl = _gaussian_kl(mu_q[1:], var[1:, 0], mu_p[1:], var[1:, 0])
    torch.testing.assert_close(factor[1:] / T * m[1:] * D, kl, rtol=1e-9, atol=0)
    # i = 1: L_0 = −log N(x0; x̂0, β̃_2 I) up to its normaliser (Ho et al. 2020 §3.3, Gaussian decoder), with the
    # clipped posterior variance β̃_2 = β_2(1 − ᾱ_1)/(1 − ᾱ_2) that discrete_elbo (val/bpd) uses.
    betas = torch.linspace(1e-3, 0.2, T, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    beta_tilde_2 = betas[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1])
    decoder = 0.5 * (x0[0] - x0_hat[0]).square().sum() / beta_tilde_2
    torch.testing.assert_close(factor[0] / T * m[0] * D, decoder, rtol=1e-6, atol=0)  # log ᾱ is stored in float32
    # So the uniform-i average of factor·ε-MSE is the VLB (without the prior term) in nats/dim.
    total = (kl.sum() + decoder) / D
    torch.testing.assert_close((factor * m).mean(), total, rtol=1e-6, atol=0)


def test_discrete_elbo_factor_approaches_the_continuous_one():
    """½T·expm1(Δλ) → ½·(−dλ/dt) as the grid refines (VDM's L_T → L_∞)."""
    T = 1000
    disc, cont = CosineSchedule(num_timesteps=T), CosineSchedule(discrete=False)
    i = torch.tensor([50.0, 300.0, 700.0], dtype=torch.float64)
    t = i / T
    got = ELBOWeighting().factor(t, disc.log_snr(t), disc)
    rate = -(cont.log_snr(t) - cont.log_snr(t - 1.0 / T)) * T  # backward difference, the grid's own slope
    torch.testing.assert_close(got, 0.5 * rate, rtol=0.05, atol=0)
    assert torch.isfinite(
        ELBOWeighting().factor(torch.tensor([1.0 / T]), disc.log_snr(torch.tensor([1.0 / T])), disc)
    ).all()


# ---- density weightings on a discrete grid: each step is the mass of ½·w(λ) over its cell (issue 15, item 1) ----
def _np_sigmoid(lam, bias=2.0):
    return np.exp(-np.logaddexp(0.0, lam - bias))  # 1/(1 + e^{λ−b}) without overflow


def _cell_quadrature(formula, lo: float, hi: float) -> float:
    """∫_lo^hi formula(λ) dλ by scipy's adaptive quadrature (hi may be +∞), independent of the closed forms."""
    from scipy import integrate

    return integrate.quad(lambda x: float(formula(np.array(x))), lo, hi, epsabs=0, epsrel=1e-10, limit=200)[0]


@pytest.mark.parametrize(
    ("weighting", "formula"),
    [
        (EDMWeighting(), _np_edm),
        (SigmoidWeighting(), _np_sigmoid),
        (SigmoidWeighting(-1.0), lambda x: _np_sigmoid(x, -1)),
    ],
    ids=lambda x: getattr(x, "name", ""),
)
@pytest.mark.parametrize(
    "sched", [LinearSchedule(), CosineSchedule(), VESchedule(num_timesteps=40)], ids=lambda s: type(s).__name__
)
def test_density_factor_on_a_discrete_schedule_is_the_mass_of_its_cell(weighting, formula, sched):
    """factor_i = T·½∫_{λ_i}^{λ_{i−1}} w dλ, finite at i = 1 where λ_0 = +∞ (T·(λ_0 − λ_1) is not)."""
    T = sched.num_timesteps
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    lam = sched.log_snr(t).double()
    got = weighting.factor(t, sched.log_snr(t), sched)
    assert torch.isfinite(got).all() and (got > 0).all()
    lam_0 = float(sched.log_snr(torch.zeros(1)))
    for i, hi in ((1, lam_0), (T // 2, float(lam[T // 2 - 2])), (T, float(lam[T - 2]))):
        expected = 0.5 * T * _cell_quadrature(formula, float(lam[i - 1]), hi)
        assert got[i - 1].item() == pytest.approx(expected, rel=1e-6), i
    # The cells tile the schedule: Σ_i factor_i / T = ½∫_{λ_T}^{λ_0} w dλ.
    total = 0.5 * _cell_quadrature(formula, float(lam[-1]), lam_0)
    assert got.sum().item() / T == pytest.approx(total, rel=1e-6)


def test_first_cell_weights_of_edm_and_sigmoid_on_ddpms_linear_schedule():
    """The numbers quoted in issue 15 (edm ≈ 1.14, sigmoid ≈ 0.37), from quadrature, not from the closed forms."""
    sched, T = LinearSchedule(), 1000
    t = torch.tensor([1.0 / T])
    lam_1 = float(sched.log_snr(t))
    for weighting, formula, approx in ((EDMWeighting(), _np_edm, 1.14), (SigmoidWeighting(), _np_sigmoid, 0.37)):
        expected = 0.5 * T * _cell_quadrature(formula, lam_1, math.inf)
        assert expected == pytest.approx(approx, abs=0.005)
        assert weighting.factor(t, sched.log_snr(t), sched).item() == pytest.approx(expected, rel=1e-5)


def test_elbo_first_step_uses_the_decoder_of_val_bpd():
    """The training elbo weighting's i = 1 term is the Gaussian decoder of discrete_elbo (variance β̃_2, not β_1),
    up to the decoder's constant normaliser ½·log(2πβ̃_2) per dimension (issue 15, item 4)."""
    from diffusion_lab.diffusion.likelihood_terms import reverse_log_variance, vlb_term

    sched, T, D = LinearSchedule(), 1000, 5
    g = torch.Generator().manual_seed(0)
    t, s = torch.full((3,), 1.0 / T), torch.zeros(3)
    alpha, sigma = (c[:, None] for c in sched.alpha_sigma(t))
    x0, eps = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    x0_hat = x0 + 0.01 * torch.randn(3, D, generator=g)
    x_t = alpha * x0 + sigma * eps
    eps_mse = ((x_t - alpha * x0_hat) / sigma - eps).square().mean(1)
    log_var = reverse_log_variance(sched, t, s, "small", x_t)
    decoder = vlb_term(x0, x_t, x0_hat, t, sched, log_var, decoder="gaussian")
    normaliser = 0.5 * (math.log(2 * math.pi) + log_var[:, 0])
    got = ELBOWeighting().factor(t, sched.log_snr(t), sched) / T * eps_mse
    torch.testing.assert_close(got, decoder - normaliser, rtol=2e-3, atol=0)


def test_elbo_first_step_is_a_kl_where_log_snr_at_zero_is_finite():
    """A discrete VE schedule has λ_0 < ∞: its first VLB term is KL_1 = ½T·expm1(λ_0 − λ_1), as in discrete_elbo."""
    sched, T = VESchedule(num_timesteps=10), 10
    t = torch.tensor([1.0 / T], dtype=torch.float64)
    lam_0, lam_1 = float(sched.log_snr(torch.zeros(1, dtype=torch.float64))), float(sched.log_snr(t))
    got = ELBOWeighting().factor(t, sched.log_snr(t), sched).item()
    assert got == pytest.approx(0.5 * T * math.expm1(lam_0 - lam_1), rel=1e-9)
