"""β-schedules: a paper's ``T`` betas (DDPM linear, improved-DDPM cosine) on the continuous interface.

:class:`DiscreteBetaSchedule` holds the machinery (``ᾱ_i`` on the grid ``t_i = i/T``, ``log ᾱ`` interpolated
linearly in ``t`` between grid points, exact inverse, Lin et al.'s zero-terminal-SNR rescaling); a new
β-schedule implements :meth:`DiscreteBetaSchedule.make_betas`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.schedules.base import NoiseSchedule, _clamp01
from diffusion_lab.schema.domains import POSITIVE_INT
from diffusion_lab.schema.signature import enforce_domains


# Lin et al. 2024, Alg. 1: shift √ᾱ so that √ᾱ_T = 0, then scale so the first step keeps its √ᾱ_1.
def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """``(T,)`` betas ↦ ``(T,)`` betas with ``ᾱ_T = 0`` (``β_T = 1``) and ``β_1`` unchanged (float64).

    ``√ᾱ_i' = (√ᾱ_i − √ᾱ_T)·√ᾱ_1/(√ᾱ_1 − √ᾱ_T)`` for ``i = 1..T``, an affine map of ``√ᾱ``. Lin et al.'s
    ``√ᾱ_0`` is their first timestep, our ``i = 1`` (as in diffusers' ``rescale_zero_terminal_snr``);
    ``ᾱ = 1`` at ``t = 0`` is unchanged as well.
    """
    if betas.numel() < 2:
        raise ValueError("zero_terminal_snr needs num_timesteps >= 2")
    sqrt_ab = torch.exp(0.5 * torch.cumsum(torch.log1p(-betas), 0))
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    alpha_bar = ((sqrt_ab - last) * first / (first - last)).square()
    return 1.0 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


class DiscreteBetaSchedule(NoiseSchedule):
    """A β-schedule ``β_1..β_T`` with ``ᾱ_i = ∏_{j≤i} (1 − β_j)`` at ``t_i = i/T`` (``ᾱ_0 = 1``).

    Between grid points ``log ᾱ`` is interpolated linearly in ``t``, which keeps ``λ_t`` strictly
    decreasing and makes a continuous-time model (``discrete=False``) a faithful refinement.

    ``zero_terminal_snr=True`` rescales the betas (Lin et al. 2024, :func:`rescale_zero_terminal_snr`) so
    ``ᾱ_T = 0`` (``β_T = 1``, ``λ(1) = −∞``). ``log ᾱ_T = −∞`` cannot be interpolated linearly, so the last
    cell ``[(T−1)/T, 1]`` interpolates ``√ᾱ`` linearly down to 0 instead; every value and derivative stays
    finite except ``λ(1) = −∞`` (and ``dλ/dt`` there).
    """

    log_alpha_bar: Tensor  # (T + 1,), log ᾱ_i for i = 0..T; −∞ at T with zero_terminal_snr

    @enforce_domains
    def __init__(
        self, num_timesteps: Annotated[int, POSITIVE_INT] = 1000, discrete: bool = True, zero_terminal_snr: bool = False
    ) -> None:
        super().__init__()
        betas = self.make_betas(num_timesteps).double()
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        if betas.shape != (num_timesteps,) or not bool(self._valid_betas(betas, zero_terminal_snr).all()):
            raise ValueError("betas must be a (T,) tensor with every β in (0, 1) (β_T = 1 with zero_terminal_snr)")
        log_alpha_bar = torch.cat([betas.new_zeros(1), torch.cumsum(torch.log1p(-betas), 0)])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("log_alpha_bar", log_alpha_bar.float(), persistent=False)
        self.T = num_timesteps
        self.num_timesteps = num_timesteps if discrete else None
        self._zero_terminal = zero_terminal_snr

    @staticmethod
    def _valid_betas(betas: Tensor, zero_terminal_snr: bool) -> Tensor:
        """Per-β validity ``(T,)``: ``0 < β < 1``, except ``β_T = 1`` exactly under zero terminal SNR."""
        valid = (betas > 0) & (betas < 1)
        if zero_terminal_snr and betas.numel() > 0:
            valid[-1] = bool(betas[-1] == 1)
        return valid

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the betas were rescaled to ``ᾱ_T = 0`` (``λ(1) = −∞``)."""
        return self._zero_terminal

    @abstractmethod
    def make_betas(self, num_timesteps: int) -> Tensor:
        """The paper's ``(T,)`` betas, float64."""

    def _cell(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Grid cell ``i = ⌊tT⌋ ∈ {0..T−1}`` (long) and the position ``tT − i ∈ [0, 1]`` in it; shape of ``t``."""
        pos = _clamp01(t) * self.T
        lo = pos.floor().clamp(max=self.T - 1)
        return lo.long(), pos - lo

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        """``log ᾱ(t)`` by linear interpolation in ``t`` of the grid values (shape of ``t``).

        Under zero terminal SNR the ``−∞`` entry is replaced by ``log ᾱ_{T−1}`` (``torch.lerp`` with ``−∞``
        gives nan at weight 0); the last cell's value is then overridden from :meth:`_tail_alpha`.
        """
        lo, frac = self._cell(t)
        table = self.log_alpha_bar.to(t.dtype)
        if self._zero_terminal:
            table = torch.cat([table[:-1], table[-2:-1]])
        return torch.lerp(table[lo], table[lo + 1], frac)

    def _tail_alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Zero terminal SNR: (whether in the last cell, ``α = √ᾱ_{T−1}·(1 − frac)`` there), each shape of ``t``."""
        lo, frac = self._cell(t)
        sqrt_last = torch.exp(0.5 * self.log_alpha_bar[-2].to(t.dtype))
        return lo == self.T - 1, sqrt_last * (1.0 - frac)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``α = √ᾱ``, ``σ = √(1 − ᾱ)`` computed from ``log ᾱ`` without cancellation."""
        log_ab = self._log_alpha_bar(t)
        alpha, sigma = torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))
        if not self._zero_terminal:
            return alpha, sigma
        last, tail = self._tail_alpha(t)
        return torch.where(last, tail, alpha), torch.where(last, torch.sqrt((1.0 - tail) * (1.0 + tail)), sigma)

    def log_snr(self, t: Tensor) -> Tensor:
        """``λ = log ᾱ − log(1 − ᾱ)``; ``+∞`` at ``t = 0`` (and ``−∞`` at ``t = 1`` under zero terminal SNR)."""
        log_ab = self._log_alpha_bar(t)
        lam = log_ab - torch.log(-torch.expm1(log_ab))
        if not self._zero_terminal:
            return lam
        last, tail = self._tail_alpha(t)
        return torch.where(last, 2.0 * torch.log(tail) - torch.log1p(-tail.square()), lam)

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        """Exact inverse of the piecewise-linear ``log ᾱ(t)``: ``log ᾱ = log sigmoid(λ)``."""
        target = F.logsigmoid(log_snr)
        table = self.log_alpha_bar.to(log_snr.dtype)
        # table is decreasing; searchsorted needs increasing values, so search on −table.
        idx = torch.searchsorted(-table, -target.contiguous()).clamp(1, self.T - int(self._zero_terminal))
        hi, lo = table[idx], table[idx - 1]
        frac = (target - lo) / (hi - lo)
        t = ((idx - 1).to(log_snr.dtype) + frac.clamp(0, 1)) / self.T
        if not self._zero_terminal:
            return t
        # Last cell: √ᾱ = √ᾱ_{T−1}·(1 − frac), inverted in closed form.
        tail_frac = (1.0 - torch.exp(0.5 * (target - table[-2]))).clamp(0, 1)
        return torch.where(target < table[-2], (self.T - 1 + tail_frac) / self.T, t)


# Ho et al. 2020 §4: β linear from 1e-4 to 0.02 over T = 1000 steps.
class LinearSchedule(DiscreteBetaSchedule):
    """DDPM linear-β schedule, ``β_i = linspace(β_start, β_end, T)``; optionally zero terminal SNR."""

    def __init__(
        self,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        discrete: bool = True,
        zero_terminal_snr: bool = False,
    ) -> None:
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.beta_start, self.beta_end = beta_start, beta_end
        super().__init__(num_timesteps, discrete, zero_terminal_snr)

    def make_betas(self, num_timesteps: int) -> Tensor:
        """``(T,)`` linearly spaced betas."""
        return torch.linspace(self.beta_start, self.beta_end, num_timesteps, dtype=torch.float64)


# Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2), β clipped at 0.999.
class CosineSchedule(DiscreteBetaSchedule):
    """Improved-DDPM cosine schedule with offset ``s`` and ``β ≤ max_beta``; optionally zero terminal SNR."""

    def __init__(
        self,
        s: float = 0.008,
        max_beta: float = 0.999,
        num_timesteps: int = 1000,
        discrete: bool = True,
        zero_terminal_snr: bool = False,
    ) -> None:
        if s < 0 or not 0.0 < max_beta < 1.0:
            raise ValueError(f"cosine schedule needs s >= 0 and 0 < max_beta < 1, got {s}, {max_beta}")
        self.s, self.max_beta = s, max_beta
        super().__init__(num_timesteps, discrete, zero_terminal_snr)

    def make_betas(self, num_timesteps: int) -> Tensor:
        """``β_i = min(1 − ᾱ(i)/ᾱ(i−1), max_beta)``."""
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + self.s) / (1 + self.s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=self.max_beta)
