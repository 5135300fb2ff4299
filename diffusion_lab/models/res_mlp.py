"""The small residual MLP of the flow-matching toy experiments (torchcfm's and C2OT's 2-D networks).

``f_θ(x (B, D), c_noise (B,), y=None) -> (B, D)``; knows nothing of diffusion schedules.
"""

from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from diffusion_lab.models.embeddings import _require
from diffusion_lab.schema.domains import FINITE_POSITIVE, POSITIVE_INT
from diffusion_lab.schema.signature import enforce_domains


class ResMLPBlock(nn.Module):
    """``h + fc2(GELU(fc1(h)))`` with ``fc1: hidden → expansion·hidden``: ``(B, hidden) -> (B, hidden)``."""

    def __init__(self, hidden: int, expansion: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, expansion * hidden)
        self.fc2 = nn.Linear(expansion * hidden, hidden)
        self.act = nn.GELU()

    def forward(self, h: Tensor) -> Tensor:
        """Apply the block (shapes in the class docstring)."""
        return h + self.fc2(self.act(self.fc1(h)))


# Cheng & Schwing 2025 (C2OT, arXiv 2503.10636) 2-D experiments: input and time each linearly embedded to the
# width and summed, residual GELU MLP blocks, a linear read-out; no normalisation, default PyTorch init.
class ResMLP(nn.Module):
    """``forward(x (B, dim), c_noise (B,), y=None) -> (B, dim)``.

    ``Linear(dim, hidden)(x) + Linear(1, hidden)(time_scale·c_noise)`` → ``num_blocks`` × :class:`ResMLPBlock`
    → ``Linear(hidden, dim)``. With ``hidden=128, num_blocks=3, expansion=4`` it has 396,034 parameters.

    Args:
        dim: data dimension ``D``.
        hidden: width of the residual stream.
        num_blocks: residual blocks.
        expansion: the blocks' inner width as a multiple of ``hidden``.
        time_scale: multiplies ``c_noise`` before its linear embedding (``1e-3`` turns the continuous-time
            ``c_noise = 1000·t`` back into ``t ∈ [0, 1]``, the input scale of the flow-matching codes).
    """

    @enforce_domains
    def __init__(
        self,
        dim: Annotated[int, POSITIVE_INT] = 2,
        hidden: Annotated[int, POSITIVE_INT] = 128,
        num_blocks: Annotated[int, POSITIVE_INT] = 3,
        expansion: Annotated[int, POSITIVE_INT] = 4,
        time_scale: Annotated[float, FINITE_POSITIVE] = 1e-3,
    ) -> None:
        super().__init__()
        self.dim, self.time_scale = dim, time_scale
        self.num_classes = None  # unconditional only
        self.inp = nn.Linear(dim, hidden)
        self.time_emb = nn.Linear(1, hidden)
        self.blocks = nn.ModuleList(ResMLPBlock(hidden, expansion) for _ in range(num_blocks))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from ``x`` ``(B, dim)`` and ``c_noise`` ``(B,)``; returns ``(B, dim)``.

        Raises:
            ValueError: labels given (the network is unconditional) or a wrongly shaped input.
        """
        _require(y is None, "ResMLP is unconditional: it takes no labels y (use model=mlp for cond.enabled=true)")
        _require(
            x.ndim == 2 and x.shape[1] == self.dim, f"ResMLP: x must have shape (B, {self.dim}), got {tuple(x.shape)}"
        )
        _require(
            c_noise.shape == (x.shape[0],),
            f"ResMLP: c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}",
        )
        h = self.inp(x) + self.time_emb((self.time_scale * c_noise).unsqueeze(1).to(x.dtype))
        for block in self.blocks:
            h = block(h)
        return self.out(h)
