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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Sampler

TMP_PREFIX = ".tmp-"  # temp files never end in .ckpt, so a crash leaves no file that looks like a checkpoint
RNG_KEY = "diffusion_lab_rng"
RNG_PER_RANK_KEY = "diffusion_lab_rng_per_rank"
RUN_KEY = "diffusion_lab_run"  # how the run is filed (name, group, tags), for sample/eval jobs on its checkpoints
log = logging.getLogger(__name__)
WANDB_KEY = "wandb_run_id"
CHECKSUM_KEY = "diffusion_lab_checksum"  # {"algorithm": "sha256", "entries": {top-level key: hex digest}}


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temp file in the same directory + fsync + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files a killed process left behind in ``directory``; returns what was removed."""
    directory = Path(directory)
    stale = sorted(directory.glob(f"{TMP_PREFIX}*")) if directory.is_dir() else []
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


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


# ---------------------------------------------------------------------------------------------- checksums


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, not a PyTorch checkpoint, or corrupted (checksum)."""


def _digest_into(h: Any, obj: Any) -> None:
    """Feed ``obj`` (nested dicts/lists/tuples of tensors and plain values) into the hash ``h``.

    A tensor contributes its dtype, shape and raw bytes; a dict its keys in sorted order; anything else its
    type and ``repr`` (ints, floats, strings, None: what ``torch.load(weights_only=True)`` gives back)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest_into(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _digest_into(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checkpoint_digests(checkpoint: dict[str, Any]) -> dict[str, str]:
    """SHA-256 hex digest of every top-level entry of a checkpoint (``state_dict`` holds raw and EMA weights,
    ``optimizer_states`` the Adam moments, …) except the checksum itself."""
    digests = {}
    for key in sorted(checkpoint, key=str):
        if key != CHECKSUM_KEY:
            h = hashlib.sha256()
            _digest_into(h, checkpoint[key])
            digests[str(key)] = h.hexdigest()
    return digests


def with_checksum(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` carrying :func:`checkpoint_digests` under ``diffusion_lab_checksum``."""
    return {**checkpoint, CHECKSUM_KEY: {"algorithm": "sha256", "entries": checkpoint_digests(checkpoint)}}


def verify_checksum(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the entries whose digest differs from the stored one; a checkpoint
    written before checksums existed loads with a warning."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(stored, dict) or not isinstance(stored.get("entries"), dict):
        warnings.warn(f"{path}: no checksum (a checkpoint from an older version); loading it unverified", stacklevel=3)
        return
    expected, actual = stored["entries"], checkpoint_digests(checkpoint)
    bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch in {', '.join(bad)} (file corrupted)")


def _load_failure(err: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    if "Weights only load failed" in lines[0]:  # pickled code (or a class) the weights-only unpickler refuses
        detail = next((line for line in lines if "Unsupported" in line), "")
        return f"refused by torch.load(weights_only=True): Weights only load failed ({detail[:200]})"
    return f"not a PyTorch checkpoint ({type(err).__name__}: {lines[0][:200]})"


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, verify: bool | None = None
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure as one :class:`CheckpointError` line naming
    the file (empty, not a PyTorch checkpoint, code refused by the weights-only unpickler, checksum mismatch).

    ``verify`` (default: ``not mmap``) checks the checksum; a mapped read skips it, since hashing would read
    every tensor that ``mmap`` leaves on disk (callers that only want the config and bookkeeping entries).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path=<path to a .ckpt file>)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # every failure of torch.load becomes one line naming the file
        raise CheckpointError(f"{path}: {_load_failure(err)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    if verify if verify is not None else not mmap:
        verify_checksum(ckpt, path)
    return ckpt


# SIGUSR1 is what scripts/slurm/train.sbatch asks SLURM to send 90 s before the time limit (--signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingInterrupted(SIGTERMException):
    """Training stopped on a signal after writing ``last.ckpt`` of the step it arrived in.

    A ``SystemExit`` whose status is ``128 + signal number`` (the shell's convention: 143 for SIGTERM, 130 for
    SIGINT, 138 for SIGUSR1), so a scheduler or script sees an interrupted run, not a finished one."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.message = signum, message

    def __str__(self) -> str:
        return self.message


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


def agreed_signal(trainer: L.Trainer, received: int | None) -> int:
    """The stop signal any rank received (0: none). Under DDP one all-reduce (max), so all ranks agree."""
    local = int(received or 0)
    if trainer.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    flag = torch.tensor([local], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def requeue_slurm_job(trainer: L.Trainer, signum: int) -> bool:
    """``scontrol requeue <job>`` when the run is a SLURM job with Lightning's auto-requeue on and ``signum`` is
    its requeue signal (SIGUSR1 by default), as Lightning's own handler does; returns whether it requeued."""
    import subprocess

    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and signum == env.requeue_signal):
        return False
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        status = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except OSError as err:  # no scontrol on this node: the checkpoint is written, the job just is not requeued
        log.warning("requeueing SLURM job %s failed: %s", job, err)
        return False
    if status != 0:
        log.warning("requeueing SLURM job %s failed (scontrol exit status %d)", job, status)
    return status == 0


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


# ---------------------------------------------------------------------------------------------- RNG state


def rng_states() -> dict[str, Any]:
    """The global RNG states training draws from (noise, t, label dropout, dropout): torch, CUDA, numpy, python.

    Stored as plain tensors/containers so ``torch.load(weights_only=True)`` reads them back.
    """
    np_state: Any = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    random.setstate(_python_state_from_plain(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _python_state_to_plain(state: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(plain: dict[str, Any]) -> tuple[Any, ...]:
    return (int(plain["version"]), tuple(int(v) for v in plain["internal"]), plain["gauss"])


class ExactResume(L.Callback):
    """Saves the global RNG states, the W&B run id and ``run`` (name, group, tags) in every checkpoint;
    restores the RNGs on resume.

    Lightning itself restores weights, optimizer, LR scheduler, loop counters and module extras (EMA,
    importance-sampler history); with these and :class:`EpochSeededSampler` a resumed run is bit-identical.

    Under DDP every rank draws its own noise, times and label dropout: at fit start rank ``r`` of ``W`` is
    reseeded with ``seed·W + r`` (as NVlabs/edm does; the network was built from ``seed`` on every rank and
    DDP broadcasts rank 0's weights anyway), every rank's RNG state is gathered into the checkpoint
    (``diffusion_lab_rng_per_rank``), and each rank restores its own on resume. A single process keeps the
    ``seed`` stream untouched.
    """

    def __init__(self, seed: int | None = None, run: dict[str, Any] | None = None) -> None:
        self.seed = seed
        self.run = run

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and self.seed is not None:
            rank_seed = (self.seed * trainer.world_size + trainer.global_rank) % 2**31
            random.seed(rank_seed)
            np.random.seed(rank_seed)
            torch.manual_seed(rank_seed)  # also every CUDA device

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = rng_states()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size  # every rank saves (Lightning writes rank 0's copy)
            torch.distributed.all_gather_object(gathered, checkpoint[RNG_KEY])
            checkpoint[RNG_PER_RANK_KEY] = gathered
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            checkpoint[WANDB_KEY] = run_id
        if self.run is not None:
            checkpoint[RUN_KEY] = self.run

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get(RNG_PER_RANK_KEY)
        if per_rank is not None and len(per_rank) == trainer.world_size:
            set_rng_states(per_rank[trainer.global_rank])
        elif per_rank is not None or (RNG_KEY in checkpoint and trainer.world_size > 1):
            log.warning(
                "resuming on %d processes from a checkpoint written by %d: the data order continues, but the "
                "random draws (noise, t) cannot continue exactly",
                trainer.world_size, len(per_rank) if per_rank is not None else 1,
            )  # fmt: skip
            if trainer.world_size == 1:  # one process: continue rank 0's stream
                set_rng_states(per_rank[0] if per_rank is not None else checkpoint[RNG_KEY])
            elif self.seed is not None:
                self.setup(trainer, pl_module, "fit")
        elif RNG_KEY in checkpoint:
            set_rng_states(checkpoint[RNG_KEY])


def wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of the trainer's W&B run, or None without a W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return str(logger.version) if logger.version is not None else None
    return None


def stored_wandb_run_id(ckpt_path: str | Path | None) -> str | None:
    """The W&B run id a checkpoint was written under (None if absent or no checkpoint)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    run_id = ckpt.get(WANDB_KEY)
    return str(run_id) if run_id is not None else None


def resolve_resume(ckpt_path: str | None, resume: bool, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if given, else ``<run_dir>/checkpoints/last.ckpt`` when
    ``resume=true``. Without that file ``resume=true`` starts a fresh run and says so (a warning naming the path):
    a requeued job passes ``resume=true`` from its first launch on, before any checkpoint exists."""
    if ckpt_path:
        return ckpt_path
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        log.warning("resume=true: no checkpoint at %s, so this is a fresh start (step 0) in %s", last, run_dir)
    return str(last) if resume and last.is_file() else None


# ------------------------------------------------------------------------------------------ data order


class EpochSeededSampler(Sampler[int]):
    """Shuffled indices whose order depends only on ``(seed, epoch)``; resumes mid-epoch by skipping.

    ``position()`` returns ``(epoch, batches already consumed in it, rank, world_size)`` when an
    iterator is created; with ``world_size > 1`` each rank takes every ``world_size``-th index of the
    same permutation (truncated to a multiple of ``world_size``), as ``DistributedSampler`` does.

    Args:
        num_samples: dataset length N.
        batch_size: samples per batch (to turn consumed batches into consumed indices).
        seed: shuffling seed.
        position: callable giving the loop position (see above).
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, position: Callable[[], tuple[int, int, int, int]]
    ) -> None:
        self.num_samples, self.batch_size, self.seed, self.position = num_samples, batch_size, seed, position

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's full permutation of ``range(N)`` (N,) long."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        epoch, consumed, rank, world = self.position()
        per_rank = self.num_samples // world
        indices = self.permutation(epoch)[: per_rank * world][rank::world]
        if consumed * self.batch_size >= per_rank:  # a checkpoint at the very end of an epoch
            indices = self.permutation(epoch + 1)[: per_rank * world][rank::world]
            consumed = 0
        yield from indices[consumed * self.batch_size :].tolist()

    def __len__(self) -> int:
        _, _, _, world = self.position()
        return self.num_samples // world


def loop_position(trainer: L.Trainer) -> tuple[int, int, int, int]:
    """``(epoch, batches consumed in it, rank, world_size)`` of a trainer's fit loop."""
    # Reset to 0 at every epoch start; on resume, the restored count of batches trained in the epoch.
    consumed = int(getattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed", 0))
    return trainer.current_epoch, consumed, trainer.global_rank, trainer.world_size


def check_batches_per_rank(num_examples: int, batch_size: int, world_size: int, drop_last: bool) -> None:
    """At least one training batch per rank, or a :class:`ConfigError` (instead of a run of zero steps)."""
    from diffusion_lab.config import ConfigError

    per_rank = num_examples // world_size
    if per_rank < (batch_size if drop_last else 1):
        raise ConfigError(
            f"the training split has {num_examples} examples, {per_rank} per rank on {world_size} process(es): "
            f"fewer than dataset.batch_size={batch_size} (the per-rank batch; incomplete batches are dropped), so "
            "no training step would run; lower dataset.batch_size or train on more data"
        )


def make_train_loader_resumable(datamodule: Any, trainer: L.Trainer) -> None:
    """Wrap ``datamodule.train_dataloader`` so its loader draws from an :class:`EpochSeededSampler`.

    The loader keeps batch size, ``drop_last``, workers and collate function; only the order changes (to
    one a checkpoint can reproduce). The trainer must be built with ``use_distributed_sampler=False``.
    """
    original = datamodule.train_dataloader

    def train_dataloader() -> DataLoader[Any]:
        loader: DataLoader[Any] = original()
        assert loader.batch_size is not None
        check_batches_per_rank(len(loader.dataset), loader.batch_size, trainer.world_size, loader.drop_last)  # type: ignore[arg-type]
        sampler = EpochSeededSampler(
            len(loader.dataset),  # type: ignore[arg-type]
            loader.batch_size,
            int(getattr(datamodule, "seed", 0)),
            lambda: loop_position(trainer),
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            drop_last=loader.drop_last,
            num_workers=loader.num_workers,
            persistent_workers=loader.persistent_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            # Its own generator: creating an iterator (which a resume does at a different time) then
            # draws the workers' base seed from it instead of from the global RNG that training uses.
            generator=torch.Generator().manual_seed(int(getattr(datamodule, "seed", 0))),
        )

    datamodule.train_dataloader = train_dataloader
