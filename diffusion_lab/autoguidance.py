"""The guidance a sampling job asks for: classifier-free, or autoguidance with a guide checkpoint, in an interval.

``guidance=auto guide_ckpt=…`` (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") guides
the model with a weaker one of the same task. The guide must take and give the same data (shape) under the same
conditioning (class count, or none); both checkpoints' stored configs are read first (mapped reads: the weights
stay on disk) and a mismatch is refused naming both, before either model is built or a sample drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffusion_lab.checkpoint_loading import load_checkpoint, load_module, stored_config
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.module import DiffusionModule
from diffusion_lab.schema.errors import ConfigError


def checkpoint_signature(path: str | Path) -> dict[str, Any]:
    """What a guide must share with the main model: ``{"data_shape": [...], "num_classes": int | None}``."""
    ckpt = load_checkpoint(path, mmap=True)
    cfg = stored_config(ckpt, path)
    return {"data_shape": list(ckpt.get("data_shape") or []), "num_classes": cfg.model.get("num_classes")}


def check_guide(ckpt_path: str | Path, guide_ckpt: str | Path) -> None:
    """Refuse a guide whose data shape or conditioning differs from the main model's (:class:`ConfigError` naming
    both checkpoints and both values)."""
    main, guide = checkpoint_signature(ckpt_path), checkpoint_signature(guide_ckpt)
    for key, what in (("data_shape", "data shape"), ("num_classes", "conditioning (class count; None: unconditional)")):
        if main[key] != guide[key]:
            raise ConfigError(
                f"guide_ckpt={guide_ckpt} has {what} {guide[key]}, but ckpt_path={ckpt_path} has {main[key]}; "
                "valid: a guide trained on the same data with the same conditioning"
            )


def job_guidance(cfg: DictConfig, module: DiffusionModule) -> Guidance | None:
    """The :class:`Guidance` of a sample / evaluate job (None: unguided): the guide (``guidance=auto``) is loaded
    onto ``cfg.device`` and used with its EMA weights when ``cfg.use_ema``."""
    if cfg.guidance_scale is None:
        return None
    limits = cfg.guidance_interval
    interval = None if limits is None else (float(limits[0]), float(limits[1]))
    if str(getattr(cfg.guidance, "value", cfg.guidance)) != "auto":
        return Guidance(float(cfg.guidance_scale), interval=interval)
    guide_module = load_module(cfg.guide_ckpt, map_location=cfg.device)
    guide = guide_module.ema_denoiser() if cfg.use_ema else guide_module.denoiser
    return Guidance(float(cfg.guidance_scale), guide=guide.eval(), interval=interval)
