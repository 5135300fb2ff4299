"""Loss-aware importance sampling of training times (Nichol & Dhariwal 2021): per-bin loss histories.

:class:`ImportanceTimeSampler` keeps a ring buffer of recent losses per bin (the integer steps of a discrete
schedule, else equal bins of ``(t_min, 1]``), draws bins in proportion to ``sqrt(E[L²])`` and checkpoints the
buffers through :meth:`ImportanceTimeSampler.state_dict`.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.diffusion.time_samplers.base import StateDict, TimeSampler, _draw_bins
from diffusion_lab.schema.domains import POSITIVE_INT, PROBABILITY, UNIT_OPEN
from diffusion_lab.schema.signature import enforce_domains


# Nichol & Dhariwal 2021 §3.3, eq. 18: p_t ∝ sqrt(E[L_t²]) over the last 10 losses of each t, 0.001 uniform mixed in.
class ImportanceTimeSampler(TimeSampler):
    """Loss-aware importance sampling over bins: the integer steps of a discrete schedule, else ``num_bins``
    equal bins of ``(t_min, 1]`` with ``t`` uniform inside its bin.

    Bins are drawn uniformly until every bin holds ``history`` losses, then with
    ``p = (1 − uniform_prob) · sqrt(E[L²]) / Σ sqrt(E[L²]) + uniform_prob / K``; ``weight = (1/K) / p(bin)``.
    The ring buffers of losses live in :meth:`state_dict` as tensors, so a resumed run draws the same times.

    Args:
        history: losses kept per bin.
        num_bins: bins of a continuous schedule (a discrete one uses its ``T`` steps).
        uniform_prob: probability mass of the uniform component.
        t_min: lower end of the continuous range.
    """

    name = "importance"

    @enforce_domains
    def __init__(
        self,
        history: Annotated[int, POSITIVE_INT] = 10,
        num_bins: Annotated[int, POSITIVE_INT] = 100,
        uniform_prob: Annotated[float, PROBABILITY] = 0.001,
        t_min: Annotated[float, UNIT_OPEN] = 1e-5,
    ) -> None:
        self.history, self.num_bins, self.uniform_prob, self.t_min = history, num_bins, uniform_prob, t_min
        self._discrete_T = 0  # T of a discrete schedule, 0 for continuous; fixed by the first schedule seen
        self._losses: Tensor | None = None  # (K, history) float32 ring buffers
        self._counts: Tensor | None = None  # (K,) int64, losses recorded per bin, capped at history
        self._positions: Tensor | None = None  # (K,) int64, next ring slot per bin

    def _allocate(self, schedule: NoiseSchedule, device: torch.device) -> None:
        """Create the buffers for ``schedule`` on first use; refuse a schedule with a different binning."""
        T = schedule.num_timesteps or 0
        K = T or self.num_bins
        if self._losses is not None and self._counts is not None and self._positions is not None:
            if (self._discrete_T, self._losses.shape[0]) != (T, K):
                raise ValueError(f"importance sampler state has {self._losses.shape[0]} bins, schedule needs {K}")
            self._losses, self._counts = self._losses.to(device), self._counts.to(device)
            self._positions = self._positions.to(device)
            return
        self._discrete_T = T
        self._losses = torch.zeros(K, self.history, device=device)
        self._counts = torch.zeros(K, dtype=torch.long, device=device)
        self._positions = torch.zeros(K, dtype=torch.long, device=device)

    @property
    def is_warm(self) -> bool:
        """Whether every bin holds a full history (before that, bins are drawn uniformly)."""
        return self._counts is not None and bool((self._counts == self.history).all())

    def probabilities(self) -> Tensor:
        """``(K,)`` float64 bin probabilities (uniform before warm-up); needs a schedule seen first."""
        assert self._losses is not None, "sample() or load_state_dict() first"
        K = self._losses.shape[0]
        uniform = torch.full((K,), 1.0 / K, dtype=torch.float64, device=self._losses.device)
        if not self.is_warm:
            return uniform
        rms = self._losses.double().square().mean(1).sqrt()
        if not rms.sum() > 0:
            return uniform
        return (1.0 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob * uniform

    def sample(
        self, batch_size: int, schedule: NoiseSchedule, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        self._allocate(schedule, device)
        probs = self.probabilities().to(device)
        K = probs.shape[0]
        u = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
        idx, weight = _draw_bins(probs, u)
        if self._discrete_T:
            return (idx + 1).float() / K, weight
        v = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
        t = self.t_min + (1.0 - self.t_min) * (idx + v) / K
        return t.float().clamp(self.t_min, 1.0), weight

    def bin_index(self, t: Tensor) -> Tensor:
        """Bin of each time, long, shape of ``t``: ``round(t·T) − 1`` (discrete) or its equal-width bin."""
        assert self._losses is not None, "sample() or load_state_dict() first"
        K = self._losses.shape[0]
        if self._discrete_T:
            pos = torch.round(t.double() * K) - 1
        else:
            pos = torch.floor((t.double() - self.t_min) / (1.0 - self.t_min) * K)
        return pos.clamp(0, K - 1).long()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push per-example losses ``(B,)`` at times ``t`` ``(B,)`` into their bins' ring buffers.

        Several losses may share a bin: they fill consecutive slots in batch order (only the last ``history``
        of them survive, as if pushed one at a time). Non-finite losses are skipped.
        """
        if self._losses is None or self._counts is None or self._positions is None:
            raise RuntimeError("ImportanceTimeSampler.update() before any sample() or load_state_dict()")
        dev = self._losses.device
        t, losses = t.detach().flatten().to(dev), losses.detach().flatten().to(dev, torch.float32)
        keep = torch.isfinite(losses)
        bins, losses = self.bin_index(t[keep]), losses[keep]
        order = torch.argsort(bins, stable=True)
        bins, losses = bins[order], losses[order]
        per_bin = torch.bincount(bins, minlength=self._losses.shape[0])
        first = torch.cumsum(per_bin, 0) - per_bin
        rank = torch.arange(bins.numel(), device=dev) - first[bins]  # occurrence number within its bin
        last = rank >= per_bin[bins] - self.history  # older ones would be overwritten within this batch
        slots = (self._positions[bins] + rank) % self.history
        self._losses[bins[last], slots[last]] = losses[last]
        self._positions = (self._positions + per_bin) % self.history
        self._counts = (self._counts + per_bin).clamp(max=self.history)

    def state_dict(self) -> StateDict:
        """``losses (K, history)``, ``counts (K,)``, ``positions (K,)`` and ``discrete_T``; empty before first use."""
        if self._losses is None or self._counts is None or self._positions is None:
            return {}
        return {
            "losses": self._losses.clone(),
            "counts": self._counts.clone(),
            "positions": self._positions.clone(),
            "discrete_T": self._discrete_T,
        }

    def load_state_dict(self, state: StateDict) -> None:
        """Restore :meth:`state_dict`'s output (an empty dict resets the sampler)."""
        if not state:
            self._losses = self._counts = self._positions = None
            return
        losses, counts, positions = state["losses"], state["counts"], state["positions"]
        assert isinstance(losses, Tensor) and isinstance(counts, Tensor) and isinstance(positions, Tensor)
        if losses.shape[1] != self.history:
            raise ValueError(f"checkpoint history {losses.shape[1]} != time_sampler.history {self.history}")
        self._losses, self._counts = losses.clone().float(), counts.clone().long()
        self._positions, self._discrete_T = positions.clone().long(), int(state["discrete_T"])
