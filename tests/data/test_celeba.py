"""Tests for diffusion_lab.data.celeba against a tiny CelebA in torchvision's on-disk layout.

Fake aligned images (178x218 JPEGs) and a ``list_eval_partition.txt`` are written into
``<tmp>/celeba/`` and read through the real datamodule. The crop boxes are checked against the numbers
of the cited code, written out again here: DDIM's ``F.crop(img, 57, 25, 128, 128)`` (top, left,
height, width) and score-SDE's central 140 crop.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.config import validate_config
from diffusion_lab.data import CelebADataModule, files
from diffusion_lab.data import celeba as celeba_module
from tests.test_config import compose_train

PARTITION = [0, 0, 0, 1, 1, 2]  # 3 train, 2 valid, 1 test
DDIM_BOX = (57, 25, 128)  # top, left, side
RGB_UNET_64 = ["model=unet", "model.resolution=64"]  # a model that fits 3 × 64 × 64 (validate_config checks it)
CENTER_BOX = (39, 19, 140)  # ((218 - 140) // 2, (178 - 140) // 2, 140)


def face_image(index: int) -> np.ndarray:
    """(218, 178, 3) uint8: the DDIM box white, the rest of the central 140 box grey, outside dark."""
    image = np.full((218, 178, 3), 20 + 10 * index, dtype=np.uint8)
    top, left, side = CENTER_BOX
    image[top : top + side, left : left + side] = 128
    top, left, side = DDIM_BOX
    image[top : top + side, left : left + side] = 255
    return image


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, Any]:
    """<tmp>/celeba/img_align_celeba/00000{1..6}.jpg + list_eval_partition.txt (listed out of order)."""
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, len(PARTITION) + 1)]
    for i, name in enumerate(names):
        Image.fromarray(face_image(i)).save(folder / "img_align_celeba" / name, quality=95)
    order = [5, 0, 3, 1, 4, 2]  # file order decides the split order, not the names
    lines = [f"{names[i]} {PARTITION[i]}" for i in order]
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    splits = {k: [names[i] for i in order if PARTITION[i] == k] for k in (0, 1, 2)}
    return {"root": str(tmp_path), "folder": folder, "splits": splits}


def expected(folder: Path, names: list[str], box: tuple[int, int, int], resolution: int) -> torch.Tensor:
    """Independent pipeline: decode, crop (top, left, side), PIL bilinear resize, scale to [-1, 1]."""
    out = []
    for name in names:
        with Image.open(folder / "img_align_celeba" / name) as image:
            top, left, side = box
            crop = image.convert("RGB").crop((left, top, left + side, top + side))
            array = np.asarray(crop.resize((resolution, resolution), Image.Resampling.BILINEAR))
        out.append(torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def make(root: str, **kwargs: Any) -> CelebADataModule:
    return CelebADataModule(root=root, **{"num_workers": 0, "batch_size": 3, **kwargs})


def test_attributes_before_setup(tmp_path: Path) -> None:
    dm = CelebADataModule(root=str(tmp_path / "nowhere"))
    assert dm.data_shape == (3, 64, 64) and dm.num_classes is None and dm.modality == "image"
    assert dm.crop == "ddim" and dm.val_split == "valid" and dm.flip is True and dm.download is False
    with pytest.raises(ValueError, match="center140"):
        CelebADataModule(crop="middle")


@pytest.mark.parametrize(("crop", "box"), [("ddim", DDIM_BOX), ("center140", CENTER_BOX)])
def test_crop_resize_splits_and_order(fake: dict[str, Any], crop: str, box: tuple[int, int, int]) -> None:
    dm = make(fake["root"], crop=crop, cache=False)
    dm.prepare_data()
    train, val = dm.train_tensor(), dm.val_tensor()
    assert train.shape == (3, 3, 64, 64) and val.shape == (2, 3, 64, 64)
    assert train.min() >= -1 and train.max() <= 1
    torch.testing.assert_close(train, expected(fake["folder"], fake["splits"][0], box, 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(val, expected(fake["folder"], fake["splits"][1], box, 64), rtol=0, atol=1e-6)
    assert dm.train_labels().tolist() == [0, 0, 0] and dm.val_labels().tolist() == [0, 0]
    # What the crop keeps: DDIM's box is all white; the central 140 crop has a grey frame around it.
    if crop == "ddim":
        assert train.mean() > 0.95
    else:
        assert train[:, :, :4].mean() < 0.1 and train[:, :, 32].max() > 0.95


def test_test_partition_as_val_and_resolution(fake: dict[str, Any]) -> None:
    dm = make(fake["root"], val_split="test", resolution=32, cache=False)
    torch.testing.assert_close(dm.val_tensor(), expected(fake["folder"], fake["splits"][2], DDIM_BOX, 32))


def test_flips_only_on_train(fake: dict[str, Any]) -> None:
    torch.manual_seed(0)
    dm = make(fake["root"], cache=False, batch_size=3)
    # Mirror-asymmetric content so a flip is visible: tint the left half of each stored image.
    dm._split("train").x[..., :32] //= 2
    originals = dm._split("train").tensors()[0]
    flipped = []
    for _ in range(8):
        x, _ = next(iter(dm.train_dataloader()))
        for img in x:
            is_plain = any(torch.equal(img, o) for o in originals)
            is_mirror = any(torch.equal(img, o.flip(-1)) for o in originals)
            assert is_plain or is_mirror
            flipped.append(is_mirror and not is_plain)
    assert any(flipped) and not all(flipped)
    assert torch.equal(torch.cat([x for x, _ in dm.val_dataloader()]), dm.val_tensor())


def test_cache_is_written_and_reused(fake: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    first = make(fake["root"])
    first.prepare_data()
    cached = sorted(p.name for p in (fake["folder"] / "diffusion_lab_cache").iterdir())
    assert cached == ["train_ddim_64.npy", "train_ddim_64.npy.sha256", "valid_ddim_64.npy", "valid_ddim_64.npy.sha256"]

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise OSError("decoding is off in this test: the cache should have been used")

    monkeypatch.setattr(celeba_module, "crop_and_resize", no_decoding)
    second = make(fake["root"])
    assert torch.equal(second.train_tensor(), first.train_tensor())
    with pytest.raises(RuntimeError, match="Could not decode"):  # another crop is not in the cache
        make(fake["root"], crop="center140").setup()


def test_cache_off_writes_nothing(fake: dict[str, Any]) -> None:
    make(fake["root"], cache=False).setup()
    assert not (fake["folder"] / "diffusion_lab_cache").exists()


def assert_helpful(message: str, folder: Path) -> None:
    for needle in [str(folder), "img_align_celeba", "list_eval_partition.txt", "dataset.root="]:
        assert needle in message, f"{needle!r} missing from: {message}"


@pytest.mark.parametrize("call", ["setup", "prepare_data"])
def test_missing_files_give_helpful_error(tmp_path: Path, call: str) -> None:
    dm = CelebADataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        getattr(dm, call)()
    assert_helpful(str(info.value), tmp_path / "celeba")
    assert "dataset.download=true" in str(info.value)


def test_missing_listed_image_is_named(fake: dict[str, Any]) -> None:
    (fake["folder"] / "img_align_celeba" / fake["splits"][0][1]).unlink()
    with pytest.raises(FileNotFoundError, match=fake["splits"][0][1]):
        make(fake["root"]).setup()


def test_bad_partition_line_is_reported(fake: dict[str, Any]) -> None:
    (fake["folder"] / "list_eval_partition.txt").write_text("image_id,partition\n000001.jpg,0\n")
    with pytest.raises(RuntimeError, match="Could not parse") as info:
        make(fake["root"]).setup()
    assert "<0|1|2>" in str(info.value)


def test_not_an_aligned_image_is_reported(fake: dict[str, Any]) -> None:
    Image.new("RGB", (64, 64)).save(fake["folder"] / "img_align_celeba" / fake["splits"][0][0])
    with pytest.raises(RuntimeError, match="178x218"):
        make(fake["root"], cache=False).setup()


def test_failed_download_gives_helpful_error_and_bounded_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_timeouts: list[float | None] = []

    def no_network(*args: Any, **kwargs: Any) -> None:
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(celeba_module, "download_file_from_google_drive", no_network)
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError, match="Downloading CelebA") as info:
        CelebADataModule(root=str(tmp_path), download=True).prepare_data()
    assert_helpful(str(info.value), tmp_path / "celeba")
    assert "URLError" in str(info.value) and "by hand" in str(info.value)
    assert seen_timeouts == [files.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


def test_downloads_only_the_two_needed_files() -> None:
    assert sorted(name for _, _, name in celeba_module.DOWNLOADS) == ["img_align_celeba.zip", "list_eval_partition.txt"]


def test_hydra_option_composes_and_loads(fake: dict[str, Any]) -> None:
    cfg = compose_train(
        ["metrics=none", "dataset=celeba", f"dataset.root={fake['root']}", "dataset.num_workers=0", *RGB_UNET_64]
    )
    validate_config(cfg)
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, CelebADataModule) and dm.crop == "ddim" and dm.resolution == 64 and dm.flip
    dm.prepare_data()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 0]
