"""A few deterministic training steps of the real DiffusionModule under one strategy; run as a script for the
multi-process cases (``python tests/sharded_train.py OUT MODE STEPS PRECISION DTYPE BATCH [RESUME]``; Lightning
relaunches it per rank) and imported for the single-process reference.

Only the loss's random draws are made deterministic: example ``i`` of the data set carries its own ``t`` and ``ε``,
so a batch of 2B on one process and two batches of B on two ranks see the same (x0, t, ε) triples. Network, denoiser,
optimizer (AdamW + warm-up), gradient clipping, EMA update, sharding and the checkpoint are the project's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Subset, TensorDataset

from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO
from diffusion_lab.callbacks.phema import PowerEMASnapshots
from diffusion_lab.checkpoint_file import read_checkpoint
from diffusion_lab.config import register_configs
from diffusion_lab.module import DiffusionModule, build_module
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.strategies import FSDP2Strategy

TINY_TOY = ["experiment=toy2d", "model.hidden=32", "model.num_layers=2", "optim.warmup_steps=0", "ema.decay=0.5"]
EXAMPLES = 64
SIGMA_RELS = [0.05, 0.10]  # post-hoc EMA profiles tracked in every run (a snapshot every 16 images)


class FixedDrawModule(DiffusionModule):
    """``training_step`` on per-example (t, ε) carried by the batch; everything else is DiffusionModule's."""

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x0, t, eps = batch
        coefs = self.denoiser.coefficients(t, x0)
        x_t = coefs.alpha * x0 + coefs.sigma * eps
        out = self.denoiser.network_output(x_t, t, None, coefs).out
        return (out.to(eps.dtype) - eps).square().mean()


def data(dtype: torch.dtype) -> TensorDataset:
    """``EXAMPLES`` toy points with their own t ∈ [0, 1) and ε (fixed seed)."""
    gen = torch.Generator().manual_seed(1234)
    x0 = torch.randn(EXAMPLES, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(EXAMPLES, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    eps = torch.randn(EXAMPLES, 2, generator=gen, dtype=torch.float64)
    return TensorDataset(x0.to(dtype), t.to(dtype), eps.to(dtype))


def rank_share(dataset: TensorDataset, batch: int, world: int) -> Subset[Any]:
    """This rank's examples: its batch ``k`` is examples ``(2k + rank)·B … (2k + rank + 1)·B − 1`` of the 2-rank
    split, so step k's two batches together are examples ``2kB … 2(k+1)B − 1``, one process's batch k of 2B."""
    # torchrun sets RANK (global); Lightning's own launcher sets LOCAL_RANK for the process it starts (rank 1).
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    blocks = range(rank, len(dataset) // batch, world)
    return Subset(dataset, [b * batch + i for b in blocks for i in range(batch)])


def build(dtype: torch.dtype) -> FixedDrawModule:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=TINY_TOY)
    torch.manual_seed(0)
    base = build_module(cfg, (2,))
    module = FixedDrawModule(
        base.denoiser.net, base.denoiser.schedule, base.denoiser.parameterization, base.loss_fn.weighting,
        base.loss_fn.time_sampler, base.sampler, (2,), base.optim_cfg, base.ema_cfg, config=base.config,
    )  # fmt: skip
    return module.to(dtype)


def run(
    out: Path, mode: str, steps: int, precision: str, dtype: torch.dtype, batch: int, resume: Path | None = None
) -> None:
    """Train to step ``steps``, ``batch`` examples per process; save ``out/<mode>.ckpt`` (one consolidated file).
    ``resume``: continue from that checkpoint (its step's batches are skipped: a plain loader restarts the epoch)."""
    single = mode.startswith("single")  # single, single_resumed: one process
    strategy: Any = "auto" if single else "ddp" if mode == "ddp" else FSDP2Strategy(precision=precision)
    nodes = 2 if mode == "fsdp_2nodes" else 1  # torchrun --nnodes=2 --nproc-per-node=1 starts each process
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single or nodes == 2 else 2, num_nodes=nodes, strategy=strategy,
        max_steps=steps,
        precision="32-true" if precision == "32" else precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
        limit_val_batches=0, plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
        callbacks=[PowerEMASnapshots(SIGMA_RELS, 16, out / f"{mode}_phema")],
    )  # fmt: skip
    dataset = rank_share(data(dtype), batch, trainer.world_size)
    done = int(read_checkpoint(resume)["global_step"]) if resume is not None else 0
    dataset = Subset(dataset, range(done * batch, len(dataset)))
    trainer.fit(build(dtype), train_dataloaders=DataLoader(dataset, batch_size=batch), ckpt_path=resume)
    trainer.save_checkpoint(out / f"{mode}.ckpt")


if __name__ == "__main__":
    out_dir, mode_, steps_, precision_, dtype_ = sys.argv[1:6]
    resume_ = Path(sys.argv[7]) if len(sys.argv) > 7 else None
    run(Path(out_dir), mode_, int(steps_), precision_, getattr(torch, dtype_), int(sys.argv[6]), resume_)
