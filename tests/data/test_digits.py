"""Tests for diffusion_lab.data.digits: scaling, resize options, seeded stratified split, render."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.data import DigitsDataModule
from diffusion_lab.data.digits import load_digits_tensors, stratified_split

N_DIGITS = 1_797


def make(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(**kwargs)


def all_images(dm: DigitsDataModule) -> Tensor:
    return torch.cat([dm.train_tensor(), dm.val_tensor()])


def sorted_rows(x: Tensor) -> Tensor:
    """Rows of (N, ...) flattened and sorted lexicographically, to compare multisets of images."""
    rows = x.flatten(1).numpy()
    return torch.from_numpy(rows[np.lexsort(rows.T[::-1])])


def test_attributes_before_setup() -> None:
    dm = make(resolution=32, resize="upsample")
    assert dm.data_shape == (1, 32, 32) and dm.num_classes == 10 and dm.modality == "image"
    assert dm._train is None


@pytest.mark.parametrize("resolution", [8, 16, 32])
@pytest.mark.parametrize("resize", ["pad", "upsample"])
def test_shape_and_exact_range(resolution: int, resize: str) -> None:
    dm = make(resolution=resolution, resize=resize)
    x = all_images(dm)
    assert x.shape == (N_DIGITS, 1, resolution, resolution) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(torch.unique(x), torch.arange(17) / 8.0 - 1.0)  # the 17 grey levels, nothing else


def test_raw_scaling_is_v_over_8_minus_1() -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits_tensors()
    raw = load_digits()
    torch.testing.assert_close(x[:, 0], torch.as_tensor(raw.images, dtype=torch.float32) / 8 - 1)
    assert torch.equal(y, torch.as_tensor(raw.target))


def test_pad_keeps_the_8x8_content_centred_on_background() -> None:
    native = make(resolution=8).train_tensor()
    for resolution, margin in [(16, 4), (32, 12)]:
        padded = make(resolution=resolution, resize="pad").train_tensor()
        centre = padded[..., margin : margin + 8, margin : margin + 8]
        assert torch.equal(centre, native)
        border = padded.clone()
        border[..., margin : margin + 8, margin : margin + 8] = -1.0
        assert (border == -1.0).all()


def test_upsample_is_nearest_blocks() -> None:
    native = make(resolution=8).train_tensor()
    for resolution in (16, 32):
        up = make(resolution=resolution, resize="upsample").train_tensor()
        k = resolution // 8
        assert torch.equal(up[..., ::k, ::k], native)
        torch.testing.assert_close(F.avg_pool2d(up, k), native)


@pytest.mark.parametrize(("kwargs", "arg"), [({"resolution": 12}, "resolution"), ({"resize": "crop"}, "resize")])
def test_invalid_options_name_argument_and_choices(kwargs: dict[str, Any], arg: str) -> None:
    with pytest.raises(ValueError, match=arg) as info:
        make(**kwargs)
    choices = ["8", "16", "32"] if arg == "resolution" else ["pad", "upsample"]
    for choice in choices:
        assert choice in str(info.value)


def test_invalid_val_fraction() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        make(val_fraction=1.0)


def test_split_partitions_all_images() -> None:
    dm = make(resolution=8, val_fraction=0.1)
    train, val = dm.train_tensor(), dm.val_tensor()
    assert len(train) + len(val) == N_DIGITS
    assert len(val) == pytest.approx(0.1 * N_DIGITS, abs=1)
    # Train ∪ val is the full set (as a multiset of (image, label) rows): nothing lost or duplicated.
    x, y = load_digits_tensors()
    labels = torch.cat([dm.train_labels(), dm.val_labels()])
    split_rows = torch.cat([torch.cat([train, val]).flatten(1), labels[:, None].float()], 1)
    full_rows = torch.cat([x.flatten(1), y[:, None].float()], 1)
    assert torch.equal(sorted_rows(split_rows), sorted_rows(full_rows))


def test_split_indices_disjoint_and_stratified() -> None:
    _, y = load_digits_tensors()
    train_idx, val_idx = stratified_split(y, val_fraction=0.2, seed=0)
    assert len(np.intersect1d(train_idx.numpy(), val_idx.numpy())) == 0
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(N_DIGITS))
    for label in range(10):
        in_class = (y == label).sum().item()
        assert (y[val_idx] == label).sum().item() == pytest.approx(0.2 * in_class, abs=1)


def test_labels() -> None:
    dm = make()
    for labels in (dm.train_labels(), dm.val_labels()):
        assert labels.dtype == torch.long and labels.min() == 0 and labels.max() == 9
        assert len(torch.unique(labels)) == 10
    _, y = next(iter(dm.train_dataloader()))
    assert y.dtype == torch.long and y.shape == (128,)


def test_same_seed_same_split_different_seed_different() -> None:
    a, b, c = make(seed=7), make(seed=7), make(seed=8)
    assert torch.equal(a.val_tensor(), b.val_tensor()) and torch.equal(a.val_labels(), b.val_labels())
    assert not torch.equal(a.val_tensor(), c.val_tensor())
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])
    assert not torch.equal(next(iter(a.train_dataloader()))[0], next(iter(c.train_dataloader()))[0])


def test_loader_shapes_drop_last_and_no_flip_by_default() -> None:
    dm = make(resolution=16, batch_size=100)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_tensor()) // 100
    x = torch.cat([bx for bx, _ in batches])
    assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32
    known = {row.numpy().tobytes() for row in dm.train_tensor()}
    assert all(img.numpy().tobytes() in known for img in x)  # served unchanged


def test_flip_option_mirrors_some_training_images() -> None:
    torch.manual_seed(0)
    dm = make(resolution=8, batch_size=64, flip=True)
    train = dm.train_tensor()
    known = {img.numpy().tobytes() for img in train}
    mirrored = {img.flip(-1).numpy().tobytes() for img in train}
    x, _ = next(iter(dm.train_dataloader()))
    is_plain = torch.tensor([img.numpy().tobytes() in known for img in x])
    is_mirror = torch.tensor([img.numpy().tobytes() in mirrored for img in x])
    assert (is_plain | is_mirror).all() and (~is_plain).any() and is_plain.any()
    assert torch.equal(torch.cat([vx for vx, _ in dm.val_dataloader()]), dm.val_tensor())  # val unflipped


def test_render_grid() -> None:
    dm = make(resolution=16)
    samples = dm.val_tensor()[:16]
    image = dm.render(samples)  # 16×16 images are shown enlarged ×2 (nearest) to at least 32 px
    assert image.dtype == np.uint8 and image.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    tile = image[2:34:2, 2:34:2, 0]  # first image, without padding, every other pixel
    expected = ((samples[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(tile, expected)
    assert np.array_equal(image[2:34:2, 2:34:2, 0], image[3:34:2, 3:34:2, 0])
    assert np.array_equal(image[..., 0], image[..., 2])  # grey images -> equal channels
