"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) from k-NN balls.

Every real feature vector ``r_i`` carries a ball of radius ``ρ_k(r_i)``, the distance to its k-th nearest *other*
real point (the point itself is never its own neighbour), and so does every fake one. With ``N`` real and ``M`` fake
points and ``1[·]`` the indicator:

- precision = ``(1/M) Σ_j 1[∃ i: ‖f_j − r_i‖ < ρ_k(r_i)]`` — fakes inside the real manifold (2019 eq. 1–2);
- recall = ``(1/N) Σ_i 1[∃ j: ‖r_i − f_j‖ < ρ_k(f_j)]`` — reals inside the fake manifold;
- density = ``(1/(kM)) Σ_j Σ_i 1[‖f_j − r_i‖ < ρ_k(r_i)]`` — how many real balls hold each fake (2020 eq. 3;
  1 in expectation when fakes and reals share a distribution, unbounded above);
- coverage = ``(1/N) Σ_i 1[min_j ‖r_i − f_j‖ < ρ_k(r_i)]`` — real balls that hold a fake (2020 eq. 4).

Distances are Euclidean in float64, computed in row blocks (memory ``O(block · max(N, M))``). The comparisons are
strict, as in the reference implementation (clovaai/generative-evaluation-prdc). One k serves all four scores:
:data:`DEFAULT_K` = 3, Kynkäänniemi et al.'s choice (Naeem et al. suggest k = 5 for density and coverage; the metrics
options take ``prdc_k``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_K", "PRDC", "PRDC_KEYS", "knn_radii", "prdc", "prdc_protocol", "prdc_scores"]

DEFAULT_K = 3
PRDC_KEYS = ("precision", "recall", "density", "coverage")
_BLOCK = 1024


@dataclass(frozen=True)
class PRDC:
    """The four scores; precision, recall and coverage in ``[0, 1]``, density in ``[0, N/k]``."""

    precision: float
    recall: float
    density: float
    coverage: float

    def as_dict(self) -> dict[str, float]:
        """``{"precision", "recall", "density", "coverage"}``."""
        return asdict(self)


def _check(name: str, x: Tensor, k: int) -> None:
    """``x`` must be a finite ``(N, D)`` set with more than ``k`` points; ValueError naming ``name`` otherwise."""
    if x.ndim != 2:
        raise ValueError(f"{name} features must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] <= k:
        raise ValueError(f"{name}: {x.shape[0]} points, but a k-NN radius with k={k} needs at least {k + 1}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf")


def knn_radii(features: Tensor, k: int = DEFAULT_K, block: int = _BLOCK) -> Tensor:
    """Distance from each point to its k-th nearest other point: ``(N, D) -> (N,)`` float64.

    The point itself is excluded by index (its own distance is set to ``inf``), so a duplicate of a point counts as
    a neighbour at distance 0, and ``ρ_k`` never collapses to the zero self-distance.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check("knn_radii", features, k)
    x = features.detach().to(torch.float64)
    out = []
    for start in range(0, x.shape[0], block):
        d = torch.cdist(x[start : start + block], x)  # (b, N)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = float("inf")  # the point is not its own neighbour
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def prdc(real: Tensor, fake: Tensor, k: int = DEFAULT_K, block: int = _BLOCK) -> PRDC:
    """Precision, recall, density and coverage of ``fake (M, D)`` against ``real (N, D)`` (module docstring).

    Raises:
        ValueError: a set that is not ``(·, D)`` with the same ``D``, has at most ``k`` points, or is not finite.
    """
    _check("real", real, k)
    _check("fake", fake, k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    r, f = real.detach().to(torch.float64), fake.detach().to(torch.float64)
    rho_real, rho_fake = knn_radii(r, k, block), knn_radii(f, k, block)
    balls_holding = torch.zeros(f.shape[0], dtype=torch.float64)  # per fake: real balls it lies in
    recalled = torch.zeros(r.shape[0], dtype=torch.bool)
    covered = torch.zeros(r.shape[0], dtype=torch.bool)
    for start in range(0, r.shape[0], block):
        d = torch.cdist(r[start : start + block], f)  # (b, M): real i of the block to every fake j
        inside = d < rho_real[start : start + block, None]
        balls_holding += inside.sum(dim=0)
        covered[start : start + block] = inside.any(dim=1)  # the nearest fake is inside the real ball
        recalled[start : start + block] = (d < rho_fake[None, :]).any(dim=1)
    return PRDC(
        precision=float((balls_holding > 0).double().mean()),
        recall=float(recalled.double().mean()),
        density=float(balls_holding.mean() / k),
        coverage=float(covered.double().mean()),
    )


def prdc_protocol(features: str, k: int, num_real: int, num_fake: int) -> dict[str, Any]:
    """What a reported precision / recall / density / coverage means: feature space, k, both set sizes."""
    return {
        "scores": list(PRDC_KEYS),
        "definition": "precision, recall: Kynkäänniemi et al. 2019; density, coverage: Naeem et al. 2020",
        "features": features,
        "distance": "euclidean (float64)",
        "k": k,
        "real_examples": num_real,
        "fake_examples": num_fake,
    }


def prdc_scores(real: Tensor, fake: Tensor, k: int, features: str) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`prdc` of ``fake (M, D)`` vs ``real (N, D)`` as ``({precision, recall, density, coverage}, protocol)``,
    the protocol naming the feature space ``features``."""
    return prdc(real, fake, k).as_dict(), prdc_protocol(features, k, real.shape[0], fake.shape[0])
