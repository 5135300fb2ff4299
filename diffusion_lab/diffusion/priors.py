"""Source distributions ("priors") of a flow: what ``ε`` in ``x_t = α_t x0 + σ_t ε`` is drawn from.

Diffusion models need ``ε ~ N(0, I)`` (their ELBO, score and every stochastic sampler assume it); a flow trained
on the straight path of rectified flow (``α = 1 − t``, ``σ = t``) may start from any distribution of the data's
shape (Lipman et al. 2023; Tong et al. 2024; Albergo & Vanden-Eijnden 2023). Flow-matching texts put data at their
``t = 1`` and the source at ``t = 0``: their ``t`` is our ``1 − t``. A non-Gaussian source is a toy-2D set
(:class:`diffusion_lab.data.toy2d.Toy2DPrior`); this module holds the contract and the Gaussian default.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class SourceDistribution(Protocol):
    """``sample(shape (B, ...), generator, device) -> (B, ...)``; ``gaussian``: whether it is ``N(0, I)``."""

    gaussian: bool

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """Draw ``shape[0]`` independent points."""
        ...


class GaussianPrior:
    """``ε ~ N(0, I)``: the source of every diffusion model (the default)."""

    gaussian = True

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """Standard normal ``shape`` on ``device`` (one ``torch.randn`` call, as the loss always drew it)."""
        return torch.randn(shape, device=device, generator=generator)
