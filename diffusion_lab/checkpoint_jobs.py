"""What the jobs on a trained checkpoint share (``dlab-sample``, ``dlab-evaluate``, ``dlab-tune-grid``): the sampler
they ask for, the model's classes read before the module is built, and the record of the job.

The entry modules import this only after their config passed its checks (it imports torch and Lightning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks.exact_resume import RUN_KEY, WANDB_KEY
from diffusion_lab.checkpoint_loading import load_checkpoint, stored_config
from diffusion_lab.config import check_sampler
from diffusion_lab.run_dir import run_lock
from diffusion_lab.samplers.grids import TUNED_GRID
from diffusion_lab.samplers.tuning import load_tuned_grid
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import build_option
from diffusion_lab.tracking.filing import training_run
from diffusion_lab.tracking.writers import track_job


def checkpoint_conditioning(ckpt_path: str | Path) -> tuple[int | None, float]:
    """``(num_classes, p_uncond)`` of the checkpoint's model (None: unconditional), from its stored config: a mapped
    read, the weights stay on disk, so a request the model cannot serve is refused before the module is built."""
    cfg = stored_config(load_checkpoint(ckpt_path, mmap=True), ckpt_path)
    return cfg.model.get("num_classes"), float(cfg.cond.p_uncond)


def sampler_config(cfg: DictConfig, module: Any, overrides: list[str]) -> DictConfig:
    """The requested sampler's config node, or the run's when ``cfg.sampler`` is null.

    A sampler chosen here keeps the run's ``clip_x0`` (a property of the data's range: [−1, 1] images or
    unbounded vectors) unless ``sampler.clip_x0`` is itself among the command-line ``overrides``.
    """
    if cfg.sampler is None:
        return OmegaConf.create(module.config["sampler"])
    sampler_cfg = cfg.sampler.copy()
    run_clip = module.config.get("sampler", {}).get("clip_x0", "missing")
    if run_clip != "missing" and not any(o.split("=")[0].lstrip("+~") == "sampler.clip_x0" for o in overrides):
        sampler_cfg.clip_x0 = run_clip
    return sampler_cfg


def build_sampler(cfg: DictConfig, module: Any, overrides: list[str]) -> Any:
    """The requested sampler (or the run's, :func:`sampler_config`), checked against the checkpoint's schedule.

    ``sampler.grid=tuned`` attaches the grid ``dlab-tune-grid`` fitted for ``cfg.ckpt_path``, these sampler
    settings and ``cfg.use_ema`` (:func:`~diffusion_lab.samplers.tuning.load_tuned_grid`), or refuses.
    """
    if cfg.sampler is None:
        return module.sampler
    sampler_cfg = sampler_config(cfg, module, overrides)
    sampler = build_option("sampler", sampler_cfg)
    if sampler.grid == TUNED_GRID:
        identity = OmegaConf.to_container(sampler_cfg, resolve=True, enum_to_str=True)
        try:
            load_tuned_grid(sampler, identity, cfg.ckpt_path, cfg.use_ema)  # type: ignore[arg-type]
        except ValueError as err:
            raise ConfigError(str(err)) from err
    check_sampler(sampler, module.denoiser.schedule)
    return sampler


def track(
    cfg: DictConfig, out_dir: Path, job_type: str, metrics: dict[str, Any], media: dict[str, Path] | None = None
) -> Path:
    """Record a ``sample`` / ``eval`` job on ``cfg.ckpt_path``: ``summary.json`` + a W&B run grouped with the
    training run (:func:`diffusion_lab.tracking.track_job`); returns the summary's path."""
    ckpt = load_checkpoint(cfg.ckpt_path, mmap=True)  # the config and run entries; the weights stay on disk
    train_config = ckpt["diffusion_lab_config"]
    train = training_run(cfg.ckpt_path, train_config, ckpt.get(WANDB_KEY), ckpt.get(RUN_KEY))
    with run_lock(out_dir, f"dlab-{job_type}"):  # never while another job writes out_dir
        return track_job(cfg, out_dir, job_type, metrics, train_config, train, media)
