"""Procedural coloured shapes: an offline, CIFAR-sized (3x32x32), class-labelled image dataset.

Each image is one filled shape — class 0 square, 1 circle, 2 triangle (apex up), 3 plus, 4 ring — of
random size, position and colour on a uniform background of another random colour, drawn with hard
edges (every pixel is either the shape's or the background's colour). The shape always lies inside the
image with a 1-pixel margin. Everything follows from ``seed``; 11k images are generated in well under a
second on a CPU, so nothing is cached. It exists so that the 32x32 RGB pipeline, class conditioning
and sample metrics can run without any download.

Shape of a bounding box of side s at (top, left), in box units u, v in [0, 1) measured at pixel
centres (d = (u, v) − ½):

- square: the whole box;          - circle: |d| ≤ ½;
- triangle: |u − ½| ≤ v/2;        - plus: |d_u| ≤ ⅙ or |d_v| ≤ ⅙;
- ring: ¼ ≤ |d| ≤ ½.

So a class is visible from the pixels alone: area / box area is 1 (square), π/4 (circle), ½ (triangle,
all mass low), 5/9 (plus) and 3π/16 (ring, hollow centre).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid, uint8_to_unit
from diffusion_lab.schema.domains import POSITIVE_INT

SHAPES = ("square", "circle", "triangle", "plus", "ring")
MIN_CONTRAST = 96  # the shape's colour differs from the background's by >= this in some channel (of 255)
MIN_SIZE = 8  # smallest box side in pixels at which the five shapes stay distinct
_CHUNK = 4096  # images per vectorised drawing step (bounds the (chunk, R, R) float temporaries)


def shape_masks(kind: Tensor, size: Tensor, top: Tensor, left: Tensor, resolution: int) -> Tensor:
    """Boolean masks of the shapes: kind, size, top, left (N,) long -> (N, R, R) bool (see module docstring)."""
    centres = torch.arange(resolution, dtype=torch.float32) + 0.5
    s = size.float()[:, None, None]
    v = (centres[None, :, None] - top.float()[:, None, None]) / s  # (N, R, 1)
    u = (centres[None, None, :] - left.float()[:, None, None]) / s  # (N, 1, R)
    box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    du, dv = u - 0.5, v - 0.5
    r2 = du**2 + dv**2
    masks = torch.stack(
        [
            box,
            r2 <= 0.25,
            box & (du.abs() <= v / 2),
            box & ((du.abs() <= 1 / 6) | (dv.abs() <= 1 / 6)),
            (r2 <= 0.25) & (r2 >= 0.0625),
        ]
    )  # (5, N, R, R)
    return masks[kind, torch.arange(len(kind))]


def contrasting_colours(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(background, foreground) uint8 colours (n, 3) whose max channel difference is >= MIN_CONTRAST."""
    background = torch.randint(0, 256, (n, 3), generator=generator)
    foreground = torch.randint(0, 256, (n, 3), generator=generator)
    while True:
        dull = (foreground - background).abs().amax(dim=1) < MIN_CONTRAST
        if not dull.any():
            return background.to(torch.uint8), foreground.to(torch.uint8)
        foreground[dull] = torch.randint(0, 256, (int(dull.sum()), 3), generator=generator)


def generate_shapes(
    n: int, resolution: int, min_size: int, max_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw n images: (x (n, 3, R, R) uint8, y (n,) long in 0..4), classes balanced and shuffled."""
    labels = (torch.arange(n) % len(SHAPES))[torch.randperm(n, generator=generator)]
    size = torch.randint(min_size, max_size + 1, (n,), generator=generator)
    room = resolution - size - 1  # number of 1-pixel-margin positions along each axis
    top = 1 + (torch.rand(n, generator=generator) * room).long()
    left = 1 + (torch.rand(n, generator=generator) * room).long()
    background, foreground = contrasting_colours(n, generator)
    # A shape's mask depends on (kind, size) only, up to translation: draw each once at the origin ...
    kinds, sizes = torch.meshgrid(torch.arange(len(SHAPES)), torch.arange(min_size, max_size + 1), indexing="ij")
    origin = torch.zeros(kinds.numel(), dtype=torch.long)
    stamps = shape_masks(kinds.flatten(), sizes.flatten(), origin, origin, resolution).view(*kinds.shape, -1)
    x = torch.empty((n, 3, resolution, resolution), dtype=torch.uint8)
    pixels = torch.arange(resolution)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        # ... then move it to (top, left): pixel (i, j) reads the stamp at (i - top, j - left).
        rows, cols = pixels - top[part, None], pixels - left[part, None]  # (B, R)
        flat = rows.clamp(min=0)[:, :, None] * resolution + cols.clamp(min=0)[:, None, :]  # (B, R, R)
        stamp = stamps[labels[part], size[part] - min_size]  # (B, R·R)
        mask = stamp.gather(1, flat.flatten(1)).view_as(flat) & (rows >= 0)[:, :, None] & (cols >= 0)[:, None, :]
        x[part] = torch.where(mask[:, None], foreground[part, :, None, None], background[part, :, None, None])
    return x, labels


class ShapesDataModule(DiffusionDataModule):
    """Coloured shapes; batches ``(x (B, 3, R, R) float32 in [-1, 1], y (B,) long in 0..4)``.

    Train and val are drawn, in that order, from one ``torch.Generator`` seeded by ``seed``.

    Args:
        num_train: training images.
        num_val: validation images.
        resolution: image side R.
        min_scale: smallest shape box side as a fraction of R (rounded to pixels, >= 8 px).
        max_scale: largest shape box side as a fraction of R (at most R - 2 px).
        batch_size: images per batch.
        flip: random horizontal flips for training (off: every shape is already mirror-symmetric, a
            flip only moves it).
        num_workers: DataLoader workers (0 is best: batches are one indexing op).
        seed: data-generation and shuffling seed.
    """

    def __init__(
        self,
        num_train: Annotated[int, POSITIVE_INT] = 10_000,
        num_val: Annotated[int, POSITIVE_INT] = 1_000,
        resolution: Annotated[int, POSITIVE_INT] = 32,
        min_scale: float = 0.3,
        max_scale: float = 0.75,
        batch_size: int = 128,
        flip: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        min_size, max_size = round(min_scale * resolution), round(max_scale * resolution)
        if not MIN_SIZE <= min_size <= max_size <= resolution - 2:
            raise ValueError(
                f"need {MIN_SIZE} <= round(dataset.min_scale·R) <= round(dataset.max_scale·R) <= R - 2 pixels; "
                f"got min_scale={min_scale}, max_scale={max_scale} at resolution={resolution} "
                f"({min_size}..{max_size} px)"
            )
        if num_train < batch_size or num_val < 1:
            raise ValueError(f"need dataset.num_train >= batch_size and num_val >= 1, got {num_train}, {num_val}")
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(3, resolution, resolution), num_classes=len(SHAPES), modality="image",
        )  # fmt: skip
        self.num_train, self.num_val, self.resolution = num_train, num_val, resolution
        self.min_scale, self.max_scale, self.flip = min_scale, max_scale, flip
        self.min_size, self.max_size = min_size, max_size
        self.save_hyperparameters()

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        sizes = (self.resolution, self.min_size, self.max_size)
        x_train, y_train = generate_shapes(self.num_train, *sizes, generator)
        x_val, y_val = generate_shapes(self.num_val, *sizes, generator)
        return (
            TensorPairDataset(x_train, y_train, transform=uint8_to_unit, flip=self.flip),
            TensorPairDataset(x_val, y_val, transform=uint8_to_unit),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 3, R, R) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)
