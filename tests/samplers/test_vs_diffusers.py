"""Our DDPM, DDIM, DPM-Solver++ and UniPC against diffusers' schedulers, step for step.

Setup: the linear β schedule with T = 1000 on both sides (ᾱ agrees to 1e-6 relative: diffusers accumulates it in
float32), one ε-predicting network — the Gaussian-mixture oracle on 2-D points, or a fixed random MLP on
``(B, 3, 4, 4)`` "images" — called with the same conditioning, the same ``x_T`` and, for the stochastic samplers, one
generator seeded alike on both sides (both draw ``randn(x.shape)`` once per step after the network call).
diffusers' 0-based timestep ``k`` is our ``t = (k + 1)/T``; our ``"uniform"`` grid is its
``timestep_spacing="trailing"`` (``k = 999, 999 − T/N, …, T/N − 1``) and its final "ᾱ = 1" is our ``t = 0``.
Every intermediate ``x`` is compared: ours are the inputs the network sees plus the output.

Agreement (float32 tolerance, |x| ≲ 5 for the oracle): DDPM with σ² = β̃ (``fixed_small``), DDIM with η = 0 and
η = 1 (shared noise), x̂0 clipping in DDPM, DPM-Solver++ 2M (``DPMSolverMultistepScheduler``, ``midpoint``) with
diffusers' ``lower_order_final`` below 15 steps and the first-order final step to ``σ = 0``, and single-step 2S
(``DPMSolverSinglestepScheduler``, whose ``order_list`` equals our :meth:`DPMSolverSampler.step_orders`), and UniPC
bh2 of order 2 and 3 with the corrector (``UniPCMultistepScheduler``; float64 and the other options in test_unipc.py).

Deliberate differences, each asserted exactly where it applies:

1. DDPM with σ² = β (``fixed_large``): diffusers adds noise on every step whose timestep ``k > 0``, so on a respaced
   grid also on the final step to ᾱ = 1 (``k = T/N − 1``); we never add noise on the step to ``t = 0`` (Ho et al.
   2020 Alg. 2 sets z = 0 on the last step). All states but the last agree; the last differs by exactly
   ``√β_last · z``, ``z`` the next draw of the shared generator. (With ``fixed_small`` that variance is 0 anyway.)
2. DPM-Solver++(3M): diffusers weights ``D2 = (D1_0 − D1_1)/(r0 + r1) ≈ h² x̂0''/2`` by ``φ3`` where the Taylor term
   is ``φ3 h² x̂0''`` (global order 2 instead of 3, see tests/samplers/test_dpm_solver.py). Trajectories agree until
   the first third-order step; from diffusers' own state and x̂0 history, every second- and first-order step agrees
   and every third-order step differs by exactly ``α_r φ3 D2``.
3. DDIM with clipping: diffusers' default ``use_clipped_model_output=False`` keeps the network's ε̂ after clipping
   x̂0; we re-derive ε̂ from the clipped x̂0, which is ``use_clipped_model_output=True`` (asserted).
"""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
)
from torch import nn

from diffusion_lab.diffusion import Denoiser, EpsParameterization, LinearSchedule
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, UniPCSampler, time_grid
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler, half_log_snr, multistep_update, phi_coefficients

F64 = torch.float64
T = 1000
SCHEDULE = LinearSchedule(num_timesteps=T)
PARAM = EpsParameterization()
GMM = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=F64),
    torch.tensor([[-2.0, 0.0], [2.0, 0.5]], dtype=F64),
    torch.tensor([0.4, 0.6], dtype=F64),
)
TOL = {"rtol": 1e-5, "atol": 5e-5}
STEPS = [10, 25, 50]


class RandomEpsNet(nn.Module):
    """A fixed random MLP ``g`` as an ε-network: ``ε̂ = σ x + α g(x, c_noise)``, so ``x̂0 = α x − σ g`` stays bounded

    (the Bayes ε̂ for N(0, I) data plus a random correction), like a trained network's; inputs are flattened.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(dim + 2, hidden, generator=g) / math.sqrt(dim + 2), requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g) / math.sqrt(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        alpha, sigma = SCHEDULE.alpha_sigma((c_noise.double() + 1) / T)
        emb = torch.stack([torch.sin(c_noise / 300), torch.cos(c_noise / 300)], dim=1)
        g = (torch.tanh(torch.cat([x.flatten(1), emb], dim=1) @ self.w1) @ self.w2).reshape(x.shape)
        return (sigma.view(-1, 1, 1, 1) * x + alpha.view(-1, 1, 1, 1) * g).float()


class Recording(nn.Module):
    """Passes through to ``net`` and keeps every input ``x`` (the sampler's states, ε-parameterization: c_in = 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x, c_noise, y=None):
        self.inputs.append(x.clone())
        return self.net(x, c_noise, y)


MODELS = {
    "oracle": (OracleNetwork(GMM, SCHEDULE, PARAM), (256, 2)),
    "mlp": (RandomEpsNet(48), (16, 3, 4, 4)),
}


def x_T(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def eps_model(net, x, k):
    """What diffusers expects: ε̂ at its timestep ``k``, from our network with our conditioning at ``t = (k+1)/T``."""
    t = torch.full((x.shape[0],), (int(k) + 1) / T, dtype=torch.float32)
    return net(x, PARAM.c_noise(t, SCHEDULE)).float()


def ours(sampler, net, x, steps, seed=1):
    """Our trajectory ``(steps + 1, *x.shape)`` and the generator afterwards."""
    rec = Recording(net)
    g = torch.Generator().manual_seed(seed)
    grid = time_grid("uniform", steps, SCHEDULE)
    out = sampler.sample(Denoiser(rec, SCHEDULE, PARAM), x, t_grid=grid, generator=g)
    assert out.nfe == steps
    return torch.stack([*rec.inputs, out.x0]), g


def theirs(scheduler, net, x, steps, seed=1, custom_timesteps=False, **step_kwargs):
    """diffusers' trajectory ``(steps + 1, *x.shape)`` and x̂0 per step (DPM-Solver schedulers only, else empty)."""
    if custom_timesteps:  # DPMSolverSinglestepScheduler has no "trailing" spacing; hand it our grid
        grid = time_grid("uniform", steps, SCHEDULE)
        scheduler.set_timesteps(timesteps=[round(float(t) * T) - 1 for t in grid[:-1]])
    else:
        scheduler.set_timesteps(steps)
    expected = [T - 1 - i * (T // steps) for i in range(steps)]
    assert scheduler.timesteps.tolist() == expected, "diffusers' grid is not our uniform grid"
    g = torch.Generator().manual_seed(seed)
    if "generator" in inspect.signature(scheduler.step).parameters:  # UniPC's step takes none (deterministic)
        step_kwargs = {**step_kwargs, "generator": g}
    states, x0_hats = [x], []
    for k in scheduler.timesteps:
        x = scheduler.step(eps_model(net, x, k), k, x, **step_kwargs).prev_sample
        states.append(x)
        if hasattr(scheduler, "model_outputs"):
            x0_hats.append(scheduler.model_outputs[-1].clone())
    return torch.stack(states), x0_hats


def test_schedules_agree():
    ours_ab = torch.exp(SCHEDULE.log_alpha_bar[1:].double())
    torch.testing.assert_close(DDPMScheduler().alphas_cumprod.double(), ours_ab, rtol=1e-6, atol=0)


CASES = {
    "ddpm_small": (
        lambda n: DDPMSampler(steps=n, variance="small"),
        lambda: DDPMScheduler(variance_type="fixed_small", clip_sample=False, timestep_spacing="trailing"),
        {},
    ),
    "ddpm_small_clip": (
        lambda n: DDPMSampler(steps=n, variance="small", clip_x0=1.0),
        lambda: DDPMScheduler(variance_type="fixed_small", clip_sample=True, timestep_spacing="trailing"),
        {},
    ),
    "ddim_eta0": (
        lambda n: DDIMSampler(steps=n, eta=0.0),
        lambda: DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
        {"eta": 0.0},
    ),
    "ddim_eta1": (
        lambda n: DDIMSampler(steps=n, eta=1.0),
        lambda: DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
        {"eta": 1.0},
    ),
    "ddim_eta0_clip": (
        lambda n: DDIMSampler(steps=n, eta=0.0, clip_x0=1.0),
        lambda: DDIMScheduler(clip_sample=True, timestep_spacing="trailing"),
        {"eta": 0.0, "use_clipped_model_output": True},
    ),
    "dpm_solver_2m": (
        lambda n: DPMSolverSampler(steps=n, order=2),
        lambda: DPMSolverMultistepScheduler(solver_order=2, timestep_spacing="trailing"),
        {},
    ),
    "dpm_solver_1": (
        lambda n: DPMSolverSampler(steps=n, order=1),
        lambda: DPMSolverMultistepScheduler(solver_order=1, timestep_spacing="trailing"),
        {},
    ),
    "unipc_2": (  # float64 agreement, bh1, the corrector off and UniC after DPM-Solver++: tests/samplers/test_unipc.py
        lambda n: UniPCSampler(steps=n, order=2),
        lambda: UniPCMultistepScheduler(solver_order=2, timestep_spacing="trailing"),
        {},
    ),
    "unipc_3": (
        lambda n: UniPCSampler(steps=n, order=3),
        lambda: UniPCMultistepScheduler(solver_order=3, timestep_spacing="trailing"),
        {},
    ),
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectories_match_step_for_step(case, steps, model):
    make_ours, make_theirs, step_kwargs = CASES[case]
    net, shape = MODELS[model]
    a, _ = ours(make_ours(steps), net, x_T(shape), steps)
    b, _ = theirs(make_theirs(), net, x_T(shape), steps, **step_kwargs)
    torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("steps", STEPS)
def test_dpm_solver_2s_matches_singlestep_scheduler(steps, model):
    net, shape = MODELS[model]
    sampler = DPMSolverSampler(steps=steps, order=2, method="singlestep")
    scheduler = DPMSolverSinglestepScheduler(solver_order=2, lower_order_final=True)
    a, _ = ours(sampler, net, x_T(shape), steps)
    b, _ = theirs(scheduler, net, x_T(shape), steps, custom_timesteps=True)
    lam = half_log_snr(*SCHEDULE.alpha_sigma(time_grid("uniform", steps, SCHEDULE))).tolist()
    assert scheduler.order_list == sampler.step_orders(lam)
    assert 2 in scheduler.order_list
    torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("steps", STEPS)
def test_ddpm_large_variance_differs_only_by_the_final_noise(steps, model):
    """Difference 1 of the module docstring: diffusers' extra noise on the step to ᾱ = 1."""
    net, shape = MODELS[model]
    scheduler = DDPMScheduler(variance_type="fixed_large", clip_sample=False, timestep_spacing="trailing")
    a, g = ours(DDPMSampler(steps=steps, variance="large"), net, x_T(shape), steps)
    b, _ = theirs(scheduler, net, x_T(shape), steps)
    torch.testing.assert_close(a[:-1], b[:-1], **TOL)
    beta_last = 1.0 - float(scheduler.alphas_cumprod[scheduler.timesteps[-1]])
    z = torch.randn(shape, generator=g)  # the draw we skip and diffusers makes
    torch.testing.assert_close(b[-1] - a[-1], math.sqrt(beta_last) * z, **TOL)
    assert beta_last > 1e-3


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("steps", STEPS)
def test_dpm_solver_3m_differs_only_in_the_third_order_term(steps, model):
    """Difference 2 of the module docstring, checked on diffusers' own trajectory one step at a time."""
    net, shape = MODELS[model]
    sampler = DPMSolverSampler(steps=steps, order=3)
    a, _ = ours(sampler, net, x_T(shape), steps)
    b, x0_hats = theirs(
        DPMSolverMultistepScheduler(solver_order=3, timestep_spacing="trailing"), net, x_T(shape), steps
    )
    torch.testing.assert_close(a[:3], b[:3], **TOL)  # first- and second-order warm-up steps
    alpha, sigma = SCHEDULE.alpha_sigma(time_grid("uniform", steps, SCHEDULE))
    lam = half_log_snr(alpha, sigma).tolist()
    orders = sampler.step_orders(lam)
    assert orders.count(3) >= steps - 4
    missing_sizes = []
    for i, order in enumerate(orders):
        r, first = i + 1, i + 1 - order
        step = multistep_update(
            b[i], x0_hats[first:r], lam[first:r], float(alpha[r]), float(sigma[r]), lam[r], float(sigma[i])
        )
        if order < 3:
            torch.testing.assert_close(step, b[r], **TOL)
            continue
        m0, m1, m2 = x0_hats[i], x0_hats[i - 1], x0_hats[i - 2]
        h, h0, h1 = lam[r] - lam[i], lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
        d2 = ((m0 - m1) * (h / h0) - (m1 - m2) * (h / h1)) / ((h0 + h1) / h)  # diffusers' D2
        missing = float(alpha[r]) * phi_coefficients(h)[2] * d2
        torch.testing.assert_close(step - b[r], missing, **TOL)
        missing_sizes.append(missing.abs().max().item())
    assert max(missing_sizes) > 100 * TOL["atol"]  # the difference is real, not rounding
