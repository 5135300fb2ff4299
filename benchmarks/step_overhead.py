"""Per-step overhead of training: the digits default run (``dlab-train`` defaults) against a bare PyTorch loop.

- ``ours``: the real ``DiffusionModule`` of the default experiment (digits 8×8, ``unet_digits``, batch 64) in the
  trainer that :func:`diffusion_lab.train.build_trainer` builds (non-finite guard, exact-resume callback, LR
  monitor, CSV logger every ``log_every_n_steps``), evaluation, sample grids and checkpoints off.
- ``bare``: a copy of the same network in a hand-written loop over the same data loader: ε-prediction MSE on the
  linear schedule (T = 1000), ``zero_grad``, backward, ``clip_grad_norm_(1.0)``, ``AdamW.step`` with the same
  settings and warm-up, and an EMA update (``torch._foreach_lerp_``).

Both run in ONE process and ONE fit: a callback alternates blocks of ``--block`` Lightning steps with blocks of
``--block`` bare steps (the bare block runs inside ``on_train_batch_start``), so a change in the machine's speed
(other jobs on the cores) falls on both alike. A step's time is the interval between successive batch starts
(data loading, every hook, logging and the optimizer included), minus any bare block run in it. The ratio is
``median(bare step) / median(ours step)`` (≥ 1 would be "as fast as bare"); ``ratio_per_block_pair`` gives the
spread. Prints one JSON line and writes ``benchmarks/results/step_overhead.json``.

    OMP_NUM_THREADS=1 uv run python benchmarks/step_overhead.py                  # 12 block pairs of 25 steps
    OMP_NUM_THREADS=1 uv run python benchmarks/step_overhead.py --profile 200    # cProfile of 200 of our steps
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from diffusion_lab.callbacks.exact_resume import make_train_loader_resumable
from diffusion_lab.config import register_configs
from diffusion_lab.module import build_module, build_network, warmup_factor
from diffusion_lab.schema.registry import CONFIG_DIR, build_option
from diffusion_lab.train import build_trainer

RESULTS = Path(__file__).resolve().parent / "results" / "step_overhead.json"
OFF = 10**9  # "never" for the step intervals of sample grids and checkpoints
OVERRIDES = [
    "logger.wandb=null",
    "eval.num_samples=0",
    "eval.bpd_examples=0",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=0",
    f"callbacks.sample_every_n_steps={OFF}",
    f"callbacks.checkpoint_every_n_steps={OFF}",
]


def compose_default(extra: list[str]) -> DictConfig:
    """The default training config (digits) with evaluation, grids and checkpoints off."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*OVERRIDES, *extra])


class BareLoop:
    """The hand-written training loop, run a block of steps at a time over its own copy of the loader."""

    def __init__(self, cfg: DictConfig, data_shape: tuple[int, ...], loader: Any) -> None:
        self.net = build_network(cfg.model, data_shape, False).train()
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_factor(s, int(o.warmup_steps)))
        self.params = list(self.net.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.decay, self.clip = float(cfg.ema.decay), float(cfg.trainer.gradient_clip_val)
        # Ho et al. 2020: linear β from 1e-4 to 0.02 over T = 1000 steps; ᾱ_t = Π (1 − β).
        self.alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        self.loader, self._it = loader, iter(loader)
        self.times: list[float] = []
        self.cpu: list[float] = []

    def _batch(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> None:
        x0, _ = self._batch()
        t = torch.randint(0, 1000, (x0.shape[0],))
        eps = torch.randn_like(x0)
        a = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        loss = (self.net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float()) - eps).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1 - self.decay)

    def run(self, steps: int) -> None:
        """``steps`` timed steps; each time is batch fetch to the end of the EMA update."""
        last, last_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
            now, now_cpu = time.perf_counter(), time.process_time()
            self.times.append(now - last)
            self.cpu.append(now_cpu - last_cpu)
            last, last_cpu = now, now_cpu


class Interleave(L.Callback):
    """Times our steps (batch start to next batch start) and runs a bare block every ``block`` steps."""

    def __init__(self, bare: BareLoop | None, block: int, warmup: int) -> None:
        self.bare, self.block, self.warmup = bare, block, warmup
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.last: float | None = None
        self.last_cpu = 0.0
        self.profiler: cProfile.Profile | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        step = trainer.global_step
        if self.last is not None and step > self.warmup:
            self.times.append(now - self.last)
            self.cpu.append(now_cpu - self.last_cpu)
        if step == self.warmup and self.profiler is not None:
            self.profiler.enable()
        if self.bare is not None and step >= self.warmup and (step - self.warmup) % self.block == 0:
            self.bare.run(self.block)
        self.last, self.last_cpu = time.perf_counter(), time.process_time()


def build_run(cfg: DictConfig, run_dir: Path, timer: Interleave) -> tuple[L.Trainer, Any, Any]:
    L.seed_everything(cfg.seed)
    datamodule = build_option("dataset", cfg.dataset)
    module = build_module(cfg, datamodule.data_shape)
    trainer = build_trainer(cfg, run_dir, [timer])
    make_train_loader_resumable(datamodule, trainer)
    return trainer, module, datamodule


def ratios(bare: list[float], ours: list[float], block: int) -> dict[str, Any]:
    """``median(bare) / median(ours)`` over all steps, and per interleaved block pair (the spread)."""
    pairs = [
        statistics.median(bare[i : i + block]) / statistics.median(ours[i : i + block])
        for i in range(0, len(ours) - block + 1, block)
    ]
    return {
        "ratio": statistics.median(bare) / statistics.median(ours),
        "ours_step_ms_median": 1e3 * statistics.median(ours),
        "bare_step_ms_median": 1e3 * statistics.median(bare),
        "per_block_pair": pairs,
        "pairs_min_max": [min(pairs), max(pairs)],
        "pairs_n": len(pairs),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.warmup + args.pairs * args.block * 1
    cfg = compose_default([f"trainer.max_steps={steps + 1}", *args.override])
    with tempfile.TemporaryDirectory() as tmp:
        datamodule = build_option("dataset", cfg.dataset)
        bare = BareLoop(cfg, tuple(datamodule.data_shape), datamodule.train_dataloader())
        for _ in range(args.warmup):
            bare.step()
        timer = Interleave(bare, args.block, args.warmup)
        trainer, module, dm = build_run(cfg, Path(tmp), timer)
        trainer.fit(module, datamodule=dm)
    n = min(len(timer.times), len(bare.times))
    wall = ratios(bare.times[:n], timer.times[:n], args.block)
    cpu = ratios(bare.cpu[:n], timer.cpu[:n], args.block)
    return {
        "benchmark": "step_overhead",
        "config": "digits default (unet_digits, batch 64), eval/grids/checkpoints off",
        "overrides": args.override,
        "ratio_bare_over_ours_cpu": cpu["ratio"],
        "ratio_bare_over_ours_wall": wall["ratio"],
        "cpu": cpu,
        "wall": wall,
        "ours_examples_per_s_wall": cfg.dataset.batch_size / statistics.median(timer.times),
        "bare_examples_per_s_wall": cfg.dataset.batch_size / statistics.median(bare.times),
        "steps_each": n,
        "block": args.block,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def profile(args: argparse.Namespace) -> None:
    """cProfile ``--profile`` of our steps (after the warm-up) and print the top functions by own time."""
    cfg = compose_default([f"trainer.max_steps={args.warmup + args.profile}", *args.override])
    timer = Interleave(None, args.block, args.warmup)
    timer.profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, module, dm = build_run(cfg, Path(tmp), timer)
        trainer.fit(module, datamodule=dm)
    timer.profiler.disable()
    pstats.Stats(timer.profiler).sort_stats(args.sort).print_stats(args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12, help="interleaved (ours, bare) block pairs")
    parser.add_argument("--block", type=int, default=25, help="steps per block")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps of each loop first")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for both loops")
    parser.add_argument("--profile", type=int, default=0, help="profile this many of our steps instead")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
    result = measure(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
