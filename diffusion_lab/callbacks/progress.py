"""Progress bars that count optimizer steps of ``trainer.max_steps``.

Training runs are sized in steps (``trainer.max_epochs=-1``), so Lightning's per-epoch bars read
"Epoch 1/-2" and restart every epoch; these show ``step k/max_steps`` over the whole run, a resumed run
starting at its checkpoint's step. With ``max_steps=-1`` (an epoch-sized run) they fall back to
Lightning's epoch bars.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def step_description(trainer: L.Trainer) -> str:
    """``"step k/N"`` (N = ``trainer.max_steps``), the text shown before the bar."""
    return f"step {trainer.global_step}/{trainer.max_steps}"


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps of ``max_steps`` across epochs."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # once per run: the bar spans every epoch
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description(step_description(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, *args)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, trainer.max_steps):
            bar.n = step
            bar.set_description(step_description(trainer), refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps <= 0 or trainer.global_step >= trainer.max_steps:
            super().on_train_epoch_end(trainer, pl_module)


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar (``callbacks.rich_progress=true``), counting optimizer steps of ``max_steps``."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.max_steps > 0 and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id,
                total=trainer.max_steps,
                completed=trainer.global_step,
                description=step_description(trainer),
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, *args)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id, completed=trainer.global_step, description=step_description(trainer)
            )
            self.refresh()
        self._update_metrics(trainer, pl_module)
