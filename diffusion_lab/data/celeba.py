"""CelebA (Liu et al. 2015), aligned-and-cropped faces, cropped and resized to 64x64; no labels.

Read from torchvision's layout, ``<root>/celeba/img_align_celeba/*.jpg`` (202,599 JPEGs of 178x218)
plus ``<root>/celeba/list_eval_partition.txt`` (``<file> <0|1|2>``: train / valid / test). Only these
two are needed (torchvision's ``CelebA`` class also wants the attribute files).

Crops, both common in diffusion papers at 64x64:

- ``crop="ddim"`` (default): the 128x128 box with top-left corner (row 57, column 25), i.e. centred on
  (x, y) = (89, 121) — Song, Meng & Ermon 2021 (DDIM), ``datasets/__init__.py`` of their code, which
  later CelebA-64 work (e.g. Analytic-DPM, PNDM) reuses. DDPM (Ho et al. 2020) reports CelebA-HQ, not
  CelebA 64.
- ``crop="center140"``: the central 140x140 square — Song & Ermon 2019 (NCSN) and Song et al. 2021
  (score SDE), ``central_crop(img, 140)``.

Then a bilinear, antialiased resize to ``resolution`` (PIL's, as torchvision's ``Resize`` on PIL images
in the DDIM code). Train = partition 0 (162,770 images, random horizontal flips as in DDIM), val =
partition 1 ("valid", 19,867) or 2 ("test", 19,962).

Decoding all JPEGs takes a few minutes, so each processed split is cached as one ``.npy`` of uint8
under ``<root>/celeba/diffusion_lab_cache/`` (``cache=false`` turns this off; an unwritable root only
warns), with its sha256 in ``<file>.sha256``: a cache that does not match it is decoded again, with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import CelebA
from torchvision.datasets.utils import download_file_from_google_drive, extract_archive

from diffusion_lab.cache_files import seal, verify_or_discard
from diffusion_lab.data import files
from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid, uint8_to_unit
from diffusion_lab.schema.choices import CelebACrop, CelebAValSplit, values
from diffusion_lab.schema.domains import POSITIVE_INT

BASE_FOLDER = CelebA.base_folder  # "celeba"
IMAGE_FOLDER = "img_align_celeba"
PARTITION_FILE = "list_eval_partition.txt"
ARCHIVE = "img_align_celeba.zip"
CACHE_FOLDER = "diffusion_lab_cache"
PARTITIONS = {"train": 0, "valid": 1, "test": 2}
VAL_SPLITS = values(CelebAValSplit)
# Crop boxes (left, top, right, bottom) on the 178x218 aligned images.
CROPS = {
    "ddim": (25, 57, 25 + 128, 57 + 128),  # Song, Meng & Ermon 2021: cx, cy = 89, 121, side 128
    "center140": ((178 - 140) // 2, (218 - 140) // 2, (178 - 140) // 2 + 140, (218 - 140) // 2 + 140),
}
ALIGNED_SIZE = (178, 218)  # (width, height) of every img_align_celeba image
# Google-Drive ids and md5 sums of the two files we need, from torchvision's CelebA.file_list.
DOWNLOADS = tuple(entry for entry in CelebA.file_list if entry[2] in (ARCHIVE, PARTITION_FILE))


def read_partition(path: Path) -> dict[str, list[str]]:
    """Parse ``list_eval_partition.txt`` into {"train" | "valid" | "test": [file names in file order]}."""
    splits: dict[str, list[str]] = {name: [] for name in PARTITIONS}
    names = {index: name for name, index in PARTITIONS.items()}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}:{number}: expected '<image file> <0|1|2>', got {line!r}")
        splits[names[int(parts[1])]].append(parts[0])
    return splits


def crop_and_resize(path: Path, box: tuple[int, int, int, int], resolution: int) -> np.ndarray:
    """One aligned CelebA image -> (R, R, 3) uint8: crop ``box`` (left, top, right, bottom), bilinear resize."""
    image = files.open_rgb(path)
    if image.size != ALIGNED_SIZE:
        raise ValueError(f"expected a {ALIGNED_SIZE[0]}x{ALIGNED_SIZE[1]} aligned image, got {image.size}")
    return np.asarray(image.crop(box).resize((resolution, resolution), Image.Resampling.BILINEAR))


def _read_cache(path: Path) -> np.ndarray | None:
    """A cached ``.npy`` array, read with ``allow_pickle=False`` (a pickle or an object array is refused, never
    run); ``None``, with a warning, when the file is unreadable, so the images are decoded again."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        warnings.warn(f"ignoring the CelebA cache {path} ({err}); decoding the images again", stacklevel=2)
        return None


class CelebADataModule(DiffusionDataModule):
    """CelebA faces; batches ``(x (B, 3, R, R) float32 in [-1, 1], y (B,) zeros)`` (no class labels).

    Args:
        root: directory that contains (or will contain) ``celeba/img_align_celeba/`` and
            ``celeba/list_eval_partition.txt``.
        download: fetch ``img_align_celeba.zip`` (1.4 GB) and the partition file from Google Drive in
            :meth:`prepare_data` when missing (needs the ``gdown`` package; Drive often refuses with a
            quota error — then download by hand from the CelebA page).
        resolution: output side R (64 in the papers above).
        crop: "ddim" (128x128 box centred on (89, 121)) or "center140" (central 140x140).
        val_split: "valid" (partition 1) or "test" (partition 2) as the validation split.
        batch_size: images per batch.
        flip: random horizontal flips on the training split (DDIM); val is never flipped.
        num_workers: DataLoader workers.
        seed: shuffling seed.
        cache: keep each processed split as ``.npy`` under ``celeba/diffusion_lab_cache/``.
    """

    def __init__(
        self,
        root: str = "data/celeba",
        download: bool = False,
        resolution: Annotated[int, POSITIVE_INT] = 64,
        crop: CelebACrop | str = CelebACrop.ddim,
        val_split: CelebAValSplit | str = CelebAValSplit.valid,
        batch_size: int = 128,
        flip: bool = True,
        num_workers: int = 4,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        crop = files.choice(crop, tuple(CROPS), "dataset.crop")
        val_split = files.choice(val_split, VAL_SPLITS, "dataset.val_split")
        if not 1 <= resolution <= 128:
            raise ValueError(f"dataset.resolution must be in 1..128 (the crop is at most 140 px), got {resolution}")
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(3, resolution, resolution), num_classes=None, modality="image",
        )  # fmt: skip
        self.root, self.download, self.resolution, self.crop = str(root), download, resolution, crop
        self.val_split, self.flip, self.cache = val_split, flip, cache
        self.save_hyperparameters()

    @property
    def folder(self) -> Path:
        """The absolute directory holding ``img_align_celeba/`` and the partition file: ``<root>/celeba``."""
        return Path(self.root).expanduser().resolve() / BASE_FOLDER

    def prepare_data(self) -> None:
        """Download if asked and files are missing; check the files; fill the cache (rank 0 under Lightning)."""
        if self.download and self._missing():
            self._download()
        self._check_files()
        if self.cache:
            for split in ("train", self.val_split):
                self._load_split(split)

    def _missing(self) -> list[str]:
        missing = [] if (self.folder / IMAGE_FOLDER).is_dir() else [f"{IMAGE_FOLDER}/"]
        return missing + ([] if (self.folder / PARTITION_FILE).is_file() else [PARTITION_FILE])

    def _fix_hint(self, download_failed: bool = False) -> str:
        download = (
            "or download img_align_celeba.zip and list_eval_partition.txt by hand from "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive, 'Align&Cropped Images' and "
            f"'Eval') and unzip the archive into {self.folder}"
            if download_failed
            else "or set dataset.download=true to fetch them from Google Drive (needs network and the gdown "
            "package, 1.4 GB)"
        )
        return (
            f"Expected {self.folder}/{IMAGE_FOLDER}/ with the 178x218 aligned JPEGs (000001.jpg ...) and "
            f"{self.folder}/{PARTITION_FILE} with one '<file> <0|1|2>' line per image (0 train, 1 valid, "
            f"2 test), as torchvision lays CelebA out. Fix: set dataset.root=<directory containing "
            f"{BASE_FOLDER}/> (now {self.folder.parent}), {download}."
        )

    def _download(self) -> None:
        try:
            with files.socket_timeout(files.DOWNLOAD_TIMEOUT_S):
                for file_id, md5, filename in DOWNLOADS:
                    download_file_from_google_drive(file_id, str(self.folder), filename, md5)
                extract_archive(str(self.folder / ARCHIVE))
        except Exception as err:  # no gdown, quota exceeded, URLError, timeouts, md5 mismatch ...
            raise files.download_failed("CelebA", self.folder, err, self._fix_hint(download_failed=True)) from err

    def _check_files(self) -> None:
        files.require_files("CelebA", self.folder, self._missing(), self._fix_hint())

    def _split_paths(self, split: str) -> list[Path]:
        """The image files of one partition, in the partition file's order; all must exist."""
        try:
            names = read_partition(self.folder / PARTITION_FILE)[split]
        except (ValueError, UnicodeDecodeError) as err:
            raise RuntimeError(f"Could not parse {self.folder / PARTITION_FILE}: {err}. {self._fix_hint()}") from err
        if not names:
            raise RuntimeError(f"{self.folder / PARTITION_FILE} lists no '{split}' images. {self._fix_hint()}")
        present = {p.name for p in (self.folder / IMAGE_FOLDER).iterdir()}
        absent = [name for name in names if name not in present]
        if absent:
            raise FileNotFoundError(
                f"CelebA incomplete: {len(absent)} '{split}' images listed in {PARTITION_FILE} are missing from "
                f"{self.folder / IMAGE_FOLDER} (first: {', '.join(absent[:3])}). {self._fix_hint()}"
            )
        return [self.folder / IMAGE_FOLDER / name for name in names]

    def _cache_path(self, split: str) -> Path:
        return self.folder / CACHE_FOLDER / f"{split}_{self.crop}_{self.resolution}.npy"

    def _load_split(self, split: str) -> Tensor:
        """One partition as (N, 3, R, R) uint8, from the cache when it matches, else decoded (and cached)."""
        paths = self._split_paths(split)
        cached = self._cache_path(split)
        if self.cache and verify_or_discard(cached, "ignoring the CelebA cache"):  # its sha256 first: else rebuilt
            array = _read_cache(cached)
            if array is not None and array.dtype == np.uint8 and array.shape == (len(paths), *self.data_shape):
                return torch.from_numpy(array)
        x = files.decode_images(paths, lambda p: crop_and_resize(p, CROPS[self.crop], self.resolution), self.data_shape)
        if self.cache:
            self._write_cache(cached, x)
        return x

    def _write_cache(self, path: Path, x: Tensor) -> None:
        tmp = path.with_suffix(".tmp.npy")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, x.numpy())
            tmp.replace(path)
            seal(path)  # <path>.sha256, checked before the cache is read back
        except OSError as err:
            warnings.warn(f"CelebA: could not write the cache {path} ({err}); set dataset.cache=false", stacklevel=2)

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        self._check_files()
        x_train, x_val = self._load_split("train"), self._load_split(self.val_split)
        zeros = torch.zeros  # CelebA is unconditional here: labels are all 0
        return (
            TensorPairDataset(x_train, zeros(len(x_train), dtype=torch.long), transform=uint8_to_unit, flip=self.flip),
            TensorPairDataset(x_val, zeros(len(x_val), dtype=torch.long), transform=uint8_to_unit),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 3, R, R) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)
