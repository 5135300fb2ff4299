"""LightningDataModules for diffusion training: toy 2-D point sets, sklearn digits, procedural shapes,
MNIST / Fashion-MNIST, CIFAR-10, CelebA 64, downsampled ImageNet 32/64 and any image folder.

Every module yields ``(x, y)`` batches (x float32: images (B, C, H, W) in [-1, 1] or points (B, 2);
y (B,) long) and exposes ``data_shape``, ``num_classes``, ``modality`` and ``render`` before setup.
"""

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid
from diffusion_lab.data.celeba import CelebADataModule
from diffusion_lab.data.cifar10 import CIFAR10DataModule
from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.data.image_folder import ImageFolderDataModule
from diffusion_lab.data.imagenet import ImageNetDataModule
from diffusion_lab.data.mnist import FashionMNISTDataModule, MNISTDataModule
from diffusion_lab.data.shapes import SHAPES, ShapesDataModule
from diffusion_lab.data.toy2d import TOY_DISTRIBUTIONS, Toy2DDataModule, ToyDistribution, render_points

__all__ = [
    "SHAPES",
    "TOY_DISTRIBUTIONS",
    "CIFAR10DataModule",
    "CelebADataModule",
    "DiffusionDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "ShapesDataModule",
    "TensorPairDataset",
    "Toy2DDataModule",
    "ToyDistribution",
    "render_image_grid",
    "render_points",
]
