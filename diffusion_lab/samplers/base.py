"""Sampler base: every sampler runs ``sample(denoiser, x_T, ...) -> SampleOutput`` on a time grid.

The time grid is data (k-diffusion style): a decreasing ``(N+1,)`` tensor from ``t = 1`` to ``t = 0``
built by a :class:`TimeGrid` and handed to the sampler, which sees the model only through the
denoiser contract ``D(x_t, t, y) -> x̂0`` and the schedule's ``(α_t, σ_t)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.schedules import NoiseSchedule


class IndexedGenerator:
    """One ``torch.Generator`` per example (EDM's ``StackedRandomGenerator``).

    Noise for example ``i`` depends only on its own seed, so a set of N samples is identical whatever
    the batch size or the number of ranks it is split over.
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
        """``(len(seeds), *shape[1:])`` standard normal noise; ``shape[0]`` must equal the seed count."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} does not match {len(self.generators)} per-example seeds")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in self.generators])


Generator = torch.Generator | IndexedGenerator | None


def randn(
    shape: tuple[int, ...],
    generator: Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise from a plain generator, per-example generators, or the global RNG."""
    if isinstance(generator, IndexedGenerator):
        return generator.randn(shape, device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


GridFn = Callable[[int, NoiseSchedule], Tensor]
TIME_GRIDS: dict[str, GridFn] = {}


def register_grid(name: str) -> Callable[[GridFn], GridFn]:
    """Decorator adding a time-grid builder ``(steps, schedule) -> (steps+1,) float64`` to the registry."""

    def wrap(fn: GridFn) -> GridFn:
        TIME_GRIDS[name] = fn
        return fn

    return wrap


@register_grid("uniform")
def uniform_grid(steps: int, schedule: NoiseSchedule) -> Tensor:
    """Uniform in ``t`` from 1 to 0; a discrete schedule snaps to integer steps (evenly respaced)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    T = schedule.num_timesteps
    if T is not None:
        if steps > T:
            raise ValueError(f"sampler.steps={steps} exceeds the discrete schedule's T={T} timesteps")
        grid = torch.round(grid * T) / T
    return grid


def time_grid(name: str, steps: int, schedule: NoiseSchedule) -> Tensor:
    """Build the named grid; an unknown name raises with the valid choices."""
    if name not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {name!r}; valid choices: {sorted(TIME_GRIDS)}")
    if steps < 1:
        raise ValueError(f"sampler.steps must be a positive integer, got {steps}")
    return TIME_GRIDS[name](steps, schedule)


@dataclass(frozen=True)
class SampleOutput:
    """``x0``: samples ``(B, ...)``; ``nfe``: number of denoiser evaluations (per sample batch)."""

    x0: Tensor
    nfe: int


class CountingDenoiser:
    """Calls the denoiser with a per-batch ``t`` and counts network function evaluations."""

    def __init__(self, denoiser: Denoiser, clip_x0: float | None) -> None:
        self.denoiser = denoiser
        self.clip_x0 = clip_x0
        self.nfe = 0

    def __call__(self, x_t: Tensor, t: float, y: Tensor | None) -> Tensor:
        return self.with_variance(x_t, t, y)[0]

    def with_variance(self, x_t: Tensor, t: float, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(x̂0, v)``: the (clipped) prediction and the learned variance interpolation, None if not learned."""
        self.nfe += 1
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.float32)
        x0_hat, v = self.denoiser.predict_with_variance(x_t, t_batch, y)
        if self.clip_x0 is not None:
            x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
        return x0_hat, v


class Sampler(ABC):
    """A reverse-process solver. ``steps`` grid intervals on the ``grid`` spacing.

    ``clip_x0``: clamp x̂0 to ``[−c, c]`` before each update (Ho et al. clip images to [−1, 1]);
    ``None`` for unbounded data.
    """

    name: str

    def __init__(self, steps: int = 50, grid: str = "uniform", clip_x0: float | None = None) -> None:
        if steps < 1:
            raise ValueError(f"sampler.steps must be a positive integer, got {steps}")
        if grid not in TIME_GRIDS:
            raise ValueError(f"unknown sampler.grid {grid!r}; valid choices: {sorted(TIME_GRIDS)}")
        self.steps, self.grid, self.clip_x0 = steps, grid, clip_x0

    def time_grid(self, schedule: NoiseSchedule) -> Tensor:
        """The ``(steps+1,)`` float64 grid this sampler uses by default."""
        return time_grid(self.grid, self.steps, schedule)

    @staticmethod
    def prior(
        shape: tuple[int, ...],
        schedule: NoiseSchedule,
        generator: Generator = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``x_1 ∼ N(0, σ_1² I)`` (α_1 ≈ 0), ``shape`` including the batch dimension."""
        sigma_1 = schedule.alpha_sigma(torch.ones((), dtype=torch.float64))[1].item()
        return sigma_1 * randn(shape, generator, device)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        y: Tensor | None = None,
        t_grid: Tensor | None = None,
        generator: Generator = None,
        progress: bool = False,
    ) -> SampleOutput:
        """Integrate from ``x_T`` (at ``t_grid[0]``) to ``t_grid[-1]``; returns samples and NFE."""
        grid = (self.time_grid(denoiser.schedule) if t_grid is None else t_grid).double().cpu()
        if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("t_grid must be a strictly decreasing 1-D tensor with at least 2 points")
        alpha, sigma = denoiser.schedule.alpha_sigma(grid)
        model = CountingDenoiser(denoiser, self.clip_x0)
        x = x_T.float()
        for i in tqdm(range(grid.numel() - 1), disable=not progress, desc=self.name, leave=False):
            coefs = (alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
            x = self.step(model, x, float(grid[i]), coefs, y, generator)
        return SampleOutput(x0=x, nfe=model.nfe)

    @abstractmethod
    def step(
        self,
        model: CountingDenoiser,
        x: Tensor,
        t: float,
        coefs: tuple[Tensor, Tensor, Tensor, Tensor],
        y: Tensor | None,
        generator: Generator,
    ) -> Tensor:
        """One update ``x_s → x_r`` given float64 ``(α_s, σ_s, α_r, σ_r)``."""


def transition_variance(alpha_s: Tensor, sigma_s: Tensor, alpha_r: Tensor, sigma_r: Tensor) -> Tensor:
    """``σ²_{s|r} = σ_s² − (α_s/α_r)² σ_r²``, the variance of ``q(x_s | x_r)`` (the step's β), float64."""
    return sigma_s**2 - (alpha_s / alpha_r) ** 2 * sigma_r**2


def posterior_coefficients(
    alpha_s: Tensor, sigma_s: Tensor, alpha_r: Tensor, sigma_r: Tensor
) -> tuple[float, float, float]:
    """``q(x_r | x_s, x0) = N(a·x_s + b·x0, var)`` for ``r < s`` (Kingma et al. 2021, eq. 29–30).

    ``α_{s|r} = α_s/α_r``, ``σ²_{s|r} = σ_s² − α_{s|r}² σ_r²``; ``a = α_{s|r} σ_r²/σ_s²``,
    ``b = α_r σ²_{s|r}/σ_s²``, ``var = σ²_{s|r} σ_r²/σ_s²``. Computed in float64.
    """
    alpha_sr = alpha_s / alpha_r
    sigma2_sr = transition_variance(alpha_s, sigma_s, alpha_r, sigma_r)
    a = alpha_sr * sigma_r**2 / sigma_s**2
    b = alpha_r * sigma2_sr / sigma_s**2
    var = sigma2_sr * sigma_r**2 / sigma_s**2
    return float(a), float(b), float(var.clamp(min=0.0))


def noise_like(x: Tensor, generator: Generator) -> Tensor:
    """Standard normal noise with the shape, device and dtype of ``x``."""
    return randn(tuple(x.shape), generator, x.device, x.dtype)
