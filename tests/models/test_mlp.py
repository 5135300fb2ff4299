"""Tests for diffusion_lab.models.mlp (fast, CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffusion_lab.models import MLP


def _perturb_output_layer(model: MLP) -> None:
    with torch.no_grad():
        model.out.weight.normal_(std=0.1)
        model.out.bias.normal_(std=0.1)


@pytest.mark.parametrize(
    ("kwargs", "out_dim"),
    [({}, 2), ({"out_dim": 4}, 4), ({"dim": 3, "num_layers": 1, "hidden": 32}, 3), ({"num_classes": 8}, 2)],
)
def test_output_shape(kwargs: dict[str, Any], out_dim: int) -> None:
    model = MLP(**kwargs)
    x = torch.randn(5, model.dim)
    y = torch.randint(0, 8, (5,)) if model.num_classes else None
    assert model(x, torch.rand(5) * 1000, y).shape == (5, out_dim)


def test_depth_and_width_set_the_parameter_count() -> None:
    def count(**kw: int) -> int:
        return sum(p.numel() for p in MLP(**kw).parameters())

    assert count(num_layers=5) > count(num_layers=4) and count(hidden=128) < count(hidden=256)
    assert len(MLP(num_layers=3).blocks) == 3


def test_output_is_exactly_zero_at_init() -> None:
    assert torch.count_nonzero(MLP()(torch.randn(4, 2), torch.rand(4))) == 0


def test_gradients_reach_every_parameter_after_perturbing_output_layer() -> None:
    torch.manual_seed(0)
    model = MLP(num_classes=3, hidden=32, time_embed_dim=16)
    _perturb_output_layer(model)
    model(torch.randn(6, 2), torch.rand(6) * 1000, torch.tensor([0, 1, 2, 3, 0, 1])).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_noise_conditioning_changes_output() -> None:
    torch.manual_seed(0)
    model = MLP()
    _perturb_output_layer(model)
    out = model(torch.ones(2, 2), torch.tensor([10.0, 500.0]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_class_conditioning_changes_output_and_none_is_null_label() -> None:
    torch.manual_seed(0)
    model = MLP(num_classes=2)
    _perturb_output_layer(model)
    x, c = torch.ones(2, 2), torch.full((2,), 100.0)
    out = model(x, c, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert torch.allclose(model(x, c), model(x, c, torch.tensor([2, 2])), atol=1e-5)


def test_labels_given_to_unconditional_mlp_raise() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MLP()(torch.randn(2, 2), torch.rand(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"dim": 0}, "dim"),
        ({"hidden": 0}, "hidden"),
        ({"num_layers": 0}, "num_layers"),
        ({"time_embed_dim": 1}, "time_embed_dim"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_classes": 0}, "num_classes"),
        ({"out_dim": 0}, "out_dim"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        MLP(**kwargs)


@pytest.mark.parametrize(("x_shape", "c_shape"), [((4, 3), (4,)), ((4, 2, 1), (4,)), ((4, 2), (4, 1))])
def test_bad_input_shapes_raise(x_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="MLP"):
        MLP()(torch.randn(x_shape), torch.zeros(c_shape))


def test_deterministic_under_manual_seed() -> None:
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = MLP(dropout=0.1)
        _perturb_output_layer(model)
        outs.append(model(torch.randn(4, 2), torch.rand(4)))  # train mode: dropout draws from the seed too
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = MLP()
    _perturb_output_layer(model)
    x, c = torch.randn(4, 2), torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, c)
    assert torch.isfinite(out).all()
    assert (out.float() - model(x, c)).abs().max() < 0.1 * model(x, c).abs().max()
