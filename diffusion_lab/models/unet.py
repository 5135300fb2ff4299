"""DDPM / ADM-style UNet: ``f_θ(x, c_noise, y) -> (B, out_channels, H, W)``.

Ho et al. 2020 (App. B, the 35.7M-parameter CIFAR-10 network) with the options of Nichol & Dhariwal
2021 ("improved-diffusion") and Dhariwal & Nichol 2021 (ADM): multi-head attention, scale-shift
norm (AdaGN), BigGAN-style residual up/down-sampling, class conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.embeddings import ConditionEmbedding, _require
from diffusion_lab.schema.domains import POSITIVE_INT, POSITIVE_INTS, UNIT_OPEN
from diffusion_lab.schema.signature import enforce_domains

# Ho et al. 2020 use TF's group_norm default epsilon.
_GN_EPS = 1e-6


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (improved-diffusion's init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Wu & He 2018 (GroupNorm), computed in float32 as improved-diffusion's GroupNorm32 does.
class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back, so bf16/fp16 activations stay stable.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, same dtype as the input.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` of shape ``(B, C, ...)``."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class EmbedBlock(nn.Module):
    """A block called as ``block(x, emb)``; ``x`` is ``(B, C, H, W)``, ``emb`` is ``(B, E)``."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block; subclasses that ignore ``emb`` still accept it."""
        raise NotImplementedError


class EmbedSequential(nn.ModuleList):
    """Chain of :class:`EmbedBlock` s, each called as ``block(x, emb)``."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the blocks in order: ``(B, C, H, W), (B, E) -> (B, C', H', W')``."""
        for block in self:
            x = block(x, emb)
        return x


# Ho et al. 2020 App. B (Wide-ResNet block + timestep projection); Dhariwal & Nichol 2021 §3
# (scale-shift norm "AdaGN", BigGAN-style up/down-sampling inside the block).
class ResBlock(EmbedBlock):
    """Residual block ``x -> skip(R(x)) + conv2(drop(SiLU(GN(conv1(R(SiLU(GN(x))))) ⊕ emb)))``.

    ``R`` is the optional parameter-free ``resample`` (average pool / nearest upsample); ``⊕`` adds
    the projected embedding, or applies ``GN(h)·(1+scale)+shift`` when ``use_scale_shift_norm``.
    ``conv2`` is zero-initialised so the block starts as (a resampled, projected) identity.

    Shapes: ``x (B, in_channels, H, W)``, ``emb (B, emb_dim)`` -> ``(B, out_channels, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        num_groups: int,
        use_scale_shift_norm: bool = False,
        resample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm32(num_groups, in_channels, eps=_GN_EPS)
        self.resample = resample if resample is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm2 = GroupNorm32(num_groups, out_channels, eps=_GN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block (shapes in the class docstring)."""
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        x = self.resample(x)
        e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# Ho et al. 2020 App. B (self-attention, after Wang et al. 2018); multi-head as in Nichol & Dhariwal 2021.
class AttentionBlock(EmbedBlock):
    """Pre-norm multi-head self-attention over the ``H·W`` positions, residual, zero-init output.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; ``C`` must be divisible by ``num_heads``.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        _require(channels % num_heads == 0, f"channels={channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(num_groups, channels, eps=_GN_EPS)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """Attend over positions; ``emb`` is ignored."""
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, H·W, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(d)) v
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, height, width))


# Ho et al. 2020 App. B (`downsample` with_conv=True).
class Downsample(EmbedBlock):
    """Stride-2 3×3 convolution: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """Halve the spatial size; ``emb`` is ignored."""
        return self.conv(x)


# Ho et al. 2020 App. B (`upsample` with_conv=True).
class Upsample(EmbedBlock):
    """Nearest-neighbour ×2 then 3×3 convolution: ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """Double the spatial size; ``emb`` is ignored."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _validate_unet_args(unet: UNet) -> None:
    """Check the UNet hyper-parameters stored on ``unet``; raise ValueError naming the bad argument."""
    mult, levels = unet.channel_mult, len(unet.channel_mult)
    attention_resolutions, num_groups = unet.attention_resolutions, unet.num_groups
    _require(
        unet.resolution % 2 ** (levels - 1) == 0,
        f"UNet: resolution={unet.resolution} must be divisible by 2**(len(channel_mult)-1)="
        f"{2 ** (levels - 1)} (channel_mult={mult})",
    )
    visited = unet.resolutions
    bad = sorted(set(attention_resolutions) - set(visited))
    _require(
        not bad,
        f"UNet: attention_resolutions contains {bad}, which the UNet never visits; valid values are "
        f"{visited} (resolution={unet.resolution}, channel_mult={mult})",
    )
    # Every channel count in the net (incl. skip concatenations) is a multiple of base_channels.
    _require(
        unet.base_channels % num_groups == 0,
        f"UNet: base_channels={unet.base_channels} must be divisible by num_groups={num_groups} (GroupNorm)",
    )
    attention_levels = {lvl for lvl, res in enumerate(visited) if res in attention_resolutions} | {levels - 1}
    for level in sorted(attention_levels):  # the middle block (last level) always has attention
        unet.heads_for(unet.base_channels * mult[level])


# Ho et al. 2020 App. B; Nichol & Dhariwal 2021 (improved-diffusion `UNetModel`); Dhariwal & Nichol 2021 §3.
class UNet(nn.Module):
    """DDPM/ADM UNet. ``forward(x (B, C_in, H, W), c_noise (B,), y (B,) | None) -> (B, C_out, H, W)``.

    Layout: stem conv; per level ``num_res_blocks`` ResBlocks (+ attention when the level's
    resolution is in ``attention_resolutions``) then a downsample (except the last level); a middle
    ResBlock–attention–ResBlock; a mirrored decoder with ``num_res_blocks + 1`` ResBlocks per level
    fed by skip concatenations; GroupNorm–SiLU–zero-init conv output. The output is exactly zero at
    initialisation. The network knows nothing of diffusion schedules; ``c_noise`` goes to the
    sinusoidal embedding unchanged.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels (default ``in_channels``; ``2·in_channels`` for learned variance).
        resolution: nominal input size; ``attention_resolutions`` refer to it (an input of another
            size divisible by ``2**(len(channel_mult)-1)`` also runs, with attention at the same levels).
        base_channels: channels of the first level; the time embedding has ``4·base_channels``.
        channel_mult: channel multiplier per level; level ``i`` runs at ``resolution / 2**i``.
        num_res_blocks: residual blocks per encoder level.
        attention_resolutions: spatial sizes (e.g. 16 = the 16×16 level) that get self-attention.
        dropout: dropout rate inside residual blocks.
        num_heads: attention heads (ignored when ``num_head_channels`` is set).
        num_head_channels: if set, heads = channels // num_head_channels at each attention layer.
        num_groups: GroupNorm groups; must divide ``base_channels``.
        num_classes: number of classes for label conditioning (an extra null label is added), or None.
        resblock_updown: resample with ResBlocks (BigGAN style) instead of strided/upsampling convs.
        use_scale_shift_norm: condition with ``GN(h)·(1+scale)+shift`` (AdaGN) instead of addition.
    """

    @enforce_domains
    def __init__(
        self,
        in_channels: Annotated[int, POSITIVE_INT] = 3,
        out_channels: Annotated[int | None, POSITIVE_INT.or_null("= in_channels")] = None,
        resolution: Annotated[int, POSITIVE_INT] = 32,
        base_channels: Annotated[int, POSITIVE_INT] = 128,
        channel_mult: Annotated[Sequence[int], POSITIVE_INTS] = (1, 2, 2, 2),
        num_res_blocks: Annotated[int, POSITIVE_INT] = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: Annotated[float, UNIT_OPEN] = 0.1,
        num_heads: Annotated[int, POSITIVE_INT] = 1,
        num_head_channels: Annotated[int | None, POSITIVE_INT.or_null()] = None,
        num_groups: Annotated[int, POSITIVE_INT] = 32,
        num_classes: Annotated[int | None, POSITIVE_INT.or_null("unconditional")] = None,
        resblock_updown: bool = False,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.resolution, self.base_channels = resolution, base_channels
        self.channel_mult = tuple(int(m) for m in channel_mult)  # Hydra hands over a ListConfig
        self.attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.num_res_blocks, self.dropout, self.num_groups = num_res_blocks, dropout, num_groups
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_classes = num_classes
        self.resblock_updown, self.use_scale_shift_norm = resblock_updown, use_scale_shift_norm
        _validate_unet_args(self)

        self.emb_dim = 4 * base_channels
        self.cond = ConditionEmbedding(base_channels, self.emb_dim, num_classes)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skips, ch = self._build_encoder()
        self.middle = EmbedSequential([self._res(ch, ch), self._attn(ch), self._res(ch, ch)])
        ch = self._build_decoder(skips, ch)
        self.out = nn.Sequential(
            GroupNorm32(num_groups, ch, eps=_GN_EPS),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)),
        )

    @property
    def resolutions(self) -> list[int]:
        """Spatial sizes visited, one per level: ``[resolution, resolution/2, …]``."""
        return [self.resolution // 2**level for level in range(len(self.channel_mult))]

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a layer with ``channels`` channels (validated)."""
        if self.num_head_channels is None:
            heads = self.num_heads
            ok, what = channels % heads == 0, f"num_heads={heads}"
        else:
            heads = channels // self.num_head_channels
            ok, what = channels % self.num_head_channels == 0, f"num_head_channels={self.num_head_channels}"
        _require(ok, f"UNet: attention layer with {channels} channels is not divisible by {what}")
        return heads

    def _res(self, in_ch: int, out_ch: int, resample: nn.Module | None = None) -> ResBlock:
        """A ResBlock with this UNet's embedding width, dropout, norm and conditioning style."""
        return ResBlock(in_ch, out_ch, self.emb_dim, self.dropout, self.num_groups, self.use_scale_shift_norm, resample)

    def _attn(self, ch: int) -> AttentionBlock:
        """An attention block for ``ch`` channels."""
        return AttentionBlock(ch, self.heads_for(ch), self.num_groups)

    def _downsample(self, ch: int) -> EmbedBlock:
        """Halve the resolution: a ResBlock with average pooling, or a strided conv."""
        return self._res(ch, ch, nn.AvgPool2d(2)) if self.resblock_updown else Downsample(ch)

    def _upsample(self, ch: int) -> EmbedBlock:
        """Double the resolution: a ResBlock with nearest upsampling, or nearest + conv."""
        if self.resblock_updown:
            return self._res(ch, ch, nn.Upsample(scale_factor=2.0, mode="nearest"))
        return Upsample(ch)

    def _build_encoder(self) -> tuple[list[int], int]:
        """Create ``self.down``; return the channel count of each skip tensor and the final width."""
        self.down = nn.ModuleList()
        skips, ch = [self.base_channels], self.base_channels
        for level, (mult, res) in enumerate(zip(self.channel_mult, self.resolutions, strict=True)):
            for _ in range(self.num_res_blocks):
                blocks: list[nn.Module] = [self._res(ch, mult * self.base_channels)]
                ch = mult * self.base_channels
                if res in self.attention_resolutions:
                    blocks.append(self._attn(ch))
                self.down.append(EmbedSequential(blocks))
                skips.append(ch)
            if level != len(self.channel_mult) - 1:
                self.down.append(EmbedSequential([self._downsample(ch)]))
                skips.append(ch)
        return skips, ch

    def _build_decoder(self, skips: list[int], ch: int) -> int:
        """Create ``self.up`` consuming ``skips`` (last first); return the final width."""
        self.up = nn.ModuleList()
        for level in reversed(range(len(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                out_ch = self.channel_mult[level] * self.base_channels
                blocks: list[nn.Module] = [self._res(ch + skips.pop(), out_ch)]
                ch = out_ch
                if self.resolutions[level] in self.attention_resolutions:
                    blocks.append(self._attn(ch))
                if level > 0 and i == self.num_res_blocks:
                    blocks.append(self._upsample(ch))
                self.up.append(EmbedSequential(blocks))
        return ch

    def _check_input(self, x: Tensor, c_noise: Tensor) -> None:
        """Validate ``x`` ``(B, in_channels, H, W)`` and ``c_noise`` ``(B,)``."""
        _require(
            x.ndim == 4 and x.shape[1] == self.in_channels,
            f"UNet: x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}",
        )
        factor = 2 ** (len(self.channel_mult) - 1)
        _require(
            x.shape[2] % factor == 0 and x.shape[3] % factor == 0,
            f"UNet: H and W must be divisible by {factor}, got {tuple(x.shape[2:])}",
        )
        _require(
            c_noise.shape == (x.shape[0],),
            f"UNet: c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}",
        )

    def forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from ``x`` ``(B, C_in, H, W)``, ``c_noise`` ``(B,)``, labels ``y`` ``(B,)`` or None.

        Returns ``(B, out_channels, H, W)``. With ``num_classes`` set, ``y=None`` means the null label
        (the unconditional branch of classifier-free guidance).

        Raises:
            ValueError: ``y`` given to an unconditional UNet, or a wrongly shaped input.
        """
        self._check_input(x, c_noise)
        emb = self.cond(c_noise, y)
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            skip = hs.pop()
            h = block(torch.cat([h, skip.to(h.dtype)], dim=1), emb)
        return self.out(h)
