"""Crash-safe checkpoints and bit-exact resume.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a hidden temp file in the target
  directory, flushed, ``fsync``-ed and moved over the target with ``os.replace`` (atomic on POSIX), so a
  crash mid-write leaves the previous ``last.ckpt`` intact and no partial ``*.ckpt`` file. Every checkpoint
  carries a SHA-256 of each of its entries (:func:`with_checksum`), verified when it is read
  (:func:`read_checkpoint`): a flipped bit, an empty or a foreign file is one :class:`CheckpointError` line.
- :class:`LastCheckpoint`: ``last.ckpt`` also at the end of training and, on SIGTERM/SIGINT/SIGUSR1, at the end
  of the step the signal arrived in, before the run exits with status 128 + signal number.
- :func:`checkpoint_callbacks`: ``last.ckpt`` every ``checkpoint_every_n_steps``, the ``keep_last_k``
  newest step checkpoints, and the best ``save_top_k`` by ``monitor``/``mode``.
- :class:`ExactResume`: stores what Lightning leaves out — the global RNG states (torch CPU/CUDA, numpy,
  python) and the W&B run id — and restores the RNGs on resume.
- :class:`EpochSeededSampler`: the training order is a function of ``(seed, epoch)`` and skips the batches
  already consumed in the interrupted epoch, so a resumed run sees exactly the batches an uninterrupted
  one would (Lightning does not fast-forward an ordinary ``DataLoader``).

This module holds the Lightning side: :class:`AtomicCheckpointIO`, :class:`LastCheckpoint` and
:func:`checkpoint_callbacks`. The file-level half (atomic writes, checksums, the verified read) is
:mod:`diffusion_lab.checkpoint_file`, stop signals are :mod:`~diffusion_lab.callbacks.stop_signals`, RNG state and
data order are :mod:`~diffusion_lab.callbacks.exact_resume`; their names are re-exported here, where callers
import them from.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

# The names from the split-out modules are re-exported: callers import them from this module.
from diffusion_lab.callbacks.stop_signals import (
    STOP_SIGNALS,
    TrainingInterrupted,
    agreed_signal,
    requeue_slurm_job,
)
from diffusion_lab.checkpoint_file import (
    atomic_torch_save,
    read_checkpoint,
    remove_stale_temp_files,
    with_checksum,
)

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes (:func:`atomic_torch_save`) of checkpoints carrying a checksum
    (:func:`with_checksum`); reads are weights-only and verified (:func:`read_checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(with_checksum(checkpoint), path)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("checkpoints are read weights-only (torch.load(weights_only=True))")
        return read_checkpoint(path, map_location=map_location)


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two save steps (at the end of
    the step that reaches ``max_steps``, so extending the run resumes mid-epoch exactly), and when a stop signal
    arrives.

    On SIGTERM (SLURM preemption, ``kill``), SIGINT (Ctrl-C) or SIGUSR1 (SLURM's pre-timeout ``--signal``) the
    current step runs to its end (optimizer step and EMA update), ``last.ckpt`` of that step is written through
    the atomic IO, and :class:`TrainingInterrupted` ends the run with status 128 + signal number; under SLURM
    with auto-requeue, the job is requeued on SIGUSR1. A second signal stops at once, without a checkpoint.
    Under DDP the ranks agree on the step with one all-reduce (max) of the received signal per optimizer step,
    so every rank enters the collective save together, whichever rank the signal reached.
    """

    def __init__(self, *args: Any, stop_signals: tuple[int, ...] = STOP_SIGNALS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_signals = stop_signals
        self._received: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._step_at_batch_start = -1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step != self._last_global_step_saved and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # The handlers from before Lightning registers its own (teardown puts these back).
        self._previous_handlers = {signum: signal.getsignal(signum) for signum in self.stop_signals}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._received = None
        # Replaces Lightning's SIGTERM/SIGUSR1 handlers (registered just before the fit stage), which stop without
        # a checkpoint (SIGTERM) or save one from inside the handler, mid-step and per rank (SLURM's SIGUSR1).
        if threading.current_thread() is threading.main_thread():
            for signum in self.stop_signals:
                signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Signal handler: remember the signal; the checkpoint is written where the step ends."""
        if self._received is not None:  # a second signal: stop now
            self._restore_handlers()
            name = signal.Signals(signum).name
            raise TrainingInterrupted(signum, f"a second {name} while finishing the step: stopped without a checkpoint")
        self._received = signum

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step_at_batch_start:
            return  # a gradient-accumulation micro-batch: no optimizer step to save yet
        if self._is_last_step(trainer):
            # Saved here, mid-epoch, as a periodic save would be: after this hook Lightning closes the epoch, and a
            # checkpoint written in on_train_end would resume one epoch later (another data order).
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        signum = agreed_signal(trainer, self._received)
        if signum:
            self._save_and_stop(trainer, signum)

    def _is_last_step(self, trainer: L.Trainer) -> bool:
        """Whether this optimizer step reached ``max_steps`` and ``last.ckpt`` does not hold it yet."""
        return (
            self.save_last is True
            and 0 < trainer.max_steps <= trainer.global_step
            and self._last_global_step_saved != trainer.global_step
            and not trainer.sanity_checking
        )

    def _save_and_stop(self, trainer: L.Trainer, signum: int) -> None:
        """Write ``last.ckpt`` of this step (unless the periodic save just did), requeue under SLURM, raise."""
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        name, step = signal.Signals(signum).name, trainer.global_step
        message = (
            f"received {name}: wrote {self.last_model_path} (step {step}); exiting with status {128 + signum}. "
            "Resume with the same command and resume=true (same run directory) or ckpt_path=<that file>"
        )
        if trainer.is_global_zero:
            log.warning(message)
            requeue_slurm_job(trainer, signum)
        raise TrainingInterrupted(signum, message)


def checkpoint_callbacks(
    dirpath: str | Path,
    every_n_steps: int,
    keep_last_k: int = 0,
    monitor: str | None = None,
    mode: str = "min",
    save_top_k: int = 1,
) -> list[ModelCheckpoint]:
    """``last.ckpt`` every ``every_n_steps`` (+ the ``keep_last_k`` newest ``step=N.ckpt``) and, when
    ``monitor`` is set, the ``save_top_k`` best ``best-step=N.ckpt`` by that logged metric."""
    dirpath = str(dirpath)
    remove_stale_temp_files(dirpath)
    # Lightning's trick for "newest k": rank checkpoints by the step counter itself.
    periodic = LastCheckpoint(
        dirpath=dirpath,
        filename="{step}",
        save_last=True,
        save_top_k=keep_last_k,
        monitor="step" if keep_last_k > 0 else None,
        mode="max",
        every_n_train_steps=every_n_steps,
        auto_insert_metric_name=True,
    )
    callbacks: list[ModelCheckpoint] = [periodic]
    if monitor:
        best = ModelCheckpoint(
            dirpath=dirpath,
            filename="best-{step}",
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=False,
            every_n_train_steps=every_n_steps,
        )
        callbacks.append(best)
    return callbacks
