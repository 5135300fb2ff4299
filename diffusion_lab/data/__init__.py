"""LightningDataModules for diffusion training: toy 2-D point sets, sklearn digits, CIFAR-10.

Every module yields ``(x, y)`` batches (x float32: images (B, C, H, W) in [-1, 1] or points (B, 2);
y (B,) long) and exposes ``data_shape``, ``num_classes``, ``modality`` and ``render`` before setup.
"""

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid
from diffusion_lab.data.cifar10 import CIFAR10DataModule
from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.data.toy2d import TOY_DISTRIBUTIONS, Toy2DDataModule, ToyDistribution, render_points

__all__ = [
    "TOY_DISTRIBUTIONS",
    "CIFAR10DataModule",
    "DiffusionDataModule",
    "DigitsDataModule",
    "TensorPairDataset",
    "Toy2DDataModule",
    "ToyDistribution",
    "render_image_grid",
    "render_points",
]
