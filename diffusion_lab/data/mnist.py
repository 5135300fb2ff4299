"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017): 28x28 grey images, 10 classes.

Read through torchvision's ``MNIST`` / ``FashionMNIST`` from the uncompressed idx files, in
torchvision's layout ``<root>/MNIST/raw/`` (``<root>/FashionMNIST/raw/``). Train = the 60k training
images, val = the 10k test images. Pixels 0..255 are mapped to [-1, 1], so the black background is -1.

Resolution: most diffusion UNets halve the resolution three times, which 28 does not allow, so the
default pads the 28x28 digits with 2 background pixels on every side to 32x32 (the digit stays
pixel-exact); ``resize="resize"`` instead resamples to 32x32 (bilinear, antialiased, rounded back to
8 bits) and ``resize="none"`` keeps 28x28. No horizontal flips by default: a mirrored digit is a
different (or no) digit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import MNIST, FashionMNIST

from diffusion_lab.data import files
from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid, uint8_to_unit
from diffusion_lab.schema.choices import MNISTResize, values

RESIZES = values(MNISTResize)
NATIVE, PADDED = 28, 32
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def resize_digits(x: Tensor, resize: str) -> Tensor:
    """(N, 1, 28, 28) uint8 -> (N, 1, R, R) uint8 with R = 32 ("pad", "resize") or 28 ("none")."""
    if resize == "pad":
        margin = (PADDED - NATIVE) // 2
        return F.pad(x, (margin, margin, margin, margin), value=0)
    if resize == "resize":
        y = F.interpolate(x.float(), size=(PADDED, PADDED), mode="bilinear", antialias=True, align_corners=False)
        return y.round().clamp(0, 255).to(torch.uint8)
    return x


class MNISTDataModule(DiffusionDataModule):
    """MNIST; batches ``(x (B, 1, R, R) float32 in [-1, 1], y (B,) long in 0..9)``, R = 32 (or 28).

    Args:
        root: directory that contains (or will contain) ``MNIST/raw/`` with the four idx files.
        download: fetch the files in :meth:`prepare_data` when missing (torchvision's mirrors, each
            socket operation bounded by ``files.DOWNLOAD_TIMEOUT_S``).
        resize: "pad" (default: 2-pixel background border -> 32x32), "resize" (bilinear -> 32x32) or
            "none" (28x28).
        batch_size: images per batch.
        flip: random horizontal flips on the training split (off: mirrored digits are not digits).
        num_workers: DataLoader workers (0 is fine: batches are one indexing op on an in-memory tensor).
        seed: shuffling seed.
    """

    reader: type[MNIST] = MNIST
    title = "MNIST"

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = False,
        resize: MNISTResize | str = MNISTResize.pad,
        batch_size: int = 128,
        flip: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        resize = files.choice(resize, RESIZES, "dataset.resize")
        side = NATIVE if resize == "none" else PADDED
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(1, side, side), num_classes=10, modality="image",
        )  # fmt: skip
        self.root, self.download, self.resize, self.flip = str(root), download, resize, flip
        self.save_hyperparameters()

    @property
    def folder(self) -> Path:
        """The absolute directory the idx files are read from: ``<root>/MNIST/raw``."""
        return Path(self.root).expanduser().resolve() / self.reader.__name__ / "raw"

    def prepare_data(self) -> None:
        """Download when ``download`` is set (rank 0 only under Lightning), then check the files exist."""
        if self.download and self._missing():
            self._download()
        self._check_files()

    def _missing(self) -> list[str]:
        return [name for name in IDX_FILES if not (self.folder / name).is_file()]

    def _fix_hint(self, download_failed: bool = False) -> str:
        mirrors = ", ".join(self.reader.mirrors)
        download = (
            f"or fetch {', '.join(name for name, _ in self.reader.resources)} from {mirrors} on a machine with "
            f"network access and gunzip them into {self.folder}"
            if download_failed
            else "or set dataset.download=true to fetch them (needs network, about 30 MB)"
        )
        return (
            f"Expected the uncompressed idx files {self.folder}/{{{', '.join(IDX_FILES)}}} (idx3-ubyte: "
            "big-endian magic 2051, count, 28, 28, then uint8 pixels; idx1-ubyte: magic 2049, count, then "
            f"uint8 labels 0..9). Fix: set dataset.root=<directory containing {self.reader.__name__}/raw/> "
            f"(now {self.folder.parent.parent}), {download}."
        )

    def _download(self) -> None:
        try:
            with files.socket_timeout(files.DOWNLOAD_TIMEOUT_S):
                self.reader(str(self.folder.parent.parent), train=False, download=True)
        except Exception as err:  # URLError, timeouts, md5 mismatch, a bad archive ...
            raise files.download_failed(self.title, self.folder, err, self._fix_hint(download_failed=True)) from err

    def _check_files(self) -> None:
        files.require_files(self.title, self.folder, self._missing(), self._fix_hint())

    def label_origin(self, split: str, n: int) -> list[tuple[str, int]]:
        """The idx label file of ``split`` (train: ``train-labels-idx1-ubyte``, val: ``t10k-labels-idx1-ubyte``)."""
        return [(str(self.folder / IDX_FILES[1 if split == "train" else 3]), n)]

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Read one split: (x (N, 1, 28, 28) uint8, y (N,) long)."""
        try:
            ds = self.reader(str(self.folder.parent.parent), train=train, download=False)
            x, y = ds.data, ds.targets
            if x.dtype != torch.uint8 or x.shape[1:] != (NATIVE, NATIVE) or len(x) != len(y):
                raise ValueError(f"images of shape {tuple(x.shape)} ({x.dtype}) with {len(y)} labels")
        except (AssertionError, RuntimeError, ValueError, TypeError) as err:
            raise RuntimeError(f"Could not parse {self.title} in {self.folder}: {err!r}. {self._fix_hint()}") from err
        return x.unsqueeze(1).contiguous(), y.to(torch.long)

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        self._check_files()
        (x_train, y_train), (x_val, y_val) = self._load_split(train=True), self._load_split(train=False)
        return (
            TensorPairDataset(resize_digits(x_train, self.resize), y_train, transform=uint8_to_unit, flip=self.flip),
            TensorPairDataset(resize_digits(x_val, self.resize), y_val, transform=uint8_to_unit),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 1, R, R) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): MNIST's format and splits, 10 clothing classes.

    Same options as :class:`MNISTDataModule`; files under ``<root>/FashionMNIST/raw/``.
    """

    reader = FashionMNIST
    title = "Fashion-MNIST"

    def __init__(self, root: str = "data/fashion_mnist", **options: Any) -> None:
        if "resize" in options:  # a str in the saved hyperparameters (they collect this frame's options too)
            options["resize"] = files.choice(options["resize"], RESIZES, "dataset.resize")
        super().__init__(root, **options)
