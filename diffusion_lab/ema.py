"""The per-step EMA update of the module's weights: cached tensor lists, one fused op, shard-local under FSDP2.

Polyak averaging as ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)`` and
``use_buffers=True`` defines it: the first update copies the live tensors, every later one is
``E ← E + (1 − decay)·(θ − E)`` (``torch._foreach_lerp_``) over parameters and buffers.
``AveragedModel.update_parameters`` walks both modules' ``parameters()`` and ``buffers()`` and reads its update
counter back from the device on every call; :class:`EMAUpdate` lists the tensors once and keeps the counter on the
host, so a step costs the one fused lerp (the same kernel, so the result is bit-identical) and the counter's increment.

Under FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) the EMA copy is sharded exactly like the weights it tracks, so
each rank updates its own shard (``DTensor.to_local``): no all-gather per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (a view sharing its storage) for a ``DTensor``; ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def ema_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors an EMA of ``module`` averages: parameters then buffers, in ``AveragedModel``'s order."""
    return [*module.parameters(), *module.buffers()]


class EMAUpdate:
    """Updates ``averaged`` (an ``AveragedModel`` of ``live``) with ``decay``; call :meth:`reset` after anything that
    replaces tensors (sharding, moving buffers to a device or dtype) or rewrites ``n_averaged`` (a checkpoint load)."""

    def __init__(self, averaged: AveragedModel, live: nn.Module, decay: float) -> None:
        self.averaged, self.live, self.decay = averaged, live, float(decay)
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._count = 0

    def reset(self) -> None:
        """Forget the cached tensor lists and counter (re-read on the next :meth:`update`)."""
        self._pairs = None

    def _build(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        # The parameters themselves (a move keeps the Parameter objects); buffers are replaced by a move: see reset().
        ema = [local(t) for t in ema_tensors(self.averaged.module)]
        live = [local(t) for t in ema_tensors(self.live)]
        if [t.shape for t in ema] != [t.shape for t in live]:
            raise RuntimeError("the EMA copy is not sharded like the weights it tracks (local shapes differ)")
        is_float = [t.is_floating_point() or t.is_complex() for t in ema]
        self._count = int(self.averaged.n_averaged)  # the one host read, when the lists are (re)built
        return (
            [e for e, f in zip(ema, is_float, strict=True) if f],
            [w for w, f in zip(live, is_float, strict=True) if f],
            [e for e, f in zip(ema, is_float, strict=True) if not f],
            [w for w, f in zip(live, is_float, strict=True) if not f],
        )

    def _lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        if self._pairs is None:
            self._pairs = self._build()
        return self._pairs

    @torch.no_grad()
    def copy(self) -> None:
        """Set the copy to the live weights (before EMA starts); ``n_averaged`` is unchanged."""
        ema_f, live_f, ema_o, live_o = self._lists()
        torch._foreach_copy_(ema_f + ema_o, live_f + live_o)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step (a copy at the first): ``E ← lerp(E, θ, 1 − decay)`` on every local tensor."""
        ema_f, live_f, ema_o, live_o = self._lists()  # (re)reads the counter when the lists are (re)built
        if self._count == 0:
            self.copy()
        else:
            if ema_f:
                torch._foreach_lerp_(ema_f, live_f, 1 - self.decay)
            for e, w in zip(ema_o, live_o, strict=True):  # integer buffers: AveragedModel's own formula
                e.copy_(e * self.decay + w * (1 - self.decay))
        self.averaged.n_averaged += 1
        self._count += 1
