"""Pins of the EMA in diffusion_lab.module (``DiffusionModule.optimizer_step``): ``ema.start_step = k`` keeps the EMA
equal to the live weights through step k and then runs the ``start_step = 0`` trajectory delayed by exactly k steps.

The optimizer step itself is replaced by "the weights become W_s" (a given float64 sequence) and the loop's step
counter by the number of steps taken, so the EMA hook is the only code that runs."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from diffusion_lab.module import DiffusionModule, build_module
from tests.test_train import TINY_TOY, compose_train

DECAY = 0.75


def weight_sequence(module: DiffusionModule, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` float64 parameter states ``W_1 … W_steps`` (name → tensor), each drawn independently."""
    gen = torch.Generator().manual_seed(seed)
    names = [(n, p.shape) for n, p in module.denoiser.named_parameters()]
    return [{n: torch.randn(shape, generator=gen, dtype=torch.float64) for n, shape in names} for _ in range(steps)]


def ema_trajectory(start_step: int, weights: list[dict[str, torch.Tensor]], monkeypatch) -> list[dict]:
    """EMA parameters after each of ``len(weights)`` optimizer steps of a float64 toy module whose step ``s`` sets
    the live weights to ``weights[s − 1]``."""
    cfg = compose_train([*TINY_TOY, f"ema.decay={DECAY}", f"ema.start_step={start_step}"])
    module = build_module(cfg, (2,)).double()
    done = {"steps": 0}

    def optimizer_step(self, *args, **kwargs):  # the step: W ← W_s
        self.denoiser.load_state_dict(weights[done["steps"]], strict=False)

    monkeypatch.setattr(L.LightningModule, "optimizer_step", optimizer_step)
    monkeypatch.setattr(DiffusionModule, "global_step", property(lambda self: done["steps"]))  # steps completed
    out = []
    for _ in weights:
        module.optimizer_step(0, 0, None, None)
        done["steps"] += 1
        out.append({n: p.detach().clone() for n, p in module.ema.module.named_parameters()})
    return out


def ema_closed_form(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``start_step = 0`` after n steps: the first update copies W_1, then E ← d·E + (1 − d)·W_j, so
    ``E_n = d^{n−1}·W_1 + Σ_{j=2}^{n} (1 − d)·d^{n−j}·W_j``."""
    n = len(weights)
    return {
        name: DECAY ** (n - 1) * weights[0][name]
        + sum((1 - DECAY) * DECAY ** (n - j) * weights[j - 1][name] for j in range(2, n + 1))
        for name in weights[0]
    }


@pytest.mark.parametrize("k", [1, 3])
def test_ema_start_step_delays_the_trajectory_by_exactly_k_steps(k, monkeypatch):
    n = 4
    weights = weight_sequence(build_module(compose_train(TINY_TOY), (2,)), k + n, seed=k)
    delayed = ema_trajectory(k, weights, monkeypatch)
    fresh = ema_trajectory(0, weights[k:], monkeypatch)  # a run whose weights at its step 0 are W_k
    for s in range(1, k + 1):  # through step k the EMA is the live weights
        for name, w in weights[s - 1].items():
            torch.testing.assert_close(delayed[s - 1][name], w, rtol=0, atol=0)
    for j in range(1, n + 1):  # step k + j of the delayed run is step j of the fresh one
        for name, e in fresh[j - 1].items():
            torch.testing.assert_close(delayed[k + j - 1][name], e, rtol=0, atol=0)
    for name, e in ema_closed_form(weights[k:]).items():
        torch.testing.assert_close(delayed[-1][name], e, rtol=1e-12, atol=1e-12)
    # The EMA did average: the last EMA is not the last live weights.
    assert any(not torch.equal(delayed[-1][name], w) for name, w in weights[-1].items())
