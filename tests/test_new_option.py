"""Adding an option is one class and one YAML file (README, "Add a schedule"): the schema comes from the class's
signature, so the new option composes, rejects typos and out-of-range values, and trains, with nothing else edited."""

import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from diffusion_lab import config
from diffusion_lab.diffusion import Denoiser, DiffusionLoss, EpsParameterization, UniformTimeSampler
from diffusion_lab.diffusion.weightings import EpsMSEWeighting
from diffusion_lab.schema import registry

YAML = """\
# Linear in log-SNR (tests/example_schedule.py).
defaults:
  - /schema/schedule/linear_log_snr@_here_
_target_: tests.example_schedule.LinearLogSNRSchedule
log_snr_max: 8.0
"""


@pytest.fixture
def conf_with_new_schedule(tmp_path, monkeypatch):
    """A copy of conf/ plus conf/schedule/linear_log_snr.yaml, registered as the config layer would be."""
    conf = tmp_path / "conf"
    shutil.copytree(registry.CONFIG_DIR, conf)
    (conf / "schedule" / "linear_log_snr.yaml").write_text(YAML)
    monkeypatch.setattr(registry, "CONFIG_DIR", str(conf))
    registry.option_files.cache_clear()
    registry.option_targets.cache_clear()
    config.register_configs()
    yield str(conf)
    registry.option_files.cache_clear()
    registry.option_targets.cache_clear()


def _compose(conf: str, *overrides: str):
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("train", overrides=["experiment=toy2d", "schedule=linear_log_snr", *overrides])


def test_a_new_schedule_composes_from_its_signature_and_yaml(conf_with_new_schedule):
    cfg = _compose(conf_with_new_schedule, "schedule.log_snr_min=-12")
    assert (cfg.schedule.log_snr_max, cfg.schedule.log_snr_min, cfg.schedule.num_timesteps) == (8.0, -12.0, None)
    config.validate_config(cfg)
    schedule = instantiate(cfg.schedule)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(schedule.log_snr(t), 8.0 - 20.0 * t)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))  # variance preserving by default
    denoiser = Denoiser(instantiate(cfg.model, dim=2), schedule, EpsParameterization())  # the MLP of toy 2-D
    out = DiffusionLoss(EpsMSEWeighting(), UniformTimeSampler())(denoiser, torch.randn(8, 2))
    out.loss.mean().backward()  # trains: a finite loss with gradients through the new schedule's coefficients
    assert torch.isfinite(out.loss).all()


def test_a_new_schedule_rejects_typos_types_and_ranges(conf_with_new_schedule):
    with pytest.raises(ConfigCompositionException, match="log_snr_mx"):
        _compose(conf_with_new_schedule, "schedule.log_snr_mx=1")
    with pytest.raises(ConfigCompositionException, match="log_snr_min"):
        _compose(conf_with_new_schedule, "schedule.log_snr_min=low")
    cfg = _compose(conf_with_new_schedule, "schedule.num_timesteps=0")  # the Annotated rule beside the parameter
    with pytest.raises(config.ConfigError, match=r"schedule.num_timesteps=0 is out of range; valid: null \(contin"):
        config.validate_config(cfg)
    cfg = _compose(conf_with_new_schedule, "schedule.log_snr_min=9")  # the class's own combination check
    with pytest.raises(config.ConfigError, match="schedule: needs log_snr_min < log_snr_max"):
        config.validate_config(cfg)
