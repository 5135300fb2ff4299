"""CIFAR-10 (Krizhevsky 2009) through ``torchvision.datasets.CIFAR10``, 32x32, scaled to [-1, 1].

Train = the 50k training images (random horizontal flips, as Ho et al. 2020 §4), val = the 10k
test images (never flipped). Both splits are held in memory as uint8 (about 180 MB) and
converted to float per batch.

Integrity: by default torchvision's md5 checks of the official files apply. ``verify_md5=False``
replaces them by a presence check — for files written by other tools, or by our tests, which write
a tiny CIFAR-10 in the real pickle format and load it through this same code. Either way the batch pickles
are read by an unpickler that builds only containers and numpy arrays (:class:`_ArrayUnpickler`), so a
crafted file is refused, never run; ``batches.meta`` (class names) is not read.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, render_image_grid, uint8_to_unit
from diffusion_lab.data.files import DOWNLOAD_TIMEOUT_S, download_failed, require_files, socket_timeout

BASE_FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
MD5 = dict(CIFAR10.train_list + CIFAR10.test_list) | {str(CIFAR10.meta["filename"]): str(CIFAR10.meta["md5"])}
FILES = tuple(MD5)  # data_batch_1..5, test_batch, batches.meta

EXPECTED_FORMAT = (
    "the python-pickle release of CIFAR-10 (cifar-10-python.tar.gz, extracted): "
    "{dir}/{{data_batch_1..data_batch_5, test_batch, batches.meta}}, each batch a pickled dict with "
    "'data' (N x 3072 uint8: the R, G, B 32x32 planes, row-major) and 'labels' (N ints in 0..9), "
    "batches.meta a pickled dict with 'label_names'"
)


def files_intact(folder: Path, verify_md5: bool) -> bool:
    """Whether all six CIFAR-10 files exist in ``folder`` (and match torchvision's md5 sums if asked)."""
    return all(check_integrity(str(folder / name), MD5[name] if verify_md5 else None) for name in FILES)


# Everything a CIFAR-10 batch pickle may name: numpy's array reconstruction, and the bytes constructor
# ``_codecs.encode`` of protocol-2 pickles written by Python 3 (torch's weights-only unpickler allows it too); dicts,
# lists, str and int need no global. Anything else (os.system, builtins.eval, …) is refused, never called.
_ARRAY_GLOBALS = frozenset(
    {(m, "_reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")}
    | {(m, "scalar") for m in ("numpy.core.multiarray", "numpy._core.multiarray")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin containers and numpy arrays, so a crafted batch file cannot run code
    even with ``verify_md5=False`` (torchvision's reader calls ``pickle.load`` on it)."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is one of :data:`_ARRAY_GLOBALS`."""
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One batch file -> ``(data (N, 3072) uint8, labels)``, read with :class:`_ArrayUnpickler`."""
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(f, encoding="latin1").load()
    return np.asarray(entry["data"], dtype=np.uint8), [int(y) for y in entry["labels"]]


def split_files(train: bool) -> list[str]:
    """The batch files of one split: ``data_batch_1..5`` (train) or ``test_batch``."""
    return [name for name, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]


def read_split(folder: Path, train: bool) -> tuple[np.ndarray, list[int], list[int]]:
    """``data_batch_1..5`` (train) or ``test_batch`` -> ``(x (N, 3, 32, 32) uint8, labels, labels per file)``."""
    batches = [read_batch(folder / name) for name in split_files(train)]
    x = np.vstack([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    return x, [y for _, labels in batches for y in labels], [len(labels) for _, labels in batches]


def _fix_hint(folder: Path, download_failed: bool = False) -> str:
    """What to do about missing/broken files: expected format, and the config keys to set."""
    download = (
        f"or fetch {CIFAR10.url} on a machine with network access and extract it into {folder.parent} "
        "(dataset.download=true needs network access)"
        if download_failed
        else "or set dataset.download=true to fetch it (needs network, 163 MB)"
    )
    return (
        f"Expected {EXPECTED_FORMAT.format(dir=folder)}. "
        f"Fix: set dataset.root=<directory containing {BASE_FOLDER}/> (now {folder.parent}), {download}."
    )


class CIFAR10DataModule(DiffusionDataModule):
    """CIFAR-10; batches ``(x (B, 3, 32, 32) float32 in [-1, 1], y (B,) long in 0..9)``.

    Args:
        root: directory that contains (or will contain) ``cifar-10-batches-py/``.
        download: fetch and extract the archive in :meth:`prepare_data` when files are missing.
        batch_size: images per batch.
        flip: random horizontal flips on the training split (Ho et al. 2020); val is never flipped.
        num_workers: DataLoader workers.
        seed: shuffling seed.
        verify_md5: check torchvision's md5 sums of the official files (False: presence check only).
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        flip: bool = True,
        num_workers: int = 4,
        seed: int = 0,
        verify_md5: bool = True,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed,
            data_shape=(3, 32, 32), num_classes=10, modality="image",
        )  # fmt: skip
        self.root, self.download, self.flip, self.verify_md5 = str(root), download, flip, verify_md5
        self._label_counts: dict[str, list[int]] = {}
        self.save_hyperparameters()

    @property
    def folder(self) -> Path:
        """The absolute directory the batch files are read from: ``<root>/cifar-10-batches-py``."""
        return Path(self.root).expanduser().resolve() / BASE_FOLDER

    def prepare_data(self) -> None:
        """Download when ``download`` is set (rank 0 only under Lightning), then check the files exist."""
        if self.download:
            self._download()
        self._check_files()

    def _download(self) -> None:
        if files_intact(self.folder, self.verify_md5):
            return
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                download_and_extract_archive(
                    CIFAR10.url, str(self.folder.parent), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
                )
        except Exception as err:  # URLError, OSError, timeouts, a bad archive md5 ...
            hint = _fix_hint(self.folder, download_failed=True)
            raise download_failed("CIFAR-10", self.folder.parent, err, hint) from err

    def _check_files(self) -> None:
        missing = [name for name in FILES if not (self.folder / name).is_file()]
        require_files("CIFAR-10", self.folder, missing, _fix_hint(self.folder))
        if not files_intact(self.folder, self.verify_md5):
            raise RuntimeError(
                f"CIFAR-10 files in {self.folder} fail torchvision's md5 check (corrupted or not "
                "the official release). Delete the folder and set dataset.download=true, or set "
                f"dataset.verify_md5=false to load them anyway. {_fix_hint(self.folder)}"
            )

    def label_origin(self, split: str, n: int) -> list[tuple[str, int]]:
        """The batch files the ``split`` labels were read from, with each file's label count."""
        names = split_files(train=split == "train")
        return list(zip([str(self.folder / name) for name in names], self._label_counts.get(split, []), strict=False))

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Read one split: (x (N, 3, 32, 32) uint8, y (N,) long)."""
        try:
            data, labels, self._label_counts["train" if train else "val"] = read_split(self.folder, train)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
            hint = _fix_hint(self.folder)
            raise RuntimeError(f"Could not parse CIFAR-10 in {self.folder}: {err!r}. {hint}") from err
        return torch.from_numpy(np.ascontiguousarray(data)), torch.as_tensor(labels, dtype=torch.long)

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        self._check_files()
        x_train, y_train = self._load_split(train=True)
        x_val, y_val = self._load_split(train=False)
        return (
            TensorPairDataset(x_train, y_train, transform=uint8_to_unit, flip=self.flip),
            TensorPairDataset(x_val, y_val, transform=uint8_to_unit),
        )

    def render(self, samples: Tensor) -> np.ndarray:
        """Square grid of (B, 3, 32, 32) samples in [-1, 1] -> (H, W, 3) uint8."""
        return render_image_grid(samples)
