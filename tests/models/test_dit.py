"""Tests for diffusion_lab.models.dit (fast, CPU; the paper's large shapes are built on the meta device)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from diffusion_lab.config import check_model_data, register_configs, validate_config
from diffusion_lab.models.dit import DiT, DiTBlock, num_parameters, patchify, sincos_pos_embed_2d, unpatchify
from diffusion_lab.module import build_module
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR, build_option, option_config, option_names

register_configs()

TINY: dict[str, Any] = dict(in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=4)
# Peebles & Xie 2023 Table 1 (layers, width, heads) and Table 4's parameter counts (millions) of the X/2 models,
# in the paper's setting: 32×32×4 latents (256² images), learned variance (8 output channels), 1000 classes.
PAPER_SHAPES = {"dit_s": 33, "dit": 130, "dit_l": 458, "dit_xl": 675}
PAPER_SETTING: dict[str, Any] = dict(in_channels=4, out_channels=8, num_classes=1000)


def _perturb(model: nn.Module, std: float = 0.05) -> None:
    """Add noise to every parameter, so the zero-initialised layers pass signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def _compose(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("hw", [(8, 8), (4, 12), (6, 2)])
@pytest.mark.parametrize("p", [1, 2])
def test_patchify_unpatchify_round_trip(hw: tuple[int, int], p: int) -> None:
    x = torch.randn(3, 5, *hw)
    tokens = patchify(x, p)
    assert tokens.shape == (3, hw[0] * hw[1] // p**2, p * p * 5)
    assert torch.equal(unpatchify(tokens, p, 5, (hw[0] // p, hw[1] // p)), x)


def test_patchify_puts_each_patch_in_one_token_row_major() -> None:
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    tokens = patchify(x, 2)
    # Token (row 1, col 2) = index 1·3 + 2 holds pixels [2:4, 4:6] of both channels, laid out (p_row, p_col, C).
    expected = x[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[0, 5], expected)


def test_patchify_refuses_a_size_the_patch_does_not_divide() -> None:
    with pytest.raises(ValueError, match="patch_size=2"):
        patchify(torch.zeros(1, 1, 7, 8), 2)


def test_position_embedding_is_the_2d_sincos_table() -> None:
    emb = sincos_pos_embed_2d(8, (2, 3))
    omega = torch.tensor([1.0, 0.01])  # 10000^(−k/2), k = 0, 1
    i, j = 1, 2  # token 1·3 + 2
    expected = torch.cat([torch.sin(i * omega), torch.cos(i * omega), torch.sin(j * omega), torch.cos(j * omega)])
    torch.testing.assert_close(emb[5], expected)
    assert emb.shape == (6, 8) and len({tuple(r.tolist()) for r in emb}) == 6  # every position distinct


@pytest.mark.parametrize(
    ("kwargs", "batch", "hw", "out_channels"),
    [
        (TINY, 3, (8, 8), 2),
        ({**TINY, "out_channels": 4}, 2, (8, 8), 4),  # learned variance: 2 × channels
        ({**TINY, "patch_size": 1}, 2, (4, 4), 2),
        ({**TINY, "num_classes": 5}, 2, (8, 8), 2),
        (TINY, 2, (8, 12), 2),  # non-square: positions for a 4×6 grid
    ],
)  # fmt: skip
def test_output_shape(kwargs: dict[str, Any], batch: int, hw: tuple[int, int], out_channels: int) -> None:
    model = DiT(**kwargs).eval()
    y = torch.randint(0, model.num_classes, (batch,)) if model.num_classes else None
    out = model(torch.randn(batch, model.in_channels, *hw), torch.rand(batch) * 1000, y)
    assert out.shape == (batch, out_channels, *hw)


def test_output_is_exactly_zero_at_init_adaln_zero() -> None:
    model = DiT(**TINY, num_classes=3)
    out = model(torch.randn(4, 2, 8, 8), torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 3]))
    assert torch.count_nonzero(out) == 0
    gates = [p for m in model.modules() if isinstance(m, DiTBlock) for p in m.adaLN_modulation.parameters()]
    assert len(gates) == 2 * 2 and all(torch.count_nonzero(p) == 0 for p in gates)  # each block starts as identity


@pytest.mark.parametrize(("name", "millions"), sorted(PAPER_SHAPES.items()))
def test_paper_shapes_have_the_papers_parameter_counts(name: str, millions: int) -> None:
    shape: dict[str, Any] = {str(k): v for k, v in option_config("model", name).items()}
    shape = {k: v for k, v in shape.items() if k not in ("_target_", "in_channels")}
    with torch.device("meta"):  # shapes only: XL/2 is 675M parameters
        model = DiT(**{**shape, **PAPER_SETTING})
    assert round(num_parameters(model) / 1e6) == millions, num_parameters(model)


def test_xl2_count_is_the_reference_implementations() -> None:
    """facebookresearch/DiT counts 675,129,632 for DiT-XL/2, its frozen 256×1152 position table included."""
    with torch.device("meta"):
        model = DiT(**{**PAPER_SETTING, "patch_size": 2, "hidden_size": 1152, "depth": 28, "num_heads": 16})
    assert num_parameters(model) + 256 * 1152 == 675_129_632


def test_dit_digits_matches_unet_digits_parameter_count() -> None:
    dit = build_option("model", option_config("model", "dit_digits"))
    unet = build_option("model", option_config("model", "unet_digits"))
    assert abs(num_parameters(dit) / num_parameters(unet) - 1) < 0.05


def _adam_steps(model: DiT, steps: int) -> None:
    """``steps`` Adam steps of a regression to the input on a fixed random batch (fresh optimizer state)."""
    torch.manual_seed(1)
    x, c, y = torch.randn(8, 2, 8, 8), torch.rand(8) * 1000, torch.randint(0, 4, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (model(x, c, y) - x).square().mean().backward()
        opt.step()


def _responses(model: DiT) -> tuple[Tensor, Tensor]:
    """Outputs on one image at two noise levels (same label), and at two labels (same noise level)."""
    probe = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2)).expand(2, -1, -1, -1)
    with torch.no_grad():
        by_noise = model(probe, torch.tensor([10.0, 900.0]), torch.tensor([1, 1]))
        by_label = model(probe, torch.tensor([10.0, 10.0]), torch.tensor([0, 3]))
    return by_noise, by_label


def test_conditioning_changes_the_output_from_the_second_step() -> None:
    """adaLN-Zero: at init only the output layer has a gradient, and its input (the tokens, every gate 0) does not
    depend on (c_noise, y); so after one step the output is non-zero but the same for any conditioning, and from the
    second step the modulation and gates have moved and the conditioning acts."""
    torch.manual_seed(0)
    model = DiT(**TINY, num_classes=4)
    _adam_steps(model, 1)
    by_noise, by_label = _responses(model)
    assert by_noise.abs().max() > 0
    assert torch.equal(by_noise[0], by_noise[1]) and torch.equal(by_label[0], by_label[1])
    _adam_steps(model, 1)
    by_noise, by_label = _responses(model)
    assert (by_noise[0] - by_noise[1]).abs().max() > 1e-4 and (by_label[0] - by_label[1]).abs().max() > 1e-4


def test_none_label_is_the_null_label() -> None:
    torch.manual_seed(0)
    model = DiT(**TINY, num_classes=4).eval()
    _perturb(model)
    x, c = torch.randn(2, 2, 8, 8), torch.full((2,), 100.0)
    torch.testing.assert_close(model(x, c), model(x, c, torch.tensor([4, 4])))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = DiT(**TINY, num_classes=3)
    _perturb(model)
    model(torch.randn(3, 2, 8, 8), torch.rand(3) * 1000, torch.tensor([0, 1, 3])).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_tokens_attend_to_each_other() -> None:
    """A pixel change in one patch moves the output of another patch (attention mixes tokens)."""
    torch.manual_seed(0)
    model = DiT(**TINY).eval()
    _perturb(model)
    x, c = torch.randn(1, 2, 8, 8), torch.tensor([100.0])
    x2 = x.clone()
    x2[0, :, 0, 0] += 1.0
    with torch.no_grad():
        delta = (model(x2, c) - model(x, c)).abs()
    assert delta[0, :, 6:, 6:].max() > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_heads": 5}, "num_heads"),
        ({"hidden_size": 30, "num_heads": 3}, "divisible by 4"),
        ({"patch_size": 0}, "patch_size"),
        ({"depth": 0}, "depth"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        DiT(**{**TINY, **kwargs})


@pytest.mark.parametrize(("x_shape", "c_shape"), [((2, 3, 8, 8), (2,)), ((2, 2, 7, 8), (2,)), ((2, 2, 8, 8), (1,))])
def test_bad_input_shapes_raise(x_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="DiT"):
        DiT(**TINY)(torch.randn(x_shape), torch.zeros(c_shape))


def test_labels_given_to_an_unconditional_dit_raise() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        DiT(**TINY)(torch.randn(2, 2, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_every_dit_option_is_a_model_option() -> None:
    assert {"dit", "dit_s", "dit_l", "dit_xl", "dit_digits"} <= set(option_names("model"))


def test_a_patch_size_that_does_not_divide_the_data_is_refused_at_composition() -> None:
    cfg = _compose(["model=dit_digits", "model.patch_size=3"])
    with pytest.raises(ConfigError, match=r"model.patch_size=3 .*valid: a patch_size dividing 8 and 8"):
        check_model_data(cfg.model, (1, 8, 8), "diffusion_lab.data.DigitsDataModule")


def test_heads_that_do_not_split_the_width_are_refused_at_composition() -> None:
    with pytest.raises(ConfigError, match=r"model.hidden_size=96 is not divisible by model.num_heads=5"):
        validate_config(_compose(["model=dit_digits", "model.num_heads=5"]))


def _digits_batch(n: int = 16) -> tuple[Tensor, Tensor]:
    from diffusion_lab.metrics.digits import digits_split

    x, y, _, _ = digits_split()
    return x[:n], y[:n]


@pytest.mark.parametrize("param", ["eps", "x0", "v", "flow", "score", "edm"])
def test_every_parameterization_gives_the_data_shape(param: str) -> None:
    torch.manual_seed(0)
    cfg = _compose(["model=dit_digits", f"parameterization={param}"])
    module = build_module(cfg, (1, 8, 8))
    _perturb(module.denoiser.net)
    x, _ = _digits_batch(4)
    x0_hat = module.denoiser(x, torch.tensor([0.1, 0.4, 0.7, 0.95]))
    assert x0_hat.shape == x.shape and torch.isfinite(x0_hat).all()


def test_learned_variance_doubles_the_output_channels() -> None:
    cfg = _compose(["model=dit_digits", "loss.learned_variance=true"])
    module = build_module(cfg, (1, 8, 8))
    net = module.denoiser.net
    assert isinstance(net, DiT) and net.out_channels == 2
    x, _ = _digits_batch(4)
    x0_hat, variance = module.denoiser.predict_with_variance(x, torch.full((4,), 0.5))
    assert x0_hat.shape == variance.shape == x.shape  # type: ignore[union-attr]


def test_a_short_digits_training_run_lowers_the_loss() -> None:
    """Class-conditional DiT on real digits: 30 Adam steps at a fixed noise level lower the loss from its init."""
    torch.manual_seed(0)
    cfg = _compose(["model=dit_digits", "cond.enabled=true", "model.num_classes=10"])
    module = build_module(cfg, (1, 8, 8))
    x, y = _digits_batch(64)
    opt = torch.optim.Adam(module.denoiser.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        gen = torch.Generator().manual_seed(0)  # the same noise and t each step: the loss is one function
        loss = module.loss_fn(module.denoiser, x, y, generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.7 * losses[0], losses
