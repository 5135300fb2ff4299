"""Pins of diffusion_lab.callbacks.evaluation.generate_sharded without spawning processes: W simulated ranks sample
their index-seeded shards, a stand-in ``all_gather`` hands each rank what every rank sent (in rank order, shapes
checked, every rank gathering the same number of times), and the gathered set equals the single-process samples in
index order, labels included. One example per batch on both sides, so the samples match bit for bit (batch
composition moves float32 sums by an ulp). (The 2-process gloo run is tests/test_evaluate.py's slow test.)"""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.callbacks.evaluation import generate_in_batches, generate_sharded
from diffusion_lab.module import DiffusionModule, build_module
from tests.test_train import TINY_TOY, compose_train


def toy_module(overrides: list[str]) -> DiffusionModule:
    module = build_module(compose_train([*TINY_TOY, "sampler=ddim", "sampler.steps=3", *overrides]), (2,))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.ema.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))  # a network whose samples depend on its input
    return module


def simulate_ranks(module: DiffusionModule, num_samples: int, world_size: int, batch_size: int, monkeypatch):
    """``generate_sharded`` on every rank; returns each rank's result. Run twice: first to record what each rank
    sends to each collective, then with ``all_gather`` returning the ``(W, ...)`` stack of those tensors."""
    sent: dict[int, list[torch.Tensor]] = {r: [] for r in range(world_size)}
    rank = {"now": 0, "call": 0}

    def record(tensor):
        sent[rank["now"]].append(tensor.clone())
        return torch.stack([tensor] * world_size)  # right shape; discarded

    def gather(tensor):
        i = rank["call"]
        rank["call"] += 1
        assert {len(calls) for calls in sent.values()} == {len(sent[0])}, "ranks gather a different number of times"
        assert all(sent[r][i].shape == tensor.shape for r in range(world_size)), "all_gather needs equal shapes"
        return torch.stack([sent[r][i] for r in range(world_size)])

    results = []
    for collective in (record, gather):
        monkeypatch.setattr(module, "all_gather", collective)
        results = []
        for r in range(world_size):
            rank["now"], rank["call"] = r, 0
            out, rate = generate_sharded(module, num_samples, batch_size, r, world_size, seed=3)
            assert rate > 0
            results.append(out)
    return results


@pytest.mark.parametrize(("num_samples", "world_size"), [(11, 2), (7, 3), (3, 4)])  # padded shards; an empty one
def test_sharded_samples_gathered_equal_the_single_process_ones_in_order(num_samples, world_size, monkeypatch):
    module = toy_module([])
    single, _ = generate_in_batches(module, num_samples, batch_size=1, seed=3)
    assert len(torch.unique(single.x0, dim=0)) == num_samples  # distinct samples: an order mix-up cannot hide
    for r, out in enumerate(simulate_ranks(module, num_samples, world_size, batch_size=1, monkeypatch=monkeypatch)):
        assert out.x0.shape == (num_samples, 2) and out.y is None
        assert torch.equal(out.x0, single.x0)
        assert r >= num_samples or out.nfe == single.nfe  # (a rank with an empty shard ran no sampler)


@pytest.mark.parametrize(("num_samples", "world_size"), [(7, 3), (2, 3)])
def test_sharded_labels_of_a_conditional_model_are_gathered_in_order(num_samples, world_size, monkeypatch):
    """Labels cycle over the classes by index; a rank with an empty shard still joins the label gather."""
    module = toy_module(["model.num_classes=3"])
    single, _ = generate_in_batches(module, num_samples, batch_size=1, seed=3)
    assert single.y is not None and single.y.tolist() == [i % 3 for i in range(num_samples)]
    for out in simulate_ranks(module, num_samples, world_size, batch_size=1, monkeypatch=monkeypatch):
        assert out.y is not None and torch.equal(out.y, single.y)
        assert torch.equal(out.x0, single.x0)
