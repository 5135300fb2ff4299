"""Post-hoc EMA during training: power-function EMAs of the denoiser's weights and their fp16 snapshots.

``ema=posthoc`` adds :class:`PowerEMASnapshots` to the trainer. It holds its own fp32 copies (one per σ_rel) of the
denoiser's parameters, beside the module's plain EMA (``ema.decay``, untouched), and updates them after every
optimizer step with ``β = (1 − Δt/t)^(γ+1)`` (Karras et al. 2024 eq. 127), ``t`` the training images seen so far
(all ranks, all accumulated micro-batches) and ``Δt`` this step's. Every ``snapshot_every`` images, and at the end of
training, rank 0 writes ``<run>/phema/snapshots/phema-<images>.pt``: the EMAs in fp16 and the live buffers, with
checksums, atomically (:mod:`diffusion_lab.checkpoint_file`). ``dlab-phema`` combines them into checkpoints.

Under DDP every rank holds the full weights and the same EMAs (the updates are identical), so rank 0's snapshot is
the full state. Under FSDP (``trainer=fsdp``) each profile is sharded like the weight it tracks (a ``DTensor`` of the
same placement) and updated shard-locally, with no communication per step; a snapshot and a checkpoint gather the
full tensors once (a collective every rank joins), and rank 0 writes them. The EMAs are part of the callback's
checkpoint state (full tensors, resharded on load), so a resumed run continues them exactly, at any world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from diffusion_lab.checkpoint_file import atomic_torch_save, with_checksum
from diffusion_lab.ema import local
from diffusion_lab.module import DiffusionModule
from diffusion_lab.phema import power_beta, sigma_rel_to_gamma

SNAPSHOT_FORMAT_KEY = "diffusion_lab_phema"  # the snapshot format's version (an int)
SNAPSHOT_FORMAT = 1
SNAPSHOT_DIR = Path("phema") / "snapshots"


def snapshot_name(nimg: int) -> str:
    """``phema-<images, 12 digits>.pt``: names sort in training time."""
    return f"phema-{nimg:012d}.pt"


class PowerEMASnapshots(L.Callback):
    """Track power-function EMAs at ``sigma_rels`` and snapshot them every ``snapshot_every`` training images.

    Args:
        sigma_rels: the relative widths σ_rel of the tracked profiles, each in ``(0, 1/√12)``.
        snapshot_every: training images between snapshots (one is also written at the end of training).
        snapshot_dir: where the snapshots go (``<run>/phema/snapshots``).
    """

    def __init__(self, sigma_rels: list[float], snapshot_every: int, snapshot_dir: str | Path) -> None:
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [float(g) for g in sigma_rel_to_gamma(self.sigma_rels)]
        self.snapshot_every = int(snapshot_every)
        self.snapshot_dir = Path(snapshot_dir)
        self.nimg = 0  # training images of every rank so far (the profiles' time)
        self.step = 0  # the optimizer step the EMAs are at
        self.pending = 0  # images of this rank since the last optimizer step (accumulated micro-batches)
        self.last_snapshot = 0  # nimg of the last snapshot written
        self.emas: list[dict[str, Tensor]] | None = None

    # ---------------------------------------------------------------------------------------------- tracking
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the EMAs at the live weights, or keep the ones a resumed checkpoint restored (after the restore)."""
        params = dict(_denoiser(pl_module).named_parameters())
        if self.emas is None:
            if trainer.global_step > 0:
                raise RuntimeError(
                    f"ema.posthoc: resuming at step {trainer.global_step} from a checkpoint written without post-hoc "
                    "EMA state: the power-function profiles start at training image 0, so they cannot begin now; "
                    "resume with ema.posthoc.sigma_rels=[] or start a new run"
                )
            # An fp32 clone of each weight (of its shard: a DTensor clones shard-locally, keeping its placement).
            self.emas = [{k: p.detach().float().clone() for k, p in params.items()} for _ in self.sigma_rels]
        else:
            self.emas = [{k: _shard_like(v, params[k]) for k, v in ema.items()} for ema in self.emas]
        self.step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.pending += len(batch[0])
        if trainer.global_step == self.step:  # still accumulating gradients: no optimizer step yet
            return
        delta = self.pending * trainer.world_size  # drop_last loaders: every rank's batch has this size
        self.pending, self.step = 0, trainer.global_step
        before, self.nimg = self.nimg, self.nimg + delta
        self.update(dict(_denoiser(pl_module).named_parameters()), delta)
        if self.nimg // self.snapshot_every > before // self.snapshot_every:
            self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.nimg > self.last_snapshot:
            self.snapshot(trainer, pl_module)

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], delta: int) -> None:
        """One EMA step of every profile: ``θ̂ ← β θ̂ + (1 − β) θ`` with β of Karras et al. 2024 eq. 127 (on this
        rank's shards under FSDP)."""
        assert self.emas is not None
        for gamma, ema in zip(self.gammas, self.emas, strict=True):
            live = [local(params[name]).detach().to(value.dtype) for name, value in ema.items()]
            torch._foreach_lerp_([local(v) for v in ema.values()], live, 1.0 - power_beta(gamma, self.nimg, delta))

    # ---------------------------------------------------------------------------------------------- snapshots
    def snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Write the EMAs (fp16) and the live buffers at ``nimg`` (rank 0; returns the path there, else None).
        Every rank calls it at the same step: under FSDP the full tensors are gathered first."""
        self.last_snapshot = self.nimg
        assert self.emas is not None
        emas = [{k: _full(v) for k, v in ema.items()} for ema in self.emas]  # a collective under FSDP: every rank
        if not trainer.is_global_zero:
            return None
        denoiser = _denoiser(pl_module)
        params = {k for k, _ in denoiser.named_parameters()}
        record = {
            SNAPSHOT_FORMAT_KEY: SNAPSHOT_FORMAT,
            "nimg": self.nimg,
            "step": self.step,
            "sigma_rels": list(self.sigma_rels),
            "emas": [{k: v.detach().to("cpu", torch.float16) for k, v in ema.items()} for ema in emas],
            "buffers": {k: v.detach().cpu() for k, v in denoiser.state_dict().items() if k not in params},
        }
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = self.snapshot_dir / snapshot_name(self.nimg)
        atomic_torch_save(with_checksum(record), path)
        return path

    def state_dict(self) -> dict[str, Any]:
        """The EMAs (fp32, full tensors: gathered under FSDP, on every rank) and the clock, saved in every checkpoint
        so that a resume continues them."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "nimg": self.nimg,
            "last_snapshot": self.last_snapshot,
            "emas": [{k: _full(v).cpu() for k, v in ema.items()} for ema in self.emas or []],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise RuntimeError(
                f"ema.posthoc.sigma_rels={self.sigma_rels}, but the checkpoint tracked {state_dict['sigma_rels']}: "
                "a profile cannot change width mid-run; resume with the checkpoint's sigma_rels"
            )
        self.nimg, self.last_snapshot = int(state_dict["nimg"]), int(state_dict["last_snapshot"])
        self.emas = [dict(ema) for ema in state_dict["emas"]]


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a sharded ``DTensor`` gathered from every rank (a collective), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(full: Tensor, param: Tensor) -> Tensor:
    """An fp32 copy of ``full`` placed like ``param``: sharded the same way for a ``DTensor`` (the shard of this
    rank, from ``full`` which every rank holds), else a plain tensor on its device."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(local(param).device, torch.float32), param.device_mesh, param.placements)
    return full.to(param.device, torch.float32, copy=True)


def _denoiser(pl_module: L.LightningModule) -> torch.nn.Module:
    assert isinstance(pl_module, DiffusionModule)
    return pl_module.denoiser


def posthoc_ema_callbacks(posthoc: Any, run_dir: Path) -> list[L.Callback]:
    """``[PowerEMASnapshots]`` for a run with ``ema.posthoc.sigma_rels`` set (writing to ``<run_dir>/phema/``), else
    ``[]``: the plain ``ema.decay`` run is unchanged."""
    if not posthoc.sigma_rels:
        return []
    return [PowerEMASnapshots(list(posthoc.sigma_rels), posthoc.snapshot_every, Path(run_dir) / SNAPSHOT_DIR)]
