"""Tests for diffusion_lab.models.unet (fast, CPU)."""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffusion_lab.models import UNet
from diffusion_lab.models.unet import AttentionBlock

# Ho et al. 2020 App. B CIFAR-10 network (all defaults): 35.7M parameters.
DDPM_CIFAR10: dict[str, Any] = dict(
    in_channels=3, resolution=32, base_channels=128, channel_mult=(1, 2, 2, 2),
    num_res_blocks=2, attention_resolutions=(16,), dropout=0.1,
)  # fmt: skip
DIGITS: dict[str, Any] = dict(
    resolution=16, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(8,)
)
EIGHT: dict[str, Any] = dict(
    resolution=8, in_channels=1, base_channels=32, channel_mult=(1, 2), attention_resolutions=(4,)
)
# A tiny network for the behavioural tests (fast on CPU).
TINY: dict[str, Any] = dict(
    resolution=8, in_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(8, 4), num_groups=8, dropout=0.0,
)  # fmt: skip
# The Dhariwal & Nichol 2021 options on the tiny network.
ADM_OPTIONS: dict[str, Any] = {
    **TINY,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "num_head_channels": 8,
}


def _perturb(model: nn.Module, std: float = 0.05) -> None:
    """Add noise to every parameter, so the zero-initialised layers stop blocking signal and gradients."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def _inputs(model: UNet, batch: int = 2, size: int | None = None) -> tuple[Tensor, Tensor]:
    size = model.resolution if size is None else size
    return torch.randn(batch, model.in_channels, size, size), torch.linspace(0, 999, batch)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "batch", "hw", "out_channels"),
    [
        (DIGITS, 3, (16, 16), 1),
        ({**DIGITS, "num_res_blocks": 1, "num_groups": 8, "dropout": 0.0}, 2, (16, 16), 1),  # unet_small.yaml
        (EIGHT, 2, (8, 8), 1),
        ({**TINY, "out_channels": 4}, 2, (8, 8), 4),  # learned variance: 2 × channels
        (ADM_OPTIONS, 1, (8, 8), 2),
        ({**TINY, "num_classes": 5, "num_heads": 4}, 3, (8, 8), 2),
        (DIGITS, 2, (16, 8), 1),  # non-square input with sides divisible by 2**(levels-1)
    ],
)  # fmt: skip
def test_output_shape(kwargs: dict[str, Any], batch: int, hw: tuple[int, int], out_channels: int) -> None:
    model = UNet(**kwargs).eval()
    x = torch.randn(batch, model.in_channels, *hw)
    y = torch.randint(0, model.num_classes, (batch,)) if model.num_classes else None
    out = model(x, torch.rand(batch) * 1000, y)
    assert out.shape == (batch, out_channels, *hw)


def test_ddpm_cifar10_parameter_count_matches_paper() -> None:
    n = _num_params(UNet(**DDPM_CIFAR10))
    assert abs(n - 35.7e6) / 35.7e6 < 0.02, n


def test_defaults_are_the_ddpm_cifar10_network() -> None:
    params = inspect.signature(UNet).parameters
    assert {name: params[name].default for name in DDPM_CIFAR10} == DDPM_CIFAR10


def test_output_is_exactly_zero_at_init() -> None:
    model = UNet(**TINY)
    assert torch.count_nonzero(model(*_inputs(model))) == 0


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=3, use_scale_shift_norm=True)
    _perturb(model)
    x, c = _inputs(model, batch=3)
    model(x, c, torch.tensor([0, 1, 3])).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_noise_conditioning_changes_output() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    _perturb(model)
    x = torch.randn(1, 2, 8, 8).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10.0, 500.0]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_class_conditioning_changes_output_and_none_is_null_label() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=4).eval()
    _perturb(model)
    x, c = torch.randn(1, 2, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 100.0)
    out = model(x, c, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert torch.allclose(model(x, c), model(x, c, torch.tensor([4, 4])), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "expected_count", "expected_sizes"),
    [
        (DDPM_CIFAR10, 2 + 3 + 1, {16: 5, 4: 1}),  # level 16: 2 encoder + 3 decoder; middle at 4
        ({**DDPM_CIFAR10, "attention_resolutions": (32, 8)}, 5 + 5 + 1, {32: 5, 8: 5, 4: 1}),
        ({**DDPM_CIFAR10, "attention_resolutions": ()}, 1, {4: 1}),
        (DIGITS, 5 + 1, {8: 5, 4: 1}),
    ],
)
def test_attention_is_placed_at_requested_resolutions(
    kwargs: dict[str, Any], expected_count: int, expected_sizes: dict[int, int]
) -> None:
    model = UNet(**{**kwargs, "base_channels": 32})  # narrower: same layout, faster forward
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == expected_count
    sizes: Counter[int] = Counter()
    for block in blocks:
        block.register_forward_hook(lambda _m, inp, _o: sizes.update([inp[0].shape[-1]]))
    with torch.no_grad():
        model(*_inputs(model, batch=1))
    assert sizes == expected_sizes


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"resolution": 30}, "resolution"),
        ({"resolution": 8, "channel_mult": (1, 2)}, "attention_resolutions"),  # default (16,) never visited
        ({"attention_resolutions": (16, 3)}, "attention_resolutions"),
        ({"base_channels": 48}, "num_groups"),
        ({"num_heads": 3}, "num_heads"),
        ({"num_head_channels": 48}, "num_head_channels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, 0)}, "channel_mult"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        UNet(**kwargs)


def test_attention_error_lists_the_visited_resolutions() -> None:
    with pytest.raises(ValueError, match=r"\[16, 8, 4\]"):
        UNet(**{**DIGITS, "attention_resolutions": (32,)})


def test_labels_given_to_unconditional_unet_raise() -> None:
    model = UNet(**TINY)
    with pytest.raises(ValueError, match="num_classes"):
        model(*_inputs(model), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    ("x_shape", "c_shape"),
    [((2, 3, 8, 8), (2,)), ((2, 2, 7, 7), (2,)), ((2, 2, 8, 8), (1,)), ((2, 2, 8, 8), ())],
)
def test_bad_input_shapes_raise(x_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="UNet"):
        UNet(**TINY)(torch.randn(x_shape), torch.zeros(c_shape))


def test_deterministic_under_manual_seed() -> None:
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = UNet(**TINY).eval()
        _perturb(model)
        x, c = _inputs(model)
        outs.append(model(x, c))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_channels_last_input_gives_the_same_output() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    _perturb(model)
    x, c = _inputs(model)
    assert torch.allclose(model(x.to(memory_format=torch.channels_last), c), model(x, c), atol=1e-5)


def test_bf16_autocast_and_bf16_weights() -> None:
    torch.manual_seed(0)
    model = UNet(**TINY).eval()
    _perturb(model)
    x, c = _inputs(model)
    with torch.no_grad():
        ref = model(x, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, c)
        out_bf16 = model.to(torch.bfloat16)(x.bfloat16(), c)
    for o in (out, out_bf16):
        assert o.shape == ref.shape and torch.isfinite(o).all()
        assert (o.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_instantiates_from_hydra_config() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "diffusion_lab.models.UNet", **TINY, "channel_mult": [1, 2]})
    model = instantiate(cfg)
    assert isinstance(model, UNet) and model.channel_mult == (1, 2)
    assert model(*_inputs(model)).shape == (2, 2, 8, 8)
