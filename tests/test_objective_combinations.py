"""Every schedule × parameterization × weighting × time sampler composes and trains, or fails at composition
with its reason — the ablation grid a researcher sweeps over."""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.config import validate_config
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.losses import DiffusionLoss
from diffusion_lab.diffusion.time_samplers import UniformTimeSampler
from diffusion_lab.module import build_module
from diffusion_lab.schema.errors import ConfigError
from tests.test_config import compose_train, options

SCHEDULES, PARAMS = options("schedule"), options("parameterization")
WEIGHTINGS, TIME_SAMPLERS = options("weighting"), options("time_sampler")
ZERO_SNR = {"rectified_flow"}  # α_1 = 0
UNDEFINED_AT_ZERO_SNR = {"eps", "score"}


def expected_error(schedule: str, param: str, weighting: str) -> str | None:
    """The documented reason a combination is refused, or None if it must train."""
    if schedule in ZERO_SNR and param in UNDEFINED_AT_ZERO_SNR:
        return "zero SNR"
    if schedule == "learned" and weighting != "elbo":
        return "weighting=elbo"
    return None


@pytest.fixture(scope="module")
def nodes():
    """Each weighting and time-sampler option, composed once through Hydra."""
    out = {}
    for group, names in (("weighting", WEIGHTINGS), ("time_sampler", TIME_SAMPLERS), ("parameterization", PARAMS)):
        for name in names:
            out[group, name] = compose_train(["experiment=toy2d", f"{group}={name}"])[group]
    return out


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_combination_trains_or_is_refused_with_its_reason(schedule, param, nodes):
    base = compose_train(["experiment=toy2d", f"schedule={schedule}", f"parameterization={param}"])
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    module = None
    for weighting in WEIGHTINGS:
        for sampler in TIME_SAMPLERS:
            cfg = base.copy()
            OmegaConf.update(cfg, "weighting", nodes["weighting", weighting], merge=False)
            OmegaConf.update(cfg, "time_sampler", nodes["time_sampler", sampler], merge=False)
            combo = f"{schedule}/{param}/{weighting}/{sampler}"
            reason = expected_error(schedule, param, weighting)
            if reason is not None:
                with pytest.raises(ConfigError, match=reason):
                    validate_config(cfg)
                continue
            validate_config(cfg)
            if module is None:
                torch.manual_seed(0)
                module = build_module(cfg, (2,))
                for p in module.denoiser.net.parameters():  # zero-initialised output layer: perturb so grads flow
                    p.data.add_(0.01 * torch.randn_like(p))
            module.zero_grad()
            loss_fn = DiffusionLoss(instantiate(cfg.weighting), instantiate(cfg.time_sampler))
            out = loss_fn(module.denoiser, x0, generator=torch.Generator().manual_seed(1))
            assert math.isfinite(out.loss.item()), combo
            out.loss.backward()
            grads = [p.grad for p in module.denoiser.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads), combo


def test_learned_variance_needs_a_discrete_schedule():
    with pytest.raises(ConfigError, match="discrete-time schedule"):
        validate_config(compose_train(["experiment=toy2d", "schedule=sigmoid", "loss.learned_variance=true"]))
    with pytest.raises(ConfigError, match=r"loss\.learned_variance=true"):
        validate_config(compose_train(["experiment=toy2d", "sampler=ddpm", "sampler.variance=learned"]))
    cfg = compose_train(["experiment=toy2d", "schedule=cosine", "loss.learned_variance=true"])
    validate_config(cfg)
    module = build_module(cfg, (2,))
    out = module.loss_fn(module.denoiser, torch.randn(32, 2), generator=torch.Generator().manual_seed(0))
    assert out.vlb is not None and torch.isfinite(out.vlb).all()
    out.loss.backward()


# Every schedule option plus the variants a sweep reaches with one override: continuous β-schedules, zero
# terminal SNR (Lin et al. 2024), a discrete sigmoid and a discrete VE schedule.
SCHEDULE_VARIANTS = [[f"schedule={name}"] for name in SCHEDULES] + [
    ["schedule=linear", "schedule.discrete=false"],
    ["schedule=cosine", "schedule.discrete=false"],
    ["schedule=linear", "schedule.zero_terminal_snr=true"],
    ["schedule=cosine", "schedule.discrete=false", "schedule.zero_terminal_snr=true"],
    ["schedule=sigmoid", "schedule.num_timesteps=1000"],
    ["schedule=sigmoid", "schedule.zero_terminal_snr=true"],
    ["schedule=ve", "schedule.num_timesteps=100"],
]


def drawable_times(schedule) -> torch.Tensor:
    """Every t a time sampler can draw: the T grid points of a discrete schedule, else a dense grid of
    [t_min, 1] = [1e-5, 1] that is logarithmic near 0, where λ(0) = +∞ makes −dλ/dt blow up."""
    T = schedule.num_timesteps
    if T is not None:
        return torch.arange(1, T + 1) / T
    return torch.cat([torch.logspace(-5, 0, 400), torch.linspace(0, 1, 401)[1:], torch.tensor([1 - 2.0**-24])])


@pytest.mark.parametrize("overrides", SCHEDULE_VARIANTS, ids=lambda o: "+".join(x.split("=", 1)[1] for x in o))
def test_every_weighting_is_finite_at_every_time_a_sampler_can_draw(overrides, nodes):
    """The multiplier of the network's squared error (weighting factor × the parameterization's ε-error scale,
    the terminal limit at zero SNR) is finite and > 0 at every drawable t < 1, and finite and ≥ 0 at t = 1, for
    every weighting × parameterization the config check accepts (issue 15, item 1: edm and sigmoid were +∞ at
    i = 1 of every DDPM schedule)."""
    base = compose_train(["experiment=toy2d", *overrides])
    schedule = instantiate(base.schedule)
    t = drawable_times(schedule)
    interior = t < 1
    checked = 0
    for param_name in PARAMS:
        for weighting_name in WEIGHTINGS:
            cfg = base.copy()
            OmegaConf.update(cfg, "parameterization", nodes["parameterization", param_name], merge=False)
            OmegaConf.update(cfg, "weighting", nodes["weighting", weighting_name], merge=False)
            try:
                validate_config(cfg)
            except ConfigError:
                continue  # refused at composition, with its reason (test above)
            param = instantiate(cfg.parameterization)
            loss_fn = DiffusionLoss(instantiate(cfg.weighting), UniformTimeSampler())
            denoiser = Denoiser(torch.nn.Identity(), schedule, param)
            with torch.no_grad():
                coefs = denoiser.coefficients(t, t[:, None])
                weight = loss_fn._output_weight(denoiser, t, schedule.log_snr(t), coefs)
            combo = f"{overrides}/{param_name}/{weighting_name}"
            assert torch.isfinite(weight).all(), (combo, t[~torch.isfinite(weight)][:5])
            assert (weight[interior] > 0).all(), (combo, t[interior][weight[interior] <= 0][:5])
            assert (weight >= 0).all(), combo
            checked += 1
    assert checked > 0
