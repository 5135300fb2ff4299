"""Tests for diffusion_lab.data.toy2d: registry, scale, exact log-densities, determinism, render."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from diffusion_lab.data import TOY_DISTRIBUTIONS, DiffusionDataModule, Toy2DDataModule
from diffusion_lab.data.toy2d import GAUSSIANS_STD, PAPER_UNIT_SETS, eight_gaussians_means

NAMES = sorted(TOY_DISTRIBUTIONS)
UNIT_SCALE = sorted(set(TOY_DISTRIBUTIONS) - set(PAPER_UNIT_SETS))  # the others are in their paper's units


def make(name: str = "swiss_roll", seed: int = 0, **kwargs: int) -> Toy2DDataModule:
    kwargs = {"num_train": 2_000, "num_val": 500, "batch_size": 256, **kwargs}
    return Toy2DDataModule(name=name, seed=seed, **kwargs)


def grid(limit: float, n: int) -> tuple[Tensor, float]:
    """Cell-centre grid over [-limit, limit]^2: ((n*n, 2), cell area)."""
    h = 2 * limit / n
    axis = -limit + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1), h * h


def test_registry_has_the_four_sets_and_the_flow_matching_pair() -> None:
    assert set(UNIT_SCALE) == {"swiss_roll", "two_moons", "eight_gaussians", "checkerboard"}
    assert set(NAMES) == set(UNIT_SCALE) | {"torchdyn_moons", "c2ot_eight_gaussians"}


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="name") as info:
        Toy2DDataModule(name="spiral")
    for name in NAMES:
        assert name in str(info.value)


def test_attributes_before_setup() -> None:
    dm = make()
    assert isinstance(dm, L.LightningDataModule) and isinstance(dm, DiffusionDataModule)
    assert dm.data_shape == (2,) and dm.num_classes is None and dm.modality == "points"
    assert dm._train is None  # nothing generated yet


@pytest.mark.parametrize("name", UNIT_SCALE)
def test_unit_scale(name: str) -> None:
    x = TOY_DISTRIBUTIONS[name].sample(50_000, torch.Generator().manual_seed(1))
    assert x.shape == (50_000, 2) and x.dtype == torch.float32
    assert (x.mean(0).abs() < 0.3).all(), x.mean(0)
    assert ((x.std(0) > 0.7) & (x.std(0) < 1.35)).all(), x.std(0)
    assert x.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.2)  # RMS over coordinates
    assert (x.abs() < 3.0).all()  # render()'s fixed axis range holds the data


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_data_different_seed_different(name: str) -> None:
    a, b, c = make(name, seed=3), make(name, seed=3), make(name, seed=4)
    assert torch.equal(a.train_tensor(), b.train_tensor())
    assert torch.equal(a.val_tensor(), b.val_tensor())
    assert not torch.equal(a.train_tensor(), c.train_tensor())
    assert not torch.equal(a.train_tensor()[:500], a.val_tensor())  # val is not a copy of train


def test_loader_batches_and_seeded_shuffle() -> None:
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    batches = list(a.train_dataloader())
    assert len(batches) == 2_000 // 256  # drop_last
    x, y = batches[0]
    assert x.shape == (256, 2) and x.dtype == torch.float32
    assert y.shape == (256,) and y.dtype == torch.long and (y == 0).all()
    assert torch.equal(x, next(iter(b.train_dataloader()))[0])
    assert not torch.equal(x, a.train_tensor()[:256])  # shuffled
    # Iterating the same loader again (the next epoch) draws a new order from its generator.
    loader = a.train_dataloader()
    first_epoch, second_epoch = next(iter(loader))[0], next(iter(loader))[0]
    assert not torch.equal(first_epoch, second_epoch)
    val = torch.cat([vx for vx, _ in a.val_dataloader()])
    assert torch.equal(val, a.val_tensor())  # val: fixed order, nothing dropped


def test_eight_gaussians_log_prob_integrates_to_one() -> None:
    log_prob = make("eight_gaussians").log_prob
    assert log_prob is not None
    points, area = grid(limit=3.0, n=600)
    assert torch.exp(log_prob(points)).sum().item() * area == pytest.approx(1.0, abs=1e-3)


def test_eight_gaussians_log_prob_matches_torch_mixture() -> None:
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(8)), Independent(Normal(eight_gaussians_means(), GAUSSIANS_STD), 1)
    )
    dm = make("eight_gaussians")
    x = dm.sample_reference(1_000, torch.Generator().manual_seed(0))
    assert dm.log_prob is not None
    torch.testing.assert_close(dm.log_prob(x), mixture.log_prob(x))
    x_far = torch.tensor([[0.0, 0.0], [2.5, -2.5]])
    torch.testing.assert_close(dm.log_prob(x_far), mixture.log_prob(x_far))


def test_checkerboard_log_prob_finite_exactly_on_the_squares() -> None:
    dm = make("checkerboard")
    log_prob = dm.log_prob
    assert log_prob is not None
    samples = dm.sample_reference(20_000, torch.Generator().manual_seed(0))
    assert torch.allclose(log_prob(samples), torch.full((20_000,), -math.log(8.0)))
    centres = torch.tensor([[i + 0.5, j + 0.5] for i in range(-3, 3) for j in range(-3, 3)])
    on_board = (centres.abs() < 2).all(1)
    on_square = on_board & ((centres[:, 0] - 0.5 + centres[:, 1] - 0.5) % 2 == 0)
    assert on_square.sum() == 8
    finite = torch.isfinite(log_prob(centres))
    assert torch.equal(finite, on_square)
    assert (log_prob(centres[~on_square]) == -math.inf).all()
    # The generator puts mass only on those 8 squares, with equal shares.
    cells = torch.floor(samples)
    assert ((cells.sum(1) % 2) == 0).all()
    counts = torch.unique(cells, dim=0, return_counts=True)[1]
    assert len(counts) == 8 and (counts.float() / 20_000 - 1 / 8).abs().max() < 0.02
    points, area = grid(limit=2.5, n=500)
    assert torch.exp(log_prob(points)).sum().item() * area == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", ["swiss_roll", "two_moons"])
def test_log_prob_none_where_unknown(name: str) -> None:
    assert make(name).log_prob is None


def test_sample_reference_uses_the_generator() -> None:
    dm = make("two_moons")
    a = dm.sample_reference(100, torch.Generator().manual_seed(5))
    b = dm.sample_reference(100, torch.Generator().manual_seed(5))
    c = dm.sample_reference(100, torch.Generator().manual_seed(6))
    assert a.shape == (100, 2) and torch.equal(a, b) and not torch.equal(a, c)


def test_render_points() -> None:
    dm = make("eight_gaussians")
    image = dm.render(torch.zeros(64, 2))
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (400, 400, 3)
    # Samples at the origin are blue at the image centre; reference points are grey elsewhere.
    centre = image[195:205, 195:205].reshape(-1, 3).astype(int)
    assert ((centre[:, 2] - centre[:, 0]) > 50).any()
    other = dm.render(torch.full((64, 2), 1.5))
    assert not np.array_equal(image, other)


@pytest.mark.parametrize("name", ["torchdyn_moons", "c2ot_eight_gaussians"])
def test_paper_unit_sets_render_on_their_papers_axes(name) -> None:
    """The C2OT pair lives on [-7, 7]² (source radius 5): a sample at (6, 6) lands at pixel (372, 28) of the 400²
    image, where [-3, 3]² axes would have cut it off."""
    dm = make(name, num_train=512, num_val=64)
    pixel = dm.render(torch.full((64, 2), 6.0))[24:33, 368:377].reshape(-1, 3).astype(int)
    assert ((pixel[:, 2] - pixel[:, 0]) > 50).any()  # blue: the sample is drawn


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        return (self.net(x) - x).pow(2).mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val", (self.net(batch[0]) - batch[0]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_under_a_lightning_trainer() -> None:
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(_TinyModule(), datamodule=make("checkerboard"))
    assert trainer.state.finished
