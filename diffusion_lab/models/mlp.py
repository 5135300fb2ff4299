"""Residual MLP with noise/label embedding for low-dimensional (e.g. 2-D toy) data.

``f_θ(x (B, D), c_noise (B,), y (B,) | None) -> (B, out_dim)``; knows nothing of diffusion schedules.
"""

from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.embeddings import ConditionEmbedding, _require
from diffusion_lab.schema.domains import POSITIVE_INT, UNIT_OPEN, Domain
from diffusion_lab.schema.signature import enforce_domains


# The ADM residual block (Dhariwal & Nichol 2021 §3) with Linear layers in place of 3×3 convs.
class MLPBlock(nn.Module):
    """Pre-norm residual block ``h + fc2(drop(SiLU(fc1(SiLU(LN(h))) + proj(SiLU(emb)))))``.

    Shapes: ``h (B, hidden)``, ``emb (B, emb_dim)`` -> ``(B, hidden)``.
    """

    def __init__(self, hidden: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(emb_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """Apply the block (shapes in the class docstring)."""
        a = self.fc1(F.silu(self.norm(h))) + self.emb_proj(F.silu(emb))
        return h + self.fc2(self.dropout(F.silu(a)))


# Residual-MLP denoiser for 2-D toy data (as used for toy experiments since Sohl-Dickstein et al. 2015);
# conditioning as in Ho et al. 2020 App. B (sinusoidal → MLP) and Ho & Salimans 2022 (null label).
class MLP(nn.Module):
    """``forward(x (B, dim), c_noise (B,), y (B,) | None) -> (B, out_dim)``.

    ``Linear(dim, hidden)`` → ``num_layers`` × :class:`MLPBlock` (each adds its own projection of the
    noise/label embedding) → LayerNorm → SiLU → zero-initialised ``Linear(hidden, out_dim)``, so the
    output is exactly zero at initialisation.

    Args:
        dim: data dimension ``D``.
        hidden: width of the residual stream and of the noise/label embedding.
        num_layers: number of residual blocks.
        time_embed_dim: width of the sinusoidal embedding of ``c_noise``.
        dropout: dropout rate inside the blocks.
        num_classes: number of classes for label conditioning (an extra null label is added), or None.
        out_dim: output dimension (default ``dim``).
    """

    @enforce_domains
    def __init__(
        self,
        dim: Annotated[int, POSITIVE_INT] = 2,
        hidden: Annotated[int, POSITIVE_INT] = 256,
        num_layers: Annotated[int, POSITIVE_INT] = 4,
        time_embed_dim: Annotated[int, Domain(lambda v: v >= 2, "an integer >= 2")] = 128,
        dropout: Annotated[float, UNIT_OPEN] = 0.0,
        num_classes: Annotated[int | None, POSITIVE_INT.or_null("unconditional")] = None,
        out_dim: Annotated[int | None, POSITIVE_INT.or_null("= dim")] = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = dim if out_dim is None else out_dim
        self.num_classes = num_classes
        self.cond = ConditionEmbedding(time_embed_dim, hidden, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden, dropout) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from ``x`` ``(B, dim)``, ``c_noise`` ``(B,)``, labels ``y`` ``(B,)`` or None.

        Returns ``(B, out_dim)``. With ``num_classes`` set, ``y=None`` means the null label.

        Raises:
            ValueError: ``y`` given to an unconditional MLP, or a wrongly shaped input.
        """
        _require(
            x.ndim == 2 and x.shape[1] == self.dim,
            f"MLP: x must have shape (B, {self.dim}), got {tuple(x.shape)}",
        )
        _require(
            c_noise.shape == (x.shape[0],),
            f"MLP: c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}",
        )
        emb = self.cond(c_noise, y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
