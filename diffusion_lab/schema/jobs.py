"""The schemas of the jobs run on a trained checkpoint: ``dlab-sample``, ``dlab-evaluate``, ``dlab-tune-grid``.

Each range rule sits beside its field (``Annotated[int, POSITIVE_INT]``); the entry point's validation function
(:mod:`diffusion_lab.cli`) checks them all, and the device, before torch is imported or the checkpoint is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

from omegaconf import MISSING

from diffusion_lab.schema.domains import (
    CLASS_LABELS,
    DEVICE,
    FINITE_POSITIVE,
    GUIDANCE_SCALE,
    JOB_SEED,
    OPEN_UNIT,
    POSITIVE_INT,
    RUN_NAME,
    SAMPLE_COUNT,
    UNIT_OPEN,
    Domain,
)
from diffusion_lab.schema.run import MAX_SIGMA_REL, SIGMA_REL, WandbConfig
from diffusion_lab.schema.signature import domain_rules


class GuidanceKind(str, Enum):
    cfg = "cfg"  # classifier-free guidance: the model's null label (Ho & Salimans 2022)
    auto = "auto"  # autoguidance: a weaker model of the same task, guide_ckpt (Karras et al. 2024)


# Kynkäänniemi et al. 2024: guidance only for σ/α in (σ_lo, σ_hi] (σ_hi may be .inf).
GUIDANCE_INTERVAL = Domain(
    lambda v: len(v) == 2 and 0 <= v[0] < v[1], "null (everywhere) or [σ_lo, σ_hi] in σ/α with 0 <= σ_lo < σ_hi"
)


@dataclass
class JobLoggerConfig:
    """``dlab-sample`` / ``dlab-evaluate``: a W&B run (job_type sample / eval) beside the local summary.json."""

    wandb: WandbConfig | None = field(default_factory=WandbConfig)


@dataclass
class SampleConfig:
    ckpt_path: str = MISSING
    sampler: Any = None
    num_samples: Annotated[int, POSITIVE_INT] = 64
    batch_size: Annotated[int, POSITIVE_INT] = 256
    seed: Annotated[int, JOB_SEED] = 0
    use_ema: bool = True
    device: Annotated[str, DEVICE] = "cpu"
    out_dir: str | None = None
    grid: bool = True
    # Classifier-free guidance scale w (null: none); needs a model trained with cond.enabled=true.
    guidance_scale: Annotated[float | None, GUIDANCE_SCALE] = None
    # Labels of a class-conditional model, cycled over sample indices (null: 0, 1, …, num_classes − 1); the
    # upper bound is the checkpoint's, checked right after its config is read (sample.check_sampling_request).
    class_labels: Annotated[list[int] | None, CLASS_LABELS] = None
    # guidance=auto: guide with guide_ckpt (same data shape and conditioning) at weight guidance_scale.
    guidance: GuidanceKind = GuidanceKind.cfg
    guide_ckpt: str | None = None
    guidance_interval: Annotated[list[float] | None, GUIDANCE_INTERVAL] = None
    name: Annotated[str | None, RUN_NAME.or_null("the training run's name")] = None  # W&B run name prefix
    logger: JobLoggerConfig = field(default_factory=JobLoggerConfig)


class LikelihoodMethod(str, Enum):
    auto = "auto"  # discrete VLB for a discrete-time schedule, continuous ELBO otherwise
    discrete = "discrete"
    continuous = "continuous"
    ode = "ode"  # probability-flow ODE likelihood (Song et al. 2021 App. D.2); never chosen by auto


class HutchinsonProbe(str, Enum):
    rademacher = "rademacher"
    gaussian = "gaussian"


SPLITS = ("train", "val")
# dlab-evaluate's scores: the likelihood ones, and the sample-quality ones with the ``metrics=`` option of each.
LIKELIHOOD_SCORES = ("bpd",)
SAMPLE_SCORES = {"fid": "fid", "fd_digits": "digits_fd", "toy2d": "toy2d"}
# Kynkäänniemi et al. 2019 / Naeem et al. 2020 k-NN scores, in the features of the sample score they come with (alone:
# the data's, diffusion_lab.evaluate.prdc_feature_score); in Inception features (fid) only precision and recall.
PRDC_SCORES = ("precision", "recall", "density", "coverage")
VALID_SCORES = sorted([*LIKELIHOOD_SCORES, *SAMPLE_SCORES, *PRDC_SCORES])
SCORES = Domain(
    lambda v: len(v) >= 1 and all(s in VALID_SCORES for s in v), f"a non-empty list of scores from {VALID_SCORES}"
)
SPLIT = Domain(lambda v: v in SPLITS, f"one of {list(SPLITS)}")


@dataclass
class EvaluateConfig:
    """``dlab-evaluate``: score a checkpoint on held-out data."""

    ckpt_path: str = MISSING
    scores: Annotated[list[str], SCORES] = field(default_factory=lambda: ["bpd"])
    split: Annotated[str, SPLIT] = "val"
    num_examples: Annotated[int | None, POSITIVE_INT.or_null("the whole split")] = None
    batch_size: Annotated[int, POSITIVE_INT] = 256
    bpd_method: LikelihoodMethod = LikelihoodMethod.auto
    # Diffusion terms per example; None: all T terms (discrete).
    num_t_samples: Annotated[int | None, POSITIVE_INT.or_null("all T terms")] = 50
    # bpd_method=ode: adaptive Dormand–Prince from t_eps to 1 with a Hutchinson trace estimate (metric val/bpd_ode@N).
    # None: 1/T for a discrete-time schedule, 1e-5 otherwise.
    ode_t_eps: Annotated[float | None, UNIT_OPEN.or_null("1/T, or 1e-5 for a continuous-time schedule")] = None
    ode_rtol: Annotated[float, FINITE_POSITIVE] = 1e-5
    ode_atol: Annotated[float, FINITE_POSITIVE] = 1e-5
    ode_probe: HutchinsonProbe = HutchinsonProbe.rademacher
    ode_exact_trace: bool = False  # exact divergence: D backward passes per evaluation (low-dimensional data only)
    ode_dequantize: bool | None = None  # None: dequantise (N, C, H, W) images (8-bit bound), not vectors
    use_ema: bool = True
    device: Annotated[str, DEVICE] = "cpu"
    seed: Annotated[int, JOB_SEED] = 0
    out_dir: str | None = None
    # Sample-quality scores (scores=[fid|fd_digits|toy2d|precision|recall|density|coverage, …]): num_samples
    # index-seeded EMA samples drawn with `sampler` (null: the run's; sampler=<option> sampler.steps=… as in
    # dlab-sample), scored against the train split.
    sampler: Any = None
    metrics: Any = None  # metrics=fid (default) options, e.g. metrics.inception_weights=/path/to/weights.pth
    num_samples: Annotated[int, SAMPLE_COUNT] = 1000
    guidance_scale: Annotated[float | None, GUIDANCE_SCALE] = None
    guidance: GuidanceKind = GuidanceKind.cfg  # as in dlab-sample
    guide_ckpt: str | None = None
    guidance_interval: Annotated[list[float] | None, GUIDANCE_INTERVAL] = None
    ref_stats_only: bool = False  # compute + cache the reference statistics (and fid_floor@num_samples), then exit
    name: Annotated[str | None, RUN_NAME.or_null("the training run's name")] = None  # W&B run name prefix
    logger: JobLoggerConfig = field(default_factory=JobLoggerConfig)


@dataclass
class FitOptions:
    """How a grid is fitted (diffusion_lab/samplers/tuning.py): ``num_draws`` fit and ``num_heldout`` held-out noise
    draws (fixed by ``seed``), the fit accepted only if better on the held-out ones, at most ``max_evals`` loss
    evaluations (each ``steps`` NFE on ``num_draws`` examples), evaluated in batches of ``batch_size``; the reference
    is RK45 with ``reference_rtol``/``reference_atol`` (checked against 10x tighter on 16 held-out draws)."""

    num_draws: Annotated[int, POSITIVE_INT] = 128
    num_heldout: Annotated[int, POSITIVE_INT] = 128
    max_evals: Annotated[int, POSITIVE_INT] = 120
    batch_size: Annotated[int, POSITIVE_INT] = 256
    seed: Annotated[int, JOB_SEED] = 0
    reference_rtol: Annotated[float, OPEN_UNIT] = 1e-5
    reference_atol: Annotated[float, OPEN_UNIT] = 1e-5

    def __post_init__(self) -> None:
        """Built from Python (the tuning code, tests), the options obey the rules a config is checked against."""
        for name, rule in domain_rules(FitOptions).items():
            if (error := rule.argument_error("FitOptions", name, getattr(self, name))) is not None:
                raise ValueError(error)


@dataclass
class TuneGridConfig(FitOptions):
    """``dlab-tune-grid``: fit ``sampler``'s (null: the run's) ``steps``-step grid to ``ckpt_path`` with the
    :class:`FitOptions` (its fields, declared once there); the grid file is written beside the checkpoint."""

    ckpt_path: str = MISSING
    sampler: Any = None
    use_ema: bool = True
    device: Annotated[str, DEVICE] = "cpu"


# dlab-phema's σ_rel list: the brief form sigma_rel=0.02,0.05 is read as a list (phema_cli.list_argument).
SIGMA_REL_LIST = Domain(
    lambda v: len(v) >= 1 and all(SIGMA_REL.test(s) for s in v),
    f"a non-empty list of numbers in (0, 1/√12 ≈ {MAX_SIGMA_REL:.4f}), e.g. sigma_rel=0.05,0.10",
)


@dataclass
class PhemaConfig:
    """``dlab-phema``: reconstruct post-hoc EMA checkpoints, one per ``sigma_rel``, from the snapshots a run trained
    with ``ema=posthoc`` wrote (``<run_dir>/phema/snapshots``); each is ``ckpt`` (null: the run's last.ckpt) with its
    EMA weights replaced, written to ``out_dir`` (null: ``<run_dir>/phema``)."""

    run_dir: str = MISSING
    sigma_rel: Annotated[list[float], SIGMA_REL_LIST] = MISSING
    ckpt: str | None = None
    out_dir: str | None = None
