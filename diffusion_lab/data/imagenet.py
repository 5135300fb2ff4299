"""Downsampled ImageNet 32x32 / 64x64 (Chrabaszcz, Loshchilov & Hutter 2017), 1000 classes.

The official ``npz`` release (image-net.org, "Downsampled ImageNet", needs an ImageNet login, so
there is no download here): ``Imagenet{R}_train_npz.zip`` (64x64: ``_train_part1_npz.zip`` and
``_train_part2_npz.zip``) hold ``train_data_batch_1.npz`` … ``train_data_batch_10.npz``, and
``Imagenet{R}_val_npz.zip`` holds ``val_data.npz``. Each file has

- ``data``: (N, 3·R·R) uint8, channel-planar: the R plane, then G, then B, each row-major, so
  ``data.reshape(N, 3, R, R)`` is already CHW (their ``image2numpy_imagenet_train.py``);
- ``labels``: N ints in 1..1000, in the order of the devkit's ``map_clsloc.txt`` (not the sorted-wnid
  order of torchvision's ``ImageNet``); we subtract 1 to get 0..999;
- ``mean`` (train files only, unused).

The files may sit directly in ``root`` or one folder below it (the folders the zips unpack to, e.g.
``Imagenet64_train_part1_npz/``). Train = the 1,281,167 training images (about 3.9 GB in memory at 32x32,
15.7 GB at 64x64; ``num_train_batches`` loads only the first k files), val = the 50,000 validation images.
Random horizontal flips on train, as in improved DDPM / ADM (Nichol & Dhariwal 2021; Dhariwal & Nichol
2021). This is not the unlabelled box-resized "ImageNet 32/64" of van den Oord et al. 2016 (PixelRNN),
used for likelihood results (e.g. VDM): that is another set of pixels.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid, uint8_to_unit
from diffusion_lab.schema.domains import POSITIVE_INT

RESOLUTIONS = (32, 64)
NUM_TRAIN_BATCHES = 10
NUM_CLASSES = 1000
VAL_FILE = "val_data.npz"


def train_file(index: int) -> str:
    """Name of the ``index``-th (1-based) training batch file."""
    return f"train_data_batch_{index}.npz"


def npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an ``.npz`` (compressed or not) from its header, without loading it."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: unsupported .npy format version {version} for {key!r}")
    return tuple(shape)


class ImageNetDataModule(DiffusionDataModule):
    """Downsampled ImageNet; batches ``(x (B, 3, R, R) float32 in [-1, 1], y (B,) long in 0..999)``.

    Args:
        root: directory with ``train_data_batch_{1..10}.npz`` and ``val_data.npz`` (directly or in the
            folders the official zips unpack to).
        resolution: 32 or 64 (must match the files).
        num_train_batches: load ``train_data_batch_1..k`` only (1..10; each is a tenth of the classes'
            images, shuffled, so any k keeps all 1000 classes).
        batch_size: images per batch.
        flip: random horizontal flips on the training split; val is never flipped.
        num_workers: DataLoader workers.
        seed: shuffling seed.
    """

    def __init__(
        self,
        root: str = "data/imagenet32",
        resolution: Annotated[int, POSITIVE_INT] = 32,
        num_train_batches: int = NUM_TRAIN_BATCHES,
        batch_size: int = 128,
        flip: bool = True,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        if resolution not in RESOLUTIONS:
            raise ValueError(f"dataset.resolution must be one of {list(RESOLUTIONS)}, got {resolution}")
        if not 1 <= num_train_batches <= NUM_TRAIN_BATCHES:
            raise ValueError(f"dataset.num_train_batches must be in 1..{NUM_TRAIN_BATCHES}, got {num_train_batches}")
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(3, resolution, resolution), num_classes=NUM_CLASSES, modality="image",
        )  # fmt: skip
        self.root, self.resolution, self.num_train_batches, self.flip = str(root), resolution, num_train_batches, flip
        self.save_hyperparameters()

    @property
    def folder(self) -> Path:
        """The absolute directory searched for the npz files (and its immediate subfolders)."""
        return Path(self.root).expanduser().resolve()

    @property
    def expected_files(self) -> list[str]:
        """The files this configuration reads: the first ``num_train_batches`` train batches and the val file."""
        return [train_file(i) for i in range(1, self.num_train_batches + 1)] + [VAL_FILE]

    def prepare_data(self) -> None:
        """Check that the files exist (nothing to download: image-net.org needs a login)."""
        self._locate_all()

    def _fix_hint(self) -> str:
        r = self.resolution
        return (
            f"Expected the npz release of Downsampled ImageNet {r}x{r} (Chrabaszcz et al. 2017) in {self.folder} "
            f"or one folder below it: train_data_batch_1.npz ... train_data_batch_10.npz and val_data.npz, each "
            f"with 'data' (N x {3 * r * r} uint8, the R, G, B {r}x{r} planes row-major) and 'labels' (N ints in "
            f"1..1000). Fix: set dataset.root=<that directory> (now {self.folder}), after downloading "
            f"Imagenet{r}_train{'_part1/_part2' if r == 64 else ''}_npz.zip and Imagenet{r}_val_npz.zip from "
            "https://image-net.org/download-images.php (needs an ImageNet account; dataset.download is not "
            "supported) and unzipping them there."
        )

    def _locate(self, name: str) -> Path | None:
        """``root/name`` or the single ``root/*/name``; None if absent."""
        direct = self.folder / name
        if direct.is_file():
            return direct
        found = sorted(self.folder.glob(f"*/{name}")) if self.folder.is_dir() else []
        if len(found) > 1:
            raise RuntimeError(f"{name} found in several folders: {[str(p) for p in found]}. {self._fix_hint()}")
        return found[0] if found else None

    def _locate_all(self) -> dict[str, Path]:
        located = {name: self._locate(name) for name in self.expected_files}
        missing = [name for name, path in located.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"Downsampled ImageNet {self.resolution}x{self.resolution} not found: {self.folder} lacks "
                f"{', '.join(missing)}. {self._fix_hint()}"
            )
        return {name: path for name, path in located.items() if path is not None}

    def _load_files(self, paths: list[Path]) -> tuple[Tensor, Tensor]:
        """Concatenate npz files into (x (N, 3, R, R) uint8, y (N,) long in 0..999), preallocated."""
        side, width = self.resolution, 3 * self.resolution**2
        shapes = [self._data_shape(path) for path in paths]
        for path, shape in zip(paths, shapes, strict=True):
            if len(shape) != 2 or shape[1] != width:
                raise RuntimeError(
                    f"{path}: 'data' has shape {shape}, but dataset.resolution={side} needs (N, {width}) "
                    f"(a {int(np.sqrt(shape[-1] / 3))}x{int(np.sqrt(shape[-1] / 3))} file?). {self._fix_hint()}"
                )
        x = torch.empty((sum(shape[0] for shape in shapes), 3, side, side), dtype=torch.uint8)
        y = torch.empty(len(x), dtype=torch.long)
        start = 0
        for path, shape in zip(paths, shapes, strict=True):
            data, labels = self._read(path)
            self._check_arrays(path, data, labels, shape[0])
            x[start : start + shape[0]] = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, side, side)
            y[start : start + shape[0]] = torch.from_numpy(labels.astype(np.int64) - 1)
            start += shape[0]
        return x, y

    def _data_shape(self, path: Path) -> tuple[int, ...]:
        """Shape of the file's ``data`` array, from its header."""
        try:
            with zipfile.ZipFile(path) as archive:
                keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
            if "data" not in keys or "labels" not in keys:
                raise KeyError(f"has arrays {keys}, needs 'data' and 'labels'")
            return npz_array_shape(path, "data")
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise RuntimeError(f"Could not read {path}: {err}. {self._fix_hint()}") from err

    def _check_arrays(self, path: Path, data: np.ndarray, labels: np.ndarray, n: int) -> None:
        """``data`` must be uint8 and ``labels`` n integers in 1..1000."""
        in_range = labels.size == 0 or (labels.min() >= 1 and labels.max() <= NUM_CLASSES)
        integral = np.issubdtype(labels.dtype, np.integer)
        if data.dtype != np.uint8 or labels.shape != (n,) or not integral or not in_range:
            bad = labels[(labels < 1) | (labels > NUM_CLASSES)] if labels.size and integral else labels[:0]
            span = f" in {labels.min()}..{labels.max()}" if labels.size and integral else ""
            span += f", {bad.size} outside 1..{NUM_CLASSES} (values {np.unique(bad)[:10].tolist()})" if bad.size else ""
            raise RuntimeError(
                f"{path}: expected uint8 'data' and {n} integer 'labels' in 1..{NUM_CLASSES}, got {data.dtype} "
                f"'data' and {labels.dtype} labels of shape {labels.shape}{span}. {self._fix_hint()}"
            )

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The ``data`` and ``labels`` arrays of one npz file."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                return npz["data"], np.asarray(npz["labels"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise RuntimeError(f"Could not read {path}: {err!r}. {self._fix_hint()}") from err

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        located = self._locate_all()
        x_train, y_train = self._load_files([located[name] for name in self.expected_files[:-1]])
        x_val, y_val = self._load_files([located[VAL_FILE]])
        return (
            TensorPairDataset(x_train, y_train, transform=uint8_to_unit, flip=self.flip),
            TensorPairDataset(x_val, y_val, transform=uint8_to_unit),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 3, R, R) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)
