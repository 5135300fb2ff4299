"""The :class:`TimeSampler` interface, the uniform sampler, and the helpers every time sampler shares.

Conventions (the reference distribution, what the weight means): see :mod:`diffusion_lab.diffusion.time_samplers`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Annotated

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.schema.domains import UNIT_OPEN
from diffusion_lab.schema.signature import enforce_domains

StateDict = dict[str, Tensor | int | float]


class TimeSampler(ABC):
    """Draws ``(t, weight)``, each ``(batch_size,)`` float32 on ``device``.

    Stateful samplers override :meth:`update`, :meth:`state_dict` and :meth:`load_state_dict`; the training
    loop feeds :meth:`update` the per-example losses of every rank, so all ranks hold the same state.
    """

    name: str

    @abstractmethod
    def sample(
        self, batch_size: int, schedule: NoiseSchedule, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``t ∈ (0, 1]`` and the importance weight ``p_ref(t)/p(t)``."""

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses ``(B,)`` (before importance weighting) at times ``t`` ``(B,)``; no-op here."""
        del t, losses

    def state_dict(self) -> StateDict:
        """Everything needed to resume sampling exactly; empty for a stateless sampler."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore :meth:`state_dict`'s output; a stateless sampler ignores it."""
        del state


def _draw_bins(probs: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Bin of each uniform ``u ∈ [0, 1)`` under the ``(K,)`` bin probabilities ``probs``, and its weight.

    Returns ``idx`` (long, shape of ``u``), found by searching ``u`` in the cumulative masses (inverse CDF), and
    ``weight = (1/K) / probs[idx]`` (float32, shape of ``u``): uniform bins over the proposal ``probs``.
    """
    K = probs.shape[0]
    idx = torch.searchsorted(probs.cumsum(0), u, right=True).clamp(max=K - 1)
    return idx, ((1.0 / K) / probs[idx]).float()


# Ho et al. 2020 Alg. 1: t ~ Uniform({1, ..., T}); the continuous analogue t ~ U(t_min, 1].
class UniformTimeSampler(TimeSampler):
    """Uniform times; integer timesteps ``i/T`` for a discrete schedule. Weight is 1."""

    name = "uniform"

    @enforce_domains
    def __init__(self, t_min: Annotated[float, UNIT_OPEN] = 1e-5) -> None:
        self.t_min = t_min

    def sample(
        self, batch_size: int, schedule: NoiseSchedule, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        T = schedule.num_timesteps
        if T is not None:
            idx = torch.randint(1, T + 1, (batch_size,), device=device, generator=generator)
            t = idx.float() / T
        else:
            u = torch.rand(batch_size, device=device, generator=generator)
            t = self.t_min + (1.0 - self.t_min) * u
        return t, torch.ones_like(t)
