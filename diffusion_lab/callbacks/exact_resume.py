"""Bit-exact resume: what Lightning leaves out of a checkpoint, and a data order a checkpoint can reproduce.

- :class:`ExactResume`: stores the global RNG states (torch CPU/CUDA, numpy, python), the W&B run id and how the
  run is filed; restores the RNGs on resume (:func:`resolve_resume` picks the checkpoint to resume from).
- :class:`EpochSeededSampler`: the training order is a function of ``(seed, epoch)`` and skips the batches
  already consumed in the interrupted epoch, so a resumed run sees exactly the batches an uninterrupted
  one would (Lightning does not fast-forward an ordinary ``DataLoader``); :func:`make_train_loader_resumable`
  puts it under a datamodule's training loader.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from diffusion_lab.schema.errors import ConfigError

RNG_KEY = "diffusion_lab_rng"
RNG_PER_RANK_KEY = "diffusion_lab_rng_per_rank"
RUN_KEY = "diffusion_lab_run"  # how the run is filed (name, group, tags), for sample/eval jobs on its checkpoints
WANDB_KEY = "wandb_run_id"
# The logger of diffusion_lab.callbacks.checkpoint, where this code lived before the split: log filters name it.
log = logging.getLogger("diffusion_lab.callbacks.checkpoint")


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
