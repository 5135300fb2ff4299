"""Training-step throughput of the CIFAR-10 UNet (conf/model/unet.yaml, 35.7M parameters): ours vs bare PyTorch.

Three variants, same batch shape, same AdamW settings, gradient clipping at 1.0 and an EMA update per step:

- ``ours``: the real ``DiffusionModule`` (``build_module`` on the composed ``model=unet`` config) trained
  by a ``lightning.Trainer`` with the project's callbacks that run every step (non-finite guard); the
  time of a step is ``on_train_batch_start`` → ``on_train_batch_end`` (forward, loss, backward, clip,
  optimizer step, EMA, logging).
- ``bare``: the same network in a hand-written loop: ε-prediction MSE on the linear schedule, backward,
  ``clip_grad_norm_``, ``AdamW.step``, ``torch._foreach_lerp_`` EMA.
- ``diffusers``: diffusers' ``UNet2DModel`` in the DDPM CIFAR-10 configuration (google/ddpm-cifar10-32,
  35.7M parameters) in the same bare loop.

    uv run python benchmarks/train_throughput.py                 # CPU: batch 8, 3 rounds of 5 timed steps
    uv run python benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 50 --precision bf16-mixed

The variants run in ``--rounds`` rounds, the order rotated each round (ours, bare, diffusers; then bare,
diffusers, ours; …), so a drift in the machine's speed (other load, clocks) falls on every variant alike;
each variant's figure is the median over all its timed steps, and ``ratio_per_round`` shows the spread.
Prints one JSON line and writes ``benchmarks/results/train_throughput.json``. Peak memory is
``torch.cuda.max_memory_allocated`` per variant on CUDA; on CPU it is the process's resident-set
high-water mark after the variant's first run (cumulative, so only the first variant's figure is its own).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from diffusion_lab.callbacks.nan_guard import NonFiniteGuard
from diffusion_lab.config import register_configs
from diffusion_lab.module import build_module
from diffusion_lab.schema.registry import CONFIG_DIR

SHAPE = (3, 32, 32)
RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time of every training step (batch start to batch end, device-synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


def ours(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=unet", "dataset=cifar10", "optim.warmup_steps=0"])
    L.seed_everything(0)
    module = build_module(cfg, SHAPE)
    n = args.warmup + args.steps
    x = torch.rand(n * args.batch_size, *SHAPE) * 2 - 1
    data = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=n, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, callbacks=[timer, NonFiniteGuard("stop")], limit_val_batches=0,
    )  # fmt: skip
    reset_peak(device)
    trainer.fit(module, train_dataloaders=loader)
    return summarize(timer.times[args.warmup :], args, device, sum(p.numel() for p in module.denoiser.parameters()))


def bare(args: argparse.Namespace, device: torch.device, net: nn.Module, call: Any) -> dict[str, Any]:
    """The bare loop around ``call(net, x_t, t) -> ε̂``."""
    torch.manual_seed(0)
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = [p.detach().clone().float() for p in net.parameters()]
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    times = []
    reset_peak(device)
    for _ in range(args.warmup + args.steps):
        x0 = torch.rand(args.batch_size, *SHAPE, device=device) * 2 - 1
        sync(device)
        start = time.perf_counter()
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        eps = torch.randn_like(x0)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = call(net, x_t, t)
        loss = (out.float() - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.999)
        sync(device)
        times.append(time.perf_counter() - start)
    return summarize(times[args.warmup :], args, device, sum(p.numel() for p in net.parameters()))


def summarize(times: list[float], args: argparse.Namespace, device: torch.device, params: int) -> dict[str, Any]:
    step = statistics.median(times)
    return {
        "images_per_s": args.batch_size / step,
        "step_s_median": step,
        "step_s_all": times,
        "peak_memory_mb": peak_memory_mb(device),
        "parameters": params,
    }


def run_rounds(variants: dict[str, Any], rounds: int, batch_size: int) -> dict[str, dict[str, Any]]:
    """Run every variant ``rounds`` times, rotating the order; pool each variant's timed steps."""
    names = list(variants)
    results: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = variants[name]()
            if name not in results:
                results[name] = {**run, "round_medians": []}
            else:
                results[name]["step_s_all"] += run["step_s_all"]
            results[name]["round_medians"].append(run["step_s_median"])
    for res in results.values():
        res["step_s_median"] = statistics.median(res["step_s_all"])
        res["images_per_s"] = batch_size / res["step_s_median"]
    return results


def diffusers_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(  # google/ddpm-cifar10-32
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, norm_num_groups=32,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all variants, the order rotated each round")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from diffusion_lab.models import UNet

    # The same network class and config as ours (conf/model/unet.yaml), outside Lightning.
    net = UNet(in_channels=3, resolution=32, base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
               attention_resolutions=[16], dropout=0.1)  # fmt: skip
    unet2d = diffusers_unet()
    variants = {
        "ours": lambda: ours(args, device),
        "bare": lambda: bare(args, device, net, lambda m, x, t: m(x, t.float(), None)),
        "diffusers": lambda: bare(args, device, unet2d, lambda m, x, t: m(x, t).sample),
    }
    results = run_rounds(variants, args.rounds, args.batch_size)
    per_round = [o / b for o, b in zip(results["ours"]["round_medians"], results["bare"]["round_medians"], strict=True)]
    record = {
        "benchmark": "train_throughput",
        "model": "conf/model/unet.yaml (Ho et al. 2020 CIFAR-10 UNet)",
        "batch_size": args.batch_size,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "precision": args.precision,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "platform": platform.platform(),
        "ratio_ours_over_bare": results["ours"]["images_per_s"] / results["bare"]["images_per_s"],
        "ratio_ours_over_diffusers": results["ours"]["images_per_s"] / results["diffusers"]["images_per_s"],
        # bare step time / ours step time, per round
        "ratio_per_round": [1 / r for r in per_round],
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in results}))


if __name__ == "__main__":
    main()
