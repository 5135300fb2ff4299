"""The per-step EMA update (diffusion_lab.ema.EMAUpdate) is AveragedModel's, bit for bit, without walking modules."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion_lab.ema import EMAUpdate


class Net(nn.Module):
    """Parameters, a float buffer and an integer buffer (AveragedModel averages buffers too: use_buffers=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.norm = nn.BatchNorm1d(3)  # running_mean/var (float) and num_batches_tracked (int64)


def perturb(net: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.add_(
                torch.randint(0, 7, t.shape, generator=gen)
                if not t.is_floating_point()
                else torch.randn(t.shape, generator=gen)
            )


def test_update_equals_averaged_model_update_parameters_bit_for_bit() -> None:
    decay, gen = 0.9, torch.Generator().manual_seed(0)
    live = Net()
    ours = AveragedModel(live, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    reference = copy.deepcopy(ours)
    update = EMAUpdate(ours, live, decay)
    for _ in range(5):  # the first update copies, the others lerp (floats) / use the integer formula
        perturb(live, gen)
        update.update()
        reference.update_parameters(live)
        for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert int(ours.n_averaged) == 5


def test_a_loaded_counter_is_read_again_after_reset() -> None:
    """A checkpoint load rewrites n_averaged: after reset, a restored 0 means "copy", as AveragedModel would."""
    live = Net()
    ema = AveragedModel(live, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    update = EMAUpdate(ema, live, 0.5)
    update.update()
    update.update()
    ema.n_averaged.zero_()
    update.reset()
    with torch.no_grad():
        live.lin.weight.fill_(3.0)
    update.update()
    assert torch.equal(ema.module.lin.weight, live.lin.weight)  # copied, not averaged


def test_copy_sets_every_tensor_to_the_live_one_and_keeps_the_counter() -> None:
    """Before EMA starts the copy follows the live weights exactly (parameters and buffers, integer ones included)
    and n_averaged stays 0, so the first real update after the start copies again (AveragedModel's rule)."""
    gen, live = torch.Generator().manual_seed(1), Net()
    ema = AveragedModel(live, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    update = EMAUpdate(ema, live, 0.5)
    for _ in range(2):
        perturb(live, gen)
        update.copy()
        for (name, a), b in zip(ema.module.state_dict().items(), live.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert int(ema.n_averaged) == 0
    perturb(live, gen)
    update.update()  # n_averaged 0: a copy, then the counter moves
    assert torch.equal(ema.module.lin.weight, live.lin.weight) and int(ema.n_averaged) == 1


def test_the_gathered_ema_copy_takes_the_mode_of_the_sharded_one_on_every_call() -> None:
    """Sampling in validation runs in eval mode (dropout off, BatchNorm on running statistics): the plain copy that
    ShardedEMA.gather returns follows the train/eval mode Lightning gave the sharded copy, also when the step's
    weights are cached, and holds its weights and buffers."""
    from diffusion_lab.strategies import ShardedEMA

    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    perturb(net, torch.Generator().manual_seed(2))
    ema = ShardedEMA(net)
    net.eval()
    full = ema.gather(net, 1, torch.device("cpu"))
    assert not any(m.training for m in full.modules())
    for (name, a), b in zip(full.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(5, 3)
    torch.testing.assert_close(full(x), net(x), rtol=0, atol=0)  # eval: deterministic, running statistics
    net.train()
    assert all(m.training for m in ema.gather(net, 1, torch.device("cpu")).modules())  # cached step, new mode
