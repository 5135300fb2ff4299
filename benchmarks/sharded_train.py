"""1 process vs DDP-2 vs FSDP2-2 on CPU (gloo): step time, peak memory and bytes of state held per process.

Each mode trains the default digits model (``unet_digits``, or ``--model unet`` for the CIFAR-10 UNet at 32×32)
through the project's module and strategy (``trainer=fsdp`` is :class:`diffusion_lab.strategies.FSDP2Strategy`) for
``--steps`` steps with ``--batch`` examples per process; per process it reports the median step time after
``--warmup`` steps, the resident-set high-water mark, and the bytes of parameters, EMA copy and AdamW state that
process holds (for FSDP2 its shards: about 1/N of the 1-process figure). One JSON line, written to
``benchmarks/results/sharded_train.json`` (``sharded_train_unet.json`` for ``--model unet``); ratios are against the
1-process run of the same invocation.

    OMP_NUM_THREADS=1 uv run python benchmarks/sharded_train.py                 # digits UNet
    OMP_NUM_THREADS=1 uv run python benchmarks/sharded_train.py --model unet --batch 4 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lab.config import register_configs
from diffusion_lab.ema import local
from diffusion_lab.module import build_module
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.strategies import FSDP2Strategy

RESULTS = Path(__file__).resolve().parent / "results" / "sharded_train.json"
SHAPES = {"unet_digits": (1, 8, 8), "unet": (3, 32, 32)}


def state_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this process holds of ``tensors`` (a sharded DTensor counts its local shard)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


class Probe(L.Callback):
    """Step times, and at the end this process's state bytes and peak RSS, written to ``<out>/<mode>_rank<r>.json``."""

    def __init__(self, out: Path, mode: str, warmup: int) -> None:
        self.out, self.mode, self.warmup, self.times, self.last = out, mode, warmup, [], 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.times.append(now - self.last)
        self.last = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        moments = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        record = {
            "step_s_median": statistics.median(self.times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "param_bytes": state_bytes(list(pl_module.denoiser.parameters())),  # type: ignore[union-attr]
            "ema_bytes": state_bytes(list(pl_module.ema.module.parameters())),  # type: ignore[union-attr]
            "optimizer_bytes": state_bytes(moments),
        }
        (self.out / f"{self.mode}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def train(args: argparse.Namespace) -> None:
    """One mode (run per rank by Lightning's launcher)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", "optim.warmup_steps=0"])
    shape = SHAPES[args.model]
    strategy: Any = {"single": "auto", "ddp": "ddp", "fsdp": FSDP2Strategy()}[args.mode]
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if args.mode == "single" else 2, strategy=strategy, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, limit_val_batches=0, callbacks=[Probe(Path(args.out), args.mode, args.warmup)],
    )  # fmt: skip
    torch.manual_seed(0)
    x = torch.rand(args.batch * (args.steps + 1) * 2, *shape) * 2 - 1
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=args.batch)
    trainer.fit(build_module(cfg, shape), train_dataloaders=loader)


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Run every mode as its own process tree; merge the per-rank records."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    modes: dict[str, Any] = {}
    for mode in ("single", "ddp", "fsdp"):
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}_rank*.json"))]
        modes[mode] = {"ranks": ranks, **{k: max(r[k] for r in ranks) for k in ranks[0]}}
    one = modes["single"]
    for mode in ("ddp", "fsdp"):
        state = ("param_bytes", "ema_bytes", "optimizer_bytes")
        modes[mode]["state_fraction_of_one_process"] = sum(modes[mode][k] for k in state) / sum(one[k] for k in state)
        modes[mode]["step_time_ratio"] = modes[mode]["step_s_median"] / one["step_s_median"]
    return {"benchmark": "sharded_train", "model": args.model, "batch_per_process": args.batch, "steps": args.steps,
            "warmup": args.warmup, "threads_per_process": int(env["OMP_NUM_THREADS"]), "modes": modes,
            "torch": torch.__version__, "lightning": L.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_digits", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=32, help="examples per process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="/tmp/dlab_sharded_bench")
    parser.add_argument("--mode", default=None, choices=["single", "ddp", "fsdp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        train(args)
        return
    result = drive(args)
    out = RESULTS if args.model == "unet_digits" else RESULTS.with_name(f"sharded_train_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
