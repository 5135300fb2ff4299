"""Structured-config schemas, registered in Hydra's ConfigStore.

Every YAML option under ``conf/<group>/`` extends one schema here (``defaults: [<name>_schema]``), so
the composed config is typed: a mistyped key, a value of the wrong type or an enum value outside its
choices fails at composition time, naming the valid keys or values. Range checks that types cannot
express (positive counts, probabilities, combinations) live in :func:`validate_config`, which the
entry points call right after composition, before any data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

# ---------------------------------------------------------------------------------------------- diffusion


@dataclass
class LinearScheduleConfig:
    _target_: str = "diffusion_lab.diffusion.schedules.LinearSchedule"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    discrete: bool = True
    zero_terminal_snr: bool = False


@dataclass
class CosineScheduleConfig:
    _target_: str = "diffusion_lab.diffusion.schedules.CosineSchedule"
    s: float = 0.008
    max_beta: float = 0.999
    num_timesteps: int = 1000
    discrete: bool = True
    zero_terminal_snr: bool = False


@dataclass
class SigmoidScheduleConfig:
    _target_: str = "diffusion_lab.diffusion.schedules.SigmoidSchedule"
    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0
    clip_min: float = 1e-9
    num_timesteps: int | None = None
    zero_terminal_snr: bool = False


@dataclass
class VEScheduleConfig:
    _target_: str = "diffusion_lab.diffusion.schedules.VESchedule"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_timesteps: int | None = None


@dataclass
class RectifiedFlowScheduleConfig:
    _target_: str = "diffusion_lab.diffusion.schedules.RectifiedFlowSchedule"


@dataclass
class ShiftedScheduleConfig:
    """``base`` is any schedule node (``schedule.base._target_=…``); the default is the cosine schedule."""

    _target_: str = "diffusion_lab.diffusion.schedules.ShiftedSchedule"
    base: Any = field(default_factory=lambda: CosineScheduleConfig(discrete=False))
    reference_resolution: int = 64
    resolution: int = 64


@dataclass
class LearnedScheduleConfig:
    _target_: str = "diffusion_lab.diffusion.schedules.LearnedSchedule"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    hidden: int = 1024


class NoiseConditioning(str, Enum):
    time = "time"  # integer timestep (discrete) or 1000·t (continuous)
    log_snr = "log_snr"  # λ
    log_sigma = "log_sigma"  # EDM's ¼ ln σ, σ = e^{−λ/2}


@dataclass
class ParameterizationConfig:
    _target_: str = MISSING
    noise_conditioning: NoiseConditioning | None = None  # None: the parameterization's default


@dataclass
class EDMParameterizationConfig:
    _target_: str = "diffusion_lab.diffusion.parameterizations.EDMParameterization"
    sigma_data: float = 0.5
    noise_conditioning: NoiseConditioning | None = None


@dataclass
class WeightingConfig:
    """A weighting without parameters (eps_mse, x0_mse, v_mse, truncated_snr, elbo)."""

    _target_: str = MISSING


@dataclass
class MinSNRWeightingConfig:
    _target_: str = "diffusion_lab.diffusion.weightings.MinSNRWeighting"
    gamma: float = 5.0


@dataclass
class P2WeightingConfig:
    _target_: str = "diffusion_lab.diffusion.weightings.P2Weighting"
    gamma: float = 1.0
    k: float = 1.0


@dataclass
class EDMWeightingConfig:
    _target_: str = "diffusion_lab.diffusion.weightings.EDMWeighting"
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5


@dataclass
class SigmoidWeightingConfig:
    _target_: str = "diffusion_lab.diffusion.weightings.SigmoidWeighting"
    bias: float = 2.0


@dataclass
class UniformTimeSamplerConfig:
    _target_: str = "diffusion_lab.diffusion.time_samplers.UniformTimeSampler"
    t_min: float = 1e-5


@dataclass
class LowDiscrepancyTimeSamplerConfig:
    _target_: str = "diffusion_lab.diffusion.time_samplers.LowDiscrepancyTimeSampler"
    t_min: float = 1e-5


@dataclass
class LogNormalTimeSamplerConfig:
    _target_: str = "diffusion_lab.diffusion.time_samplers.LogNormalTimeSampler"
    p_mean: float = -1.2
    p_std: float = 1.2
    t_min: float = 1e-5
    # False: the proposal is part of the objective (EDM, SD3) instead of importance-weighted to uniform t.
    importance_weight: bool = True


@dataclass
class LogitNormalTimeSamplerConfig:
    _target_: str = "diffusion_lab.diffusion.time_samplers.LogitNormalTimeSampler"
    m: float = 0.0
    s: float = 1.0
    t_min: float = 1e-5
    # False: the proposal is part of the objective (EDM, SD3) instead of importance-weighted to uniform t.
    importance_weight: bool = True


@dataclass
class ImportanceTimeSamplerConfig:
    _target_: str = "diffusion_lab.diffusion.time_samplers.ImportanceTimeSampler"
    history: int = 10
    num_bins: int = 100
    uniform_prob: float = 0.001
    t_min: float = 1e-5


@dataclass
class LossConfig:
    """Objective options beyond the four axes: the learned reverse variance of improved DDPM."""

    # Nichol & Dhariwal 2021 §3.1: the network also outputs v of Σ = exp(v log β + (1−v) log β̃).
    learned_variance: bool = False
    # λ of L_hybrid = L_simple + λ·L_vlb (Nichol & Dhariwal 2021 eq. 16).
    vlb_weight: float = 0.001


class Grid(str, Enum):
    uniform = "uniform"  # uniform in t (a discrete schedule snaps to evenly respaced integer steps)
    leading = "leading"  # diffusers' timestep_spacing="leading" (discrete schedules)
    trailing = "trailing"  # diffusers' timestep_spacing="trailing", starts at t = 1 (discrete schedules)
    karras = "karras"  # Karras et al. 2022 eq. 5 in σ/α (options rho, sigma_min, sigma_max)
    log_snr = "log_snr"  # uniform in log-SNR (options sigma_min, sigma_max)
    time_power = "time_power"  # eq. 5's ramp in t, ρ = 2: DPM-Solver's time_quadratic (options rho, sigma_min)
    tuned = "tuned"  # fitted to the checkpoint by dlab-tune-grid (dlab-sample / dlab-evaluate only)


class DDPMVariance(str, Enum):
    small = "small"  # β̃ (posterior variance)
    large = "large"  # β
    learned = "learned"  # the network's interpolation (needs loss.learned_variance=true)


@dataclass
class SamplerConfig:
    """Fields every stepping sampler shares: ``steps`` intervals of the ``grid``; the σ-grid options
    ``rho`` (karras), ``sigma_min``/``sigma_max`` (karras, log_snr) stay null for the grid's default."""

    _target_: str = MISSING
    steps: int = 50
    grid: Grid = Grid.uniform
    clip_x0: float | None = 1.0
    rho: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None


@dataclass
class DDPMSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.DDPMSampler"
    steps: int = 1000
    variance: DDPMVariance = DDPMVariance.small


@dataclass
class DDIMSamplerConfig(SamplerConfig):
    _target_: str = "diffusion_lab.samplers.DDIMSampler"
    eta: float = 0.0


@dataclass
class EulerSamplerConfig(SamplerConfig):
    """Euler on the PF-ODE; ``s_churn > 0`` adds Karras et al. 2022 Alg. 2's churn (σ/α units)."""

    _target_: str = "diffusion_lab.samplers.EulerSampler"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0


@dataclass
class HeunSamplerConfig(EulerSamplerConfig):
    _target_: str = "diffusion_lab.samplers.HeunSampler"


@dataclass
class EDMSamplerConfig(EulerSamplerConfig):
    """Heun with churn on the ρ = 7 grid: Karras et al. 2022 Alg. 2 with their ImageNet-64 settings."""

    _target_: str = "diffusion_lab.samplers.EDMSampler"
    steps: int = 256
    grid: Grid = Grid.karras
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003


class DPMSolverMethod(str, Enum):
    multistep = "multistep"  # DPM-Solver++(2M)/(3M): one evaluation per step
    singlestep = "singlestep"  # DPM-Solver++(2S): two evaluations per step


@dataclass
class DPMSolverSamplerConfig(SamplerConfig):
    """DPM-Solver++ (Lu et al. 2022): ``order`` 1–3 multistep (2M, 3M) or 1–2 singlestep (2S)."""

    _target_: str = "diffusion_lab.samplers.DPMSolverSampler"
    steps: int = 20
    order: int = 2
    method: DPMSolverMethod = DPMSolverMethod.multistep
    lower_order_final: bool = True


class UniPCVariant(str, Enum):
    bh1 = "bh1"  # B(h) = h (recommended for unconditional sampling below 10 steps)
    bh2 = "bh2"  # B(h) = 1 − e^{−h} (diffusers' default; recommended otherwise)


class UniPCPredictor(str, Enum):
    unip = "unip"  # UniP-p
    dpm_solver = "dpm_solver"  # DPM-Solver++ multistep (ours: 3M integrates the quadratic exactly)


@dataclass
class UniPCSamplerConfig(SamplerConfig):
    """UniPC (Zhao et al. 2023): predictor of ``order`` 1–3 (UniP or DPM-Solver++), then the UniC corrector."""

    _target_: str = "diffusion_lab.samplers.UniPCSampler"
    steps: int = 20
    order: int = 2
    variant: UniPCVariant = UniPCVariant.bh2
    predictor: UniPCPredictor = UniPCPredictor.unip
    corrector: bool = True
    lower_order_final: bool = True


class RKMethod(str, Enum):
    RK45 = "RK45"  # Dormand–Prince 5(4)
    RK23 = "RK23"
    DOP853 = "DOP853"


@dataclass
class RK45SamplerConfig:
    """Adaptive Runge–Kutta reference solution of the PF-ODE (scipy); NFE follows from the tolerances."""

    _target_: str = "diffusion_lab.samplers.RK45Sampler"
    rtol: float = 1e-5
    atol: float = 1e-5
    method: RKMethod = RKMethod.RK45
    sigma_stop: float = 1e-4
    clip_x0: float | None = 1.0


@dataclass
class EulerMaruyamaSamplerConfig(SamplerConfig):
    """Euler–Maruyama on the reverse SDE (Song et al. 2021)."""

    _target_: str = "diffusion_lab.samplers.EulerMaruyamaSampler"
    steps: int = 1000


@dataclass
class PCSamplerConfig(SamplerConfig):
    """Predictor–corrector (Song et al. 2021 Alg. 2–3): reverse-SDE predictor, Langevin corrector with
    signal-to-noise ratio ``snr``."""

    _target_: str = "diffusion_lab.samplers.PCSampler"
    steps: int = 1000
    snr: float = 0.16
    corrector_steps: int = 1


# ------------------------------------------------------------------------------------------------ models


@dataclass
class UNetConfig:
    _target_: str = "diffusion_lab.models.UNet"
    in_channels: int = 3
    out_channels: int | None = None
    resolution: int = 32
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    num_heads: int = 1
    num_head_channels: int | None = None
    num_groups: int = 32
    num_classes: int | None = None
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False


@dataclass
class MLPConfig:
    _target_: str = "diffusion_lab.models.MLP"
    dim: int = 2
    hidden: int = 256
    num_layers: int = 4
    time_embed_dim: int = 128
    dropout: float = 0.0
    num_classes: int | None = None
    out_dim: int | None = None


# -------------------------------------------------------------------------------------------------- data


@dataclass
class DigitsDataConfig:
    _target_: str = "diffusion_lab.data.DigitsDataModule"
    resolution: int = 16
    resize: str = "pad"
    batch_size: int = 128
    val_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 0
    flip: bool = False


@dataclass
class Toy2DDataConfig:
    _target_: str = "diffusion_lab.data.Toy2DDataModule"
    name: str = "swiss_roll"
    num_train: int = 100_000
    num_val: int = 10_000
    batch_size: int = 512
    seed: int = 0
    num_workers: int = 0


@dataclass
class CIFAR10DataConfig:
    _target_: str = "diffusion_lab.data.CIFAR10DataModule"
    root: str = "data/cifar10"
    download: bool = False
    batch_size: int = 128
    flip: bool = True
    num_workers: int = 4
    seed: int = 0
    verify_md5: bool = True


class MNISTResize(str, Enum):
    pad = "pad"  # 2 background pixels on each side: 28 -> 32, digits pixel-exact
    resize = "resize"  # bilinear (antialiased) 28 -> 32, rounded to 8 bits
    none = "none"  # native 28x28


@dataclass
class MNISTDataConfig:
    _target_: str = "diffusion_lab.data.MNISTDataModule"
    root: str = "data/mnist"
    download: bool = False
    resize: MNISTResize = MNISTResize.pad
    batch_size: int = 128
    flip: bool = False
    num_workers: int = 0
    seed: int = 0


@dataclass
class FashionMNISTDataConfig(MNISTDataConfig):
    _target_: str = "diffusion_lab.data.FashionMNISTDataModule"
    root: str = "data/fashion_mnist"


class CelebACrop(str, Enum):
    ddim = "ddim"  # 128x128 box centred on (x, y) = (89, 121): Song, Meng & Ermon 2021
    center140 = "center140"  # central 140x140: Song & Ermon 2019, Song et al. 2021


class CelebAValSplit(str, Enum):
    valid = "valid"  # list_eval_partition.txt partition 1
    test = "test"  # partition 2


@dataclass
class CelebADataConfig:
    _target_: str = "diffusion_lab.data.CelebADataModule"
    root: str = "data/celeba"
    download: bool = False
    resolution: int = 64
    crop: CelebACrop = CelebACrop.ddim
    val_split: CelebAValSplit = CelebAValSplit.valid
    batch_size: int = 128
    flip: bool = True
    num_workers: int = 4
    seed: int = 0
    cache: bool = True


@dataclass
class ImageNetDataConfig:
    """Downsampled ImageNet npz batches (no ``download``: image-net.org needs a login)."""

    _target_: str = "diffusion_lab.data.ImageNetDataModule"
    root: str = "data/imagenet32"
    resolution: int = 32
    num_train_batches: int = 10
    batch_size: int = 128
    flip: bool = True
    num_workers: int = 4
    seed: int = 0


@dataclass
class ImageNet64DataConfig(ImageNetDataConfig):
    root: str = "data/imagenet64"
    resolution: int = 64


class FolderCrop(Enum):  # no str mixin: a member named "center" would shadow str.center
    center = "center"
    random = "random"  # random train crops of the stored load_size squares (needs load_size > resolution)


@dataclass
class ImageFolderDataConfig:
    _target_: str = "diffusion_lab.data.ImageFolderDataModule"
    root: str = "data/images"
    resolution: int = 64
    crop: FolderCrop = FolderCrop.center
    load_size: int | None = None
    val_root: str | None = None
    val_fraction: float = 0.05
    class_labels: bool = True
    batch_size: int = 64
    flip: bool = False
    num_workers: int = 4
    seed: int = 0


@dataclass
class ShapesDataConfig:
    _target_: str = "diffusion_lab.data.ShapesDataModule"
    num_train: int = 10_000
    num_val: int = 1_000
    resolution: int = 32
    min_scale: float = 0.3
    max_scale: float = 0.75
    batch_size: int = 128
    flip: bool = False
    num_workers: int = 0
    seed: int = 0


# --------------------------------------------------------------------------------------- metrics / logging


@dataclass
class NoMetricConfig:
    """No sample-quality metric (``metrics=none``)."""

    _target_: Any = None


@dataclass
class DigitsFDMetricConfig:
    _target_: str = "diffusion_lab.metrics.DigitsFDMetric"
    cache_dir: str | None = None
    resize: str = "center_crop"


@dataclass
class Toy2DMetricConfig:
    _target_: str = "diffusion_lab.metrics.Toy2DMetric"
    num_projections: int = 256


@dataclass
class FidelityMetricConfig:
    """FID / IS / KID / precision-recall via torch-fidelity (``metrics=fid``); see diffusion_lab/metrics/fidelity.py."""

    _target_: str = "diffusion_lab.metrics.FidelityMetric"
    # Local weights-inception-2015-12-05-6726825d.pth (torch-fidelity's inception-v3-compat); null: download once.
    inception_weights: str | None = None
    cache_dir: str | None = None  # reference features/statistics (null: ~/.cache/diffusion_lab/fidelity)
    fid: bool = True
    isc: bool = True
    kid: bool = True
    prc: bool = False  # precision/recall in Inception-2048 space
    noise_floor: bool = True  # also log fid_floor@N: N training images vs the full training set
    feature_layer: str = "2048"  # of FID/KID/PRC: 64 | 192 | 768 | 2048; a non-standard one renames keys fid<layer>…
    kid_subset_size: int = 1000
    isc_splits: int = 10
    batch_size: int = 64
    device: str = "auto"
    reference_name: str = "reference"
    seed: int = 0
    max_reference: int | None = None  # reference images handed in by the training callback (null: all)
    verbose: bool = False


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
class JobLoggerConfig:
    """``dlab-sample`` / ``dlab-evaluate``: a W&B run (job_type sample / eval) beside the local summary.json."""

    wandb: WandbConfig | None = field(default_factory=WandbConfig)


@dataclass
class LoggerConfig:
    wandb: WandbConfig | None = field(default_factory=WandbConfig)
    csv: bool = True


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainerConfig:
    """Keyword arguments of ``lightning.Trainer`` that the project exposes."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    max_steps: int = 2000
    max_epochs: int = -1
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 25
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

    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100


@dataclass
class EMAConfig:
    decay: float = 0.999
    start_step: int = 0


class CheckpointMode(str, Enum):
    min = "min"
    max = "max"


class NonFiniteAction(str, Enum):
    skip = "skip"  # skip the optimizer step (grads dropped) and log a warning naming the step and tensor
    stop = "stop"  # raise NonFiniteError naming the step and tensor; the last checkpoint stays intact
    off = "off"  # no check


@dataclass
class CallbacksConfig:
    sample_every_n_steps: int = 500
    grid_samples: int = 64
    # last.ckpt (atomic write) every this many optimizer steps; also the step checkpoints below.
    checkpoint_every_n_steps: int = 500
    # Also keep the newest k step checkpoints ``step=N.ckpt`` (0: last.ckpt only).
    keep_last_k: int = 0
    # Also keep the ``save_top_k`` best ``best-step=N.ckpt`` by this logged metric (null: none).
    monitor: str | None = None
    mode: CheckpointMode = CheckpointMode.min
    save_top_k: int = 1
    # A non-finite loss or gradient: skip the step, stop the run, or do not check.
    nonfinite: NonFiniteAction = NonFiniteAction.stop
    rich_progress: bool = False


@dataclass
class EvalConfig:
    """Sample-quality evaluation at the end of training (and every ``every_n_steps`` if > 0)."""

    num_samples: int = 1000
    batch_size: int = 500
    every_n_steps: int = 0
    # Bits/dim of the EMA model on this many validation examples (0 turns it off): the discrete VLB
    # (Ho et al. 2020 eq. 5) for a discrete-time schedule, the continuous ELBO (Kingma et al. 2021) otherwise.
    bpd_examples: int = 512
    # Diffusion terms per example: an unbiased estimate over this many sampled t (None: all T terms).
    bpd_num_t_samples: int | None = 50
    # Classifier-free guidance scale w of the evaluation samples and grids (null: none; needs cond.enabled=true).
    guidance_scale: float | None = None


@dataclass
class ConditioningConfig:
    """Class conditioning and the label dropout of classifier-free guidance (Ho & Salimans 2022).

    ``enabled``: condition the network on the dataset's labels (sets ``model.num_classes`` from the
    dataset, which must have labels). ``p_uncond``: probability that a training label is replaced by
    the null label, so the same network also learns the unconditional model (Ho & Salimans use 0.1–0.2).
    """

    enabled: bool = False
    p_uncond: float = 0.1


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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cond: ConditioningConfig = field(default_factory=ConditioningConfig)
    precision: str = "32"
    seed: int = 0
    name: str = "default"
    ckpt_path: str | None = None
    # Resume from <run dir>/checkpoints/last.ckpt when it exists (same command, same hydra.run.dir).
    resume: bool = False
    # torch.compile the network (the EMA copy stays eager); channels_last memory format for image networks.
    compile: bool = False
    channels_last: bool = False
    # Metric key (``*`` allowed, e.g. ``val/energy_distance@*``) whose final value dlab-train returns to a
    # Hydra sweeper (Optuna); null: return nothing.
    optimize_metric: str | None = None


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
    name: str | None = None  # W&B run name prefix (null: the training run's name)
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
    name: str | None = None  # W&B run name prefix (null: the training run's name)
    logger: JobLoggerConfig = field(default_factory=JobLoggerConfig)


@dataclass
class TuneGridConfig:
    """``dlab-tune-grid``: fit ``sampler``'s (null: the run's) ``steps``-step grid to ``ckpt_path``
    (diffusion_lab/samplers/tuning.py); the grid file is written beside the checkpoint."""

    ckpt_path: str = MISSING
    sampler: Any = None
    num_draws: int = 128  # noise draws the grid is fitted on
    num_heldout: int = 128  # other draws the error is reported on (and the fit accepted by)
    max_evals: int = 120  # loss evaluations of the search, each `steps` NFE on num_draws examples
    batch_size: int = 256
    seed: int = 0
    reference_rtol: float = 1e-5  # the RK45 reference solve (checked against 10x tighter on 16 held-out draws)
    reference_atol: float = 1e-5
    use_ema: bool = True
    device: str = "cpu"


SCHEMAS: dict[str, dict[str, type]] = {
    "schedule": {
        "linear": LinearScheduleConfig,
        "cosine": CosineScheduleConfig,
        "sigmoid": SigmoidScheduleConfig,
        "ve": VEScheduleConfig,
        "rectified_flow": RectifiedFlowScheduleConfig,
        "shifted": ShiftedScheduleConfig,
        "learned": LearnedScheduleConfig,
    },
    "parameterization": {"base": ParameterizationConfig, "edm": EDMParameterizationConfig},
    "weighting": {
        "base": WeightingConfig,
        "min_snr": MinSNRWeightingConfig,
        "p2": P2WeightingConfig,
        "edm": EDMWeightingConfig,
        "sigmoid": SigmoidWeightingConfig,
    },
    "time_sampler": {
        "uniform": UniformTimeSamplerConfig,
        "antithetic": LowDiscrepancyTimeSamplerConfig,
        "log_normal": LogNormalTimeSamplerConfig,
        "logit_normal": LogitNormalTimeSamplerConfig,
        "importance": ImportanceTimeSamplerConfig,
    },
    "sampler": {
        "ddpm": DDPMSamplerConfig,
        "ddim": DDIMSamplerConfig,
        "euler": EulerSamplerConfig,
        "heun": HeunSamplerConfig,
        "edm": EDMSamplerConfig,
        "dpm_solver": DPMSolverSamplerConfig,
        "unipc": UniPCSamplerConfig,
        "rk45": RK45SamplerConfig,
        "euler_maruyama": EulerMaruyamaSamplerConfig,
        "pc": PCSamplerConfig,
    },
    "model": {"unet": UNetConfig, "mlp": MLPConfig},
    "dataset": {
        "digits": DigitsDataConfig,
        "toy2d": Toy2DDataConfig,
        "cifar10": CIFAR10DataConfig,
        "mnist": MNISTDataConfig,
        "fashion_mnist": FashionMNISTDataConfig,
        "celeba": CelebADataConfig,
        "imagenet32": ImageNetDataConfig,
        "imagenet64": ImageNet64DataConfig,
        "image_folder": ImageFolderDataConfig,
        "shapes": ShapesDataConfig,
    },
    "metrics": {
        "none": NoMetricConfig,
        "toy2d": Toy2DMetricConfig,
        "digits_fd": DigitsFDMetricConfig,
        "fid": FidelityMetricConfig,
    },
}


def register_configs() -> None:
    """Store every schema as ``schema/<group>/<name>`` and the top-level ones as ``*_schema``.

    A YAML option extends its schema with ``defaults: [/schema/<group>/<name>@_here_]``.
    """
    cs = ConfigStore.instance()
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="tune_grid_schema", node=TuneGridConfig)


PRECISIONS = ("32", "bf16-mixed", "16-mixed", "64")


class ConfigError(ValueError):
    """A composed config with an out-of-range value or an impossible combination."""


def _positive(v: Any) -> bool:
    return v >= 1


def _non_negative(v: Any) -> bool:
    return v >= 0


def _probability(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _unit_open(v: Any) -> bool:
    return 0.0 <= v < 1.0


# (key, test, valid range): every numeric option with a domain the schema types cannot express. A key a
# config does not have (another model or dataset) or whose value is null is skipped.
DOMAIN_RULES: list[tuple[str, Any, str]] = [
    ("trainer.accumulate_grad_batches", _positive, "an integer >= 1"),
    ("trainer.log_every_n_steps", _positive, "an integer >= 1"),
    ("trainer.num_nodes", _positive, "an integer >= 1"),
    ("trainer.gradient_clip_val", _non_negative, "null or 0 (no clipping) or a number > 0"),
    ("dataset.batch_size", _positive, "an integer >= 1"),
    ("dataset.num_workers", _non_negative, "an integer >= 0"),
    ("dataset.num_train", _positive, "an integer >= 1"),
    ("dataset.num_val", _positive, "an integer >= 1"),
    ("dataset.val_fraction", lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)"),
    ("dataset.resolution", _positive, "an integer >= 1"),
    ("optim.lr", lambda v: v > 0, "a number > 0"),
    ("optim.eps", lambda v: v > 0, "a number > 0"),
    ("optim.weight_decay", _non_negative, "a number >= 0"),
    ("optim.warmup_steps", _non_negative, "an integer >= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(_unit_open(b) for b in v), "two numbers in [0, 1)"),
    ("ema.decay", lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    ("ema.start_step", _non_negative, "an integer >= 0"),
    ("callbacks.checkpoint_every_n_steps", _positive, "an integer >= 1"),
    ("callbacks.sample_every_n_steps", _positive, "an integer >= 1"),
    ("callbacks.grid_samples", _non_negative, "an integer >= 0"),
    ("callbacks.keep_last_k", _non_negative, "an integer >= 0 (0: last.ckpt only)"),
    ("callbacks.save_top_k", lambda v: v >= 1 or v == -1, "an integer >= 1, or -1 (all)"),
    ("eval.num_samples", _non_negative, "an integer >= 0"),
    ("eval.batch_size", _positive, "an integer >= 1"),
    ("eval.every_n_steps", _non_negative, "an integer >= 0 (0: only at the end)"),
    ("eval.bpd_examples", _non_negative, "an integer >= 0"),
    ("eval.bpd_num_t_samples", _positive, "null (all T terms) or an integer >= 1"),
    ("cond.p_uncond", _probability, "a probability in [0, 1]"),
    ("loss.vlb_weight", _non_negative, "a number >= 0"),
    ("schedule.num_timesteps", _positive, "null (continuous) or an integer >= 1"),
    ("sampler.steps", _positive, "an integer >= 1"),
    ("time_sampler.t_min", _unit_open, "a number in [0, 1)"),
    ("time_sampler.uniform_prob", _probability, "a probability in [0, 1]"),
    ("time_sampler.history", _positive, "an integer >= 1"),
    ("time_sampler.num_bins", _positive, "an integer >= 1"),
    ("model.in_channels", _positive, "an integer >= 1"),
    ("model.out_channels", _positive, "null (= in_channels) or an integer >= 1"),
    ("model.base_channels", _positive, "an integer >= 1"),
    ("model.resolution", _positive, "an integer >= 1"),
    ("model.channel_mult", lambda v: len(v) >= 1 and all(m >= 1 for m in v), "a non-empty list of integers >= 1"),
    ("model.num_res_blocks", _positive, "an integer >= 1"),
    ("model.num_heads", _positive, "an integer >= 1"),
    ("model.num_head_channels", _positive, "null or an integer >= 1"),
    ("model.num_groups", _positive, "an integer >= 1"),
    ("model.dropout", _unit_open, "a number in [0, 1)"),
    ("model.dim", _positive, "an integer >= 1"),
    ("model.hidden", _positive, "an integer >= 1"),
    ("model.num_layers", _positive, "an integer >= 1"),
    ("model.time_embed_dim", _positive, "an integer >= 1"),
]


def _check_domains(cfg: DictConfig) -> None:
    """Every :data:`DOMAIN_RULES` value in range, then the UNet's shape constraints."""
    from omegaconf import OmegaConf

    for key, ok, valid in DOMAIN_RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value} is out of range; valid: {valid}")
    model = cfg.model
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


def validate_config(cfg: DictConfig) -> None:
    """Check ranges and combinations that the schema types cannot express; raise :class:`ConfigError`."""
    if str(cfg.precision) not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is not supported; valid choices: {list(PRECISIONS)}")
    _check_domains(cfg)
    # Ranges are DOMAIN_RULES; this pair of keys is checked together.
    if not (cfg.trainer.max_steps > 0 or cfg.trainer.max_epochs > 0):
        raise ConfigError("trainer.max_steps or max_epochs must be > 0")
    if str(cfg.trainer.strategy).startswith("fsdp") and cfg.trainer.accelerator == "cpu":
        raise ConfigError(
            f"trainer.strategy={cfg.trainer.strategy} needs GPUs (Lightning's FSDP is CUDA-only); with "
            "trainer.accelerator=cpu use trainer=ddp (valid strategies on CPU: auto, ddp, ddp_spawn)"
        )
    _check_digits_metric(cfg)  # config-only checks first: they need no torch import
    _check_objective(cfg)
    datamodule = _instantiate_axis(cfg, "dataset")  # its own checks (it is built, not set up: no data is loaded)
    _check_conditioning(cfg, datamodule)


def _instantiate_axis(cfg: DictConfig, group: str) -> Any:
    """Build one objective axis; a constructor's ValueError becomes a ConfigError naming the group."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg[group])
    except (InstantiationException, ValueError) as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{group}: {cause}") from err


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
    from hydra.utils import instantiate

    return instantiate(dataset_cfg).num_classes


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


def _check_conditioning(cfg: DictConfig, datamodule: Any) -> None:
    """A conditional model needs a labelled dataset; guidance needs both. ``datamodule.num_classes`` is read
    only for a conditional run (an image folder's labels are its subfolders: reading them scans the disk)."""
    p_uncond, model_classes = cfg.cond.p_uncond, cfg.model.get("num_classes")  # p_uncond's range: DOMAIN_RULES
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
    from omegaconf import OmegaConf

    names = []
    for name, schema in SCHEMAS["dataset"].items():
        try:
            if dataset_num_classes(OmegaConf.structured(schema)) is not None:
                names.append(f"dataset={name}")
        except Exception:  # an option that needs arguments to build is left out of the hint
            continue
    return names
