"""Tests for diffusion_lab.data.shapes: determinism, exact two-colour images, class semantics, training.

The class of every image is recovered from its pixels alone by a hand-written rule (fill ratio of the
shape's bounding box, hollow centre, top-heaviness), independent of the generator's geometry code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.config import validate_config
from diffusion_lab.data import SHAPES, ShapesDataModule
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.train import train
from tests.test_config import compose_train


def classify(image: torch.Tensor) -> str:
    """Name the shape in one (3, R, R) image in [-1, 1] from its pixels (see the module docstring)."""
    background = image[:, 0, 0]  # the 1-pixel margin keeps the corner free
    mask = (image != background[:, None, None]).any(0)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = box.shape
    fill = box.float().mean().item()
    top, bottom = box[: h // 2].sum().item(), box[h - h // 2 :].sum().item()
    centre = box[(h - 1) // 2 : h // 2 + 1, (w - 1) // 2 : w // 2 + 1]
    if not centre.any():
        return "ring"
    if top < 0.6 * bottom:
        return "triangle"
    if fill > 0.95:
        return "square"
    return "circle" if fill > 0.7 else "plus"


@pytest.fixture(scope="module")
def shapes() -> ShapesDataModule:
    dm = ShapesDataModule(num_train=1000, num_val=200, batch_size=50)
    dm.setup()
    return dm


def test_attributes_before_setup() -> None:
    dm = ShapesDataModule()
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == len(SHAPES) == 5 and dm.modality == "image"
    assert (dm.min_size, dm.max_size) == (10, 24) and dm.flip is False and dm._train is None


def test_images_are_two_coloured_in_range(shapes: ShapesDataModule) -> None:
    x = shapes.train_tensor()
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    levels = (x + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # 8-bit pixel values
    for image in x[:100]:
        colours = torch.unique(image.flatten(1).T, dim=0)
        assert len(colours) == 2  # hard edges: the shape's colour and the background's
        assert (colours[0] - colours[1]).abs().max() * 127.5 >= 96 - 1e-3  # MIN_CONTRAST


def test_class_is_visible_in_the_pixels(shapes: ShapesDataModule) -> None:
    for x, y in [(shapes.train_tensor(), shapes.train_labels()), (shapes.val_tensor(), shapes.val_labels())]:
        predicted = [classify(image) for image in x]
        assert predicted == [SHAPES[label] for label in y.tolist()]


def test_shape_sizes_and_margin(shapes: ShapesDataModule) -> None:
    x = shapes.val_tensor()
    masks = (x != x[:, :, :1, :1]).any(1)  # (N, R, R)
    assert not masks[:, 0].any() and not masks[:, -1].any() and not masks[:, :, 0].any() and not masks[:, :, -1].any()
    heights = masks.any(2).sum(1)
    assert heights.min() >= 8 and heights.max() <= 24 and len(torch.unique(heights)) > 8


def test_classes_balanced_and_deterministic(shapes: ShapesDataModule) -> None:
    assert torch.bincount(shapes.train_labels(), minlength=5).tolist() == [200] * 5
    again = ShapesDataModule(num_train=1000, num_val=200, batch_size=50)
    assert torch.equal(again.train_tensor(), shapes.train_tensor())
    assert torch.equal(again.val_labels(), shapes.val_labels())
    other = ShapesDataModule(num_train=1000, num_val=200, batch_size=50, seed=1)
    assert not torch.equal(other.train_tensor(), shapes.train_tensor())
    train = {img.numpy().tobytes() for img in shapes.train_tensor()}
    assert not any(img.numpy().tobytes() in train for img in shapes.val_tensor())  # val is other images


def test_flips_only_on_train_when_asked() -> None:
    torch.manual_seed(0)
    dm = ShapesDataModule(num_train=64, num_val=16, batch_size=64, flip=True)
    originals = {img.numpy().tobytes() for img in dm.train_tensor()}
    x, _ = next(iter(dm.train_dataloader()))
    moved = [img.numpy().tobytes() not in originals for img in x]
    assert any(moved) and not all(moved)  # a mirrored shape sits elsewhere (unless centred)
    assert torch.equal(torch.cat([v for v, _ in dm.val_dataloader()]), dm.val_tensor())
    plain = ShapesDataModule(num_train=64, num_val=16, batch_size=64)
    assert all(img.numpy().tobytes() in originals for img in next(iter(plain.train_dataloader()))[0])


@pytest.mark.parametrize(
    "kwargs",
    [{"min_scale": 0.2}, {"max_scale": 0.99}, {"min_scale": 0.7, "max_scale": 0.5}, {"num_train": 10}],
)
def test_invalid_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ShapesDataModule(**kwargs)  # type: ignore[arg-type]


def test_render_grid(shapes: ShapesDataModule) -> None:
    image = shapes.render(shapes.val_tensor()[:9])
    assert image.dtype == np.uint8 and image.shape == (3 * 34 + 2, 3 * 34 + 2, 3)


TINY_MODEL = [
    "model.in_channels=3",
    "model.resolution=32",
    "model.base_channels=16",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[16]",
    "model.num_groups=4",
]


def test_hydra_option_composes_and_rejects_bad_scales() -> None:
    cfg = compose_train(["metrics=none", "dataset=shapes", "model=unet"])  # the model must fit 3 × 32 × 32
    validate_config(cfg)
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, ShapesDataModule) and dm.num_train == 10_000 and dm.num_val == 1_000
    with pytest.raises(ConfigError, match="min_scale"):
        validate_config(compose_train(["metrics=none", "dataset=shapes", "model=unet", "dataset.max_scale=0.99"]))


def test_class_conditional_training_run(tmp_path: Path) -> None:
    """Five steps of a class-conditional UNet on 32x32 RGB shapes through the real train() entry point."""
    overrides = ["metrics=none", "dataset=shapes", "dataset.num_train=64", "dataset.num_val=16"]
    cfg = compose_train([*overrides, "dataset.batch_size=8", *TINY_MODEL, "cond.enabled=true", "debug=default"])
    metrics = train(cfg, tmp_path)
    assert metrics["train/steps"] == 5 and np.isfinite(metrics["train/loss"])
    assert metrics["protocol"]["conditioning"]["num_classes"] == 5
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "samples_ema.png").is_file()
