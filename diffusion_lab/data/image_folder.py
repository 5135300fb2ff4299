"""Any folder of images, resized and cropped to ``resolution``; class subfolders become labels.

Layout (as torchvision's ``ImageFolder``): either ``<root>/<class>/**/<image>`` — each non-hidden
immediate subfolder of ``root`` is a class, labelled 0, 1, … in sorted name order, its images found
recursively — or images anywhere under ``<root>`` without labels (also with ``class_labels=false``, e.g.
FFHQ's ``00000/ 01000/ …`` chunk folders). Files with the extensions in ``files.IMAGE_EXTENSIONS`` are
read and decoded to 8-bit RGB by the rules of :mod:`diffusion_lab.data.decoding` (16-bit grey keeps its high
byte, alpha is composited over black; float, 32-bit-integer and animated images are refused, naming the file);
hidden files and folders are skipped.

Each image is resized so that its shorter side is ``load_size`` (default ``resolution``) and cropped to
the central ``load_size`` square, the ``center_crop_arr`` of Dhariwal & Nichol 2021 (guided-diffusion
``image_datasets.py``: box-filter halvings while the short side is at least twice the target, then
bicubic). The squares are held in memory as uint8. ``crop="center"`` serves their central
``resolution`` crop; ``crop="random"`` serves a fresh random ``resolution`` crop of each training square
per draw (val still gets the central crop), which needs ``load_size > resolution``.

Validation: the images of ``val_root`` (same layout and class names) if set, else a seeded random
``val_fraction`` of ``root``'s images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusion_lab.data import files
from diffusion_lab.data.base import (
    Batch,
    DiffusionDataModule,
    TensorPairDataset,
    render_image_grid,
    uint8_to_unit,
)
from diffusion_lab.schema.choices import FolderCrop, values
from diffusion_lab.schema.domains import FRACTION, POSITIVE_INT

CROPS = values(FolderCrop)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` and take the central square: PIL image -> (size, size, C) uint8.

    Dhariwal & Nichol 2021 (guided-diffusion ``center_crop_arr``): halve with a box filter while the
    shorter side is >= 2·size (fast and alias-free), then one bicubic resize.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def center_crop(x: Tensor, size: int) -> Tensor:
    """Central ``size`` x ``size`` crop of (..., H, W)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


class RandomCropDataset(TensorPairDataset):
    """Stored (N, C, L, L) squares served as random (C, R, R) crops, then optionally mirrored.

    The crop offsets, like the flips, draw from the global torch RNG (seeded per worker by Lightning).
    :meth:`tensors` returns the deterministic central crops.
    """

    def __init__(self, x: Tensor, y: Tensor, size: int, flip: bool = False) -> None:
        if size > min(x.shape[-2:]):
            raise ValueError(f"crop size {size} exceeds the stored images {tuple(x.shape[-2:])}")
        super().__init__(x, y, transform=uint8_to_unit, flip=flip)
        self.size = size

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """A batch: (x (B, C, R, R) float32, y (B,) long), each image a random crop (mirrored at random)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        b, (c, h, w), r = len(idx), self.x.shape[1:], self.size
        top = torch.randint(0, h - r + 1, (b,))
        left = torch.randint(0, w - r + 1, (b,))
        rows = (top[:, None] + torch.arange(r))[:, None, :, None]  # (B, 1, R, 1)
        cols = (left[:, None] + torch.arange(r))[:, None, None, :]  # (B, 1, 1, R)
        crops = self.x[idx[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
        x = self._convert(crops)
        if self.flip:
            mirror = torch.rand(b) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.y[idx]

    def tensors(self) -> Batch:
        """The whole split as central crops, never flipped: (x (N, C, R, R) float32, y (N,) long)."""
        return self._convert(center_crop(self.x, self.size)), self.y


def walk_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursively, following links, skipping hidden entries), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / name for name in filenames if files.is_image_file(Path(name))]
    return sorted(found)


def class_folders(folder: Path) -> list[str]:
    """Names of the non-hidden immediate subfolders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataModule(DiffusionDataModule):
    """A folder of images; batches ``(x (B, 3, R, R) float32 in [-1, 1], y (B,) long)``.

    ``num_classes`` is the number of class subfolders (None without labels); reading it lists ``root``
    (no image is opened), so it raises the missing-folder error early.

    Args:
        root: the image folder.
        resolution: output side R.
        crop: "center" or "random" (random train crops of the stored ``load_size`` squares).
        load_size: side of the stored squares (default R); > R for ``crop="random"``.
        val_root: a separate validation folder (same class names); None: split ``root``.
        val_fraction: share of ``root`` held out for validation when ``val_root`` is None (seeded).
        class_labels: label images by their class subfolder (False: one unlabelled set, recursive).
        batch_size: images per batch.
        flip: random horizontal flips on the training split (off by default: an arbitrary folder may
            hold text, digits or other mirror-sensitive images; EDM's ``--xflip`` is off by default too).
        num_workers: DataLoader workers.
        seed: split and shuffling seed.
    """

    def __init__(
        self,
        root: str = "data/images",
        resolution: Annotated[int, POSITIVE_INT] = 64,
        crop: FolderCrop | str = FolderCrop.center,
        load_size: int | None = None,
        val_root: str | None = None,
        val_fraction: Annotated[float, FRACTION] = 0.05,
        class_labels: bool = True,
        batch_size: int = 64,
        flip: bool = False,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        crop = files.choice(crop, CROPS, "dataset.crop")
        load_size = resolution if load_size is None else load_size
        if resolution < 1 or load_size < resolution:
            raise ValueError(f"need 1 <= dataset.resolution <= dataset.load_size, got {resolution}, {load_size}")
        if crop == "random" and load_size == resolution:
            raise ValueError(
                f"dataset.crop=random needs dataset.load_size > dataset.resolution={resolution} (e.g. "
                f"{resolution + resolution // 8}); a random {resolution}-crop of a {load_size} square is the square"
            )
        if val_root is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
        self._class_names: list[str] | None = None
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(3, resolution, resolution), num_classes=None, modality="image",
        )  # fmt: skip
        self.root, self.resolution, self.crop, self.load_size = str(root), resolution, crop, load_size
        self.val_root, self.val_fraction, self.class_labels, self.flip = val_root, val_fraction, class_labels, flip
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int | None:
        """Number of class subfolders of ``root`` (None when unlabelled); lists ``root`` on first use."""
        if self._class_names is None:
            self._class_names = self._list_classes()
        return len(self._class_names) or None

    @num_classes.setter
    def num_classes(self, value: int | None) -> None:
        if value is not None:  # the base class stores None; the count always comes from the folder
            raise AttributeError("ImageFolderDataModule.num_classes is the number of class subfolders of root")

    @property
    def folder(self) -> Path:
        """The absolute image folder."""
        return Path(self.root).expanduser().resolve()

    def prepare_data(self) -> None:
        """Check that the folder exists and holds images (nothing to download)."""
        self._scan(self.folder)

    def _fix_hint(self, folder: Path) -> str:
        return (
            f"Expected images ({', '.join(files.IMAGE_EXTENSIONS)}) in {folder}: in class subfolders "
            f"{folder}/<class>/... (labels in sorted folder order), or anywhere below it without labels "
            "(dataset.class_labels=false for subfolders that are not classes). Fix: set dataset.root=<image "
            f"folder> (now {self.folder}) and, for a separate validation folder, dataset.val_root= (now "
            f"{self.val_root})."
        )

    def _list_classes(self) -> list[str]:
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"Image folder not found: {self.folder} does not exist. {self._fix_hint(self.folder)}"
            )
        return class_folders(self.folder) if self.class_labels else []

    def _scan(self, folder: Path) -> tuple[list[Path], list[str]]:
        """Image files under ``folder`` and, per file, its class name ("" when unlabelled)."""
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder not found: {folder} does not exist. {self._fix_hint(folder)}")
        classes = class_folders(folder) if self.class_labels else []
        if not classes:
            paths = walk_images(folder)
            if not paths:
                raise FileNotFoundError(f"No images found under {folder}. {self._fix_hint(folder)}")
            return paths, [""] * len(paths)
        loose = [p.name for p in folder.iterdir() if p.is_file() and files.is_image_file(p)]
        if loose:
            raise RuntimeError(
                f"{folder} holds both class subfolders ({', '.join(classes[:5])}) and images directly "
                f"({', '.join(loose[:3])}): move the images into a class folder, or set dataset.class_labels=false"
            )
        paths, names = [], []
        for name in classes:
            found = walk_images(folder / name)
            if not found:
                raise FileNotFoundError(f"Class folder {folder / name} holds no images. {self._fix_hint(folder)}")
            paths += found
            names += [name] * len(found)
        return paths, names

    def _labels(self, names: list[str], where: Path) -> Tensor:
        """Class names -> (N,) long indices into ``root``'s class folders (zeros when unlabelled)."""
        index = {name: i for i, name in enumerate(self._class_names or [])}
        if not set(names) <= (set(index) if index else {""}):
            raise RuntimeError(
                f"The class subfolders of {where} ({sorted(set(names) - {''}) or 'none'}) do not match those of "
                f"{self.folder} ({list(index) or 'none'}): a separate dataset.val_root needs the same classes"
            )
        return torch.as_tensor([index.get(name, 0) for name in names], dtype=torch.long)

    def _split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """Seeded split of 0..n-1 into (train_idx, val_idx), each sorted; both non-empty."""
        if n < 2:
            raise RuntimeError(f"{self.folder} holds {n} image(s): a train/val split needs at least 2")
        n_val = min(n - 1, max(1, round(n * self.val_fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def _decode(self, paths: list[Path]) -> Tensor:
        size = self.load_size
        return files.decode_images(paths, lambda p: center_crop_arr(files.open_rgb(p), size), (3, size, size))

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        paths, names = self._scan(self.folder)
        self._class_names = self._list_classes()
        y = self._labels(names, self.folder)
        x = self._decode(paths)
        if self.val_root is None:
            train_idx, val_idx = self._split_indices(len(paths))
            (x_train, y_train), (x_val, y_val) = (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
        else:
            val_folder = Path(self.val_root).expanduser().resolve()
            val_paths, val_names = self._scan(val_folder)
            (x_train, y_train), (x_val, y_val) = (x, y), (self._decode(val_paths), self._labels(val_names, val_folder))
        r = self.resolution
        val = TensorPairDataset(center_crop(x_val, r).contiguous(), y_val, transform=uint8_to_unit)
        if self.crop == "random":
            return RandomCropDataset(x_train, y_train, r, flip=self.flip), val
        train = TensorPairDataset(
            center_crop(x_train, r).contiguous(), y_train, transform=uint8_to_unit, flip=self.flip
        )
        return train, val

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 3, R, R) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)
