"""Couplings of data and source within a batch, applied before the path ``x_t = α_t x0 + σ_t ε`` is sampled.

``independent``: the pairs as drawn (the product coupling of diffusion and plain flow matching).
``ot``: minibatch optimal transport (Tong et al. 2024, "Improving and Generalizing Flow-Based Generative Models
with Minibatch Optimal Transport", §3.2; Pooladian et al. 2023): within a plan of ``n`` data points and ``n``
source draws, the pairing that minimises ``Σ_j ‖x0_j − ε_π(j)‖²``, an exact assignment problem solved by
:func:`diffusion_lab.assignment.optimal_permutation` (the uniform-weight OT plan between two n-point sets is a
permutation, Birkhoff); or, with ``solver=sinkhorn``, the entropic plan (Cuturi 2013) on the cost scaled to a
maximum of 1, from which ``n`` pairs are drawn with replacement (Tong et al.'s torchcfm does the same). Flow-matching
texts write the pair ``(x0, x1)`` = (source, data): our ``(ε, x0)``.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from ot.bregman import sinkhorn_knopp
from torch import Tensor

from diffusion_lab.assignment import optimal_permutation
from diffusion_lab.schema.choices import OTSolver, values
from diffusion_lab.schema.domains import FINITE_POSITIVE, POSITIVE_INT

OT_SOLVERS = values(OTSolver)
SINKHORN_ITERATIONS = 10_000  # Sinkhorn–Knopp iterations at most; a plan whose marginals are still off is refused
SINKHORN_TOLERANCE = 1e-6  # largest column-marginal error accepted, relative to 1/n

Batch = tuple[Tensor, Tensor, Tensor | None]


class IndependentCoupling:
    """The pairs as drawn: ``(x0, ε, y)`` unchanged."""

    name = "independent"

    def __call__(self, x0: Tensor, eps: Tensor, y: Tensor | None, stream: bool = False) -> Batch:
        """Return the batch unchanged (``stream`` is ignored)."""
        return x0, eps, y


def squared_distances(x0: Tensor, eps: Tensor) -> Tensor:
    """``C_jk = ‖x0_j − ε_k‖²`` in float64: ``(n, ...), (n, ...) -> (n, n)`` (exact differences, no Gram trick)."""
    a, b = x0.detach().flatten(1).double(), eps.detach().flatten(1).double()
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()


def ot_assignment(x0: Tensor, eps: Tensor) -> Tensor:
    """The optimal permutation ``π`` (``(n,)`` long): ``ε_π(j)`` goes with ``x0_j`` and ``Σ_j C_jπ(j)`` is minimal."""
    return torch.from_numpy(optimal_permutation(squared_distances(x0, eps).cpu().numpy())).to(eps.device)


def entropic_plan(x0: Tensor, eps: Tensor, reg: float) -> Tensor:
    """The entropic OT plan ``(n, n)`` float64 between the uniform measures on ``x0`` and ``ε`` (Cuturi 2013):
    ``argmin_P ⟨P, C⟩ − reg·H(P)`` with ``C`` the squared distances divided by their maximum, by POT's
    Sinkhorn–Knopp iterations. Rows and columns each sum to ``1/n``; below ``reg`` ≈ 0.002 the kernel
    ``exp(−C/reg)`` underflows and the marginal check refuses the plan.

    Raises:
        RuntimeError: the iterations ended with a column marginal off by more than ``SINKHORN_TOLERANCE / n``.
    """
    cost = squared_distances(x0, eps).cpu().numpy()
    cost = cost / max(float(cost.max()), np.finfo(np.float64).tiny)
    n = cost.shape[0]
    weights = np.full(n, 1.0 / n)
    plan = sinkhorn_knopp(weights, weights, cost, reg, numItermax=SINKHORN_ITERATIONS, stopThr=1e-9, warn=False)
    error = float(np.abs(plan.sum(axis=0) - 1.0 / n).max()) * n
    if not error <= SINKHORN_TOLERANCE:
        raise RuntimeError(
            f"coupling.solver=sinkhorn with coupling.reg={reg} did not converge on {n} pairs in {SINKHORN_ITERATIONS} "
            f"iterations (marginal error {error:.2e} relative to 1/n); raise coupling.reg or use coupling.solver=exact"
        )
    return torch.from_numpy(plan)


# Tong et al. 2024, Alg. 1 with the exact OT plan (their OT-CFM); C2OT (Cheng & Schwing 2025) plans over 1,024 pairs
# and trains on them in four steps of 256 (plan_size = 4 × batch).
class OTCoupling:
    """Pair each data point with a source draw by the exact squared-L2 assignment of a plan of ``plan_size`` pairs.

    ``plan_size=None``: the plan is the training batch. ``plan_size = k·B`` (B the batch): in training (``stream``)
    every batch's ``(x0, ε, y)`` is kept; once ``k`` batches are kept they are planned together and served as
    ``k`` batches of ``B`` plan pairs, one per step (each step trains on the plan of the ``k`` batches before it,
    C2OT's protocol up to that lag). The first ``k − 1`` steps, before a plan is complete, plan within their batch.
    Outside training (validation) every batch is planned on its own. The kept pairs are not checkpointed: a resumed
    run starts planning again.
    """

    name = "ot"

    def __init__(
        self,
        plan_size: Annotated[int | None, POSITIVE_INT.or_null("the training batch")] = None,
        solver: OTSolver | str = OTSolver.exact,
        reg: Annotated[float, FINITE_POSITIVE] = 0.05,
    ) -> None:
        solver = getattr(solver, "value", solver)  # a config enum member -> its name
        if solver not in OT_SOLVERS:
            raise ValueError(f"unknown coupling.solver {solver!r}; valid choices: {list(OT_SOLVERS)}")
        self.plan_size, self.solver, self.reg = plan_size, solver, float(reg)
        self._kept: list[Batch] = []
        self._ready: list[Batch] = []

    def pair(self, x0: Tensor, eps: Tensor, y: Tensor | None) -> Batch:
        """``exact``: the batch with ``ε`` reordered by :func:`ot_assignment` (``x0`` and ``y`` keep their order).
        ``sinkhorn``: ``n`` index pairs ``(i, j)`` drawn with replacement from :func:`entropic_plan` (the global
        torch RNG, which a resumed run restores), returned as ``(x0_i, ε_j, y_i)``."""
        if self.solver == OTSolver.exact.value:
            return x0, eps[ot_assignment(x0, eps)], y
        n = x0.shape[0]
        flat = torch.multinomial(entropic_plan(x0, eps, self.reg).flatten(), n, replacement=True)
        rows, cols = (flat // n).to(x0.device), (flat % n).to(x0.device)
        return x0[rows], eps[cols], None if y is None else y[rows]

    def __call__(self, x0: Tensor, eps: Tensor, y: Tensor | None, stream: bool = False) -> Batch:
        """The coupled batch ``(x0 (B, ...), ε (B, ...), y (B,) | None)``; ``stream``: a training step."""
        batch = x0.shape[0]
        if not stream or self.plan_size is None or self.plan_size == batch:
            return self.pair(x0, eps, y)
        if self.plan_size % batch:
            raise ValueError(f"coupling.plan_size={self.plan_size} must be a multiple of the batch size {batch}")
        self._kept.append((x0, eps, y))
        if not self._ready:
            if len(self._kept) * batch < self.plan_size:
                return self.pair(x0, eps, y)  # warm-up: no complete plan yet
            self._ready = _split(self.pair(*_concat(self._kept)), batch)
            self._kept = []
        return self._ready.pop(0)


def _concat(batches: list[Batch]) -> Batch:
    ys = [b[2] for b in batches]
    y = None if any(v is None for v in ys) else torch.cat([v for v in ys if v is not None])
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), y


def _split(plan: Batch, size: int) -> list[Batch]:
    x0, eps, y = plan
    return [
        (x0[i : i + size], eps[i : i + size], None if y is None else y[i : i + size])
        for i in range(0, x0.shape[0], size)
    ]
