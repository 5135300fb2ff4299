"""Tests for diffusion_lab.data.cifar10 against a tiny fake CIFAR-10 written in the real on-disk format.

The fake files cannot match torchvision's md5 sums, so the round-trip tests load them with
``verify_md5=False`` (presence check); ``verify_md5=True`` on them must fail with a helpful message.
"""

from __future__ import annotations

import pickle
import socket
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusion_lab.data import CIFAR10DataModule
from diffusion_lab.data import cifar10 as cifar_module

N_PER_BATCH, N_TEST = 4, 6
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    """One pickled batch as in cifar-10-python.tar.gz: data (N, 3072) uint8 (R, G, B planes), labels."""
    entry = {
        "batch_label": path.name,
        "data": data,
        "labels": labels,
        "filenames": [f"{i}.png" for i in labels],
    }
    path.write_bytes(pickle.dumps(entry, protocol=2))


@pytest.fixture
def fake_cifar(tmp_path: Path) -> dict[str, Any]:
    """Write <tmp>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; return the contents."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(N_PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=N_PER_BATCH).tolist()
        write_batch(folder / f"data_batch_{i}", data, labels)
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, size=(N_TEST, 3072), dtype=np.uint8)
    test_data[0] = 0  # extremes, to see -1 and 1
    test_data[1] = 255
    test_labels = rng.integers(0, 10, size=N_TEST).tolist()
    write_batch(folder / "test_batch", test_data, test_labels)
    meta = {"label_names": LABEL_NAMES, "num_cases_per_batch": N_PER_BATCH, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {
        "root": str(tmp_path),
        "folder": folder,
        "train": (np.concatenate(train_data), train_labels),
        "test": (test_data, test_labels),
    }


def make(root: str, **kwargs: Any) -> CIFAR10DataModule:
    kwargs = {"batch_size": 4 * N_PER_BATCH, "num_workers": 0, "verify_md5": False, **kwargs}
    return CIFAR10DataModule(root=root, **kwargs)


def as_images(data: np.ndarray) -> torch.Tensor:
    """Expected datamodule view of raw rows: (N, 3072) uint8 -> (N, 3, 32, 32) float32 in [-1, 1]."""
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32)) / 127.5 - 1


def test_attributes_before_setup_without_files(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"))
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 10 and dm.modality == "image"
    assert dm.num_workers == 4 and dm.flip is True and dm.download is False


def test_round_trip_pixels_and_labels(fake_cifar: dict[str, Any]) -> None:
    dm = make(fake_cifar["root"])
    dm.prepare_data()
    dm.setup("fit")
    for tensor, labels, (data, written_labels) in [
        (dm.train_tensor(), dm.train_labels(), fake_cifar["train"]),
        (dm.val_tensor(), dm.val_labels(), fake_cifar["test"]),
    ]:
        assert tensor.dtype == torch.float32 and tensor.shape == (len(data), 3, 32, 32)
        torch.testing.assert_close(tensor, as_images(data), rtol=0, atol=1e-6)
        assert labels.dtype == torch.long and labels.tolist() == written_labels
    val = dm.val_tensor()
    assert (val[0] == -1).all() and (val[1] == 1).all()
    # Channel order: the first 1024 bytes of a row are the red plane.
    red = torch.from_numpy(fake_cifar["train"][0][0, :1024].astype(np.float32)).view(32, 32) / 127.5 - 1
    assert torch.equal(dm.train_tensor()[0, 0], red)


def test_val_loader_in_order_and_unflipped(fake_cifar: dict[str, Any]) -> None:
    dm = make(fake_cifar["root"], batch_size=4)
    xs, ys = zip(*dm.val_dataloader(), strict=True)
    assert torch.equal(torch.cat(xs), as_images(fake_cifar["test"][0]))  # 6 images: last batch of 2 kept
    assert torch.cat(ys).tolist() == fake_cifar["test"][1]


def match_flips(batch: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each batch image: (is an original (B,), is a mirrored original (B,))."""
    plain = {img.numpy().tobytes() for img in originals}
    mirrored = {img.flip(-1).numpy().tobytes() for img in originals}
    return (
        torch.tensor([img.numpy().tobytes() in plain for img in batch]),
        torch.tensor([img.numpy().tobytes() in mirrored for img in batch]),
    )


def test_train_flips(fake_cifar: dict[str, Any]) -> None:
    torch.manual_seed(0)
    originals = as_images(fake_cifar["train"][0])
    flipped = make(fake_cifar["root"], flip=True, batch_size=5 * N_PER_BATCH)
    x, _ = next(iter(flipped.train_dataloader()))
    plain, mirror = match_flips(x, originals)
    assert (plain | mirror).all() and plain.any() and mirror.any()  # P(no flip among 20) = 2^-20
    assert torch.equal(flipped.train_tensor(), originals)  # the raw tensor is never flipped
    unflipped = make(fake_cifar["root"], flip=False, batch_size=5 * N_PER_BATCH)
    plain, _ = match_flips(next(iter(unflipped.train_dataloader()))[0], originals)
    assert plain.all()


def test_train_loader_seeded_with_workers(fake_cifar: dict[str, Any]) -> None:
    """Shuffle order and (worker-side) flips follow the seed, whatever the global RNG state."""

    def first_epoch(seed: int, global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        dm = make(fake_cifar["root"], batch_size=N_PER_BATCH, num_workers=2, seed=seed)
        return [x for x, _ in dm.train_dataloader()]

    a, b, c = first_epoch(0, 1), first_epoch(0, 2), first_epoch(1, 1)
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_drop_last(fake_cifar: dict[str, Any]) -> None:
    batches = list(make(fake_cifar["root"], batch_size=6).train_dataloader())
    assert len(batches) == (5 * N_PER_BATCH) // 6 and all(len(x) == 6 for x, _ in batches)


def assert_helpful(message: str, folder: Path) -> None:
    for needle in [
        str(folder),
        "cifar-10-batches-py",
        "dataset.root=",
        "dataset.download=true",
        "data_batch_1",
    ]:
        assert needle in message, f"{needle!r} missing from: {message}"
    assert "pickle" in message and "labels" in message  # the on-disk format is described


@pytest.mark.parametrize("call", ["setup", "prepare_data"])
def test_missing_files_give_helpful_error(tmp_path: Path, call: str) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as info:
        getattr(dm, call)()
    assert_helpful(str(info.value), tmp_path / "cifar-10-batches-py")


def test_partially_missing_files_named(fake_cifar: dict[str, Any]) -> None:
    (fake_cifar["folder"] / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        make(fake_cifar["root"]).setup("fit")


def test_failed_download_gives_helpful_error_and_bounded_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_timeouts: list[float | None] = []

    def no_network(*args: Any, **kwargs: Any) -> None:
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", no_network)
    before = socket.getdefaulttimeout()
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    assert_helpful(str(info.value), tmp_path / "cifar-10-batches-py")
    assert "URLError" in str(info.value)
    assert seen_timeouts == [cifar_module.DOWNLOAD_TIMEOUT_S]  # the download cannot hang forever
    assert socket.getdefaulttimeout() == before


def test_download_skipped_when_files_present(fake_cifar: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("should not download")

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", fail)
    make(fake_cifar["root"], download=True).prepare_data()


def test_md5_mismatch_is_reported(fake_cifar: dict[str, Any]) -> None:
    dm = make(fake_cifar["root"], verify_md5=True)
    with pytest.raises(RuntimeError, match="md5") as info:
        dm.setup("fit")
    assert "dataset.verify_md5=false" in str(info.value) and "dataset.download=true" in str(info.value)


def test_unparsable_file_is_reported(fake_cifar: dict[str, Any]) -> None:
    (fake_cifar["folder"] / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="Could not parse") as info:
        make(fake_cifar["root"]).setup("fit")
    assert "dataset.root=" in str(info.value)


def test_render_grid(fake_cifar: dict[str, Any]) -> None:
    dm = make(fake_cifar["root"])
    image = dm.render(dm.val_tensor()[:6])  # 6 images -> 3 per row, 2 rows
    assert image.dtype == np.uint8 and image.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert (image[2:34, 2:34] == 0).all() and (image[2:34, 36:68] == 255).all()


def test_out_of_range_labels_are_refused_at_setup(fake_cifar: dict[str, Any]) -> None:
    folder = fake_cifar["folder"]
    data = np.zeros((N_PER_BATCH, 3072), dtype=np.uint8)
    write_batch(folder / "data_batch_3", data, [0, 10, 9, -1])  # the real pickle format, two labels out of 0..9
    dm = make(fake_cifar["root"])
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith("CIFAR10DataModule train labels: 2 of 20 labels lie outside the class range 0..9")
    assert f"values [-1, 10] in {folder / 'data_batch_3'} (2, first at row 1)" in message
    assert dm._train is None  # refused before training, nothing kept
