"""The real Hydra configs compose, every option instantiates, and bad input fails at composition."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.config import register_configs, validate_config
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR

register_configs()
GROUPS = [
    "dataset",
    "schedule",
    "parameterization",
    "weighting",
    "time_sampler",
    "sampler",
    "model",
    "metrics",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


DATASETS_WITHOUT_DIGITS_METRIC = [
    "celeba",
    "cifar10",
    "fashion_mnist",
    "image_folder",
    "imagenet32",
    "imagenet64",
    "mnist",
    "shapes",
]

RGB_DATASETS = ["celeba", "cifar10", "image_folder", "imagenet32", "imagenet64", "shapes"]

# Options that only make sense together: a toy-2D option is composed inside the toy2d experiment.
CONTEXT = {
    ("dataset", "toy2d"): ["experiment=toy2d"],
    ("metrics", "toy2d"): ["experiment=toy2d"],
    ("model", "mlp"): ["experiment=toy2d"],
    **{("dataset", name): ["metrics=none"] for name in DATASETS_WITHOUT_DIGITS_METRIC},
    # An RGB dataset needs a 3-channel network; a 3-channel network, 3-channel data (the default is 1-channel digits).
    **{("dataset", name): ["metrics=none", "model.in_channels=3"] for name in RGB_DATASETS},
    **{("model", name): ["dataset=shapes", "metrics=none"] for name in ("unet", "dit", "dit_s", "dit_l", "dit_xl")},
    ("model", "res_mlp"): ["experiment=toy2d"],
    ("schedule", "rectified_flow"): ["parameterization=flow"],
    ("schedule", "learned"): ["weighting=elbo"],
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option):
    cfg = compose_train([*CONTEXT.get((group, option), []), f"{group}={option}"])
    validate_config(cfg)
    node = cfg[group]
    if node.get("_target_"):
        obj = instantiate(node)
        assert obj is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    validate_config(cfg)
    assert cfg.name == experiment


@pytest.mark.parametrize("trainer", options("trainer"))
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_trainer_and_precision_options(trainer, precision):
    cfg = compose_train([f"trainer={trainer}", f"precision={precision}"])
    if trainer == "fsdp" and precision == "16-mixed":  # FSDP2 has no grad scaler for sharded fp16 gradients
        with pytest.raises(ConfigError, match=r"^precision=16-mixed with trainer.strategy=fsdp: .*valid: precision=32"):
            validate_config(cfg)
        return
    validate_config(cfg)


def test_ddpm_cifar10_preset_is_faithful_to_ho_et_al():
    cfg = compose_train(["experiment=ddpm_cifar10"])
    assert cfg.schedule.beta_start == 1e-4 and cfg.schedule.beta_end == 0.02 and cfg.schedule.num_timesteps == 1000
    assert cfg.model.base_channels == 128 and list(cfg.model.channel_mult) == [1, 2, 2, 2]
    assert list(cfg.model.attention_resolutions) == [16] and cfg.model.dropout == 0.1
    assert cfg.optim.lr == 2e-4 and cfg.optim.warmup_steps == 5000 and cfg.ema.decay == 0.9999
    assert cfg.dataset.batch_size == 128 and cfg.dataset.flip and cfg.trainer.max_steps == 800_000
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.sampler.steps == 1000


@pytest.mark.parametrize(
    ("override", "exc", "needle"),
    [
        (["schedule=cosin"], MissingConfigException, "cosine"),
        (["schedule.beta_strat=0.1"], ConfigCompositionException, "beta_strat"),
        (["sampler=ddpm", "sampler.variance=medium"], ConfigCompositionException, "variance"),
        (["num_sampels=3"], ConfigCompositionException, "num_sampels"),
        (["sampler.steps=abc"], ConfigCompositionException, "sampler.steps"),
    ],
)
def test_mistyped_overrides_fail_at_composition(override, exc, needle):
    with pytest.raises(exc, match=needle):
        compose_train(override)


def test_enum_error_lists_valid_choices():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["sampler=ddpm", "sampler.variance=medium"])
    assert "small" in str(info.value.__cause__) and "large" in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["precision=8"], "valid choices"),
        (["ema.decay=1.5"], "ema.decay"),
        (["sampler.steps=0"], "sampler.steps"),
        (
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy=fsdp_cpu_offload"],
            r"trainer.strategy=fsdp_cpu_offload moves shards .*; valid on CPU: trainer.strategy=fsdp$",
        ),
        (["trainer=fsdp", "precision=16-mixed"], r"precision=16-mixed with trainer.strategy=fsdp: .*: precision=32"),
        (["trainer=fsdp", "trainer.strategy=fsdp_hybrid"], r"not an FSDP2 strategy; valid: fsdp, fsdp_cpu_offload$"),
    ],
)
def test_validation_rejects_out_of_range_values(override, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(compose_train(override))


def test_cli_typo_prints_valid_choices_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "diffusion_lab.train", "schedule=cosin", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Available options in 'schedule'" in proc.stderr and "cosine" in proc.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_impossible_combination_fails_with_reason():
    with pytest.raises(ConfigError, match="needs dataset=digits"):
        validate_config(compose_train(["dataset=toy2d"]))
    with pytest.raises(ConfigError, match=r"metrics\.resize=center_crop"):
        validate_config(compose_train(["dataset.resolution=16", "metrics.resize=pool"]))


def test_resolved_config_round_trips_through_yaml():
    cfg = compose_train(["experiment=toy2d", "parameterization=v"])
    again = OmegaConf.create(OmegaConf.to_yaml(cfg))
    assert again.parameterization._target_.endswith("VParameterization")
