"""dlab-train: compose and check the config, build data + module + trainer, fit, evaluate, write the run summary.

Module-level imports are torch-free, so ``python -m diffusion_lab.train`` reports a config error as fast as
``dlab-train``: the training stack is imported inside the functions that run after the checks.

dlab-train                                  # the default experiment (digits, CPU, a few minutes)
dlab-train experiment=toy2d schedule=cosine parameterization=v weighting=min_snr
dlab-train cond.enabled=true cond.p_uncond=0.1 eval.guidance_scale=2   # class-conditional digits + CFG
python -m diffusion_lab.train trainer=ddp trainer.accelerator=cpu trainer.devices=2
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.cli import route_lightning_logs, validate_train
from diffusion_lab.config import validate_config
from diffusion_lab.run_dir import clear_records, launched_as_rank_zero, probe_writable, run_lock
from diffusion_lab.schema.registry import CONFIG_DIR, build_option, option_class
from diffusion_lab.schema.run import NonFiniteAction

if TYPE_CHECKING:
    import lightning as L

    from diffusion_lab.module import DiffusionModule
    from diffusion_lab.resume import ResumePlan

log = logging.getLogger(__name__)


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: list[L.Callback],
    wandb_id: str | None = None,
    resume: ResumePlan | None = None,
) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` + ``cfg.precision`` with checkpoints in the run dir
    (atomic writes, RNG states, the W&B run id ``wandb_id`` continued on resume; ``resume``: the resume's plan,
    whose history the CSV and W&B record and every checkpoint stores)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO, checkpoint_callbacks
    from diffusion_lab.callbacks.exact_resume import ExactResume
    from diffusion_lab.callbacks.nan_guard import NonFiniteGuard
    from diffusion_lab.callbacks.progress import StepProgressBar, StepRichProgressBar
    from diffusion_lab.callbacks.sample_grid import periodic_step_due
    from diffusion_lab.resume import ResumePlan, ResumeRecord
    from diffusion_lab.strategies import FSDP2Strategy, GatherShardedEMA, build_strategy
    from diffusion_lab.tracking.filing import run_info
    from diffusion_lab.tracking.writers import build_loggers

    resume = resume or ResumePlan()
    cb = cfg.callbacks
    checkpoints = checkpoint_callbacks(
        run_dir / "checkpoints", cb.checkpoint_every_n_steps, cb.keep_last_k, cb.monitor, str(cb.mode), cb.save_top_k
    )
    info = run_info(cfg)
    loggers = (
        build_loggers(cfg, run_dir, info, wandb_id=wandb_id, resumed=resume.history)
        if not cfg.trainer.fast_dev_run
        else []
    )
    filed = {"name": info.name, "group": info.group, "tags": list(info.tags)}
    guard = NonFiniteGuard(NonFiniteAction(cb.nonfinite).value)
    extra: list[L.Callback] = [*checkpoints, ExactResume(cfg.seed, filed), guard]
    record = ResumeRecord(resume, OmegaConf.to_container(cfg.optim, resolve=True))  # type: ignore[arg-type]
    if loggers:
        extra.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.enable_progress_bar:  # step k/max_steps, not Lightning's "Epoch 1/-2"
        # The tqdm bar redraws every 10 steps: reading its metrics syncs them to the host, ~0.6 ms a step.
        extra.append(StepRichProgressBar() if cfg.callbacks.rich_progress else StepProgressBar(refresh_rate=10))
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer)  # type: ignore[assignment]
    trainer_kwargs["strategy"] = build_strategy(str(cfg.trainer.strategy), str(cfg.precision))
    # A sharded EMA is gathered on every rank before the grid and evaluation sample from it (on rank 0).
    every = [cfg.callbacks.sample_every_n_steps, cfg.eval.every_n_steps]
    sharded = isinstance(trainer_kwargs["strategy"], FSDP2Strategy)
    gather = [GatherShardedEMA(every, periodic_step_due)] if sharded else []
    return L.Trainer(
        **trainer_kwargs,
        precision=str(cfg.precision),  # type: ignore[arg-type]
        logger=loggers or False,
        callbacks=[record, *gather, *callbacks, *extra],  # record first: it fixes the first resumed batch's log step
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        # The training order comes from EpochSeededSampler (rank-aware, resumable mid-epoch).
        use_distributed_sampler=False,
    )


def build_metric(cfg: DictConfig, datamodule: Any) -> Any:
    """The configured sample metric; a dataset with a known density (toy 2-D) supplies its log-density."""
    if not cfg.metrics.get("_target_"):
        return None
    log_prob = getattr(datamodule, "log_prob", None)
    extra = {"log_prob": log_prob} if log_prob is not None and "log_prob" in _init_args(cfg.metrics) else {}
    return build_option("metrics", cfg.metrics, extra=extra)


def _init_args(node: DictConfig) -> set[str]:
    return set(inspect.signature(option_class("metrics", node)).parameters)


def _extractor_id(metric: Any) -> str | None:
    """Identifier of the metric's feature extractor (weights hash), when it has one."""
    extractor = getattr(metric, "extractor", None)
    return getattr(extractor, "extractor_id", None)


def evaluate_bpd(cfg: DictConfig, module: DiffusionModule, datamodule: Any) -> dict[str, Any]:
    """Bits/dim of the EMA model on the first ``eval.bpd_examples`` validation examples (rank 0)."""
    from diffusion_lab.metrics.base import format_count
    from diffusion_lab.metrics.likelihood import bits_per_dim

    if cfg.eval.bpd_examples <= 0:
        return {}
    data = datamodule.val_tensor()[: cfg.eval.bpd_examples]
    result = bits_per_dim(
        module.ema_denoiser(), data, cfg.eval.batch_size, num_t_samples=cfg.eval.bpd_num_t_samples, seed=cfg.seed
    )
    return {
        f"val/bpd@{format_count(result.num_examples)}": result.bpd,
        f"val/bpd_sem@{format_count(result.num_examples)}": result.sem,
        "protocol": {**result.protocol(), "split": "val", "weights": "EMA"},
    }


def conditioning_protocol(cfg: DictConfig) -> dict[str, Any]:
    """How the model was conditioned and trained: label count and label-dropout rate (None if unconditional)."""
    num_classes = cfg.model.get("num_classes")
    return {
        "num_classes": num_classes,
        "p_uncond": cfg.cond.p_uncond if num_classes is not None else None,
        # bits/dim takes no labels: a conditional model is scored as p(x) through its null label.
        "bpd_labels": "null label (unconditional p(x))" if num_classes is not None else None,
    }


def train(cfg: DictConfig, run_dir: Path, validated: bool = False) -> dict[str, Any]:
    """Run one training job in ``run_dir``; returns the final metrics. ``validated``: the caller (``dlab-train``) has
    already run :func:`validate_config` on ``cfg``."""
    if not validated:
        validate_config(cfg)
    owner = launched_as_rank_zero()  # under DDP rank 0 owns the run dir; the other ranks share it
    with run_lock(run_dir, "dlab-train", enabled=owner):  # a second run into run_dir is refused at once
        if owner:
            prepare_run_dir(cfg, run_dir)
        return fit_and_evaluate(cfg, run_dir)


def dirs_to_write(cfg: DictConfig, run_dir: Path) -> dict[str, Path]:
    """The directories the run will write, by what they are: the run dir, W&B's (when W&B is on) and the digits
    classifier cache (when the digits metric will train and cache its classifier)."""
    from diffusion_lab.metrics.digits import classifier_path

    dirs = {"run directory": run_dir}
    wb = cfg.logger.wandb
    if wb is not None and str(getattr(wb.mode, "value", wb.mode)) != "disabled" and not cfg.trainer.fast_dev_run:
        dirs["W&B directory"] = run_dir / "wandb"
    if str(cfg.metrics.get("_target_") or "").endswith("DigitsFDMetric") and cfg.eval.num_samples > 0:
        cached = classifier_path(cfg.metrics.get("cache_dir"))
        if not cached.is_file():
            dirs["digits classifier cache"] = cached.parent
    return dirs


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Before any data or checkpoint is loaded: every directory of :func:`dirs_to_write` is writable
    (:func:`~diffusion_lab.run_dir.probe_writable`) and the previous record in ``run_dir`` is gone."""
    from diffusion_lab.tracking.filing import SUMMARY_FILE
    from diffusion_lab.tracking.writers import METRICS_FILE

    for what, directory in dirs_to_write(cfg, run_dir).items():
        probe_writable(directory, what)
    # A training run's record; a re-run into its directory (resume) removes it before training, so a kill midway
    # leaves no summary of the previous process beside the new checkpoints and CSV rows.
    clear_records(run_dir, (METRICS_FILE, SUMMARY_FILE))


def fit_and_evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Build data, module and trainer, fit, evaluate and write the run's record into ``run_dir`` (held and prepared
    by :func:`train` on rank 0); returns the final metrics."""
    import lightning as L
    import torch

    from diffusion_lab.callbacks.evaluation import SampleEvaluation
    from diffusion_lab.callbacks.exact_resume import make_train_loader_resumable, resolve_resume, stored_wandb_run_id
    from diffusion_lab.callbacks.phema import posthoc_ema_callbacks
    from diffusion_lab.callbacks.sample_grid import SampleGrid
    from diffusion_lab.module import apply_scale_switches, build_module, set_num_classes
    from diffusion_lab.plots import run_loss_vs_logsnr
    from diffusion_lab.resume import plan_resume
    from diffusion_lab.tracking.writers import finish_run, write_summary

    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_option("dataset", cfg.dataset)
    set_num_classes(cfg, datamodule.num_classes)  # cond.enabled=true: the network conditions on the labels
    module: DiffusionModule = build_module(cfg, datamodule.data_shape)
    apply_scale_switches(module, compile=cfg.compile, channels_last=cfg.channels_last)
    metric = build_metric(cfg, datamodule)
    w = cfg.eval.guidance_scale
    evaluation = SampleEvaluation(
        metric, cfg.eval.num_samples, cfg.eval.batch_size, cfg.eval.every_n_steps, guidance_scale=w
    )
    grid = SampleGrid(run_dir, cfg.callbacks.sample_every_n_steps, cfg.callbacks.grid_samples, guidance_scale=w)
    ckpt_path = resolve_resume(cfg.ckpt_path, cfg.resume, run_dir)
    plan = plan_resume(ckpt_path, cfg)  # refuses a changed key the checkpoint's state would override
    callbacks = [grid, evaluation, *posthoc_ema_callbacks(cfg.ema.posthoc, run_dir)]  # ema=posthoc: its snapshots
    trainer = build_trainer(cfg, run_dir, callbacks, wandb_id=stored_wandb_run_id(ckpt_path), resume=plan)
    make_train_loader_resumable(datamodule, trainer)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    elapsed = time.perf_counter() - start
    steps = trainer.global_step
    bpd = evaluate_bpd(cfg, module, datamodule) if trainer.is_global_zero else {}
    metrics: dict[str, Any] = {
        "train/loss": float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan")))),
        "train/steps": steps,
        "train/examples_per_s": steps * cfg.dataset.batch_size * trainer.world_size / max(elapsed, 1e-9),
        "train/wall_s": elapsed,
        **evaluation.results,
        **{k: v for k, v in bpd.items() if k != "protocol"},
        "protocol": {
            "sampler": OmegaConf.to_container(cfg.sampler, resolve=True, enum_to_str=True),
            "eval_samples": cfg.eval.num_samples,
            "reference": f"{cfg.dataset._target_.rsplit('.', 1)[-1]} train split",
            "weights": "EMA",
            "metric": cfg.metrics.get("_target_"),
            "sampling": evaluation.protocol,
            "conditioning": conditioning_protocol(cfg),
            "feature_extractor": _extractor_id(metric),
            "metric_protocol": metric.protocol() if hasattr(metric, "protocol") else None,  # e.g. precision's k
            "bpd": bpd.get("protocol"),
        },
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in bpd.items() if k != "protocol"}, step=steps)
        write_summary(run_dir, metrics)
        for logger in trainer.loggers:
            logger.save()  # the CSV is complete before it is plotted
        run_loss_vs_logsnr(run_dir)  # loss_vs_logsnr.png from csv/metrics.csv (W&B media too)
        finish_run(run_dir, cfg, metrics, trainer.loggers, resumed=plan.history)  # summary.json; closes W&B
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``dlab-train``: check the config (:func:`~diffusion_lab.cli.validate_train`), then train; returns the
    ``optimize_metric`` value (for a Hydra sweeper)."""
    validate_train(cfg)  # ranges and combinations before torch; the objective's and dataset's checks import it
    from diffusion_lab.tracking.writers import objective

    route_lightning_logs()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = train(cfg, run_dir, validated=True)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "protocol"}, indent=2, sort_keys=True))
        log.info("run directory: %s", run_dir)  # also in <run>/train.log, with Lightning's own messages
    return objective(metrics, cfg.optimize_metric)


if __name__ == "__main__":  # python -m diffusion_lab.train …: the same entry point as dlab-train
    main()
