"""The schema of a training run (``dlab-train``): every non-option group, with each range rule beside its field.

Options chosen from a group (``schedule=…``, ``sampler=…``, ``model=…``, …) have schemas derived from their
classes (:mod:`diffusion_lab.schema.signature`); the fields here are plain settings of the run itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

from omegaconf import MISSING

from diffusion_lab.schema.domains import (
    ADAM_BETAS,
    FINITE_NON_NEGATIVE,
    FINITE_POSITIVE,
    GUIDANCE_SCALE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPEN_UNIT,
    POSITIVE_INT,
    PROBABILITY,
    RUN_NAME,
    RUN_SEED,
    Domain,
)


@dataclass
class LossConfig:
    """Objective options beyond the four axes: the learned reverse variance of improved DDPM."""

    # Nichol & Dhariwal 2021 §3.1: the network also outputs v of Σ = exp(v log β + (1−v) log β̃).
    learned_variance: bool = False
    # λ of L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021 eq. 16).
    vlb_weight: Annotated[float, FINITE_NON_NEGATIVE] = 0.001


class WandbMode(str, Enum):
    auto = "auto"  # online if an API key is configured, otherwise offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbConfig:
    project: str = "diffusion_lab"
    entity: str | None = None
    mode: WandbMode = WandbMode.auto
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None  # null: the entry point's (train / sample / eval)


@dataclass
class LoggerConfig:
    wandb: WandbConfig | None = field(default_factory=WandbConfig)
    csv: bool = True


# ---------------------------------------------------------------------------------------------- training

GRADIENT_CLIP = Domain(NON_NEGATIVE.test, "null or 0 (no clipping) or a number > 0")


@dataclass
class TrainerConfig:
    """Keyword arguments of ``lightning.Trainer`` that the project exposes."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: Annotated[int, POSITIVE_INT] = 1
    strategy: str = "auto"
    max_steps: int = 2000
    max_epochs: int = -1
    gradient_clip_val: Annotated[float | None, Domain(NON_NEGATIVE.test, "null or 0 (no clipping) or a number > 0")] = (
        1.0
    )
    accumulate_grad_batches: Annotated[int, POSITIVE_INT] = 1
    log_every_n_steps: Annotated[int, POSITIVE_INT] = 25
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    fast_dev_run: Any = False
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up to a constant learning rate (Ho et al. 2020 use Adam, warm-up 5000)."""

    lr: Annotated[float, FINITE_POSITIVE] = 2e-4
    betas: Annotated[list[float], ADAM_BETAS] = field(default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, FINITE_POSITIVE] = 1e-8
    weight_decay: Annotated[float, FINITE_NON_NEGATIVE] = 0.0
    warmup_steps: Annotated[int, NON_NEGATIVE_INT] = 100


# Karras et al. 2024 eq. 123: σ_rel → 1/√12 as the power profile's exponent γ → 0⁺ (a uniform average).
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)
SIGMA_REL = Domain(lambda v: 0 < v < MAX_SIGMA_REL, f"a number in (0, 1/√12 ≈ {MAX_SIGMA_REL:.4f})")
SIGMA_RELS = Domain(
    lambda v: len(set(v)) == len(v) and all(SIGMA_REL.test(s) for s in v),
    f"[] (off) or a list of distinct numbers in (0, 1/√12 ≈ {MAX_SIGMA_REL:.4f})",
)


@dataclass
class PostHocEMAConfig:
    """Post-hoc EMA, off while ``sigma_rels`` is empty: ``ema=posthoc`` (or ``ema.posthoc.sigma_rels=[…]``) tracks
    power-function EMAs of the weights at each ``sigma_rels`` (Karras et al. 2024 §3), time counted in training
    images, written as fp16 snapshots every ``snapshot_every`` images to ``<run>/phema/snapshots/``; ``dlab-phema``
    reconstructs any other σ_rel from them. ``sigma_rel`` is set only in the checkpoints dlab-phema
    writes (the σ_rel their EMA weights were reconstructed at); a training run leaves it null."""

    sigma_rels: Annotated[list[float], SIGMA_RELS] = field(default_factory=list)
    snapshot_every: Annotated[int, POSITIVE_INT] = 16384
    sigma_rel: Annotated[float | None, SIGMA_REL.or_null("a training run")] = None


@dataclass
class EMAConfig:
    decay: Annotated[float, OPEN_UNIT] = 0.999
    start_step: Annotated[int, NON_NEGATIVE_INT] = 0
    # Off by default (only the EMA above); ema=posthoc also tracks power-function EMAs.
    posthoc: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)


class CheckpointMode(str, Enum):
    min = "min"
    max = "max"


class NonFiniteAction(str, Enum):
    skip = "skip"  # skip the optimizer step (grads dropped) and log a warning naming the step and tensor
    stop = "stop"  # raise NonFiniteError naming the step and tensor; the last checkpoint stays intact
    off = "off"  # no check


@dataclass
class CallbacksConfig:
    sample_every_n_steps: Annotated[int, POSITIVE_INT] = 500
    grid_samples: Annotated[int, NON_NEGATIVE_INT] = 64
    # last.ckpt (atomic write) every this many optimizer steps; also the step checkpoints below.
    checkpoint_every_n_steps: Annotated[int, POSITIVE_INT] = 500
    # Also keep the newest k step checkpoints ``step=N.ckpt`` (0: last.ckpt only).
    keep_last_k: Annotated[int, NON_NEGATIVE_INT.where("0: last.ckpt only")] = 0
    # Also keep the ``save_top_k`` best ``best-step=N.ckpt`` by this logged metric (null: none).
    monitor: str | None = None
    mode: CheckpointMode = CheckpointMode.min
    save_top_k: Annotated[int, Domain(lambda v: v >= 1 or v == -1, "an integer >= 1, or -1 (all)")] = 1
    # A non-finite loss or gradient: skip the step, stop the run, or do not check.
    nonfinite: NonFiniteAction = NonFiniteAction.stop
    rich_progress: bool = False


@dataclass
class EvalConfig:
    """Sample-quality evaluation at the end of training (and every ``every_n_steps`` if > 0)."""

    # A Fréchet distance needs a sample covariance, the unbiased MMD / KID pairs of distinct samples (and the
    # Inception Score isc_splits non-empty parts: config.check_eval_samples).
    num_samples: Annotated[int, Domain(lambda v: v == 0 or v >= 2, "0 (no sample evaluation) or an integer >= 2")] = (
        1000
    )
    batch_size: Annotated[int, POSITIVE_INT] = 500
    every_n_steps: Annotated[int, NON_NEGATIVE_INT.where("0: only at the end")] = 0
    # Bits/dim of the EMA model on this many validation examples (0 turns it off): the discrete VLB
    # (Ho et al. 2020 eq. 5) for a discrete-time schedule, the continuous ELBO (Kingma et al. 2021) otherwise.
    bpd_examples: Annotated[int, NON_NEGATIVE_INT] = 512
    # Diffusion terms per example: an unbiased estimate over this many sampled t (None: all T terms).
    bpd_num_t_samples: Annotated[int | None, POSITIVE_INT.or_null("all T terms")] = 50
    # Classifier-free guidance scale w of the evaluation samples and grids (null: none; needs cond.enabled=true).
    guidance_scale: Annotated[float | None, GUIDANCE_SCALE] = None


@dataclass
class ConditioningConfig:
    """Class conditioning and the label dropout of classifier-free guidance (Ho & Salimans 2022).

    ``enabled``: condition the network on the dataset's labels (sets ``model.num_classes`` from the
    dataset, which must have labels). ``p_uncond``: probability that a training label is replaced by
    the null label, so the same network also learns the unconditional model (Ho & Salimans use 0.1–0.2).
    """

    enabled: bool = False
    p_uncond: Annotated[float, PROBABILITY] = 0.1


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    schedule: Any = MISSING
    parameterization: Any = MISSING
    weighting: Any = MISSING
    time_sampler: Any = MISSING
    sampler: Any = MISSING
    model: Any = MISSING
    metrics: Any = MISSING
    # The source of a flow and the data–source coupling; a checkpoint written before they existed gets these.
    prior: Any = field(default_factory=lambda: {"_target_": "diffusion_lab.diffusion.priors.GaussianPrior"})
    coupling: Any = field(default_factory=lambda: {"_target_": "diffusion_lab.diffusion.couplings.IndependentCoupling"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cond: ConditioningConfig = field(default_factory=ConditioningConfig)
    precision: str = "32"
    seed: Annotated[int, RUN_SEED] = 0  # Lightning's seed_everything takes a uint32
    name: Annotated[str, RUN_NAME] = "default"  # the run's folder: outputs/<name>/<time>
    ckpt_path: str | None = None
    # Resume from <run dir>/checkpoints/last.ckpt when it exists (same command, same hydra.run.dir).
    resume: bool = False
    # torch.compile the network (the EMA copy stays eager); channels_last memory format for image networks.
    compile: bool = False
    channels_last: bool = False
    # Metric key (``*`` allowed, e.g. ``val/energy_distance@*``) whose final value dlab-train returns to a
    # Hydra sweeper (Optuna); null: return nothing.
    optimize_metric: str | None = None
