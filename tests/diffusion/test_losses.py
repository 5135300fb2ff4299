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


def test_edm_recipe_reproduces_edms_per_sample_loss():
    """VE schedule + EDM preconditioning + log-normal times + EDM weighting is Karras et al. 2022's loss:
    importance weight × ½(−dλ/dt) × N(λ) cancel, leaving λ(σ)·‖D − x0‖² = (σ²+σ_d²)/σ_d²·‖ε̂ − ε‖² per example
    (times Kingma & Gao's ½ and the truncation constant, the same for every example)."""
    from diffusion_lab.diffusion.parameterizations import EDMParameterization
    from diffusion_lab.diffusion.schedules import VESchedule
    from diffusion_lab.diffusion.time_samplers import LogNormalTimeSampler
    from diffusion_lab.diffusion.weightings import EDMWeighting
    from diffusion_lab.models import MLP

    torch.manual_seed(0)
    schedule, param = VESchedule(), EDMParameterization(sigma_data=0.5)
    net = MLP(dim=D, hidden=32, num_layers=2)
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    denoiser = Denoiser(net, schedule, param)
    out = DiffusionLoss(EDMWeighting(sigma_data=0.5), LogNormalTimeSampler())(
        denoiser, GAUSS.sample(4096).float(), generator=torch.Generator().manual_seed(0)
    )
    sigma = torch.exp(-out.log_snr / 2)
    edm = (sigma**2 + 0.25) / 0.25 * out.eps_mse
    ratio = out.per_example.detach() / edm
    assert ratio.std().item() < 1e-3 * ratio.mean().item()
    assert ratio.mean().item() == pytest.approx(0.5, rel=1e-3)  # ½, and a truncation constant ≈ 1
    # EDM's ln σ ~ N(−1.2, 1.2²) is what was sampled.
    assert (-out.log_snr / 2).mean().item() == pytest.approx(-1.2, abs=0.06)


class _FixedTimes(UniformTimeSampler):
    """Every example at the same time ``t``."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def sample(self, batch_size, schedule, device, generator=None):
        return torch.full((batch_size,), self.t, device=device), torch.ones(batch_size, device=device)


def test_zero_terminal_snr_last_step_has_the_finite_limit_weight():
    """At α = 0 the ε-space factor is ∞ and k = 0; the output-space weight is their finite limit.

    Linear β rescaled to ᾱ_T = 0 (Lin et al. 2024), v-prediction: at t = 1, v = −x0, and VDM's exact VLB term
    ``L_{T−1} = ½·SNR_{T−1}·‖x̂0 − x0‖²`` gives ``½·T·e^{λ_{T−1}}`` on ``‖v̂ − v‖²`` (elbo); ``1/(α² + σ²) = 1``
    for the v-MSE."""
    from diffusion_lab.diffusion import ELBOWeighting, VMSEWeighting

    torch.manual_seed(0)
    schedule, param = LinearSchedule(zero_terminal_snr=True), VParameterization()
    denoiser = Denoiser(Offset(OracleNetwork(GAUSS, schedule, param), 0.3), schedule, param)
    x0 = GAUSS.sample(64).float()
    # At t = 1, F = v = −x0 and the oracle's F̂ = −E[x0] + 0.3 = −0.2: the squared error is (x0 − 0.2)².
    sq_err = (x0 - 0.2).square().mean(1)
    last_snr = schedule.log_snr(torch.tensor([1 - 1 / schedule.T])).exp().item()
    for weighting, expected in [(VMSEWeighting(), 1.0), (ELBOWeighting(), 0.5 * schedule.T * last_snr)]:
        out = DiffusionLoss(weighting, _FixedTimes(1.0))(denoiser, x0)
        assert torch.isneginf(out.log_snr).all()
        torch.testing.assert_close(out.per_example, expected * sq_err, rtol=2e-3, atol=0)
