"""Shared parts of every diffusion datamodule: in-memory tensor datasets, seeded loaders, image grids.

Every datamodule in ``diffusion_lab.data`` keeps its whole split in memory as one tensor
(CIFAR-10 as ``uint8``, 150 MB) and serves batches through ``__getitems__``, so a batch is one
fancy-indexing call instead of ``batch_size`` ``__getitem__`` calls plus a collate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid

from diffusion_lab.schema.domains import NON_NEGATIVE_INT, POSITIVE_INT
from diffusion_lab.schema.signature import enforce_domains

MODALITIES = ("image", "points")

Batch = tuple[Tensor, Tensor]


def uint8_to_unit(x: Tensor) -> Tensor:
    """Map ``uint8`` pixels {0..255} to float32 in [-1, 1] (``x / 127.5 - 1``); any shape."""
    return x.to(torch.float32) / 127.5 - 1.0


class TensorPairDataset(Dataset[Batch]):
    """An in-memory ``(x, y)`` dataset with batched indexing and optional random horizontal flips.

    Args:
        x: (N, ...) stored samples (any dtype; ``transform`` turns a batch of them into float32).
        y: (N,) long labels.
        transform: maps a stored batch (B, ...) to float32 (B, ...); identity if None.
        flip: mirror each sample's last axis with probability 1/2 (images only). The coin flips
            use the global torch RNG, which Lightning's ``seed_everything(workers=True)`` seeds and
            the DataLoader re-seeds per worker from the loader's seeded generator.
    """

    def __init__(
        self, x: Tensor, y: Tensor, transform: Callable[[Tensor], Tensor] | None = None, flip: bool = False
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = x, y.to(torch.long)
        self.transform, self.flip = transform, flip

    def __len__(self) -> int:
        """Number of samples N."""
        return len(self.x)

    def __getitem__(self, index: int) -> Batch:
        """One sample: (x (...) float32, y () long)."""
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """A batch: (x (B, ...) float32, y (B,) long), flipped at random when ``flip``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._convert(self.x[idx])
        if self.flip:
            mirror = torch.rand(len(idx)) < 0.5
            x = torch.where(mirror.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x, self.y[idx]

    def tensors(self) -> Batch:
        """The whole split, converted but never flipped: (x (N, ...) float32, y (N,) long)."""
        return self._convert(self.x), self.y

    def _convert(self, x: Tensor) -> Tensor:
        return (self.transform(x) if self.transform is not None else x).to(torch.float32)


def check_labels(y: Tensor, num_classes: int, dataset: str, origin: Sequence[tuple[str, int]]) -> None:
    """Refuse labels outside ``0..num_classes-1`` before training (not as an IndexError in the class embedding).

    Args:
        y: (N,) integer labels.
        num_classes: the dataset's class count.
        dataset: what the labels are, for the message (e.g. "CIFAR10DataModule train labels").
        origin: where they were read from, in order: (file, number of labels read from it), counts summing to N.

    Raises:
        ValueError: naming the dataset, each file holding bad labels (how many, first row), the offending
            values, their count and the valid range.
    """
    bad = (y < 0) | (y >= num_classes)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    if sum(count for _, count in origin) != len(y):
        origin = [(dataset, len(y))]
    values = torch.unique(y[bad]).tolist()
    shown = ", ".join(map(str, values[:10])) + (f", … ({len(values)} distinct)" if len(values) > 10 else "")
    where, start = [], 0
    for name, count in origin:
        rows = bad[start : start + count].nonzero().flatten()
        if len(rows):
            where.append(f"{name} ({len(rows)}, first at row {int(rows[0])})")
        start += count
    raise ValueError(
        f"{dataset}: {n_bad} of {len(y)} labels lie outside the class range 0..{num_classes - 1} "
        f"(num_classes={num_classes}): values [{shown}] in {'; '.join(where)}. Every label must be an integer in "
        f"0..{num_classes - 1}: fix or remove those entries."
    )


def collate_batch(batch: Batch | list[Batch]) -> Batch:
    """Collate for :class:`TensorPairDataset`: a batch from ``__getitems__`` is already stacked.

    Falls back to stacking a list of single samples (e.g. if the dataset is wrapped).
    """
    if isinstance(batch, tuple):
        return batch
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.stack(ys)


def render_image_grid(samples: Tensor, min_size: int = 32) -> np.ndarray:
    """Draw images as a square grid; images smaller than ``min_size`` are enlarged (nearest neighbour).

    Args:
        samples: (B, C, H, W) with C in {1, 3}, values in [-1, 1] (clamped).
        min_size: smallest displayed image side in pixels (an integer nearest-neighbour factor).

    Returns:
        (H', W', 3) uint8 grid with ``ceil(sqrt(B))`` images per row and 2-pixel padding.
    """
    if samples.dim() != 4:
        raise ValueError(f"expected samples of shape (B, C, H, W), got {tuple(samples.shape)}")
    unit = (samples.detach().float().cpu().clamp(-1, 1) + 1) / 2
    factor = max(1, math.ceil(min_size / unit.shape[-1]))
    unit = unit.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(unit, nrow=math.ceil(math.sqrt(len(unit))), padding=2, pad_value=1.0)
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


class DiffusionDataModule(L.LightningDataModule):
    """Base LightningDataModule: seeded shuffled loaders over in-memory train/val splits.

    Subclasses set ``data_shape``/``num_classes``/``modality`` in ``__init__`` (no data loading
    there), implement :meth:`_build_datasets` and :meth:`render`.

    Batches are ``(x, y)``: x float32 (B, *data_shape) — images in [-1, 1] — and y (B,) long.

    Args:
        batch_size: samples per batch (train drops the last incomplete batch; val keeps it).
        num_workers: DataLoader worker processes (persistent when > 0).
        seed: seeds the train-loader shuffling generator (and subclasses' data generation/splits).
        data_shape: shape of one sample, e.g. (1, 16, 16) or (2,).
        num_classes: number of label classes, or None when the labels carry no information.
        modality: "image" or "points".
    """

    @enforce_domains
    def __init__(
        self,
        *,
        batch_size: Annotated[int, POSITIVE_INT],
        num_workers: Annotated[int, NON_NEGATIVE_INT],
        seed: int,
        data_shape: tuple[int, ...],
        num_classes: int | None,
        modality: str,
    ) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.data_shape, self.num_classes, self.modality = tuple(data_shape), num_classes, modality
        self._train: TensorPairDataset | None = None
        self._val: TensorPairDataset | None = None

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        """Load or generate the (train, val) splits. Must be deterministic given ``self.seed``."""
        raise NotImplementedError

    def render(self, samples: Tensor) -> np.ndarray:
        """Draw samples (B, *data_shape) as an (H, W, 3) uint8 picture for logging."""
        raise NotImplementedError

    def label_origin(self, split: str, n: int) -> list[tuple[str, int]]:
        """Where the ``n`` labels of ``split`` ("train" or "val") were read from, in order: (file, count) pairs
        summing to ``n``. Subclasses reading label files name them; the default names the split."""
        return [(f"the {split} split", n)]

    def setup(self, stage: str | None = None) -> None:
        """Build both splits once (idempotent; every stage uses the same splits), refusing out-of-range labels."""
        if self._train is None or self._val is None:
            train, val = self._build_datasets()
            if self.num_classes is not None:
                for split, dataset in (("train", train), ("val", val)):
                    origin = self.label_origin(split, len(dataset.y))
                    check_labels(dataset.y, self.num_classes, f"{type(self).__name__} {split} labels", origin)
            self._train, self._val = train, val

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled (generator seeded by ``seed``), ``drop_last=True`` loader of (x, y) batches."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self._split("train"), shuffle=True, drop_last=True, generator=generator)

    def val_dataloader(self) -> DataLoader[Batch]:
        """Loader over the validation split in fixed order, keeping the last partial batch."""
        return self._loader(self._split("val"), shuffle=False, drop_last=False, generator=None)

    def train_tensor(self) -> Tensor:
        """All training samples (N_train, *data_shape) float32, never flipped (sets up if needed)."""
        return self._split("train").tensors()[0]

    def val_tensor(self) -> Tensor:
        """All validation samples (N_val, *data_shape) float32 (sets up if needed)."""
        return self._split("val").tensors()[0]

    def train_labels(self) -> Tensor:
        """Training labels (N_train,) long."""
        return self._split("train").y

    def val_labels(self) -> Tensor:
        """Validation labels (N_val,) long."""
        return self._split("val").y

    def _split(self, name: str) -> TensorPairDataset:
        self.setup()
        split = self._train if name == "train" else self._val
        assert split is not None
        return split

    def _loader(
        self, dataset: TensorPairDataset, shuffle: bool, drop_last: bool, generator: torch.Generator | None
    ) -> DataLoader[Batch]:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )
