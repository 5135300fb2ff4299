"""Samplers driven by the exact denoiser of a Gaussian (mixture) reproduce the data distribution."""

import pytest
import torch

from diffusion_lab.diffusion import (
    CosineSchedule,
    Denoiser,
    EpsParameterization,
    LinearSchedule,
    VParameterization,
)
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, time_grid
from diffusion_lab.samplers.base import IndexedGenerator, posterior_coefficients

F64 = torch.float64
GAUSS = GaussianMixture(
    torch.ones(1, dtype=F64), torch.tensor([[1.0, -0.5]], dtype=F64), torch.tensor([0.5], dtype=F64)
)
GMM = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=F64),
    torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64),
    torch.tensor([0.3, 0.3], dtype=F64),
)


def oracle(mixture, schedule=None, param=None):
    schedule = schedule or LinearSchedule()
    param = param or EpsParameterization()
    return Denoiser(OracleNetwork(mixture, schedule, param), schedule, param)


def draw(sampler, denoiser, n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = sampler.prior((n, 2), denoiser.schedule, g)
    return sampler.sample(denoiser, x_T, generator=g)


SAMPLERS = [
    DDPMSampler(steps=1000),
    DDPMSampler(steps=250, variance="large"),
    DDIMSampler(steps=250, eta=0.0),
    DDIMSampler(steps=250, eta=1.0),
    DDIMSampler(steps=250, eta=0.5),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"{s.name}-{s.steps}-{getattr(s, 'eta', '')}")
def test_gaussian_mean_and_covariance(sampler):
    out = draw(sampler, oracle(GAUSS))
    assert out.nfe == sampler.steps
    x = out.x0.double()
    torch.testing.assert_close(x.mean(0), GAUSS.means[0], atol=0.04, rtol=0)
    cov = torch.cov(x.T)
    torch.testing.assert_close(cov, 0.25 * torch.eye(2, dtype=F64), atol=0.025, rtol=0)


@pytest.mark.parametrize("sampler", [DDPMSampler(steps=250), DDIMSampler(steps=25)], ids=lambda s: s.name)
def test_mixture_weights_and_modes(sampler):
    out = draw(sampler, oracle(GMM, CosineSchedule(), VParameterization()))
    right = out.x0[:, 0] > 0
    assert right.double().mean().item() == pytest.approx(0.7, abs=0.03)
    assert out.x0[right, 0].mean().item() == pytest.approx(2.0, abs=0.05)
    assert out.x0[~right, 0].std().item() == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("steps", [5, 20, 100])
def test_ddim_matches_its_closed_form_linear_map_on_gaussian_data(steps):
    """For Gaussian data the Bayes denoiser is affine, so η = 0 DDIM is an affine map x_T ↦ A x_T + b.

    A and b follow from Song et al. 2021 eq. 12 with x̂0 = μ + g (x − α μ), g = α s²/(α² s² + σ²),
    iterated in float64 here independently of the sampler; the sampler must reproduce them exactly.
    """
    schedule, mu, s2 = LinearSchedule(), GAUSS.means[0], 0.25
    grid = time_grid("uniform", steps, schedule)
    alpha, sigma = schedule.alpha_sigma(grid)
    A, b = torch.ones((), dtype=F64), torch.zeros(2, dtype=F64)
    for i in range(steps):
        a_s, s_s, a_r, s_r = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        g = a_s * s2 / (a_s**2 * s2 + s_s**2)
        # x̂0 = g x + (1 − g α_s) μ;  ε̂ = (x − α_s x̂0)/σ_s;  x_r = α_r x̂0 + σ_r ε̂
        dx0 = g
        deps = (1 - a_s * g) / s_s
        A, b = (
            (a_r * dx0 + s_r * deps) * A,
            (a_r * dx0 + s_r * deps) * b + (a_r - s_r * a_s / s_s) * (1 - g * a_s) * mu,
        )
    x_T = torch.stack([torch.zeros(2), torch.ones(2)])
    out = DDIMSampler(steps=steps).sample(oracle(GAUSS), x_T).x0.double()
    torch.testing.assert_close(out[0], b, atol=2e-4, rtol=0)
    torch.testing.assert_close(out[1] - out[0], A.expand(2), atol=2e-4, rtol=1e-4)


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    """Song et al. 2021: η = 1 turns DDIM into the ancestral sampler; with the same noise, equal outputs."""
    den = oracle(GMM)
    a = draw(DDPMSampler(steps=30, variance="small"), den, n=64, seed=3).x0
    b = draw(DDIMSampler(steps=30, eta=1.0), den, n=64, seed=3).x0
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_differs_from_ddpm():
    den = oracle(GMM)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    s = DDIMSampler(steps=10)
    a = s.sample(den, x_T, generator=torch.Generator().manual_seed(1)).x0
    b = s.sample(den, x_T, generator=torch.Generator().manual_seed(2)).x0
    torch.testing.assert_close(a, b)
    c = DDPMSampler(steps=10).sample(den, x_T, generator=torch.Generator().manual_seed(1)).x0
    assert (a - c).abs().max() > 1e-2


def test_posterior_coefficients_match_ho_et_al():
    """μ̃ coefficients and β̃ of Ho et al. 2020 eq. 7 on consecutive DDPM steps."""
    s = LinearSchedule()
    betas = s.betas.double()
    alpha_bar = torch.cumprod(1 - betas, 0)
    for i in [1, 10, 500, 999]:  # step from t = i+1 to t = i (1-based), 0-based index i
        t_s, t_r = torch.tensor((i + 1) / 1000, dtype=F64), torch.tensor(i / 1000, dtype=F64)
        a, b, var = posterior_coefficients(*s.alpha_sigma(t_s), *s.alpha_sigma(t_r))
        ab_t, ab_prev, beta = alpha_bar[i], alpha_bar[i - 1], betas[i]
        assert b == pytest.approx((ab_prev.sqrt() * beta / (1 - ab_t)).item(), rel=1e-4)
        assert a == pytest.approx(((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)).item(), rel=1e-4)
        assert var == pytest.approx(((1 - ab_prev) / (1 - ab_t) * beta).item(), rel=1e-3)


def test_time_grid_respacing_and_errors():
    grid = time_grid("uniform", 10, LinearSchedule())
    assert grid[0] == 1 and grid[-1] == 0 and grid.numel() == 11
    assert torch.allclose(grid * 1000, (grid * 1000).round())
    full = time_grid("uniform", 1000, LinearSchedule())
    assert torch.equal(full * 1000, torch.arange(1000, -1, -1, dtype=F64))
    with pytest.raises(ValueError, match="exceeds"):
        time_grid("uniform", 1001, LinearSchedule())
    with pytest.raises(ValueError, match="valid choices"):
        time_grid("karras_typo", 10, LinearSchedule())
    with pytest.raises(ValueError, match="valid choices"):
        DDPMSampler(variance="medium")
    with pytest.raises(ValueError, match="strictly decreasing"):
        DDIMSampler().sample(oracle(GAUSS), torch.zeros(2, 2), t_grid=torch.tensor([0.0, 1.0]))


def test_indexed_generator_makes_samples_independent_of_batching():
    den = oracle(GMM)
    s = DDPMSampler(steps=20)

    def run(indices):
        gen = IndexedGenerator(list(indices))
        return s.sample(den, s.prior((len(indices), 2), den.schedule, gen), generator=gen).x0

    full = run(range(8))
    torch.testing.assert_close(run(range(4, 8)), full[4:])


class WithVariance(torch.nn.Module):
    """The oracle's prediction plus a constant learned-variance channel block ``v``."""

    def __init__(self, net, v):
        super().__init__()
        self.net, self.v = net, v

    def forward(self, x, c_noise, y=None):
        out = self.net(x, c_noise, y)
        return torch.cat([out, torch.full_like(out, self.v)], dim=1)


@pytest.mark.parametrize(("v", "fixed"), [(1.0, "large"), (-1.0, "small")])
def test_learned_variance_endpoints_equal_the_fixed_variances(v, fixed):
    """Nichol & Dhariwal 2021 eq. 15: v = +1 gives Σ = β, v = −1 gives Σ = β̃, sample for sample."""
    schedule, param = LinearSchedule(), EpsParameterization()
    learned = Denoiser(WithVariance(OracleNetwork(GAUSS, schedule, param), v), schedule, param, learned_variance=True)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    a = DDPMSampler(steps=20, variance="learned").sample(learned, x_T, generator=torch.Generator().manual_seed(1))
    b = DDPMSampler(steps=20, variance=fixed).sample(oracle(GAUSS), x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.x0, b.x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"loss\.learned_variance=true"):
        DDPMSampler(steps=5, variance="learned").sample(oracle(GAUSS), x_T)
