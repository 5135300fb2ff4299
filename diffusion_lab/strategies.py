"""``trainer=fsdp``: fully sharded data parallel on FSDP2 (``torch.distributed.fsdp.fully_shard``), CPU or GPU.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with a 1-D data-parallel mesh over every process
(gloo on CPU, NCCL on GPUs, from the same YAML) and three changes:

- **Sharding** (:func:`shard_module`): each block of the network (a UNet's residual/attention/resampling blocks, an
  MLP's or DiT's blocks: every module listed in a ``ModuleList`` that is not itself a list), then the whole denoiser,
  is ``fully_shard``-ed; the EMA copy is sharded with the same policy, so its shards line up with the weights' and
  the EMA update is shard-local (:mod:`diffusion_lab.ema`). ``precision=bf16-mixed`` becomes FSDP2's
  ``MixedPrecisionPolicy`` (bf16 parameters and compute, fp32 gradient reduce-scatter; the fp32 sharded weights stay
  the optimizer's master copy); ``fsdp_cpu_offload`` adds ``CPUOffloadPolicy`` on GPUs.
- **One checkpoint file**: ``last.ckpt`` is the consolidated state (full weights, EMA and optimizer state gathered on
  rank 0), written by the project's atomic, checksummed checkpoint IO, so ``dlab-sample`` / ``dlab-evaluate`` load it
  on one process as any other; it is read back verified and weights-only on every rank and re-sharded for the current
  world size (:meth:`FSDP2Strategy.load_checkpoint`), so a run may resume with another number of processes.
- **Sampling from the EMA**: a sharded EMA is gathered into one plain copy once per step at which something samples
  (:class:`GatherShardedEMA`, before the sample-grid and evaluation callbacks), never per training step.

FSDP1 (``FullyShardedDataParallel``) is not used: it refuses CPU devices, FSDP2 does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

FSDP_STRATEGIES = ("fsdp", "fsdp_cpu_offload")  # the trainer.strategy names this module builds


def shard_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of ``module`` that are sharded one by one: every module held in a ``ModuleList`` (or subclass)
    that is not itself a ``ModuleList`` and has parameters, innermost first (``fully_shard``'s bottom-up order)."""
    blocks = [
        child
        for parent in module.modules()
        if isinstance(parent, nn.ModuleList)
        for child in parent
        if not isinstance(child, nn.ModuleList) and any(True for _ in child.parameters())
    ]
    return sorted(blocks, key=lambda b: -_depth(module, b))


def _depth(root: nn.Module, target: nn.Module) -> int:
    return next(name.count(".") for name, m in root.named_modules() if m is target)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a Lightning precision flag: bf16 compute with fp32 gradient reduction for ``bf16-mixed``,
    fp16 likewise for ``16-mixed``, full precision otherwise."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_module(module: nn.Module, mesh: Any, mp_policy: MixedPrecisionPolicy, offload: OffloadPolicy) -> None:
    """``fully_shard`` each block of ``module`` (:func:`shard_blocks`), then ``module`` itself, over ``mesh``."""
    for block in shard_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(module, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (sharded)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


class ShardedEMA:
    """Holds what sampling needs of a sharded EMA copy: a plain (unsharded) module of the same structure, on the
    meta device until :meth:`gather` fills it with the full weights (a collective: every rank calls it) and the
    buffers (which FSDP2 leaves whole on every rank)."""

    def __init__(self, template: nn.Module) -> None:
        self.full = copy.deepcopy(template).to("meta")
        self.step: int | None = None  # the training step whose EMA :attr:`full` holds

    def gather(self, sharded: nn.Module, step: int, device: torch.device) -> nn.Module:
        """The full EMA weights of ``sharded`` at ``step`` in the plain copy (gathered once per step)."""
        if self.step != step:
            state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
            if any(p.is_meta for p in self.full.parameters()):
                self.full = self.full.to_empty(device=device)
            self.full.load_state_dict(state)
            # Buffers are not sharded: every rank holds them whole (non-persistent ones are not in the state dict).
            for mine, theirs in zip(self.full.buffers(), sharded.buffers(), strict=True):
                mine.copy_(theirs)
            self.full.requires_grad_(False)
            self.step = step
        return self.full.train(sharded.training)  # the mode Lightning gave the sharded copy (eval in validation)


class GatherShardedEMA(L.Callback):
    """On every rank, gathers a sharded EMA copy at the steps where the sample grid or evaluation run (``every``: their
    periods; 0 or less: never) and at the end of training, so that rank 0 alone can then sample from it."""

    def __init__(self, every: list[int], due: Callable[[L.Trainer, int], bool]) -> None:
        self.every, self.due = [int(e) for e in every if int(e) > 0], due

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if any(self.due(trainer, e) for e in self.every):
            self._gather(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._gather(pl_module)

    @staticmethod
    def _gather(pl_module: L.LightningModule) -> None:
        ema_denoiser = getattr(pl_module, "ema_denoiser", None)
        if ema_denoiser is not None:
            ema_denoiser()


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (see the module docstring). ``cpu_offload``: keep the sharded
    parameters, gradients and optimizer state in host memory (GPUs only)."""

    def __init__(self, precision: str = "32", cpu_offload: bool = False, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        self.mp_policy = mixed_precision_policy(precision)
        self.offload_policy: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()

    def setup_environment(self) -> None:
        # One data-parallel dimension over every process (Lightning's "auto" would make it tensor parallel).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module: Any) -> None:
        """Shard ``module.denoiser`` and its EMA copy ``module.ema.module`` alike over the data-parallel mesh."""
        mesh = self.device_mesh["data_parallel"]
        denoiser, ema = module.denoiser, module.ema.module
        if is_sharded(denoiser):
            return
        outside = [n for n, _ in denoiser.named_parameters() if not n.startswith("net.")]
        if outside:  # only the network's forward runs FSDP's hooks: these would train unsynchronised
            raise ValueError(
                f"trainer.strategy=fsdp shards the network only, and this denoiser trains parameters outside it: "
                f"{outside}; use trainer=ddp (or a schedule without learned parameters)"
            )
        module.sharded_ema = ShardedEMA(ema)
        # The root of each is the network: the denoiser calls net(...), whose forward runs FSDP's root hooks.
        shard_module(denoiser.net, mesh, self.mp_policy, self.offload_policy)
        shard_module(ema.net, mesh, self.mp_policy, self.offload_policy)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the consolidated checkpoint (verified, weights-only) on every rank and load this rank's shards of the
        weights, EMA and optimizer state; works for any world size (the file holds full tensors)."""
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, strict=self.lightning_module.strict_loading)  # type: ignore[union-attr]
        set_model_state_dict(self.model, checkpoint["state_dict"], options=options)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            state = _optimizer_state_by_name(state, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """A no-op: :meth:`load_checkpoint` loaded the weights into the shards already."""


def _optimizer_state_by_name(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The consolidated optimizer state keyed by parameter name (Lightning writes it keyed by parameter index)."""
    return _rekey_optimizer_state_if_needed(state, model)


def build_strategy(name: str, precision: str) -> FSDP2Strategy | str:
    """The strategy object for ``trainer.strategy=name``: :class:`FSDP2Strategy` for ``fsdp`` /
    ``fsdp_cpu_offload``, the name itself (Lightning's registry) otherwise."""
    if name not in FSDP_STRATEGIES:
        return name
    return FSDP2Strategy(precision=precision, cpu_offload=name == "fsdp_cpu_offload")
