"""2-D toy distributions (swiss roll, two moons, 8 Gaussians, checkerboard) and their datamodule.

Shapes follow the FFJORD toy sets (Grathwohl et al. 2019, ``lib/toy_data.py``) rescaled by fixed
constants — never by data statistics, so the log-densities below stay exact — such that every
coordinate has standard deviation close to 1 and (almost) all mass lies in [-3, 3]^2. The exceptions are
:data:`PAPER_UNIT_SETS`, the flow-matching pair of Cheng & Schwing 2025 (8 Gaussians at radius 5 → torchdyn's
moons ·3 − 1), kept in that paper's units so its W2 numbers compare.

Adding a distribution = one sampling function ``(n, generator) -> (n, 2)`` plus one entry in
:data:`TOY_DISTRIBUTIONS` (with its exact ``log_prob`` when it has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset
from diffusion_lab.schema.domains import POSITIVE_INT

SampleFn = Callable[[int, torch.Generator], Tensor]
LogProbFn = Callable[[Tensor], Tensor]

PLOT_LIMIT = 3.0  # render() draws [-PLOT_LIMIT, PLOT_LIMIT]^2 for every toy set


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator)


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator)


# --- swiss roll -------------------------------------------------------------------------------
SWISS_ROLL_SCALE = 1 / 7.5
SWISS_ROLL_NOISE = 0.5


def sample_swiss_roll(n: int, generator: torch.Generator) -> Tensor:
    """Swiss roll: (n, 2). ``t ~ U[1.5π, 4.5π]``, point ``(t cos t, t sin t) + N(0, 0.5²)``, times 1/7.5.

    This is the (x, z) plane of ``sklearn.datasets.make_swiss_roll(noise=0.5)``; FFJORD divides
    by 5, we divide by 7.5 so the per-coordinate std is ≈ 0.9 and points lie in about [-1.7, 2.2].
    """
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, generator))
    roll = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (roll + SWISS_ROLL_NOISE * _normal((n, 2), generator)) * SWISS_ROLL_SCALE


# --- two moons --------------------------------------------------------------------------------
MOONS_SCALE = 1.5
MOONS_NOISE = 0.1


def sample_two_moons(n: int, generator: torch.Generator) -> Tensor:
    """Two moons: (n, 2), as ``sklearn.datasets.make_moons(noise=0.1)``, centred and times 1.5.

    Upper moon ``(cos θ, sin θ)``, lower moon ``(1 - cos θ, 0.5 - sin θ)``, θ ~ U[0, π], each point
    picked from either moon with probability 1/2, plus N(0, 0.1²) noise; then ``(p - (0.5, 0.25)) * 1.5``
    (std ≈ (1.3, 0.75), RMS over both coordinates ≈ 1.07; points within about [-2.8, 2.8] x [-1.8, 1.8]).
    """
    theta = math.pi * _uniform(n, generator)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    pick_lower = (_uniform(n, generator) < 0.5).unsqueeze(1)
    points = torch.where(pick_lower, lower, upper) + MOONS_NOISE * _normal((n, 2), generator)
    return (points - torch.tensor([0.5, 0.25])) * MOONS_SCALE


# --- 8 Gaussians ------------------------------------------------------------------------------
GAUSSIANS_RADIUS = math.sqrt(2.0)
GAUSSIANS_STD = GAUSSIANS_RADIUS / 8  # FFJORD's std/radius ratio (0.5 / 4)


def eight_gaussians_means() -> Tensor:
    """The 8 mixture means (8, 2): radius √2 at angles kπ/4, k = 0..7."""
    angles = torch.arange(8, dtype=torch.float32) * (math.pi / 4)
    return GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def sample_eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    """8 Gaussians: (n, 2), equal-weight mixture of N(μ_k, (√2/8)² I) with ``|μ_k| = √2``.

    FFJORD's set halved (their radius 4/√2 ≈ 2.83, std 0.354): per-coordinate variance is
    R²/2 + s² ≈ 1.03.
    """
    k = torch.randint(0, 8, (n,), generator=generator)
    return eight_gaussians_means()[k] + GAUSSIANS_STD * _normal((n, 2), generator)


def log_prob_eight_gaussians(x: Tensor) -> Tensor:
    """Exact log-density of :func:`sample_eight_gaussians`: (B, 2) -> (B,).

    ``log p(x) = logsumexp_k [ -log 8 - log(2π s²) - |x - μ_k|² / (2 s²) ]``.
    """
    means = eight_gaussians_means().to(x)
    sq_dist = (x.unsqueeze(1) - means).pow(2).sum(-1)  # (B, 8)
    log_norm = math.log(8) + math.log(2 * math.pi * GAUSSIANS_STD**2)
    return torch.logsumexp(-sq_dist / (2 * GAUSSIANS_STD**2), dim=1) - log_norm


# --- checkerboard -----------------------------------------------------------------------------
CHECKER_HALF_WIDTH = 2.0  # board is [-2, 2]^2, 4x4 unit cells, 8 filled -> area 8


def sample_checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """Checkerboard: (n, 2), uniform on the unit cells of [-2, 2]² with ``floor(x1) + floor(x2)`` even.

    FFJORD's construction without its final ×2: per-coordinate std = 4/√12 ≈ 1.15.
    """
    x1 = 4 * _uniform(n, generator) - 2
    row = 2 * torch.randint(0, 2, (n,), generator=generator) - 2 + torch.floor(x1).remainder(2)
    x2 = row + _uniform(n, generator)
    return torch.stack([x1, x2], dim=1)


def log_prob_checkerboard(x: Tensor) -> Tensor:
    """Exact log-density of :func:`sample_checkerboard`: (B, 2) -> (B,); −log 8 on the squares, −inf off."""
    inside = (x.abs() < CHECKER_HALF_WIDTH).all(dim=1)
    on_square = torch.floor(x).sum(dim=1).remainder(2) == 0
    log_density = torch.full(x.shape[:1], -math.log(8.0), dtype=x.dtype, device=x.device)
    return torch.where(inside & on_square, log_density, torch.full_like(log_density, -math.inf))


# --- the flow-matching toy pair (torchcfm / C2OT) ----------------------------------------------
# Cheng & Schwing 2025 (C2OT) Fig. 1 and torchcfm's notebooks: 8 Gaussians → moons, in the data's own units
# (not rescaled like the sets above: the published W2 numbers are in these units).
PAPER_UNIT_SETS = ("torchdyn_moons", "c2ot_eight_gaussians")
PAPER_PLOT_LIMIT = 7.0  # C2OT's plots: [-7, 7]²
MOONS_TORCHDYN_NOISE = 0.2
C2OT_SOURCE_RADIUS = 5.0
# Their MultivariateNormal(0, √var·I) with var = 0.1: the second argument is the covariance, so Cov = √0.1·I.
C2OT_SOURCE_COVARIANCE = math.sqrt(0.1)


def sample_torchdyn_moons(n: int, generator: torch.Generator) -> Tensor:
    """torchdyn's ``generate_moons(n, noise=0.2)``, times 3 minus 1, as C2OT's ``sample_moons``: (n, 2).

    Not sklearn's moons: the angles are *equispaced* (``linspace(0, π)``, ⌊n/2⌋ on the upper moon, the rest on the
    lower ``(1 − cos θ, 1 − sin θ − 0.5)``) and the noise is one ``U[0, 0.2)`` shift per point added to *both*
    coordinates (``np.random.rand(n, 1) * noise``). The set is returned in a random order (any prefix is a random
    subset; the set itself is the construction's).
    """
    n_out = n // 2
    theta_out = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    theta_in = torch.linspace(0, math.pi, n - n_out, dtype=torch.float64)
    upper = torch.stack([torch.cos(theta_out), torch.sin(theta_out)], dim=1)
    lower = torch.stack([1 - torch.cos(theta_in), 1 - torch.sin(theta_in) - 0.5], dim=1)
    shift = MOONS_TORCHDYN_NOISE * torch.rand(n, 1, generator=generator, dtype=torch.float64)  # one per point
    points = ((torch.cat([upper, lower]) + shift) * 3 - 1).float()
    return points[torch.randperm(n, generator=generator)]


def c2ot_source_means() -> Tensor:
    """The 8 means (8, 2) of C2OT's source, in their order: ±x, ±y, then the diagonals, radius 5."""
    d = 1 / math.sqrt(2)
    unit = [(1, 0), (-1, 0), (0, 1), (0, -1), (d, d), (d, -d), (-d, d), (-d, -d)]
    return C2OT_SOURCE_RADIUS * torch.tensor(unit, dtype=torch.float32)


def sample_c2ot_eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    """C2OT's (and torchcfm's) ``sample_8gaussians``: (n, 2), equal-weight mixture of ``N(μ_k, √0.1·I)``, |μ_k| = 5."""
    k = torch.multinomial(torch.ones(8), n, replacement=True, generator=generator)
    return c2ot_source_means()[k] + math.sqrt(C2OT_SOURCE_COVARIANCE) * _normal((n, 2), generator)


# --- registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyDistribution:
    """A 2-D distribution: ``sample(n, generator) -> (n, 2)`` and exact ``log_prob`` (or None)."""

    sample: SampleFn
    log_prob: LogProbFn | None = None


TOY_DISTRIBUTIONS: dict[str, ToyDistribution] = {
    "swiss_roll": ToyDistribution(sample_swiss_roll),
    "two_moons": ToyDistribution(sample_two_moons),
    "eight_gaussians": ToyDistribution(sample_eight_gaussians, log_prob_eight_gaussians),
    "checkerboard": ToyDistribution(sample_checkerboard, log_prob_checkerboard),
    "torchdyn_moons": ToyDistribution(sample_torchdyn_moons),
    "c2ot_eight_gaussians": ToyDistribution(sample_c2ot_eight_gaussians),
}


def get_toy_distribution(name: str) -> ToyDistribution:
    """Look up a registered toy distribution; unknown names raise ValueError listing the valid ones."""
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy dataset name={name!r}; valid names: {sorted(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name]


def render_points(samples: Tensor, reference: Tensor | None = None, limit: float = PLOT_LIMIT) -> np.ndarray:
    """Scatter plot of 2-D points on the fixed square [-limit, limit]².

    Args:
        samples: (B, 2) points, drawn in blue.
        reference: optional (M, 2) real data, drawn in light grey underneath.
        limit: half-width of the axes.

    Returns:
        (400, 400, 3) uint8 RGB image (matplotlib Agg, no pyplot global state).
    """
    fig = Figure(figsize=(4, 4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8", linewidths=0)
    pts = samples.detach().float().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", linewidths=0)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_xticks([])
    ax.set_yticks([])
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class Toy2DDataModule(DiffusionDataModule):
    """Points from a registered 2-D toy distribution; batches ``(x (B, 2) float32, y (B,) zeros)``.

    Train and val sets are drawn, in that order, from one ``torch.Generator`` seeded by ``seed``.

    Args:
        name: one of :data:`TOY_DISTRIBUTIONS` ("swiss_roll", "two_moons", "eight_gaussians",
            "checkerboard").
        num_train: training points.
        num_val: validation points.
        batch_size: points per batch.
        seed: data-generation and shuffling seed.
        num_workers: DataLoader workers (0 is best: batches are one indexing op).
    """

    def __init__(
        self,
        name: str = "swiss_roll",
        num_train: Annotated[int, POSITIVE_INT] = 100_000,
        num_val: Annotated[int, POSITIVE_INT] = 10_000,
        batch_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(2,), num_classes=None, modality="points",
        )  # fmt: skip
        self.distribution = get_toy_distribution(name)
        if num_train < batch_size or num_val < 1:
            raise ValueError(f"need num_train >= batch_size and num_val >= 1, got {num_train}, {num_val}")
        self.name, self.num_train, self.num_val = name, num_train, num_val
        self.save_hyperparameters()

    @property
    def log_prob(self) -> LogProbFn | None:
        """Exact log-density (B, 2) -> (B,) of the generating distribution, or None if unknown."""
        return self.distribution.log_prob

    def sample_reference(self, n: int, generator: torch.Generator) -> Tensor:
        """Fresh i.i.d. draws (n, 2) from the generating distribution (for metrics)."""
        return self.distribution.sample(n, generator)

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        train = self.distribution.sample(self.num_train, generator)
        val = self.distribution.sample(self.num_val, generator)
        zeros = torch.zeros  # toy points carry no class: labels are all 0
        return (
            TensorPairDataset(train, zeros(self.num_train, dtype=torch.long)),
            TensorPairDataset(val, zeros(self.num_val, dtype=torch.long)),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Scatter (B, 2) samples over 5,000 reference points (seed 0) -> (400, 400, 3) uint8 (on [-7, 7]² for the
        paper-unit sets, else [-3, 3]²)."""
        reference = self.sample_reference(5_000, torch.Generator().manual_seed(0))
        return render_points(samples, reference, PAPER_PLOT_LIMIT if self.name in PAPER_UNIT_SETS else PLOT_LIMIT)


class Toy2DPrior:
    """A registered toy distribution as the source (prior) of a flow: ``sample(shape (B, 2), generator, device)``.

    This project's flows run from the source at ``t = 1`` to data at ``t = 0`` (``x_t = (1 − t)·x0 + t·ε`` with ε
    drawn from here); flow-matching texts write the same path with their ``t`` = our ``1 − t``.

    Args:
        name: one of :data:`TOY_DISTRIBUTIONS` (``c2ot_eight_gaussians`` for Cheng & Schwing 2025, Fig. 1).
    """

    gaussian = False

    def __init__(self, name: str = "c2ot_eight_gaussians") -> None:
        self.distribution = get_toy_distribution(name)
        self.name = name

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """``shape`` must be ``(B, 2)``; drawn on the CPU (a CPU generator seeded off a device ``generator``)."""
        if tuple(shape[1:]) != (2,):
            raise ValueError(f"prior={self.name} draws 2-D points (B, 2); the data has shape {tuple(shape[1:])}")
        if generator is not None and generator.device.type != "cpu":
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator().manual_seed(seed)
        return self.distribution.sample(shape[0], generator).to(device)  # type: ignore[arg-type]
