"""Tests for diffusion_lab.data.imagenet against tiny Downsampled-ImageNet npz batches in the real format.

Files as in the official zips (Chrabaszcz et al. 2017): ``train_data_batch_{1..10}.npz`` with ``data``
(N, 3·R·R) uint8 (R, G, B planes, row-major), ``labels`` (N ints in 1..1000) and ``mean``, and
``val_data.npz`` with ``data`` and ``labels``; by default in the folders the zips unpack to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from diffusion_lab.config import validate_config
from diffusion_lab.data import ImageNetDataModule
from tests.test_config import compose_train

N_PER_BATCH, N_VAL = 3, 4


def write_release(root: Path, resolution: int, flat: bool = False, compressed: bool = True) -> dict[str, Any]:
    """Write the train/val npz files (in Imagenet{R}_train_npz/ and Imagenet{R}_val_npz/ unless ``flat``)."""
    rng = np.random.default_rng(resolution)
    width = 3 * resolution**2
    train_dir = root if flat else root / f"Imagenet{resolution}_train_npz"
    val_dir = root if flat else root / f"Imagenet{resolution}_val_npz"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    train_data, train_labels = [], []
    for i in range(1, 11):
        data = rng.integers(0, 256, size=(N_PER_BATCH, width), dtype=np.uint8)
        labels = rng.integers(1, 1001, size=N_PER_BATCH)
        if i == 1:
            labels[:2] = [1, 1000]  # both ends of the 1-based label range
        save(train_dir / f"train_data_batch_{i}.npz", data=data, labels=labels.tolist(), mean=data.mean(0))
        train_data.append(data)
        train_labels.append(labels)
    val = rng.integers(0, 256, size=(N_VAL, width), dtype=np.uint8)
    val[0], val[1] = 0, 255
    val_labels = rng.integers(1, 1001, size=N_VAL)
    save(val_dir / "val_data.npz", data=val, labels=val_labels.tolist())
    return {
        "root": str(root),
        "train_dir": train_dir,
        "val_dir": val_dir,
        "train": (np.concatenate(train_data), np.concatenate(train_labels)),
        "val": (val, val_labels),
    }


@pytest.fixture
def fake32(tmp_path: Path) -> dict[str, Any]:
    return write_release(tmp_path, 32)


def make(root: str, **kwargs: Any) -> ImageNetDataModule:
    return ImageNetDataModule(root=root, **{"num_workers": 0, "batch_size": 5, **kwargs})


def as_images(data: np.ndarray, resolution: int) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, resolution, resolution).astype(np.float32)) / 127.5 - 1


def test_attributes_before_setup(tmp_path: Path) -> None:
    dm = ImageNetDataModule(root=str(tmp_path / "nowhere"), resolution=64)
    assert dm.data_shape == (3, 64, 64) and dm.num_classes == 1000 and dm.modality == "image" and dm.flip
    for bad in [{"resolution": 128}, {"num_train_batches": 0}, {"num_train_batches": 11}]:
        with pytest.raises(ValueError):
            ImageNetDataModule(**bad)


@pytest.mark.parametrize("resolution", [32, 64])
def test_round_trip_pixels_labels_and_planes(tmp_path: Path, resolution: int) -> None:
    fake = write_release(tmp_path, resolution)
    dm = make(fake["root"], resolution=resolution)
    dm.prepare_data()
    for tensor, labels, (data, written) in [
        (dm.train_tensor(), dm.train_labels(), fake["train"]),
        (dm.val_tensor(), dm.val_labels(), fake["val"]),
    ]:
        assert tensor.shape == (len(data), 3, resolution, resolution) and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, as_images(data, resolution), rtol=0, atol=1e-6)
        assert labels.dtype == torch.long and labels.tolist() == (written - 1).tolist()  # 1..1000 -> 0..999
    assert dm.train_labels()[:2].tolist() == [0, 999]
    val, pixels = dm.val_tensor(), resolution * resolution
    assert (val[0] == -1).all() and (val[1] == 1).all()
    # Channel-planar rows: the first R·R bytes are the red plane, the next the green one, row-major.
    green = fake["train"][0][4, pixels : 2 * pixels].reshape(resolution, resolution)
    torch.testing.assert_close(dm.train_tensor()[4, 1], torch.from_numpy(green.astype(np.float32)) / 127.5 - 1)


def test_flat_uncompressed_layout_and_subset_of_batches(tmp_path: Path) -> None:
    fake = write_release(tmp_path, 32, flat=True, compressed=False)
    for i in range(3, 11):  # only the first two train files are needed with num_train_batches=2
        (tmp_path / f"train_data_batch_{i}.npz").unlink()
    dm = make(fake["root"], num_train_batches=2)
    dm.prepare_data()
    assert len(dm.train_tensor()) == 2 * N_PER_BATCH
    torch.testing.assert_close(dm.train_tensor(), as_images(fake["train"][0][: 2 * N_PER_BATCH], 32))


def test_flips_only_on_train(fake32: dict[str, Any]) -> None:
    torch.manual_seed(0)
    dm = make(fake32["root"], batch_size=30)
    originals = as_images(fake32["train"][0], 32)
    x, _ = next(iter(dm.train_dataloader()))
    plain = torch.tensor([any(torch.equal(img, o) for o in originals) for img in x])
    mirror = torch.tensor([any(torch.equal(img, o.flip(-1)) for o in originals) for img in x])
    assert (plain | mirror).all() and plain.any() and mirror.any()
    assert torch.equal(torch.cat([v for v, _ in dm.val_dataloader()]), as_images(fake32["val"][0], 32))


def test_wrong_resolution_files_are_reported(fake32: dict[str, Any]) -> None:
    with pytest.raises(RuntimeError, match=r"dataset.resolution=64 needs \(N, 12288\)") as info:
        make(fake32["root"], resolution=64).setup()
    assert "32x32 file" in str(info.value)


def test_out_of_range_labels_are_reported(fake32: dict[str, Any]) -> None:
    path = fake32["val_dir"] / "val_data.npz"
    np.savez(path, data=fake32["val"][0], labels=np.zeros(N_VAL, dtype=np.int64))  # 0-based by mistake
    with pytest.raises(RuntimeError, match=r"labels.*1\.\.1000") as info:
        make(fake32["root"]).setup()
    assert str(path) in str(info.value)
    assert f"labels of shape ({N_VAL},) in 0..0, {N_VAL} outside 1..1000 (values [0])" in str(info.value)


def test_missing_key_is_reported(fake32: dict[str, Any]) -> None:
    path = fake32["val_dir"] / "val_data.npz"
    np.savez(path, images=fake32["val"][0], labels=fake32["val"][1])
    with pytest.raises(RuntimeError, match=r"has arrays \['images', 'labels'\], needs 'data'") as info:
        make(fake32["root"]).setup()
    assert f"Could not read {path}" in str(info.value) and "dataset.root=" in str(info.value)


def test_not_an_npz_is_reported(fake32: dict[str, Any]) -> None:
    path = fake32["train_dir"] / "train_data_batch_2.npz"
    path.write_bytes(b"a pickle, not an npz")
    with pytest.raises(RuntimeError, match=f"Could not read {path}"):
        make(fake32["root"]).setup()


@pytest.mark.parametrize("call", ["setup", "prepare_data"])
def test_missing_files_give_helpful_error(tmp_path: Path, call: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        getattr(ImageNetDataModule(root=str(tmp_path), resolution=64), call)()
    message = str(info.value)
    for needle in [str(tmp_path), "train_data_batch_1.npz", "val_data.npz", "dataset.root=", "image-net.org"]:
        assert needle in message, f"{needle!r} missing from: {message}"
    assert "Imagenet64_train_part1/_part2_npz.zip" in message and "12288 uint8" in message


def test_only_missing_files_are_named(fake32: dict[str, Any]) -> None:
    (fake32["train_dir"] / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks train_data_batch_7\.npz\. "):
        make(fake32["root"]).setup()


@pytest.mark.parametrize(("option", "resolution"), [("imagenet32", 32), ("imagenet64", 64)])
def test_hydra_option_composes_and_loads(tmp_path: Path, option: str, resolution: int) -> None:
    fake = write_release(tmp_path, resolution)
    rgb_unet = ["model=unet", f"model.resolution={resolution}"]  # the model must fit the data
    cfg = compose_train(
        ["metrics=none", f"dataset={option}", f"dataset.root={tmp_path}", "dataset.num_workers=0", *rgb_unet]
    )
    validate_config(cfg)
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, ImageNetDataModule) and dm.resolution == resolution and dm.num_train_batches == 10
    dm.prepare_data()
    assert dm.val_labels().tolist() == (fake["val"][1] - 1).tolist()
    assert dm.train_tensor().shape == (10 * N_PER_BATCH, 3, resolution, resolution)


def test_download_is_not_a_config_key() -> None:
    """image-net.org needs a login: dataset.download=true is rejected when the config is composed."""
    with pytest.raises(ConfigCompositionException, match="download"):
        compose_train(["metrics=none", "dataset=imagenet32", "dataset.download=true"])
