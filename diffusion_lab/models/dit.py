"""Diffusion Transformer (DiT): ``f_θ(x, c_noise, y) -> (B, out_channels, H, W)``.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers": the image is cut into ``p×p`` patches, each
patch is a token (linear embedding + fixed 2-D sin-cos position), ``depth`` transformer blocks are conditioned on
the noise level and class through adaptive LayerNorm whose residual gates start at zero (adaLN-Zero, §3.2), and a
zero-initialised linear layer maps each token back to a ``p×p`` patch. The network knows nothing of diffusion
schedules: ``c_noise`` is embedded unchanged (:class:`~diffusion_lab.models.embeddings.ConditionEmbedding`, the
timestep MLP + label table with a null label of the paper's ``TimestepEmbedder`` / ``LabelEmbedder``).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.embeddings import ConditionEmbedding, _require
from diffusion_lab.schema.domains import POSITIVE, POSITIVE_INT, Domain
from diffusion_lab.schema.signature import enforce_domains

# The paper's frequency-embedding width (its TimestepEmbedder's ``frequency_embedding_size``).
FREQ_DIM = 256
_LN_EPS = 1e-6
EVEN_INT = Domain(lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2", "even")


def patchify(x: Tensor, p: int) -> Tensor:
    """Cut images into non-overlapping ``p×p`` patches, row-major: ``(B, C, H, W) -> (B, H/p·W/p, p·p·C)``.

    Each token's features are laid out ``(p_row, p_col, C)``, the layout the paper's ``unpatchify`` reads.
    """
    b, c, h, w = x.shape
    _require(h % p == 0 and w % p == 0, f"patchify: H, W = {h}, {w} must be divisible by patch_size={p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, p: int, channels: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, h·w, p·p·C) -> (B, C, h·p, w·p)`` for a token grid ``(h, w)``."""
    h, w = grid
    _require(
        tokens.shape[1:] == (h * w, p * p * channels),
        f"unpatchify: tokens must be (B, {h * w}, {p * p * channels}), got {tuple(tokens.shape)}",
    )
    x = tokens.reshape(tokens.shape[0], h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(tokens.shape[0], channels, h * p, w * p)


# Vaswani et al. 2017 §3.5 in 2-D, as in MAE / DiT `get_2d_sincos_pos_embed`: half the width encodes the row.
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Fixed position embedding of an ``(h, w)`` token grid: ``(h·w, dim)`` float32, ``dim`` divisible by 4.

    Token ``(i, j)`` gets ``[sin(i·ω) | cos(i·ω) | sin(j·ω) | cos(j·ω)]`` with ``ω_k = 10000^(−k/(dim/4))``.
    """
    _require(dim % 4 == 0, f"sincos_pos_embed_2d: dim={dim} must be divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    rows = torch.arange(grid[0], dtype=torch.float64, device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], dtype=torch.float64, device=device).repeat(grid[0])
    parts = [f(pos[:, None] * omega[None]) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive LayerNorm's affine map ``x·(1 + scale) + shift``: ``x (B, T, D)``, ``shift, scale (B, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (timm's ``Attention``, ``qkv_bias=True``): ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend (shapes in the class docstring)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d_head) v, (B, heads, T, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


# Peebles & Xie 2023 §3.2, Fig. 3 (right): the adaLN-Zero block.
class DiTBlock(nn.Module):
    """``x + α₁·Attn(LN(x)·(1+γ₁)+β₁)``, then ``x + α₂·MLP(LN(x)·(1+γ₂)+β₂)``; ``(β, γ, α)₁,₂`` regressed from ``c``.

    The regression layer is zero-initialised, so every gate ``α`` is 0 and the block is the identity at init.
    Shapes: ``x (B, T, D)``, ``c (B, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=_LN_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=_LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Apply the block (shapes in the class docstring)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Adaptive LayerNorm then a linear map of each token to its patch: ``(B, T, D), (B, D) -> (B, T, p·p·C_out)``."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=_LN_EPS)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Map tokens to patches (shapes in the class docstring)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# Peebles & Xie 2023 §3 (DiT), with the paper's initialisation (its `initialize_weights`).
class DiT(nn.Module):
    """Diffusion Transformer. ``forward(x (B, C_in, H, W), c_noise (B,), y (B,) | None) -> (B, C_out, H, W)``.

    Patch embedding (a linear map of each ``p×p×C_in`` patch, the paper's stride-``p`` convolution) + fixed 2-D
    sin-cos positions → ``depth`` × :class:`DiTBlock` conditioned on ``c = MLP(sinusoidal(c_noise)) + E[y]`` →
    :class:`FinalLayer` → patches reassembled. Any ``H, W`` divisible by ``patch_size`` runs (the positions are
    computed for the token grid of the input). adaLN-Zero: the output is exactly zero at initialisation.
    The paper's shapes (Table 1): S = (12, 384, 6), B = (12, 768, 12), L = (24, 1024, 16), XL = (28, 1152, 16) as
    (depth, hidden_size, num_heads); "DiT-XL/2" is XL with ``patch_size=2``.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels (default ``in_channels``; ``2·in_channels`` for learned variance).
        patch_size: side ``p`` of the square patches; ``H`` and ``W`` must be divisible by it.
        hidden_size: token width ``D``; divisible by ``num_heads`` and by 4 (the 2-D position embedding).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: width of each block's MLP as a multiple of ``hidden_size``.
        num_classes: number of classes for label conditioning (an extra null label is added), or None.
    """

    @enforce_domains
    def __init__(
        self,
        in_channels: Annotated[int, POSITIVE_INT] = 3,
        out_channels: Annotated[int | None, POSITIVE_INT.or_null("= in_channels")] = None,
        patch_size: Annotated[int, POSITIVE_INT] = 2,
        hidden_size: Annotated[int, POSITIVE_INT] = 768,
        depth: Annotated[int, POSITIVE_INT] = 12,
        num_heads: Annotated[int, POSITIVE_INT] = 12,
        mlp_ratio: Annotated[float, POSITIVE] = 4.0,
        num_classes: Annotated[int | None, POSITIVE_INT.or_null("unconditional")] = None,
    ) -> None:
        super().__init__()
        _require(hidden_size % num_heads == 0, f"DiT: hidden_size={hidden_size} not divisible by num_heads={num_heads}")
        _require(hidden_size % 4 == 0, f"DiT: hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.cond = ConditionEmbedding(FREQ_DIM, hidden_size, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's init: Xavier-uniform linears with zero bias, N(0, 0.02²) timestep MLP and label table, and
        zero adaLN regressions and output layer (adaLN-Zero: every block starts as the identity, the output at 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cond.fc1.weight, std=0.02)
        nn.init.normal_(self.cond.fc2.weight, std=0.02)
        if self.cond.label_emb is not None:
            nn.init.normal_(self.cond.label_emb.weight, std=0.02)
        zeroed: list[nn.Module] = [m.adaLN_modulation for m in self.modules() if isinstance(m, DiTBlock | FinalLayer)]
        zeroed.append(self.final_layer.linear)
        for module in zeroed:  # adaLN-Zero: the gate/shift/scale regressions and the output layer start at 0
            for p in module.parameters():
                nn.init.zeros_(p)

    def _check_input(self, x: Tensor, c_noise: Tensor) -> None:
        """Validate ``x`` ``(B, in_channels, H, W)`` with ``H, W`` divisible by ``patch_size``, ``c_noise`` ``(B,)``."""
        p = self.patch_size
        _require(
            x.ndim == 4 and x.shape[1] == self.in_channels,
            f"DiT: x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}",
        )
        _require(
            x.shape[2] % p == 0 and x.shape[3] % p == 0,
            f"DiT: H and W must be divisible by patch_size={p}, got {tuple(x.shape[2:])}",
        )
        _require(
            c_noise.shape == (x.shape[0],),
            f"DiT: c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}",
        )

    def forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from ``x`` ``(B, C_in, H, W)``, ``c_noise`` ``(B,)``, labels ``y`` ``(B,)`` or None.

        Returns ``(B, out_channels, H, W)``. With ``num_classes`` set, ``y=None`` means the null label
        (the unconditional branch of classifier-free guidance).

        Raises:
            ValueError: ``y`` given to an unconditional DiT, or a wrongly shaped input.
        """
        self._check_input(x, c_noise)
        p = self.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        pos = sincos_pos_embed_2d(self.hidden_size, grid, x.device)
        h = self.x_embedder(patchify(x, p)) + pos.to(self.x_embedder.weight.dtype)  # (B, T, D)
        c = self.cond(c_noise, y).to(h.dtype)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final_layer(h, c), p, self.out_channels, grid)


def num_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (works on the meta device: shapes only, no memory)."""
    return sum(math.prod(p.shape) for p in module.parameters())
