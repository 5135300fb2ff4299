"""Tests for diffusion_lab.data.mnist against tiny MNIST / Fashion-MNIST idx files in the real format.

The idx files are written byte by byte as in the official release (big-endian magic, sizes, uint8
payload) into torchvision's layout and read through the real datamodules.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from torchvision.datasets import MNIST

from diffusion_lab.config import validate_config
from diffusion_lab.data import FashionMNISTDataModule, MNISTDataModule, files
from tests.test_config import compose_train

N_TRAIN, N_TEST = 12, 5
MODULES = {"MNIST": MNISTDataModule, "FashionMNIST": FashionMNISTDataModule}


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """idx3-ubyte: magic 0x00000803, count, rows, cols (big-endian int32), then the uint8 pixels."""
    path.write_bytes(struct.pack(">4i", 0x0803, *images.shape) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """idx1-ubyte: magic 0x00000801, count (big-endian int32), then one uint8 per label."""
    path.write_bytes(struct.pack(">2i", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_fake(root: Path, folder_name: str) -> dict[str, Any]:
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    content = {}
    for prefix, n in [("train", N_TRAIN), ("t10k", N_TEST)]:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0] = 0
        images[1] = 255
        labels = np.arange(n) % 10
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        content[prefix] = (images, labels.tolist())
    return {"root": str(root), "folder": raw, **content}


@pytest.fixture(params=list(MODULES))
def fake(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Tiny idx files under <tmp>/<MNIST|FashionMNIST>/raw/, with the datamodule class to read them."""
    return {**write_fake(tmp_path, request.param), "cls": MODULES[request.param]}


def as_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1


@pytest.mark.parametrize(("resize", "side"), [("pad", 32), ("resize", 32), ("none", 28)])
def test_attributes_before_setup(tmp_path: Path, resize: str, side: int) -> None:
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"), resize=resize)
    assert dm.data_shape == (1, side, side) and dm.num_classes == 10 and dm.modality == "image"
    assert dm.flip is False and dm.download is False
    with pytest.raises(ValueError, match="pad"):
        MNISTDataModule(resize="crop")


def test_pad_round_trip_pixels_labels_and_splits(fake: dict[str, Any]) -> None:
    dm = fake["cls"](root=fake["root"], batch_size=4)
    dm.prepare_data()
    for tensor, labels, (images, written) in [
        (dm.train_tensor(), dm.train_labels(), fake["train"]),
        (dm.val_tensor(), dm.val_labels(), fake["t10k"]),
    ]:
        assert tensor.shape == (len(images), 1, 32, 32) and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor[:, :, 2:30, 2:30], as_unit(images), rtol=0, atol=1e-6)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert (tensor[:, :, border] == -1).all()  # the 2-pixel pad is background (pixel 0)
        assert labels.dtype == torch.long and labels.tolist() == written
    val = dm.val_tensor()
    assert val.min() == -1 and val.max() == 1 and (val[1, :, 2:30, 2:30] == 1).all()


def test_resize_and_none_options(fake: dict[str, Any]) -> None:
    native = fake["cls"](root=fake["root"], resize="none").val_tensor()
    torch.testing.assert_close(native, as_unit(fake["t10k"][0]), rtol=0, atol=1e-6)
    resized = fake["cls"](root=fake["root"], resize="resize").val_tensor()
    assert resized.shape == (N_TEST, 1, 32, 32) and resized.min() >= -1 and resized.max() <= 1
    assert (resized[0] == -1).all() and (resized[1] == 1).all()  # constant images stay constant
    levels = (resized + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # still 8-bit values
    # A bilinear upsampling keeps each image's mean brightness (unlike padding with background).
    torch.testing.assert_close(resized.mean(dim=(1, 2, 3)), native.mean(dim=(1, 2, 3)), rtol=0, atol=0.02)


def test_flips_only_on_train_when_asked(fake: dict[str, Any]) -> None:
    torch.manual_seed(0)
    dm = fake["cls"](root=fake["root"], flip=True, batch_size=N_TRAIN)
    originals = dm.train_tensor()
    x, _ = next(iter(dm.train_dataloader()))
    plain = {img.numpy().tobytes() for img in originals}
    mirrored = {img.flip(-1).numpy().tobytes() for img in originals}
    seen = [img.numpy().tobytes() for img in x]
    assert all(s in plain or s in mirrored for s in seen) and any(s not in plain for s in seen)
    val = torch.cat([b for b, _ in dm.val_dataloader()])
    assert torch.equal(val, dm.val_tensor())
    default = fake["cls"](root=fake["root"], batch_size=N_TRAIN)
    assert all(img.numpy().tobytes() in plain for img in next(iter(default.train_dataloader()))[0])


def assert_helpful(message: str, folder: Path) -> None:
    for needle in [str(folder), "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "dataset.root="]:
        assert needle in message, f"{needle!r} missing from: {message}"


@pytest.mark.parametrize("call", ["setup", "prepare_data"])
def test_missing_files_give_helpful_error(tmp_path: Path, call: str) -> None:
    dm = MNISTDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        getattr(dm, call)()
    assert_helpful(str(info.value), tmp_path / "MNIST" / "raw")
    assert "dataset.download=true" in str(info.value)


def test_one_missing_file_is_named(fake: dict[str, Any]) -> None:
    (fake["folder"] / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        fake["cls"](root=fake["root"]).setup()


def test_corrupt_file_is_reported(fake: dict[str, Any]) -> None:
    (fake["folder"] / "train-images-idx3-ubyte").write_bytes(struct.pack(">4i", 0x0803, 99, 28, 28) + b"short")
    with pytest.raises(RuntimeError, match="Could not parse") as info:
        fake["cls"](root=fake["root"]).setup()
    assert "dataset.root=" in str(info.value)


def test_download_against_a_silent_server_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection but never answers would hang a download without a timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accept(): the kernel completes the handshake, no byte ever comes back
    try:
        monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
        monkeypatch.setattr(files, "DOWNLOAD_TIMEOUT_S", 0.5)
        before = socket.getdefaulttimeout()
        dm = MNISTDataModule(root=str(tmp_path), download=True)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="Downloading MNIST") as info:
            dm.prepare_data()
        assert time.monotonic() - start < 30
        assert_helpful(str(info.value), tmp_path / "MNIST" / "raw")
        assert "network access" in str(info.value) and socket.getdefaulttimeout() == before
    finally:
        server.close()


def test_download_skipped_when_files_present(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("should not download")

    monkeypatch.setattr(fake["cls"].reader, "download", fail)
    fake["cls"](root=fake["root"], download=True).prepare_data()


@pytest.mark.parametrize(("option", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_hydra_option_composes_and_loads(tmp_path: Path, option: str, folder: str) -> None:
    written = write_fake(tmp_path, folder)
    cfg = compose_train(["metrics=none", f"dataset={option}", f"dataset.root={tmp_path}", "dataset.batch_size=4"])
    validate_config(cfg)
    dm = instantiate(cfg.dataset)
    assert type(dm) is MODULES[folder] and dm.resize == "pad" and dm.flip is False
    dm.prepare_data()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32) and y.dtype == torch.long
    assert dm.val_labels().tolist() == written["t10k"][1]


def test_resize_typo_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["metrics=none", "dataset=mnist", "dataset.resize=crop"])
    assert "pad" in str(info.value.__cause__) and "none" in str(info.value.__cause__)


def test_render_grid(fake: dict[str, Any]) -> None:
    dm = fake["cls"](root=fake["root"])
    image = dm.render(dm.val_tensor()[:4])
    assert image.dtype == np.uint8 and image.shape == (2 * 34 + 2, 2 * 34 + 2, 3)


def test_out_of_range_labels_are_refused_at_setup(fake: dict[str, Any]) -> None:
    labels = np.arange(N_TEST) % 10
    labels[[1, 3]] = [12, 255]  # idx1-ubyte holds any byte; MNIST's classes are 0..9
    write_idx_labels(fake["folder"] / "t10k-labels-idx1-ubyte", labels)
    dm = fake["cls"](root=fake["root"])
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    name = fake["cls"].__name__
    assert message.startswith(f"{name} val labels: 2 of {N_TEST} labels lie outside the class range 0..9")
    assert f"values [12, 255] in {fake['folder'] / 't10k-labels-idx1-ubyte'} (2, first at row 1)" in message
