"""The loss against its analytic optimum on Gaussian data (the Bayes denoiser is closed-form)."""

import pytest
import torch

from diffusion_lab.diffusion import (
    Denoiser,
    DiffusionLoss,
    EpsMSEWeighting,
    EpsParameterization,
    LinearSchedule,
    MinSNRWeighting,
    UniformTimeSampler,
    VParameterization,
    X0Parameterization,
)
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork

PARAMS = [EpsParameterization(), X0Parameterization(), VParameterization()]
D = 4
GAUSS = GaussianMixture(
    torch.ones(1, dtype=torch.float64),
    torch.full((1, D), 0.5, dtype=torch.float64),
    torch.tensor([0.7], dtype=torch.float64),
)


def exact_expected_loss(schedule, weighting):
    """E_t[w(λ_t) · min ε-MSE(t)] under t ∼ U{1..T}/T: the minimum of the objective."""
    t = torch.arange(1, schedule.T + 1, dtype=torch.float64) / schedule.T
    alpha, sigma = schedule.alpha_sigma(t)
    return (weighting(schedule.log_snr(t)) * GAUSS.min_eps_mse(alpha, sigma)).mean().item()


class Offset(torch.nn.Module):
    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x, c, y=None):
        return self.net(x, c, y) + self.scale


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("weighting", [EpsMSEWeighting(), MinSNRWeighting(5.0)], ids=lambda w: w.name)
def test_bayes_denoiser_attains_the_analytic_minimum(param, weighting):
    schedule = LinearSchedule()
    denoiser = Denoiser(OracleNetwork(GAUSS, schedule, param), schedule, param)
    loss_fn = DiffusionLoss(weighting, UniformTimeSampler())
    g = torch.Generator().manual_seed(0)
    x0 = GAUSS.sample(100_000, g)
    out = loss_fn(denoiser, x0, generator=g)
    expected = exact_expected_loss(schedule, weighting)
    assert out.loss.item() == pytest.approx(expected, rel=0.02)
    # A biased predictor is strictly worse than the optimum on the same (t, ε) draws.
    best = loss_fn(denoiser, x0, generator=torch.Generator().manual_seed(1)).loss.item()
    scaled = Denoiser(Offset(denoiser.net, 0.2), schedule, param)
    worse = loss_fn(scaled, x0, generator=torch.Generator().manual_seed(1)).loss.item()
    assert worse > best * 1.01


def test_per_timestep_loss_equals_closed_form():
    """At fixed t the ε-MSE of the Bayes denoiser equals α²s²/(α²s²+σ²) per dimension."""
    schedule, param = LinearSchedule(), VParameterization()
    denoiser = Denoiser(OracleNetwork(GAUSS, schedule, param), schedule, param)

    class Fixed(UniformTimeSampler):
        def sample(self, n, schedule, device, generator=None):
            t = torch.full((n,), 0.3)
            return t, torch.ones(n)

    g = torch.Generator().manual_seed(1)
    out = DiffusionLoss(EpsMSEWeighting(), Fixed())(denoiser, GAUSS.sample(200_000, g), generator=g)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.3, dtype=torch.float64))
    assert out.eps_mse.mean().item() == pytest.approx(GAUSS.min_eps_mse(alpha, sigma).item(), rel=0.01)


def test_uniform_time_sampler_discrete_and_continuous():
    g = torch.Generator().manual_seed(0)
    t, w = UniformTimeSampler().sample(10_000, LinearSchedule(), torch.device("cpu"), g)
    idx = t * 1000
    assert torch.allclose(idx, idx.round(), atol=1e-3) and idx.min() >= 1 and idx.max() <= 1000
    assert (w == 1).all()
    t, _ = UniformTimeSampler(t_min=0.1).sample(10_000, LinearSchedule(discrete=False), torch.device("cpu"), g)
    assert t.min() >= 0.1 and t.max() <= 1.0 and abs(t.mean().item() - 0.55) < 0.01
    with pytest.raises(ValueError, match="t_min"):
        UniformTimeSampler(t_min=1.0)
