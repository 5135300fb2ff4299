"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set; 1,797 images, 10 classes).

Pixels are counts 0..16; we map them linearly to [-1, 1] (``v / 8 - 1``), so 0 (background)
-> -1 and 16 -> 1, both attained. No download: the data ships inside scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid
from diffusion_lab.schema.domains import FRACTION, POSITIVE_INT

NATIVE_RESOLUTION = 8
RESOLUTIONS = (8, 16, 32)
BACKGROUND = -1.0  # value of an empty pixel in [-1, 1] space (0.0 would be mid-grey)


def pad_to(images: Tensor, resolution: int) -> Tensor:
    """Centre 8x8 images on a larger canvas filled with background (-1): (N, 1, 8, 8) -> (N, 1, R, R)."""
    margin = (resolution - images.shape[-1]) // 2
    return F.pad(images, (margin, margin, margin, margin), value=BACKGROUND)


def upsample_to(images: Tensor, resolution: int) -> Tensor:
    """Nearest-neighbour upsampling by the integer factor R/8: (N, 1, 8, 8) -> (N, 1, R, R).

    Nearest rather than bilinear: each pixel becomes an exact k x k block, so the 17 grey levels,
    the [-1, 1] range (both ends attained) and the 8x8 content are preserved exactly (a k x k
    average-pool inverts it); bilinear would blur the one-pixel strokes and invent new values.
    """
    return F.interpolate(images, size=(resolution, resolution), mode="nearest")


RESIZERS: dict[str, Callable[[Tensor, int], Tensor]] = {"pad": pad_to, "upsample": upsample_to}


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (x (1797, 1, 8, 8) float32 in [-1, 1], y (1797,) long in 0..9)."""
    bunch = load_digits()
    x = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.as_tensor(np.asarray(bunch.target), dtype=torch.long)


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of indices 0..N-1, stratified by class: (train_idx (N_tr,), val_idx (N_val,)), sorted."""
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, random_state=seed, stratify=labels.numpy()
    )
    return torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(val_idx))


class DigitsDataModule(DiffusionDataModule):
    """8x8 sklearn digits at resolution 8/16/32; batches ``(x (B, 1, R, R) in [-1, 1], y (B,) in 0..9)``.

    Args:
        resolution: 8 (native), 16 or 32.
        resize: how 16/32 are reached: "pad" (centred on a -1 background) or "upsample" (nearest,
            see :func:`upsample_to`). Ignored at resolution 8.
        batch_size: images per batch.
        val_fraction: share of each class held out for validation (stratified, seeded by ``seed``).
        seed: split and shuffling seed.
        num_workers: DataLoader workers (0 is fine: the set is 1,797 images in memory).
        flip: random horizontal flips for training. Off by default: mirroring changes a digit's
            identity (2 vs 5, 3 vs ε).
    """

    def __init__(
        self,
        resolution: Annotated[int, POSITIVE_INT] = 16,
        resize: str = "pad",
        batch_size: int = 128,
        val_fraction: Annotated[float, FRACTION] = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        flip: bool = False,
    ) -> None:
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        if resize not in RESIZERS:
            raise ValueError(f"resize must be one of {sorted(RESIZERS)}, got {resize!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(1, resolution, resolution), num_classes=10, modality="image",
        )  # fmt: skip
        self.resolution, self.resize, self.val_fraction, self.flip = resolution, resize, val_fraction, flip
        self.save_hyperparameters()

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        x, y = load_digits_tensors()
        x = RESIZERS[self.resize](x, self.resolution)
        train_idx, val_idx = stratified_split(y, self.val_fraction, self.seed)
        return (
            TensorPairDataset(x[train_idx], y[train_idx], flip=self.flip),
            TensorPairDataset(x[val_idx], y[val_idx]),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 1, R, R) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)
