"""Noise-level and class-label embeddings shared by every network in :mod:`diffusion_lab.models`.

Networks know nothing of diffusion schedules: the noise conditioning ``c_noise`` (an integer DDPM
timestep as float, ``1000·t``, EDM's ``log(σ)/4`` …) is chosen by the parameterization and is
embedded here unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (constructor/input validation helper)."""
    if not ok:
        raise ValueError(message)


# Ho et al. 2020, diffusion_tf/nn.py `get_timestep_embedding` (Vaswani et al. 2017 §3.5 / tensor2tensor).
def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the noise conditioning, DDPM layout ``[sin | cos]``.

    With ``half = dim // 2`` the frequencies are ``f_k = max_period^(-k / (half - 1))`` for
    ``k = 0 … half-1`` (geometric from 1 down to ``1/max_period``, as in DDPM; ``half = 1`` uses
    ``f_0 = 1``). The output is ``[sin(c·f_0), …, sin(c·f_{half-1}), cos(c·f_0), …]``, zero-padded
    by one column when ``dim`` is odd. ``c_noise`` is used as given (no rescaling), so the
    embedding of 0 is ``[0, …, 0, 1, …, 1]``.

    Args:
        c_noise: ``(B,)`` noise conditioning, any real dtype.
        dim: embedding width, ``>= 2``.
        max_period: period of the slowest frequency.

    Returns:
        ``(B, dim)`` float32 embedding (computed in float32 whatever the autocast state).
    """
    _require(c_noise.ndim == 1, f"timestep_embedding: c_noise must be (B,), got {tuple(c_noise.shape)}")
    _require(dim >= 2, f"timestep_embedding: dim must be >= 2, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, device=c_noise.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = c_noise.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


# Tancik et al. 2020 (random Fourier features); Song et al. 2021 NCSN++ `GaussianFourierProjection`.
class FourierFeatures(nn.Module):
    """Random Fourier-feature embedding ``[sin(2π c f) | cos(2π c f)]`` with fixed ``f ~ N(0, scale²)``.

    The frequencies are a buffer (saved in checkpoints, never trained), drawn from the global RNG at
    construction, so seed before building the network for reproducibility. Typical use is
    continuous-time noise conditioning such as EDM's ``c_noise = log(σ)/4``.

    Args:
        dim: embedding width, even and ``>= 2``.
        scale: standard deviation of the frequencies.
    """

    freqs: Tensor

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        _require(dim >= 2 and dim % 2 == 0, f"FourierFeatures: dim must be even and >= 2, got {dim}")
        _require(scale > 0, f"FourierFeatures: scale must be > 0, got {scale}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        """Map ``(B,)`` noise conditioning to a ``(B, dim)`` float32 embedding."""
        _require(c_noise.ndim == 1, f"FourierFeatures: c_noise must be (B,), got {tuple(c_noise.shape)}")
        args = 2 * math.pi * c_noise.float()[:, None] * self.freqs.float()[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


# Ho et al. 2020 App. B (timestep MLP); Nichol & Dhariwal 2021 (class embedding added to it);
# Ho & Salimans 2022 §3 (extra "null" label for classifier-free guidance).
class ConditionEmbedding(nn.Module):
    """Embed ``(c_noise, y)`` into one vector: ``MLP(sinusoidal(c_noise)) + E[y]``.

    The MLP is ``Linear(freq_dim, embed_dim) → SiLU → Linear(embed_dim, embed_dim)``. When
    ``num_classes`` is set, ``E`` has ``num_classes + 1`` rows; row ``num_classes`` is the learned
    null label of classifier-free guidance, and it is used for every sample when ``y`` is None.

    Args:
        freq_dim: width of the sinusoidal embedding.
        embed_dim: output width.
        num_classes: number of classes, or None for an unconditional network.
        max_period: passed to :func:`timestep_embedding`.
    """

    def __init__(
        self, freq_dim: int, embed_dim: int, num_classes: int | None = None, max_period: float = 10000.0
    ) -> None:
        super().__init__()
        _require(freq_dim >= 2, f"ConditionEmbedding: freq_dim must be >= 2, got {freq_dim}")
        _require(num_classes is None or num_classes >= 1, f"num_classes must be None or >= 1, got {num_classes}")
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.num_classes = num_classes
        self.fc1 = nn.Linear(freq_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int | None:
        """Index of the unconditional ("null") class, ``num_classes``; None if unconditional."""
        return self.num_classes

    def forward(self, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        """Map ``c_noise`` ``(B,)`` and optional long labels ``y`` ``(B,)`` to ``(B, embed_dim)``.

        Raises:
            ValueError: ``y`` is given to an unconditional embedding, or a shape is wrong.
        """
        freq = timestep_embedding(c_noise, self.freq_dim, self.max_period).to(self.fc1.weight.dtype)
        emb = self.fc2(F.silu(self.fc1(freq)))
        if self.label_emb is None:
            _require(
                y is None,
                "got class labels y, but this network was built with num_classes=None (unconditional); "
                "set num_classes to condition on labels",
            )
            return emb
        if y is None:
            y = torch.full_like(c_noise, self.label_emb.num_embeddings - 1, dtype=torch.long)
        _require(y.shape == c_noise.shape, f"y must have shape {tuple(c_noise.shape)}, got {tuple(y.shape)}")
        return emb + self.label_emb(y).to(emb.dtype)
