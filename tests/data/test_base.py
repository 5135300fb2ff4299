"""Tests for diffusion_lab.data.base: the label-range check every labelled datamodule runs at setup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from diffusion_lab.data.base import DiffusionDataModule, TensorPairDataset, check_labels


def test_check_labels_names_values_count_files_and_range() -> None:
    y = torch.tensor([0, 9, 10, 3, -1, 4, 12, 10])
    origin = [("a.bin", 3), ("b.bin", 2), ("c.bin", 3)]
    with pytest.raises(ValueError) as info:
        check_labels(y, 10, "Toy train labels", origin)
    assert str(info.value) == (
        "Toy train labels: 4 of 8 labels lie outside the class range 0..9 (num_classes=10): values [-1, 10, 12] "
        "in a.bin (1, first at row 2); b.bin (1, first at row 1); c.bin (2, first at row 1). Every label must be "
        "an integer in 0..9: fix or remove those entries."
    )


def test_check_labels_accepts_the_whole_range_and_falls_back_on_a_bad_origin() -> None:
    check_labels(torch.arange(10), 10, "ok", [("f", 10)])  # both ends are valid
    check_labels(torch.zeros(0, dtype=torch.long), 3, "empty", [])
    with pytest.raises(ValueError, match=r"^x: 1 of 3 labels .* values \[3\] in x \(1, first at row 2\)"):
        check_labels(torch.tensor([0, 2, 3]), 3, "x", [("counts that do not add up", 7)])
    many = torch.arange(-20, 0)
    with pytest.raises(ValueError, match=r"values \[-20, -19, .*, -11, … \(20 distinct\)\]"):
        check_labels(many, 5, "many", [("m", 20)])


class Labelled(DiffusionDataModule):
    """Two in-memory splits with the given labels; 3 classes."""

    def __init__(self, train: list[int], val: list[int], num_classes: int | None = 3) -> None:
        shape = {"data_shape": (2,), "num_classes": num_classes, "modality": "points"}
        super().__init__(batch_size=2, num_workers=0, seed=0, **shape)
        self.labels = {"train": train, "val": val}

    def _build_datasets(self) -> tuple[TensorPairDataset, TensorPairDataset]:
        def split(labels: list[int]) -> TensorPairDataset:
            return TensorPairDataset(torch.zeros(len(labels), 2), torch.tensor(labels))

        return split(self.labels["train"]), split(self.labels["val"])

    def render(self, samples: Tensor) -> np.ndarray:
        raise NotImplementedError


def test_setup_refuses_out_of_range_labels_before_any_step() -> None:
    dm = Labelled(train=[0, 1, 2, 2], val=[1, 3, 0])
    with pytest.raises(ValueError, match=r"^Labelled val labels: 1 of 3 labels .* 0\.\.2 .* the val split \(1, first"):
        dm.setup("fit")
    assert dm._train is None and dm._val is None  # a refused setup keeps nothing
    with pytest.raises(ValueError, match=r"^Labelled train labels: 2 of 2 labels .* values \[-1, 5\]"):
        Labelled(train=[-1, 5], val=[0]).setup()
    Labelled(train=[0, 1, 2], val=[2]).setup()
    Labelled(train=[7], val=[9], num_classes=None).setup()  # unlabelled data: labels carry no information
