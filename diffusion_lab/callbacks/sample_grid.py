"""Periodic sample grids from the EMA denoiser, saved as PNG in the run directory and logged to W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from diffusion_lab.atomic import atomic_write
from diffusion_lab.module import DiffusionModule


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an ``(H, W, 3)`` uint8 array as PNG atomically (:func:`~diffusion_lab.atomic.atomic_write`)."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def periodic_step_due(trainer: L.Trainer, every_n_steps: int) -> bool:
    """Whether a periodic callback fires after this optimizer step (never on the final one: ``on_train_end`` does)."""
    step = trainer.global_step
    return every_n_steps > 0 and step % every_n_steps == 0 and step < (trainer.max_steps or 0)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, sample ``num_samples``
    examples with fixed per-index seeds (so grids are comparable across steps) and render them with
    the datamodule's ``render``. Writes ``samples/step_XXXXXXX.png`` and ``samples_ema.png``.
    A class-conditional model draws labels cycling over its classes (in grid order), guided by
    ``guidance_scale`` if set.
    """

    def __init__(
        self,
        out_dir: str | Path,
        every_n_steps: int = 500,
        num_samples: int = 64,
        guidance_scale: float | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.guidance_scale = guidance_scale

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if periodic_step_due(trainer, self.every_n_steps):
            self._draw(trainer, pl_module, self.out_dir / "samples" / f"step_{trainer.global_step:07d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, self.out_dir / "samples_ema.png")

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> None:
        if self.num_samples <= 0 or not trainer.is_global_zero:
            return
        assert isinstance(pl_module, DiffusionModule)
        out = pl_module.generate(range(self.num_samples), guidance_scale=self.guidance_scale)
        image = trainer.datamodule.render(out.x0.cpu())  # type: ignore[attr-defined]
        save_png(image, path)
        caption = f"NFE {out.nfe}" + ("" if out.guidance_scale is None else f", CFG w={out.guidance_scale:g}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/ema", [image], step=trainer.global_step, caption=[caption])
