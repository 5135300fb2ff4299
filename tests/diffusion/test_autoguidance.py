"""Autoguidance and the guidance interval against analytic oracles: the guided denoiser's closed form, the guide at
the main model's noise level when their schedules differ, the interval's inside/outside cases and exact counts of
network evaluations."""

import math

import pytest
import torch

from diffusion_lab.diffusion import CosineSchedule, EpsParameterization, LinearSchedule, VParameterization
from diffusion_lab.diffusion.analytic import GaussianMixture
from diffusion_lab.diffusion.guidance import (
    AutoGuidedDenoiser,
    Guidance,
    GuidedDenoiser,
    IntervalGuidance,
    sigma_over_alpha,
)
from diffusion_lab.module import Generation
from diffusion_lab.samplers import DDIMSampler, DPMSolverSampler, HeunSampler
from tests.diffusion.test_guidance import PARAMS, SEPARATED, component, noisy_inputs, oracle

F64 = torch.float64
# A "bad version" of SEPARATED: the same classes, blurred (wider components, means pulled in).
BLURRED = GaussianMixture(SEPARATED.weights, 0.6 * SEPARATED.means, 2.0 * SEPARATED.stds)


def class_posterior(mixture, x_t, y, alpha, sigma):
    """E[x0 | x_t, y] of each row's class component, (B, D) float64."""
    rows = zip(x_t, y, alpha, sigma, strict=True)
    return torch.stack(
        [component(mixture, int(k)).denoise(x[None].double(), a[None], s[None])[0] for x, k, a, s in rows]
    )


@pytest.mark.parametrize(("schedule", "param"), PARAMS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_autoguidance_is_the_guide_extrapolated_towards_the_main_model(schedule, param, w):
    main, guide = oracle(SEPARATED, schedule, param), oracle(BLURRED, schedule, param)
    x_t, t, y, alpha, sigma = noisy_inputs(main)
    d_main, d_guide = (class_posterior(m, x_t, y, alpha, sigma) for m in (SEPARATED, BLURRED))
    guided = AutoGuidedDenoiser(main, guide, w).predict(x_t, t, y)
    torch.testing.assert_close(guided.double(), d_guide + w * (d_main - d_guide), atol=2e-4, rtol=2e-4)
    assert not torch.allclose(d_main, d_guide, atol=1e-2), "the guide must differ for this test"


def test_a_guide_with_another_schedule_is_evaluated_at_the_same_noise_level():
    """Main: cosine, v-prediction; guide: linear β, ε-prediction. At equal λ both denoise the same x_t/α."""
    main = oracle(SEPARATED, CosineSchedule(discrete=False), VParameterization())
    guide = oracle(BLURRED, LinearSchedule(discrete=False), EpsParameterization())
    x_t, t, y, alpha, sigma = noisy_inputs(main)
    assert not torch.allclose(guide.schedule.log_snr(t), main.schedule.log_snr(t), atol=1e-2)
    d_main, d_guide = (class_posterior(m, x_t, y, alpha, sigma) for m in (SEPARATED, BLURRED))
    guided = AutoGuidedDenoiser(main, guide, 2.0).predict(x_t, t, y)
    torch.testing.assert_close(guided.double(), d_guide + 2.0 * (d_main - d_guide), atol=2e-3, rtol=2e-3)


def test_autoguidance_of_unconditional_models_and_refusals():
    main, guide = oracle(SEPARATED), oracle(BLURRED)
    x_t, t, _, alpha, sigma = noisy_inputs(main)
    expected = BLURRED.denoise(x_t.double(), alpha, sigma)
    expected = expected + 3.0 * (SEPARATED.denoise(x_t.double(), alpha, sigma) - expected)
    torch.testing.assert_close(AutoGuidedDenoiser(main, guide, 3.0).predict(x_t, t, None).double(), expected,
                               atol=2e-4, rtol=2e-4)  # fmt: skip
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite number >= 0"):
            AutoGuidedDenoiser(main, guide, bad)
    with pytest.raises(TypeError, match="no single network output"):
        AutoGuidedDenoiser(main, guide, 2.0).network_output(x_t, t, None)
    with pytest.raises(ValueError, match="0 <= σ_lo < σ_hi"):
        IntervalGuidance(GuidedDenoiser(main, 2.0), main, (1.0, 0.5))


@pytest.mark.parametrize("kind", ["cfg", "auto"])
def test_interval_guides_inside_and_not_outside(kind):
    main = oracle(SEPARATED)
    guide = oracle(BLURRED) if kind == "auto" else None
    x_t, t, y, _, _ = noisy_inputs(main, n=64)
    level = sigma_over_alpha(main.schedule, t)
    lo, hi = float(level.quantile(0.3)), float(level.quantile(0.7))
    inside = (level > lo) & (level <= hi)
    assert 0 < int(inside.sum()) < 64
    guidance = Guidance(2.0, guide=guide, interval=(lo, hi))
    wrapped = guidance.wrap(main, main.net.num_classes)
    assert isinstance(wrapped, IntervalGuidance)
    full = Guidance(2.0, guide=guide).wrap(main, main.net.num_classes).predict(x_t, t, y)
    conditional = main.predict(x_t, t, y)
    out = wrapped.predict(x_t, t, y)
    torch.testing.assert_close(out[inside], full[inside], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[~inside], conditional[~inside], atol=1e-6, rtol=1e-6)
    assert wrapped.calls == 1 and wrapped.guided_calls == pytest.approx(float(inside.float().mean()))
    # A batch wholly inside (outside) is one guided (plain) call.
    for rows, guided in ((inside, 1.0), (~inside, 0.0)):
        main.net.calls.clear()
        counted = Guidance(2.0, guide=guide, interval=(lo, hi)).wrap(main, main.net.num_classes)
        counted.predict(x_t[rows], t[rows], y[rows])
        assert counted.guided_calls == guided
        n = int(rows.sum())
        expected = ([2 * n] if kind == "cfg" else [n]) if guided else [n]
        assert main.net.calls == expected


def sampled_network_evals(denoiser_nets, batch):
    return sum(sum(net.calls) for net in denoiser_nets) / batch


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=12), HeunSampler(steps=6), DPMSolverSampler(steps=10)],
                         ids=lambda s: s.name)  # fmt: skip
@pytest.mark.parametrize("kind", ["cfg", "auto"])
def test_network_evaluations_are_counted_exactly(sampler, kind):
    main, guide = oracle(SEPARATED), oracle(BLURRED)
    n = 8
    interval = (0.5, 3.0)
    guidance = Guidance(2.0, guide=guide if kind == "auto" else None, interval=interval)
    wrapped = guidance.wrap(main, main.net.num_classes)
    g = torch.Generator().manual_seed(0)
    x_T = sampler.prior((n, 2), main.schedule, g)
    main.net.calls.clear()
    guide.net.calls.clear()
    out = sampler.sample(wrapped, x_T, y=torch.zeros(n, dtype=torch.long), generator=g)
    # Which calls fell in the interval, from the times the sampler actually asked for.
    assert wrapped.calls == out.nfe and 0 < wrapped.guided_calls < out.nfe
    assert float(wrapped.guided_calls).is_integer(), "every row of a sampler's call shares t"
    gen = Generation(out.x0, out.nfe, guidance_scale=2.0, guidance=kind, guidance_interval=interval,
                     guided_calls=wrapped.guided_calls)  # fmt: skip
    assert gen.network_evals == out.nfe + wrapped.guided_calls
    assert gen.network_evals == sampled_network_evals([main.net, guide.net], n)
    everywhere = Generation(out.x0, out.nfe, guidance_scale=2.0, guidance=kind)
    assert everywhere.network_evals == 2 * out.nfe and Generation(out.x0, out.nfe).network_evals == out.nfe
