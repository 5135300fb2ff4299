"""Sampler base: every sampler runs ``sample(denoiser, x_T, ...) -> SampleOutput`` on a time grid.

The time grid is data (k-diffusion style), built by a registered grid builder (:mod:`diffusion_lab.samplers.grids`)
and handed to the sampler, which sees the model only through the denoiser contract ``D(x_t, t, y) -> x̂0``
(:class:`CountingDenoiser`) and the schedule's ``(α_t, σ_t)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Annotated

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.priors import SourceDistribution
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.samplers.grids import (
    F64,
    TUNED_GRID,
    TUNED_GRID_HELP,
    GridOptions,
    check_grid,
    schedule_alpha_sigma,
    time_grid,
)
from diffusion_lab.schema.choices import Grid
from diffusion_lab.schema.domains import POSITIVE, POSITIVE_INT
from diffusion_lab.schema.signature import enforce_domains
from diffusion_lab.schema.sources import ODE_SAMPLERS


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
# (α_s, σ_s, α_r, σ_r) of one step s → r, float64 scalars.
Coefs = tuple[Tensor, Tensor, Tensor, Tensor]


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

    @property
    def schedule(self) -> NoiseSchedule:
        """The denoiser's schedule."""
        return self.denoiser.schedule

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

    def x0_eps(self, x_t: Tensor, t: float, alpha: float, sigma: float, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x̂0, ε̂)`` at ``x_t = α x̂0 + σ ε̂``, ``ε̂`` from the (clipped) x̂0; needs ``σ > 0``. One evaluation."""
        x0_hat = self(x_t, t, y)
        return x0_hat, (x_t - alpha * x0_hat) / sigma


class Sampler:
    """A reverse-process solver: ``steps`` intervals of the ``grid`` spacing (see the module doc).

    ``clip_x0``: clamp x̂0 to ``[−c, c]`` before each update (Ho et al. clip images to [−1, 1]);
    ``None`` for unbounded data. ``rho``, ``sigma_min``, ``sigma_max``: options of the σ-grids
    (:class:`GridOptions`); ``None`` keeps the grid's default, and setting one the grid does not take raises.

    Subclasses implement :meth:`step` (one update per grid interval), or override :meth:`solve` when one
    interval needs several evaluations or the grid is not stepped through one interval at a time.
    """

    name: str

    # The grid options are declared here once; a subclass takes them through ``**options``.
    @enforce_domains
    def __init__(
        self,
        steps: Annotated[int, POSITIVE_INT] = 50,
        grid: Grid | str = Grid.uniform,
        clip_x0: Annotated[float | None, POSITIVE.or_null("no clipping")] = None,
        rho: float | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        grid = str(getattr(grid, "value", grid))  # a config enum member -> its name
        self.grid_options = GridOptions(rho, sigma_min, sigma_max)
        check_grid(grid, self.grid_options)
        self.steps, self.grid, self.clip_x0 = steps, grid, clip_x0
        self.tuned_grid: Tensor | None = None  # grid="tuned": the fitted grid, and the file it came from
        self.tuned_grid_file: str | None = None

    def time_grid(self, schedule: NoiseSchedule) -> Tensor:
        """The ``(steps+1,)`` float64 grid this sampler uses by default (``tuned``: the attached one)."""
        if self.grid == TUNED_GRID:
            if self.tuned_grid is None:
                raise ValueError(TUNED_GRID_HELP)
            return self.tuned_grid.clone()
        return time_grid(self.grid, self.steps, schedule, **asdict(self.grid_options))

    def use_tuned_grid(self, grid: Tensor, source: str) -> None:
        """Attach a fitted ``(steps+1,)`` grid (strictly decreasing in ``[0, 1]``, ending at 0) read from ``source``."""
        grid = grid.to(F64).cpu()
        if self.grid != TUNED_GRID:
            raise ValueError(f"a tuned grid is attached only to a sampler with grid={TUNED_GRID!r}, not {self.grid!r}")
        if grid.shape != (self.steps + 1,) or not bool((grid[1:] < grid[:-1]).all()) or grid[-1] != 0 or grid[0] > 1:
            raise ValueError(f"{source}: not a strictly decreasing {self.steps}-step grid in [0, 1] ending at 0")
        self.tuned_grid, self.tuned_grid_file = grid, source

    def prior(
        self,
        shape: tuple[int, ...],
        schedule: NoiseSchedule,
        generator: Generator = None,
        device: torch.device | str = "cpu",
        source: SourceDistribution | None = None,
    ) -> Tensor:
        """``x_{t_0} ∼ N(0, σ_{t_0}² I)`` at the first point of this sampler's grid, ``shape`` with the batch dim.

        ``source``: the model's prior; a non-Gaussian one (a flow from another distribution) is drawn as
        ``x_{t_0} = σ_{t_0}·ε``, which needs ``α_{t_0} = 0`` (rectified flow at ``t = 1``).

        ``t_0 = 1`` (``x_1 ∼ N(0, σ_1² I)``, α_1 ≈ 0) for every grid but ``leading`` and σ-grids whose
        ``sigma_max`` is below the schedule's ``σ_e(1)``; there ``α_{t_0} x0`` is neglected, as EDM does.
        """
        t_0 = self.time_grid(schedule)[:1]
        alpha_0, sigma_0 = (v.item() for v in schedule_alpha_sigma(schedule, t_0))
        if source is None or source.gaussian:
            return sigma_0 * randn(shape, generator, device)
        if type(self).__name__ not in ODE_SAMPLERS or getattr(self, "s_churn", 0.0) > 0:
            raise ValueError(
                f"sampler={self.name} injects Gaussian noise, which assumes ε ~ N(0, I), but the model's prior is not "
                f"Gaussian; valid: sampler=euler|heun (s_churn=0) or sampler=rk45"
            )
        if alpha_0 != 0:  # x_{t_0} = α x0 + σ ε is a pure source draw only where α = 0
            raise ValueError(
                f"a non-Gaussian prior needs the sampler's grid to start where α = 0 (schedule=rectified_flow, t = 1); "
                f"sampler={self.name} starts at t={t_0.item():g} with α={alpha_0:.3g}"
            )
        return sigma_0 * draw_source(source, shape, generator, device)

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
        """Integrate from ``x_T`` (at ``t_grid[0]``) to ``t_grid[-1]``; returns samples and the true NFE."""
        grid = (self.time_grid(denoiser.schedule) if t_grid is None else t_grid).double().cpu()
        if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("t_grid must be a strictly decreasing 1-D tensor with at least 2 points")
        model = CountingDenoiser(denoiser, self.clip_x0)
        x = self.solve(model, x_T.float(), grid, y, generator, progress)
        return SampleOutput(x0=x, nfe=model.nfe)

    def intervals(self, grid: Tensor, progress: bool) -> Iterable[int]:
        """Indices ``i`` of the grid intervals ``[t_{i+1}, t_i]``, with a progress bar if asked."""
        return tqdm(range(grid.numel() - 1), disable=not progress, desc=self.name, leave=False)

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        """Carry ``x`` from ``grid[0]`` to ``grid[-1]`` (float64 CPU grid); the default takes one :meth:`step` per
        interval."""
        alpha, sigma = schedule_alpha_sigma(model.schedule, grid)
        for i in self.intervals(grid, progress):
            coefs = (alpha[i], sigma[i], alpha[i + 1], sigma[i + 1])
            x = self.step(model, x, float(grid[i]), coefs, y, generator)
        return x

    def step(
        self, model: CountingDenoiser, x: Tensor, t: float, coefs: Coefs, y: Tensor | None, generator: Generator
    ) -> Tensor:
        """One update ``x_s → x_r`` given float64 ``(α_s, σ_s, α_r, σ_r)``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither step() nor solve()")


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


def draw_source(
    source: SourceDistribution, shape: tuple[int, ...], generator: Generator, device: torch.device | str
) -> Tensor:
    """``shape`` draws from ``source``; with per-example generators example ``i`` comes from generator ``i`` alone."""
    if isinstance(generator, IndexedGenerator):
        rows = [source.sample((1, *shape[1:]), g, device) for g in generator.generators]
        if len(rows) != shape[0]:
            raise ValueError(f"batch of {shape[0]} does not match {len(rows)} per-example seeds")
        return torch.cat(rows)
    return source.sample(shape, generator, device)


def noise_like(x: Tensor, generator: Generator) -> Tensor:
    """Standard normal noise with the shape, device and dtype of ``x``."""
    return randn(tuple(x.shape), generator, x.device, x.dtype)
