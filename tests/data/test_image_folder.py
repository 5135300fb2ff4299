"""Tests for diffusion_lab.data.image_folder against real PNG/JPEG folders written into tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.config import validate_config
from diffusion_lab.data import ImageFolderDataModule
from diffusion_lab.data.decoding import ImageModeError
from diffusion_lab.data.image_folder import center_crop_arr
from diffusion_lab.schema.errors import ConfigError
from tests.test_config import compose_train

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def banded(width: int, height: int, centre: tuple[int, int, int], sides: tuple[int, int, int]) -> Image.Image:
    """A landscape image: the central ``height``-wide square ``centre``-coloured, the side bands ``sides``."""
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[:] = sides
    left = (width - height) // 2
    array[:, left : left + height] = centre
    return Image.fromarray(array)


@pytest.fixture
def classes(tmp_path: Path) -> Path:
    """root/{cat,dog}/ with nested, mixed-format, odd-sized images plus files that must be ignored."""
    root = tmp_path / "images"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / ".hidden").mkdir()
    banded(48, 24, RED, BLUE).save(root / "cat" / "a.png")
    banded(96, 48, RED, GREEN).save(root / "cat" / "nested" / "b.PNG")
    banded(40, 20, RED, BLUE).convert("RGBA").save(root / "cat" / "c.png")  # RGBA: converted to RGB
    banded(64, 32, GREEN, RED).save(root / "dog" / "d.jpg", quality=95)
    banded(32, 16, GREEN, BLUE).save(root / "dog" / "e.png")
    banded(32, 16, BLUE, BLUE).save(root / ".hidden" / "x.png")
    banded(32, 16, BLUE, BLUE).save(root / "dog" / ".y.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def make(root: Path, **kwargs: Any) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), **{"resolution": 16, "num_workers": 0, "batch_size": 2, **kwargs})


def all_images(dm: ImageFolderDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([dm.train_tensor(), dm.val_tensor()]), torch.cat([dm.train_labels(), dm.val_labels()])


def test_center_crop_arr_keeps_the_central_square() -> None:
    out = center_crop_arr(banded(300, 100, GREEN, RED), 16)  # box-halved once, then bicubic 50 -> 16
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    error = np.abs(out.astype(int) - GREEN).max(axis=-1)
    assert (error[:, 1:-1] <= 2).all() and (error <= 16).all()  # the red bands are gone (bicubic blurs 1 px)
    portrait = center_crop_arr(banded(100, 50, RED, GREEN).transpose(Image.Transpose.TRANSPOSE), 8)
    assert portrait.shape == (8, 8, 3) and (portrait[1:-1, :, 0] > 240).all()  # the top/bottom bands are gone


def test_classes_labels_and_content(classes: Path) -> None:
    dm = make(classes, val_fraction=0.4)
    assert dm.num_classes == 2 and dm.data_shape == (3, 16, 16)  # known before setup, from the folder names
    x, y = all_images(dm)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1]  # cat -> 0 (3 images, nested and RGBA included), dog -> 1
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    for image, label in zip(x, y, strict=True):
        # The central square is the class colour; the side bands are cropped away (bicubic blends the
        # outermost 2 pixels with them).
        target = red if label == 0 else green
        assert (image[:, 2:-2, 2:-2] - target).abs().amax() < 0.1
        assert (image - target).abs().mean() < 0.1


def test_seeded_split_is_disjoint_and_covers_everything(classes: Path) -> None:
    a, b = make(classes, val_fraction=0.4), make(classes, val_fraction=0.4)
    assert len(a.train_tensor()) == 3 and len(a.val_tensor()) == 2
    assert torch.equal(a.val_tensor(), b.val_tensor()) and torch.equal(a.train_labels(), b.train_labels())
    everything = {img.numpy().tobytes() for img in all_images(a)[0]}
    assert len(everything) == 5
    val_sets = set()
    for seed in range(5):
        dm = make(classes, val_fraction=0.4, seed=seed)
        train = {img.numpy().tobytes() for img in dm.train_tensor()}
        val = {img.numpy().tobytes() for img in dm.val_tensor()}
        assert not train & val and train | val == everything
        val_sets.add(frozenset(val))
    assert len(val_sets) > 1  # the split follows the seed


def test_separate_val_root(classes: Path, tmp_path: Path) -> None:
    val_root = tmp_path / "val"
    (val_root / "dog").mkdir(parents=True)
    banded(20, 20, GREEN, GREEN).save(val_root / "dog" / "v.png")
    dm = make(classes, val_root=str(val_root))
    assert len(dm.train_tensor()) == 5 and dm.val_labels().tolist() == [1]  # "dog" is class 1 of root
    (val_root / "bird").mkdir()
    banded(20, 20, BLUE, BLUE).save(val_root / "bird" / "w.png")
    with pytest.raises(RuntimeError, match="bird"):
        make(classes, val_root=str(val_root)).setup()


def test_unlabelled_folders(classes: Path, tmp_path: Path) -> None:
    dm = make(classes, class_labels=False, val_fraction=0.2)
    assert dm.num_classes is None and len(all_images(dm)[0]) == 5 and set(all_images(dm)[1].tolist()) == {0}
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        banded(24, 12, BLUE, RED).save(flat / f"{i}.png")
    assert make(flat).num_classes is None and len(make(flat).train_tensor()) == 2


def test_images_next_to_class_folders_are_an_error(classes: Path) -> None:
    banded(24, 12, BLUE, RED).save(classes / "stray.png")
    with pytest.raises(RuntimeError, match="class_labels=false"):
        make(classes).setup()


def test_random_crop_on_train_only(classes: Path) -> None:
    torch.manual_seed(0)
    dm = make(classes, crop="random", load_size=20, val_fraction=0.4, batch_size=3)
    store = dm._split("train").x  # (3, 3, 20, 20) uint8 squares
    assert store.shape == (3, 3, 20, 20)
    windows = {
        (i, top, left): (store[i, :, top : top + 16, left : left + 16].float() / 127.5 - 1)
        for i in range(3)
        for top in range(5)
        for left in range(5)
    }
    seen = set()
    for _ in range(10):
        x, _ = next(iter(dm.train_dataloader()))
        assert x.shape == (3, 3, 16, 16)
        for img in x:
            matches = [key for key, window in windows.items() if torch.equal(img, window)]
            assert matches, "every training image is a 16x16 window of a stored 20x20 square"
            seen.update((top, left) for _, top, left in matches)
    assert len(seen) > 3  # the windows move
    centre = torch.stack([windows[(i, 2, 2)] for i in range(3)])
    assert torch.equal(dm.train_tensor(), centre)  # the deterministic view is the central crop
    val = torch.cat([v for v, _ in dm.val_dataloader()])
    assert torch.equal(val, dm.val_tensor()) and val.shape == (2, 3, 16, 16)


def test_flips_only_on_train(tmp_path: Path) -> None:
    root = tmp_path / "asym"
    root.mkdir()
    for i in range(6):
        array = np.zeros((16, 16, 3), dtype=np.uint8)
        array[:, : 4 + i] = 255  # a white left band: mirror-asymmetric
        Image.fromarray(array).save(root / f"{i}.png")
    torch.manual_seed(0)
    dm = make(root, flip=True, val_fraction=0.3, batch_size=4)
    originals = dm.train_tensor()
    mirrored = []
    for _ in range(5):
        for img in next(iter(dm.train_dataloader()))[0]:
            plain = any(torch.equal(img, o) for o in originals)
            assert plain or any(torch.equal(img, o.flip(-1)) for o in originals)
            mirrored.append(not plain)
    assert any(mirrored) and not all(mirrored)
    assert torch.equal(torch.cat([v for v, _ in dm.val_dataloader()]), dm.val_tensor())


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match=r"load_size > dataset\.resolution"):
        ImageFolderDataModule(crop="random")
    with pytest.raises(ValueError, match="center"):
        ImageFolderDataModule(crop="middle")
    with pytest.raises(ValueError, match=r"resolution <= dataset\.load_size"):
        ImageFolderDataModule(resolution=32, load_size=16)
    with pytest.raises(ValueError, match="val_fraction"):
        ImageFolderDataModule(val_fraction=1.0)


def test_missing_folder_gives_helpful_error(tmp_path: Path) -> None:
    dm = make(tmp_path / "nowhere")
    for access in (lambda: dm.num_classes, dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            access()
        message = str(info.value)
        assert str(tmp_path / "nowhere") in message and "dataset.root=" in message and ".png" in message


def test_empty_folder_and_empty_class_are_reported(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images found"):
        make(tmp_path / "empty").setup()
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        make(tmp_path / "empty").setup()


def test_hydra_option_composes_and_loads(classes: Path) -> None:
    overrides = ["metrics=none", "dataset=image_folder", f"dataset.root={classes}", "dataset.num_workers=0"]
    rgb16 = ["model=unet_small", "model.in_channels=3"]  # the model must fit the data (3 × 16 × 16)
    cfg = compose_train(
        [*overrides, "dataset.resolution=16", "dataset.batch_size=2", "dataset.val_fraction=0.4", *rgb16]
    )
    validate_config(cfg)
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, ImageFolderDataModule) and dm.num_classes == 2 and dm.crop == "center"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.dtype == torch.long
    with pytest.raises(ConfigError, match="load_size"):  # caught when the config is validated, not at load time
        validate_config(compose_train([*overrides, "dataset.crop=random"]))


def test_16bit_grey_and_transparent_images_are_decoded_faithfully(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    (root / "grey16").mkdir(parents=True)
    (root / "rgba").mkdir()
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0, 257, …, 65535
    Image.fromarray(ramp).save(root / "grey16" / "ramp.png")  # mode I;16: convert("RGB") made it all white
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 50), np.arange(16, dtype=np.uint8)[None, :] * 17  # alpha 0 .. 255
    Image.fromarray(rgba).save(root / "rgba" / "fade.png")
    dm = make(root, val_fraction=0.5)
    x, y = all_images(dm)
    levels = ((x + 1) * 127.5).round().to(torch.uint8)  # back to the decoded uint8 pixels (no resize at 16)
    grey, fade = levels[y == 0][0], levels[y == 1][0]
    assert torch.equal(grey, torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16))
    expected = np.round(np.array([200, 100, 50])[:, None] * (np.arange(16) * 17)[None, :] / 255)  # over black
    assert torch.equal(fade, torch.from_numpy(expected.astype(np.uint8))[:, None, :].expand(3, 16, 16))


def test_an_undecodable_mode_is_refused_at_setup_naming_the_file(classes: Path) -> None:
    path = classes / "dog" / "depth.tif"
    Image.fromarray(np.ones((16, 16), dtype=np.float32)).save(path)
    dm = make(classes)
    with pytest.raises(ImageModeError) as info:
        dm.setup()
    message = str(info.value)
    assert f"Refusing image {path} (TIFF, mode F)" in message and "supported modes: 1, L, LA, P" in message
    assert dm._train is None and dm._val is None  # nothing half-loaded
