"""The schemas of the jobs run on a trained checkpoint: ``dlab-sample``, ``dlab-evaluate``, ``dlab-tune-grid``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

from omegaconf import MISSING

from diffusion_lab.schema.domains import RUN_NAME
from diffusion_lab.schema.run import WandbConfig


@dataclass
class JobLoggerConfig:
    """``dlab-sample`` / ``dlab-evaluate``: a W&B run (job_type sample / eval) beside the local summary.json."""

    wandb: WandbConfig | None = field(default_factory=WandbConfig)


@dataclass
class SampleConfig:
    ckpt_path: str = MISSING
    sampler: Any = None
    num_samples: int = 64
    batch_size: int = 256
    seed: int = 0
    use_ema: bool = True
    device: str = "cpu"
    out_dir: str | None = None
    grid: bool = True
    # Classifier-free guidance scale w (null: none); needs a model trained with cond.enabled=true.
    guidance_scale: float | None = None
    # Labels of a class-conditional model, cycled over sample indices (null: 0, 1, …, num_classes − 1).
    class_labels: list[int] | None = None
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


@dataclass
class EvaluateConfig:
    """``dlab-evaluate``: score a checkpoint on held-out data."""

    ckpt_path: str = MISSING
    scores: list[str] = field(default_factory=lambda: ["bpd"])
    split: str = "val"
    num_examples: int | None = None  # None: the whole split
    batch_size: int = 256
    bpd_method: LikelihoodMethod = LikelihoodMethod.auto
    num_t_samples: int | None = 50  # diffusion terms per example; None: all T terms (discrete)
    # bpd_method=ode: adaptive Dormand–Prince from t_eps to 1 with a Hutchinson trace estimate (metric val/bpd_ode@N).
    ode_t_eps: float | None = None  # None: 1/T for a discrete-time schedule, 1e-5 otherwise
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    ode_probe: HutchinsonProbe = HutchinsonProbe.rademacher
    ode_exact_trace: bool = False  # exact divergence: D backward passes per evaluation (low-dimensional data only)
    ode_dequantize: bool | None = None  # None: dequantise (N, C, H, W) images (8-bit bound), not vectors
    use_ema: bool = True
    device: str = "cpu"
    seed: int = 0
    out_dir: str | None = None
    # Sample-quality scores (scores=[fid|fd_digits|toy2d, …]): num_samples index-seeded EMA samples drawn with
    # `sampler` (null: the run's; sampler=<option> sampler.steps=… as in dlab-sample), scored against the train split.
    sampler: Any = None
    metrics: Any = None  # metrics=fid (default) options, e.g. metrics.inception_weights=/path/to/weights.pth
    num_samples: int = 1000
    guidance_scale: float | None = None
    ref_stats_only: bool = False  # compute + cache the reference statistics (and fid_floor@num_samples), then exit
    name: Annotated[str | None, RUN_NAME.or_null("the training run's name")] = None  # W&B run name prefix
    logger: JobLoggerConfig = field(default_factory=JobLoggerConfig)


@dataclass
class FitOptions:
    """How a grid is fitted (diffusion_lab/samplers/tuning.py): ``num_draws`` fit and ``num_heldout`` held-out noise
    draws (fixed by ``seed``), the fit accepted only if better on the held-out ones, at most ``max_evals`` loss
    evaluations (each ``steps`` NFE on ``num_draws`` examples), evaluated in batches of ``batch_size``; the reference
    is RK45 with ``reference_rtol``/``reference_atol`` (checked against 10x tighter on 16 held-out draws)."""

    num_draws: int = 128
    num_heldout: int = 128
    max_evals: int = 120
    batch_size: int = 256
    seed: int = 0
    reference_rtol: float = 1e-5
    reference_atol: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_draws", "num_heldout", "max_evals", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        for name in ("reference_rtol", "reference_atol"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be in (0, 1)")


@dataclass
class TuneGridConfig(FitOptions):
    """``dlab-tune-grid``: fit ``sampler``'s (null: the run's) ``steps``-step grid to ``ckpt_path`` with the
    :class:`FitOptions` (its fields, declared once there); the grid file is written beside the checkpoint."""

    ckpt_path: str = MISSING
    sampler: Any = None
    use_ema: bool = True
    device: str = "cpu"
