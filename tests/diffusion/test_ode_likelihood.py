"""Probability-flow ODE likelihood against closed forms.

With the exact (Bayes) denoiser of Gaussian or Gaussian-mixture data the PF-ODE transports the diffused
marginals exactly, so the model's log-density is known: for ``N(μ, s² I)`` data the flow is the affine map
``x_1 = α_1 μ + (r_1/r_ε)(x − α_ε μ)``, ``r_t = √(α_t² s² + σ_t²)``, and ``log p(x) = log N(x_1; 0, σ_1² I) +
D log(r_1/r_ε)``; for a mixture ``log p(x) = log p_ε(x) + log N(x_1; 0, σ_1² I) − log p_1(x_1)``. Where the
samplers' prior ``N(0, σ_1² I)`` equals ``p_1`` (rectified flow, the cosine schedule's ``α_1 ≈ 5e-5``) this is
the data density ``log N(x; μ, s² I)`` itself.
"""

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.ode_likelihood import (
    BIN_WIDTH,
    BITS_OFFSET,
    ODELikelihoodOptions,
    dormand_prince,
    ode_nll,
    prior_log_prob,
    probability_flow_drift,
)
from diffusion_lab.diffusion.parameterizations import (
    EpsParameterization,
    FlowParameterization,
    Parameterization,
    VParameterization,
    X0Parameterization,
)
from diffusion_lab.diffusion.schedules import (
    CosineSchedule,
    LinearSchedule,
    NoiseSchedule,
    RectifiedFlowSchedule,
    VESchedule,
)
from diffusion_lab.metrics.likelihood import bits_per_dim

F64 = torch.float64
MU, S = 0.5, 0.7
EXACT = ODELikelihoodOptions(exact_trace=True)


def gaussian(dim: int, mu: float = MU, s: float = S) -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=F64), torch.full((1, dim), mu, dtype=F64), torch.tensor([s], dtype=F64))


MIXTURE = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=F64),
    torch.tensor([[-0.6, 0.2], [0.5, -0.4]], dtype=F64),
    torch.tensor([0.3, 0.5], dtype=F64),
)


class FlatNet(nn.Module):
    """Runs a ``(B, D)`` network on ``(B, C, H, W)`` images."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, c_noise, y=None):
        return self.net(x.flatten(1), c_noise, y).view_as(x)


def oracle(mixture: GaussianMixture, schedule: NoiseSchedule, param: Parameterization, images: bool = False):
    net: nn.Module = OracleNetwork(mixture, schedule, param)
    return Denoiser(FlatNet(net) if images else net, schedule, param)


def alpha_sigma(schedule: NoiseSchedule, t: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return schedule.alpha_sigma(torch.full((n,), t, dtype=F64))


def gaussian_model_log_prob(
    x: torch.Tensor, schedule: NoiseSchedule, t_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(log p_model(x) (B,), x_1 (B, D))`` of the PF-ODE model of ``N(MU, S² I)`` data."""
    (a0, s0), (a1, s1) = (alpha_sigma(schedule, t, 1) for t in (t_eps, 1.0))
    r0, r1 = torch.sqrt(a0**2 * S**2 + s0**2), torch.sqrt(a1**2 * S**2 + s1**2)
    latent = a1 * MU + r1 / r0 * (x.double() - a0 * MU)
    return prior_log_prob(latent, schedule) + x.shape[1] * torch.log(r1 / r0), latent


# Piecewise-linear log ᾱ (β-schedules) has a kink at each of its T grid points: the drift jumps there,
# which the embedded error estimate of an RK pair under-reports, so their floor is ~1e-3 nats at rtol 1e-5.
CASES = [
    pytest.param(CosineSchedule(discrete=False), EpsParameterization(), 5e-3, id="cosine-eps"),
    pytest.param(LinearSchedule(discrete=False), VParameterization(), 5e-3, id="linear-v"),
    pytest.param(LinearSchedule(), EpsParameterization(), 5e-3, id="linear_T1000-eps"),
    pytest.param(VESchedule(), EpsParameterization(), 1e-3, id="ve-eps"),
    pytest.param(RectifiedFlowSchedule(), VParameterization(), 1e-3, id="rf-v"),
    pytest.param(RectifiedFlowSchedule(), FlowParameterization(), 1e-3, id="rf-flow"),
]


@pytest.mark.parametrize(("schedule", "param", "tol"), CASES)
def test_nll_of_gaussian_data_is_the_closed_form(schedule, param, tol):
    x = gaussian(3).sample(6, generator=torch.Generator().manual_seed(0)).float()
    out = ode_nll(oracle(gaussian(3), schedule, param), x, options=EXACT)
    t_eps = EXACT.start_time(schedule)
    expected, latent = gaussian_model_log_prob(x, schedule, t_eps)
    torch.testing.assert_close(out.latent.double(), latent, atol=tol, rtol=1e-4)  # VE: |x_1| ~ σ_max = 80
    torch.testing.assert_close(out.nll, -expected, atol=tol, rtol=0)
    torch.testing.assert_close(out.bits_per_dim, out.nll / (3 * math.log(2)))
    assert out.protocol["t_eps"] == t_eps and out.protocol["probe"] == "exact_trace"
    if schedule.zero_terminal_snr or isinstance(schedule, CosineSchedule):  # prior = p_1: the data density itself
        torch.testing.assert_close(out.nll, -gaussian(3).log_prob(x.double()), atol=tol, rtol=0)


def test_default_start_time_is_the_first_grid_point_of_a_discrete_schedule():
    assert EXACT.start_time(LinearSchedule(num_timesteps=250)) == 1 / 250
    assert EXACT.start_time(VESchedule()) == 1e-5
    assert ODELikelihoodOptions(t_eps=0.0).start_time(VESchedule()) == 0.0  # σ_min > 0: t = 0 is fine


@pytest.mark.parametrize(
    ("schedule", "param", "tol"),
    [
        pytest.param(CosineSchedule(discrete=False), EpsParameterization(), 5e-3, id="cosine-eps"),
        pytest.param(VESchedule(), X0Parameterization(), 1e-3, id="ve-x0"),
        pytest.param(RectifiedFlowSchedule(), VParameterization(), 1e-3, id="rf-v"),
    ],
)
def test_nll_of_a_gaussian_mixture_is_its_log_density(schedule, param, tol):
    x = MIXTURE.sample(6, generator=torch.Generator().manual_seed(1)).float()
    out = ode_nll(oracle(MIXTURE, schedule, param), x, options=EXACT)
    t_eps = EXACT.start_time(schedule)
    latent = out.latent.double()
    model = (
        MIXTURE.log_prob(x.double(), *alpha_sigma(schedule, t_eps, 6))
        + prior_log_prob(latent, schedule)
        - MIXTURE.log_prob(latent, *alpha_sigma(schedule, 1.0, 6))
    )
    torch.testing.assert_close(out.nll, -model, atol=tol, rtol=0)
    if not isinstance(schedule, VESchedule):  # VE: N(0, 80²) differs from p_1 by ~1e-2 nats (mean α_1μ ≠ 0)
        torch.testing.assert_close(out.nll, -MIXTURE.log_prob(x.double()), atol=tol, rtol=0)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    """One point, 256 probes: the mean of the estimates is the exact-trace NLL (the mixture's Jacobian is not
    diagonal, so neither probe is exact on its own)."""
    schedule, param = RectifiedFlowSchedule(), VParameterization()
    denoiser = oracle(MIXTURE, schedule, param)
    x = torch.tensor([[0.1, -0.2]]).expand(256, 2).contiguous()
    exact = ode_nll(denoiser, x[:1], options=EXACT).nll
    gen = torch.Generator().manual_seed(2)
    estimates = ode_nll(denoiser, x, options=ODELikelihoodOptions(probe=probe), generator=gen).nll
    sem = estimates.std() / math.sqrt(estimates.numel())
    assert sem > 1e-3, "the probes must vary"
    assert abs(estimates.mean() - exact[0]) < 4 * sem


def test_rademacher_probe_is_exact_for_a_diagonal_jacobian_on_images():
    """Isotropic Gaussian data: ∂f/∂x = (r'/r) I, so vᵀJv = tr J for every ±1 probe (not for Gaussian probes)."""
    schedule, param = RectifiedFlowSchedule(), VParameterization()
    denoiser = oracle(gaussian(16), schedule, param, images=True)
    x = gaussian(16).sample(4, generator=torch.Generator().manual_seed(3)).float().view(4, 1, 4, 4)
    expected, _ = gaussian_model_log_prob(x.flatten(1), schedule, EXACT.start_time(schedule))
    gen = torch.Generator().manual_seed(0)
    rademacher = ode_nll(denoiser, x, options=ODELikelihoodOptions(), generator=gen)
    gauss = ode_nll(denoiser, x, options=ODELikelihoodOptions(probe="gaussian"), generator=gen)
    torch.testing.assert_close(rademacher.nll, -expected, atol=1e-3, rtol=0)
    assert (gauss.nll + expected).abs().max() > 0.05
    assert rademacher.latent.shape == x.shape and 0 < rademacher.nfe < 200


def discretized_gaussian_levels(n: int, dim: int, s: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` samples of ``N(0, s²)`` rounded to the 256 levels ``−1 + 2k/255`` (centred bins of width h)."""
    k = ((torch.randn(n, dim, generator=gen, dtype=F64) * s + 1.0) / BIN_WIDTH).round().clamp(0, 255)
    return -1.0 + BIN_WIDTH * k


def test_dequantised_bits_per_dim_bound_the_discrete_nll_and_are_tight_for_a_smooth_model():
    """Data: ``N(0, s²)`` discretised to 8 bits, ``P(x_k) = Φ((x_k + h/2)/s) − Φ((x_k − h/2)/s)`` per dimension.
    Model: the continuous ``N(0, s²)`` (rectified flow: the prior is p_1 exactly). Per example the dequantised
    bound has expectation ``Σ_d [½ log 2πs² + (x_d² + h²/12)/(2s²)] + D log(1/h)`` (nats) ≥ ``−log P(x)`` (Jensen);
    the gap is ~h²/(24 s²) per dimension, so the bound is also close to the true discrete entropy."""
    s, dim, n, h = 0.2, 2, 512, BIN_WIDTH
    schedule, param = RectifiedFlowSchedule(), VParameterization()
    gen = torch.Generator().manual_seed(4)
    x = discretized_gaussian_levels(n, dim, s, gen)
    out = ode_nll(oracle(gaussian(dim, 0.0, s), schedule, param), x.float(), dequantize=True, generator=gen)
    normal = torch.distributions.Normal(0.0, s)
    log_p_discrete = torch.log(normal.cdf(x + h / 2) - normal.cdf(x - h / 2)).sum(1)  # (n,), exact
    expected = (0.5 * math.log(2 * math.pi * s**2) + (x**2 + h**2 / 12) / (2 * s**2)).sum(1) + dim * math.log(1 / h)
    assert bool((expected >= -log_p_discrete).all())  # Jensen, per example
    to_bits = 1.0 / (dim * math.log(2))
    diff = out.bits_per_dim - expected * to_bits  # dequantisation noise only
    sem = diff.std() / math.sqrt(n)
    assert abs(diff.mean()) < 4 * sem and sem < 1e-3  # an offset error of log₂(256/255) = 0.0056 bits would fail
    gap = out.bits_per_dim - (-log_p_discrete) * to_bits
    assert -4 * sem < gap.mean() < 4 * sem + 1e-3
    # The true discrete entropy of the data, in bits/dim: the bound's mean is at least that (up to sampling).
    k = torch.arange(256, dtype=F64)
    levels = -1.0 + h * k
    probs = normal.cdf(levels + h / 2) - normal.cdf(levels - h / 2)
    entropy_bits = -(probs * torch.log2(probs.clamp_min(1e-300))).sum()  # per dimension (the dims are iid)
    sampling_sem = out.bits_per_dim.std() / math.sqrt(n)
    assert out.bits_per_dim.mean() > entropy_bits - 4 * sampling_sem
    assert abs(out.bits_per_dim.mean() - entropy_bits) < 4 * sampling_sem
    assert out.protocol["dequantize"] == "uniform, bins of 2/255"
    assert math.log2(127.5) == pytest.approx(BITS_OFFSET)


def test_dequantisation_adds_the_bin_width_offset_to_the_continuous_nll():
    denoiser = oracle(gaussian(2), RectifiedFlowSchedule(), VParameterization())
    x = discretized_gaussian_levels(4, 2, S, torch.Generator().manual_seed(5)).float()
    deq = ode_nll(denoiser, x, dequantize=True, generator=torch.Generator().manual_seed(6))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(6)) - 0.5
    plain = ode_nll(denoiser, x + u * BIN_WIDTH, generator=None, options=EXACT)
    torch.testing.assert_close(deq.nll, plain.nll + 2 * math.log(127.5), atol=1e-3, rtol=0)


def test_bits_per_dim_metric_with_the_ode_method():
    denoiser = oracle(gaussian(2), RectifiedFlowSchedule(), VParameterization(), images=True)
    images = discretized_gaussian_levels(6, 2, S, torch.Generator().manual_seed(7)).float().view(6, 1, 1, 2)
    denoiser.train()
    result = bits_per_dim(denoiser, images, batch_size=6, method="ode", seed=3)
    assert denoiser.training, "the training flag is restored"
    direct = ode_nll(denoiser, images, dequantize=True, generator=torch.Generator().manual_seed(3))
    assert result.bpd == pytest.approx(direct.bits_per_dim.mean().item(), abs=1e-9)
    protocol = result.protocol()
    assert protocol["method"] == "ode" and protocol["decoder"] == "uniform_dequantization"
    assert protocol["probe"] == "rademacher" and protocol["rtol"] == 1e-5 and protocol["nfe_mean"] == direct.nfe
    flat = oracle(gaussian(2), RectifiedFlowSchedule(), VParameterization())
    vectors = bits_per_dim(flat, images.flatten(1), method="ode", ode=ODELikelihoodOptions(rtol=1e-3, atol=1e-3))
    assert vectors.decoder == "density" and vectors.bpd == pytest.approx(result.bpd - BITS_OFFSET, abs=0.05)


def test_drift_is_the_samplers_velocity():
    schedule, param = CosineSchedule(discrete=False), EpsParameterization()
    denoiser = oracle(MIXTURE, schedule, param)
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(8)), torch.linspace(0.01, 0.99, 5)
    torch.testing.assert_close(probability_flow_drift(denoiser, x, t), denoiser.velocity(x, t))


def test_dormand_prince_converges_on_a_known_solution():
    """``y' = cos(5t)·y``, ``I' = y`` from 0 to 3: ``y(3) = exp(sin(15)/5)``; tighter tolerance, more NFE."""

    def func(t, state):
        return math.cos(5 * t) * state[0], state[0][:, 0]

    y0 = (torch.ones(2, 1, dtype=F64), torch.zeros(2, dtype=F64))
    exact = math.exp(math.sin(15.0) / 5)
    nfes = []
    for tol in (1e-3, 1e-6, 1e-9):
        (y, _), nfe = dormand_prince(func, 0.0, 3.0, y0, tol, tol)
        assert abs(y[0, 0].item() - exact) < 30 * tol
        nfes.append(nfe)
    assert nfes == sorted(nfes) and nfes[0] < nfes[-1]
    with pytest.raises(RuntimeError, match="did not reach"):
        dormand_prince(func, 0.0, 3.0, y0, 1e-9, 1e-9, max_steps=5)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"valid choices: \['rademacher', 'gaussian'\]"):
        ODELikelihoodOptions(probe="sobol")
    with pytest.raises(ValueError, match="tolerances must be > 0"):
        ODELikelihoodOptions(rtol=0.0)
    with pytest.raises(ValueError, match=r"t_eps must be in \[0, 1\)"):
        ODELikelihoodOptions(t_eps=1.0)
    vp = oracle(gaussian(2), CosineSchedule(discrete=False), EpsParameterization())
    with pytest.raises(ValueError, match="needs t_eps > 0"):
        ode_nll(vp, torch.zeros(2, 2), options=ODELikelihoodOptions(t_eps=0.0))
    with pytest.raises(ValueError, match=r"images scaled to \[-1, 1\]"):
        ode_nll(vp, torch.full((2, 2), 128.0), dequantize=True)
    zero_snr = CosineSchedule(discrete=False, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="cannot recover x̂0"):
        ode_nll(oracle(gaussian(2), zero_snr, EpsParameterization()), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"valid choices: \['auto', 'discrete', 'continuous', 'ode'\]"):
        bits_per_dim(vp, torch.zeros(2, 2), method="odee")
    with pytest.raises(ValueError, match="no decoder"):
        bits_per_dim(vp, torch.zeros(2, 2), method="ode", decoder="gaussian")
    with pytest.raises(ValueError, match="method='ode' only"):
        bits_per_dim(vp, torch.zeros(2, 2), method="continuous", dequantize=True)
