"""Classifier-free guidance against an analytic class-conditional oracle, and label dropout.

The oracle is a Gaussian mixture whose components are the classes: the conditional denoiser of class k is
component k's posterior mean, the unconditional one (null label) the mixture's posterior mean.
"""

import inspect
import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import (
    Coefficients,
    CosineSchedule,
    Denoiser,
    EDMParameterization,
    EpsParameterization,
    FlowParameterization,
    LinearSchedule,
    RectifiedFlowSchedule,
    VParameterization,
    X0Parameterization,
)
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.diffusion.guidance import GuidedDenoiser, drop_labels
from diffusion_lab.samplers import SAMPLERS, DDIMSampler, DDPMSampler
from diffusion_lab.samplers.base import CountingDenoiser

F64 = torch.float64
# Three well-separated classes with different spreads.
SEPARATED = GaussianMixture(
    torch.tensor([0.2, 0.3, 0.5], dtype=F64),
    torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=F64),
    torch.tensor([0.3, 0.5, 0.4], dtype=F64),
)
# Two overlapping classes: guidance visibly pushes class 0 away from class 1.
OVERLAPPING = GaussianMixture(
    torch.tensor([0.5, 0.5], dtype=F64),
    torch.tensor([[-0.5, 0.0], [0.5, 0.0]], dtype=F64),
    torch.tensor([0.6, 0.6], dtype=F64),
)


def component(mixture: GaussianMixture, k: int) -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=F64), mixture.means[k : k + 1], mixture.stds[k : k + 1])


class ClassOracle(nn.Module):
    """``net(x, c_noise, y)``: the exact prediction given class ``y`` (component y); label K (the null label,
    also used for ``y=None``) gives the mixture's. With ``learned_variance`` a second channel block carries a
    label-dependent "variance" ``y / K`` so tests can see which branch it came from. Records batch sizes."""

    def __init__(self, mixture, schedule, param, learned_variance=False):
        super().__init__()
        self.num_classes = mixture.weights.numel()
        self.components = nn.ModuleList(
            [OracleNetwork(component(mixture, k), schedule, param) for k in range(self.num_classes)]
        )
        self.marginal = OracleNetwork(mixture, schedule, param)
        self.learned_variance = learned_variance
        self.calls: list[int] = []

    def forward(self, x, c_noise, y=None):
        self.calls.append(x.shape[0])
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
        outs = torch.stack([net(x, c_noise) for net in [*self.components, self.marginal]])  # (K+1, B, D)
        out = outs[y, torch.arange(x.shape[0])]
        if self.learned_variance:
            out = torch.cat([out, (y.to(out.dtype) / self.num_classes)[:, None].expand_as(out)], dim=1)
        return out


def oracle(mixture=SEPARATED, schedule=None, param=None, learned_variance=False) -> Denoiser:
    schedule = schedule or CosineSchedule(discrete=False)
    param = param or EpsParameterization()
    net = ClassOracle(mixture, schedule, param, learned_variance)
    return Denoiser(net, schedule, param, learned_variance)


PARAMS = [
    (LinearSchedule(), EpsParameterization()),
    (CosineSchedule(discrete=False), VParameterization()),
    (CosineSchedule(discrete=False), X0Parameterization()),
    (CosineSchedule(discrete=False), EDMParameterization()),
    (RectifiedFlowSchedule(), FlowParameterization()),
]


def noisy_inputs(denoiser, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=F64).clamp(0.05, 0.95).float()
    alpha, sigma = denoiser.schedule.alpha_sigma(t.double())
    x0 = SEPARATED.sample(n, g)
    x_t = (alpha[:, None] * x0 + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=F64)).float()
    y = torch.randint(0, SEPARATED.weights.numel(), (n,), generator=g)
    return x_t, t, y, alpha, sigma


@pytest.mark.parametrize(("schedule", "param"), PARAMS, ids=lambda p: type(p).__name__)
def test_scale_one_is_conditional_and_scale_zero_unconditional(schedule, param):
    denoiser = oracle(schedule=schedule, param=param)
    x_t, t, y, alpha, sigma = noisy_inputs(denoiser)
    conditional = denoiser.predict(x_t, t, y)
    # The conditional oracle is class y's posterior mean, the unconditional one the mixture's.
    expected_cond = torch.stack(
        [
            component(SEPARATED, int(k)).denoise(x[None].double(), a[None], s[None])[0]
            for x, k, a, s in zip(x_t, y, alpha, sigma, strict=True)
        ]
    )
    torch.testing.assert_close(conditional.double(), expected_cond, atol=1e-4, rtol=1e-4)
    unconditional = denoiser.predict(x_t, t, None)
    torch.testing.assert_close(
        unconditional.double(), SEPARATED.denoise(x_t.double(), alpha, sigma), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(GuidedDenoiser(denoiser, 1.0).predict(x_t, t, y), conditional, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GuidedDenoiser(denoiser, 0.0).predict(x_t, t, y), unconditional, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conditional, unconditional, atol=1e-2), "the classes must matter for this test"


@pytest.mark.parametrize(("schedule", "param"), PARAMS, ids=lambda p: type(p).__name__)
def test_one_batched_call_equals_two_separate_calls(schedule, param):
    denoiser = oracle(schedule=schedule, param=param)
    x_t, t, y, alpha, sigma = noisy_inputs(denoiser, n=32)
    cond, uncond = denoiser.predict(x_t, t, y), denoiser.predict(x_t, t, None)
    denoiser.net.calls.clear()
    guided = GuidedDenoiser(denoiser, 3.0).predict(x_t, t, y)
    assert denoiser.net.calls == [64], "one network call on the 2B batch [x_t; x_t] with labels [y; ∅]"
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    # Guiding x̂0 is guiding ε at fixed x_t (Ho & Salimans 2022 eq. 6 with w_HS = w − 1).
    a, s = alpha.float()[:, None], sigma.float()[:, None]
    eps = lambda x0: (x_t - a * x0) / s  # noqa: E731
    torch.testing.assert_close(eps(guided), 3.0 * eps(cond) - 2.0 * eps(uncond), atol=1e-4, rtol=1e-4)
    # The probability-flow velocity of the guided denoiser is built from the guided x̂0.
    d_alpha, d_sigma = Coefficients.at(denoiser.schedule, t, x_t, derivatives=True).derivatives()
    velocity = GuidedDenoiser(denoiser, 3.0).velocity(x_t, t, y)
    torch.testing.assert_close(velocity, d_alpha * guided + d_sigma * eps(guided), atol=1e-3, rtol=1e-3)


def test_learned_variance_comes_from_the_conditional_branch():
    denoiser = oracle(learned_variance=True)
    x_t, t, y, _, _ = noisy_inputs(denoiser, n=16)
    x0_cond, v_cond = denoiser.predict_with_variance(x_t, t, y)
    x0, v = GuidedDenoiser(denoiser, 2.0).predict_with_variance(x_t, t, y)
    assert v is not None and v_cond is not None
    torch.testing.assert_close(v, v_cond)  # y / K, not the null label's K / K = 1
    assert not torch.allclose(x0, x0_cond, atol=1e-3)


def test_refusals():
    denoiser = oracle()
    x_t, t, y, _, _ = noisy_inputs(denoiser, n=4)
    with pytest.raises(ValueError, match="needs class labels"):
        GuidedDenoiser(denoiser, 2.0).predict(x_t, t, None)
    with pytest.raises(ValueError, match=">= 0"):
        GuidedDenoiser(denoiser, -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        GuidedDenoiser(denoiser, math.nan)
    with pytest.raises(TypeError, match="no single network output"):
        GuidedDenoiser(denoiser, 2.0).network_output(x_t, t, y)
    unconditional = Denoiser(
        OracleNetwork(SEPARATED, denoiser.schedule, denoiser.parameterization),
        denoiser.schedule,
        denoiser.parameterization,
    )
    unconditional.net.num_classes = None
    with pytest.raises(ValueError, match="class-conditional network"):
        GuidedDenoiser(unconditional, 2.0)


def draw(sampler, denoiser, label, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = sampler.prior((n, 2), denoiser.schedule, g)
    return sampler.sample(denoiser, x_T, y=torch.full((n,), label, dtype=torch.long), generator=g)


@pytest.mark.parametrize("sampler", [DDPMSampler(steps=100), DDIMSampler(steps=50)], ids=lambda s: s.name)
@pytest.mark.parametrize("label", [0, 2])
def test_sampler_driven_by_the_w1_guided_oracle_samples_the_class_component(sampler, label):
    denoiser = GuidedDenoiser(oracle(), 1.0)
    out = draw(sampler, denoiser, label)
    assert out.nfe == sampler.steps, "NFE counts denoiser calls; each guided call is one batched network call"
    assert set(denoiser.net.calls) == {2 * 2000} and len(denoiser.net.calls) == sampler.steps
    x = out.x0.double()
    mean, std = SEPARATED.means[label], float(SEPARATED.stds[label])
    torch.testing.assert_close(x.mean(0), mean, atol=0.05, rtol=0)
    # 2000 samples: the variance estimate's standard error is s²·√(2/2000) ≈ 0.03·s².
    torch.testing.assert_close(torch.cov(x.T), std**2 * torch.eye(2, dtype=F64), atol=0.01 + 0.15 * std**2, rtol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_runs_guided_and_counts_denoiser_calls(name):
    """The wrapper needs nothing from a sampler beyond the denoiser contract: every one samples class k."""
    cls = SAMPLERS[name]
    sampler = cls(steps=50) if "steps" in inspect.signature(cls).parameters else cls()
    denoiser = GuidedDenoiser(oracle(), 1.0)
    out = draw(sampler, denoiser, label=2, n=500)
    assert out.nfe == len(denoiser.net.calls) and set(denoiser.net.calls) == {2 * 500}
    torch.testing.assert_close(out.x0.double().mean(0), SEPARATED.means[2], atol=0.08, rtol=0)


@pytest.mark.parametrize("sampler", [DDPMSampler(steps=100), DDIMSampler(steps=50)], ids=lambda s: s.name)
def test_guidance_above_one_moves_samples_away_from_the_other_class(sampler):
    other = OVERLAPPING.means[1]
    result = {}
    for w in (1.0, 3.0):
        x = draw(sampler, GuidedDenoiser(oracle(OVERLAPPING), w), label=0).x0.double()
        # Fraction of class-0 samples the Bayes classifier would assign to class 1 (x > 0).
        result[w] = ((x - other).norm(dim=1).mean().item(), (x[:, 0] > 0).double().mean().item())
    dist_1, confused_1 = result[1.0]
    dist_3, confused_3 = result[3.0]
    assert confused_1 == pytest.approx(0.2, abs=0.05), "w = 1 samples class 0 itself: P(x > 0) = Φ(−0.5/0.6)"
    assert dist_3 > dist_1 + 0.2, result
    assert confused_3 < confused_1 / 2, result


# ------------------------------------------------------------------------------------------- label dropout
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_label_dropout_rate_is_p(p):
    n, null = 20_000, 10
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, p, null, torch.Generator().manual_seed(2))
    dropped = out == null
    # Binomial(n, p): 5 standard deviations either side.
    assert abs(dropped.sum().item() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(out[~dropped], y[~dropped])  # kept labels are unchanged
    again = drop_labels(y, p, null, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, again)  # reproducible from the generator's seed


def test_label_dropout_extremes_and_range():
    y = torch.arange(10).repeat(50)
    torch.testing.assert_close(drop_labels(y, 0.0, 10), y)
    assert bool((drop_labels(y, 1.0, 10) == 10).all())
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            drop_labels(y, bad, 10)


def test_counting_denoiser_counts_a_guided_call_once():
    denoiser = GuidedDenoiser(oracle(), 2.0)
    counter = CountingDenoiser(denoiser, clip_x0=None)
    x = torch.randn(5, 2)
    counter(x, 0.5, torch.zeros(5, dtype=torch.long))
    counter.with_variance(x, 0.3, torch.ones(5, dtype=torch.long))
    assert counter.nfe == 2 and denoiser.net.calls == [10, 10]
    assert GuidedDenoiser.network_evals_per_call == 2
