"""The config layer: schemas registered in Hydra's ConfigStore, and the checks run right after composition.

An option is one class and one YAML file, ``conf/<group>/<name>.yaml``, which names the class (``_target_``) and
extends its schema (``defaults: [/schema/<group>/<name>@_here_]``). The schema is derived from the class's typed
constructor (:func:`diffusion_lab.schema.signature.schema_of`), so a mistyped key, a value of the wrong type or an
enum value outside its choices fails at composition, naming the valid keys or values. The range a value may take is
declared beside its parameter (``Annotated[int, POSITIVE_INT]``) and checked by :func:`validate_config`, with the
combinations no single parameter can express, before any data is loaded. None of this imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.schema.choices import DDPMVariance
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.jobs import EvaluateConfig, PhemaConfig, SampleConfig, TuneGridConfig
from diffusion_lab.schema.registry import (
    CONFIG_DIR,
    OPTION_GROUPS,
    build_option,
    option_config,
    option_names,
    option_schema,
)
from diffusion_lab.schema.run import TrainConfig
from diffusion_lab.schema.signature import domain_rules
from diffusion_lab.schema.sources import check_source

PRECISIONS = ("32", "bf16-mixed", "16-mixed", "64")


def register_configs() -> None:
    """Store every option's schema as ``schema/<group>/<name>`` and the entry points' as ``*_schema``."""
    cs = ConfigStore.instance()
    for group in OPTION_GROUPS:
        for name in option_names(group):
            cs.store(group=f"schema/{group}", name=name, node=option_schema(group, name))
    for name, node in (
        ("train", TrainConfig),
        ("sample", SampleConfig),
        ("evaluate", EvaluateConfig),
        ("tune_grid", TuneGridConfig),
        ("phema", PhemaConfig),
    ):
        cs.store(name=f"{name}_schema", node=node)


def check_domains(cfg: DictConfig, prefix: str = "") -> None:
    """Every value whose parameter declares a :class:`~diffusion_lab.schema.domains.Domain` is in it."""
    schema = OmegaConf.get_type(cfg)
    rules = domain_rules(schema) if isinstance(schema, type) and dataclasses.is_dataclass(schema) else {}
    for key in map(str, cfg):
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_interpolation():
            check_domains(node, f"{prefix}{key}.")
        elif key not in rules or OmegaConf.is_missing(cfg, key):
            continue  # only the values a rule covers are read (resolving their interpolations)
        elif (error := rules[key].message(f"{prefix}{key}", cfg[key])) is not None:
            raise ConfigError(error)


def _check_unet_shape(model: DictConfig) -> None:
    """Each UNet level halves the resolution, and GroupNorm groups must divide every channel count."""
    if "channel_mult" in model and "resolution" in model:
        factor = 2 ** (len(model.channel_mult) - 1)  # one downsampling between consecutive levels
        if model.resolution % factor:
            raise ConfigError(
                f"model.resolution={model.resolution} must be divisible by 2**(len(model.channel_mult)-1)={factor} "
                f"(model.channel_mult={list(model.channel_mult)}); valid: a multiple of {factor}"
            )
    if "num_groups" in model and "base_channels" in model and model.base_channels % model.num_groups:
        raise ConfigError(
            f"model.num_groups={model.num_groups} must divide model.base_channels={model.base_channels} "
            "(GroupNorm over every channel count, all multiples of base_channels); valid: a divisor of "
            f"{model.base_channels}"
        )


def _check_fsdp(cfg: DictConfig) -> None:
    """What FSDP2 (trainer=fsdp, diffusion_lab.strategies) cannot run: a strategy name it does not know, offloading
    from a CPU to itself, and a precision other than 32 / bf16-mixed."""
    strategy, accelerator = str(cfg.trainer.strategy), str(cfg.trainer.accelerator)
    if not strategy.startswith("fsdp"):
        return
    if strategy not in ("fsdp", "fsdp_cpu_offload"):
        raise ConfigError(f"trainer.strategy={strategy} is not an FSDP2 strategy; valid: fsdp, fsdp_cpu_offload")
    if strategy == "fsdp_cpu_offload" and accelerator == "cpu":
        raise ConfigError(
            "trainer.strategy=fsdp_cpu_offload moves shards from the GPU to host memory, and trainer.accelerator=cpu "
            "has them there already; valid on CPU: trainer.strategy=fsdp"
        )
    if str(cfg.precision) not in ("32", "bf16-mixed"):
        raise ConfigError(
            f"precision={cfg.precision} with trainer.strategy={strategy}: Lightning's FSDP2 strategy has no grad "
            "scaler for sharded fp16 gradients and no float64 policy; valid: precision=32, bf16-mixed"
        )


def _check_dit_shape(model: DictConfig) -> None:
    """A DiT's heads split its width, and its 2-D sin-cos positions take a width divisible by 4."""
    if "hidden_size" in model and "num_heads" in model and model.hidden_size % model.num_heads:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} is not divisible by model.num_heads={model.num_heads}; "
            f"valid: a num_heads dividing {model.hidden_size}"
        )
    if "hidden_size" in model and "patch_size" in model and model.hidden_size % 4:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} must be divisible by 4 (2-D sin-cos positions); valid: a multiple "
            "of 4"
        )


def validate_config(cfg: DictConfig) -> None:
    """Check ranges and combinations that the schema types cannot express; raise :class:`ConfigError`."""
    if str(cfg.precision) not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is not supported; valid choices: {list(PRECISIONS)}")
    check_domains(cfg)
    _check_unet_shape(cfg.model)
    _check_dit_shape(cfg.model)
    if not (cfg.trainer.max_steps > 0 or cfg.trainer.max_epochs > 0):
        raise ConfigError("trainer.max_steps or max_epochs must be > 0")
    _check_fsdp(cfg)
    _check_digits_metric(cfg)  # config-only checks first: they need no torch import
    check_posthoc_ema(cfg)
    if cfg.eval.num_samples > 0:
        check_isc_splits("eval.num_samples", cfg.eval.num_samples, cfg.metrics)
    check_source(cfg)  # a non-Gaussian prior: rectified flow, an ODE sampler, no likelihood
    _check_objective(cfg)
    datamodule = _instantiate_axis(cfg, "dataset")  # its own checks (it is built, not set up: no data is loaded)
    check_model_data(cfg.model, tuple(datamodule.data_shape), str(cfg.dataset._target_))
    _check_conditioning(cfg, datamodule)


def check_posthoc_ema(cfg: DictConfig) -> None:
    """``ema.posthoc``: ``sigma_rel`` is what ``dlab-phema`` records in the checkpoints it writes, never a training
    setting (under FSDP the profiles are sharded like the weights and gathered for each snapshot)."""
    posthoc = cfg.ema.posthoc
    if posthoc.sigma_rel is not None:
        raise ConfigError(
            f"ema.posthoc.sigma_rel={posthoc.sigma_rel} is written by dlab-phema into the checkpoints it reconstructs; "
            "valid in training: null (choose the tracked profiles with ema.posthoc.sigma_rels=[…])"
        )


def check_model_data(model: DictConfig, data_shape: tuple[int, ...], dataset: str) -> None:
    """The network must take the dataset's samples ``data_shape`` (known once the datamodule is built, before any data
    is loaded): an image network's ``in_channels`` = C of ``(C, H, W)`` and H, W divisible by its downsampling
    factor; a vector network's ``dim`` = D of ``(D,)``. Else a :class:`ConfigError` naming key and valid value."""
    where = f"dataset={dataset.rsplit('.', 1)[-1]} gives samples of shape {data_shape}"
    if "in_channels" in model:
        if len(data_shape) != 3:
            raise ConfigError(f"model={model._target_} takes images (C, H, W), but {where}; valid: a vector model")
        if model.in_channels != data_shape[0]:
            raise ConfigError(f"model.in_channels={model.in_channels}, but {where}; valid: {data_shape[0]}")
        factor = 2 ** (len(model.channel_mult) - 1) if "channel_mult" in model else 1
        if data_shape[1] % factor or data_shape[2] % factor:
            raise ConfigError(
                f"model.channel_mult={list(model.channel_mult)} downsamples by 2**(levels-1)={factor}, but {where}; "
                f"valid: a dataset resolution divisible by {factor}, or fewer levels"
            )
        if "patch_size" in model and (data_shape[1] % model.patch_size or data_shape[2] % model.patch_size):
            raise ConfigError(
                f"model.patch_size={model.patch_size} must divide the image size, but {where}; valid: a patch_size "
                f"dividing {data_shape[1]} and {data_shape[2]}"
            )
    if "dim" in model and tuple(data_shape) != (model.dim,):
        raise ConfigError(f"model.dim={model.dim}, but {where}; valid: a model for that shape")


def check_isc_splits(key: str, num_samples: int, metrics: Any) -> None:
    """The Inception Score averages over ``metrics.isc_splits`` parts of the samples (Salimans et al. 2016), each of
    which needs one: with ``metrics.isc`` on, ``num_samples`` (set at ``key``) must be at least that many."""
    if metrics is None or not str(metrics.get("_target_") or "").endswith("FidelityMetric") or not metrics.get("isc"):
        return
    if num_samples < metrics.isc_splits:
        raise ConfigError(
            f"{key}={num_samples} is below metrics.isc_splits={metrics.isc_splits} (the Inception Score needs a sample "
            f"in each split); valid: {key} >= {metrics.isc_splits}, or metrics.isc=false"
        )


def check_evaluate_request(cfg: DictConfig) -> None:
    """``dlab-evaluate``: combinations of ``scores`` with the other keys (each value's range is its field's rule)."""
    if cfg.ref_stats_only and "fid" not in cfg.scores:
        raise ConfigError(f"ref_stats_only=true needs fid in scores, got scores={list(cfg.scores)}")
    if "fid" in cfg.scores and not cfg.ref_stats_only:
        check_isc_splits("num_samples", cfg.num_samples, cfg.metrics)
    check_prdc_scores(list(cfg.scores), "fid" if "fid" in cfg.scores else None)


def check_prdc_scores(scores: list[str], feature_score: str | None) -> None:
    """Density and coverage are computed in the digits CNN's features (fd_digits) or the coordinates (toy2d); in
    Inception features (``feature_score`` fid) only torch-fidelity's precision and recall are available."""
    missing = [s for s in scores if s in ("density", "coverage")]
    if feature_score == "fid" and missing:
        raise ConfigError(
            f"scores={scores}: {missing} are not computed in Inception features (fid gives precision and recall "
            "through torch-fidelity); valid: precision, recall with fid, or all four with fd_digits or toy2d"
        )


def _instantiate_axis(cfg: DictConfig, group: str) -> Any:
    """Build one objective axis through the registry; a constructor's error becomes a ConfigError naming the group."""
    return build_option(group, cfg[group])


# Nichol & Dhariwal 2021 learn Σ per integer step; the VLB term needs the discrete posterior.
_NEEDS_DISCRETE = "loss.learned_variance=true needs a discrete-time schedule (schedule.discrete=true / num_timesteps)"


def _check_objective(cfg: DictConfig) -> None:
    """Combinations of schedule × parameterization × weighting that cannot work, with the reason."""
    schedule = _instantiate_axis(cfg, "schedule")
    param = _instantiate_axis(cfg, "parameterization")
    weighting = _instantiate_axis(cfg, "weighting")
    _instantiate_axis(cfg, "time_sampler")
    if schedule.zero_terminal_snr and not param.defined_at_zero_snr:
        raise ConfigError(
            f"the schedule reaches zero SNR at t = 1 (α_1 = 0), where parameterization={param.name} cannot recover "
            "x̂0 (Lin et al. 2024 §3.2); use parameterization=x0, v, flow or edm"
        )
    if schedule.learnable and weighting.name != "elbo":
        raise ConfigError(
            f"schedule=learned is trained through the continuous ELBO (Kingma et al. 2021); use weighting=elbo, "
            f"got weighting={weighting.name}"
        )
    if cfg.loss.learned_variance and not schedule.is_discrete:
        raise ConfigError(_NEEDS_DISCRETE)
    if cfg.sampler.get("variance") == DDPMVariance.learned and not cfg.loss.learned_variance:
        raise ConfigError("sampler.variance=learned needs loss.learned_variance=true (a model that outputs Σ)")
    check_sampler(_instantiate_axis(cfg, "sampler"), schedule)


def check_sampler(sampler: Any, schedule: Any) -> None:
    """The sampler's time grid must exist on the schedule (e.g. ``leading``/``trailing`` need a discrete one)."""
    try:
        sampler.time_grid(schedule)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from err


# How the digits metric undoes each way the dataset reaches 16×16 or 32×32.
DIGITS_METRIC_RESIZE = {"pad": "center_crop", "upsample": "pool"}


def _check_digits_metric(cfg: DictConfig) -> None:
    """The digits Fréchet distance must map samples back to 8×8 the way the dataset left it."""
    target = str(cfg.metrics.get("_target_") or "")
    if not target.endswith("DigitsFDMetric"):
        return
    if not str(cfg.dataset._target_).endswith("DigitsDataModule"):
        raise ConfigError("metrics=digits_fd needs dataset=digits (it scores 8×8 digit images)")
    expected = DIGITS_METRIC_RESIZE[cfg.dataset.resize]
    if cfg.dataset.resolution != 8 and cfg.metrics.resize != expected:
        raise ConfigError(
            f"dataset.resize={cfg.dataset.resize} needs metrics.resize={expected} "
            f"(valid pairs: {DIGITS_METRIC_RESIZE}), got metrics.resize={cfg.metrics.resize}"
        )


def dataset_num_classes(dataset_cfg: DictConfig) -> int | None:
    """The label count of the configured datamodule (built, not set up: no data is loaded)."""
    return build_option("dataset", dataset_cfg).num_classes


def check_guidance(key: str, scale: float | None, num_classes: int | None, p_uncond: float) -> None:
    """A guidance scale ``scale`` (set at ``key``) must be >= 0 and meet a conditional model with p_uncond > 0."""
    if scale is None:
        return
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(
            f"{key}={scale} is invalid; valid values: null (no guidance) or a number >= 0 "
            "(0: unconditional, 1: conditional, > 1: guided)"
        )
    if num_classes is None:
        raise ConfigError(
            f"{key}={scale} needs a class-conditional model (trained with cond.enabled=true); "
            f"this model is unconditional, so the valid value is {key}=null"
        )
    if p_uncond <= 0:
        raise ConfigError(
            f"{key}={scale} needs the unconditional branch, but cond.p_uncond=0 never trained the null label; "
            f"train with cond.p_uncond in (0, 1] or set {key}=null"
        )


def check_guidance_request(cfg: DictConfig) -> None:
    """``dlab-sample`` / ``dlab-evaluate``: ``guidance``, ``guide_ckpt`` and ``guidance_interval`` fit together (each
    value's range is its field's rule); the checkpoints themselves are compared once their configs are read."""
    kind = str(getattr(cfg.guidance, "value", cfg.guidance))
    if kind == "auto" and (cfg.guidance_scale is None or not cfg.guide_ckpt):
        raise ConfigError(
            f"guidance=auto needs guide_ckpt=<a checkpoint of a weaker model> and guidance_scale=w (got guide_ckpt="
            f"{cfg.guide_ckpt}, guidance_scale={cfg.guidance_scale}); valid: both set, or guidance=cfg"
        )
    if kind != "auto" and cfg.guide_ckpt:
        raise ConfigError(f"guide_ckpt={cfg.guide_ckpt} is the guide of autoguidance; valid: guidance=auto with it")
    if cfg.guidance_interval is not None and cfg.guidance_scale is None:
        raise ConfigError(
            f"guidance_interval={list(cfg.guidance_interval)} limits guidance, but guidance_scale=null applies none; "
            "valid: set guidance_scale=w, or guidance_interval=null"
        )


def _check_conditioning(cfg: DictConfig, datamodule: Any) -> None:
    """A conditional model needs a labelled dataset; guidance needs both. ``datamodule.num_classes`` is read
    only for a conditional run (an image folder's labels are its subfolders: reading them scans the disk)."""
    p_uncond, model_classes = cfg.cond.p_uncond, cfg.model.get("num_classes")  # p_uncond's range: its field
    if not cfg.cond.enabled:
        if model_classes is not None:
            raise ConfigError(
                f"model.num_classes={model_classes} without cond.enabled=true; set cond.enabled=true (which fills "
                "model.num_classes from the dataset) or model.num_classes=null"
            )
        check_guidance("eval.guidance_scale", cfg.eval.guidance_scale, None, p_uncond)
        return
    data_classes = datamodule.num_classes
    if data_classes is None:
        raise ConfigError(
            f"cond.enabled=true needs a dataset with class labels, but dataset={cfg.dataset._target_} has none; "
            f"valid: cond.enabled=false, or a labelled dataset ({', '.join(_labelled_datasets())})"
        )
    if model_classes is not None and model_classes != data_classes:
        raise ConfigError(
            f"model.num_classes={model_classes} but the dataset has {data_classes} classes; "
            "leave model.num_classes=null (cond.enabled=true fills it)"
        )
    check_guidance("eval.guidance_scale", cfg.eval.guidance_scale, data_classes, p_uncond)


def _labelled_datasets() -> list[str]:
    """``dataset=`` options whose datamodule has class labels (for error messages)."""
    train_defaults = yaml.safe_load(Path(CONFIG_DIR, "train.yaml").read_text(encoding="utf-8"))["defaults"]
    default = next(d["dataset"] for d in train_defaults if isinstance(d, dict) and "dataset" in d)
    names = []
    for name in sorted(option_names("dataset"), key=lambda n: (n != default, n)):  # the default first
        try:
            if dataset_num_classes(option_config("dataset", name)) is not None:
                names.append(f"dataset={name}")
        except Exception:  # an option that needs arguments to build is left out of the hint
            continue
    return names
