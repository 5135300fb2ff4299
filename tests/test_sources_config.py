"""A non-Gaussian prior is refused, with the reason, where something assumes ε ~ N(0, I)."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion_lab.config import register_configs, validate_config
from diffusion_lab.data.toy2d import Toy2DPrior
from diffusion_lab.diffusion.schedules import LinearSchedule, RectifiedFlowSchedule
from diffusion_lab.samplers.ddpm import DDPMSampler
from diffusion_lab.samplers.ode import EulerSampler, RK45Sampler
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR

register_configs()


def compose_train(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["c2ot_fig1_fm", "c2ot_fig1_ot"])
def test_the_c2ot_presets_validate(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    validate_config(cfg)
    assert cfg.prior.name == "c2ot_eight_gaussians" and cfg.eval.num_samples == 10_000


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["schedule=linear", "parameterization=eps"], "needs a path that starts from a pure source draw (α = 0 at "
         "t = 1); schedule=LinearSchedule does not; valid: schedule=rectified_flow"),
        (["sampler=ddpm"], "sampler=DDPMSampler injects Gaussian noise, which assumes ε ~ N(0, I), but "
         "prior=c2ot_eight_gaussians is not Gaussian; valid: sampler=euler|heun (s_churn=0) or sampler=rk45"),
        (["sampler=euler", "sampler.s_churn=1.0"], "sampler=EulerSampler with sampler.s_churn=1.0 injects Gaussian"),
        (["eval.bpd_examples=16"], "bits/dim needs a Gaussian prior (the ELBO's prior term is KL(q(x_1|x0) ‖ N(0, I))"),
    ],
)  # fmt: skip
def test_combinations_that_need_a_gaussian_prior_are_refused(overrides, needle):
    cfg = compose_train(["experiment=c2ot_fig1_fm", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert needle in str(err.value)


def test_the_sampler_draws_the_source_only_where_alpha_is_zero_and_without_noise():
    prior = Toy2DPrior()
    gen = torch.Generator().manual_seed(0)
    x = EulerSampler(steps=1, grid="uniform").prior((6, 2), RectifiedFlowSchedule(), gen, "cpu", prior)
    torch.testing.assert_close(x, prior.sample((6, 2), torch.Generator().manual_seed(0), "cpu"))
    assert RK45Sampler().prior((3, 2), RectifiedFlowSchedule(), None, "cpu", prior).shape == (3, 2)
    with pytest.raises(ValueError, match="needs the sampler's grid to start where α = 0"):
        EulerSampler(steps=2, grid="uniform").prior((3, 2), LinearSchedule(), None, "cpu", prior)
    with pytest.raises(ValueError, match="sampler=ddpm injects Gaussian noise"):
        DDPMSampler(steps=2).prior((3, 2), RectifiedFlowSchedule(), None, "cpu", prior)
