"""One-GPU check of what a CPU cannot run: bf16 throughput, FSDP with the EMA under sharding, torch.compile.

    bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU; about 6 minutes on an H200

1. Throughput: ``benchmarks/train_throughput.py --device cuda --precision bf16-mixed`` (the CIFAR-10 UNet,
   35.7M, batch 128, synthetic data: ours / bare loop / diffusers ``UNet2DModel``).
2. FSDP: the same short training run (CIFAR-size UNet on the procedural 32×32 shapes, bf16, 40 steps, EMA decay
   0.9 so the average moves) under ``trainer=gpu`` and under ``trainer=fsdp trainer.devices=1``; the two
   checkpoints' raw and EMA weights are compared tensor by tensor (shapes must match the unsharded network,
   values within bf16 tolerance), and ``dlab-sample`` must load the FSDP checkpoint.
3. ``compile=true``: the ``trainer=gpu`` run again with the network compiled; examples/s against eager.
4. The CPU proofs of the sharded path on this machine's cores: ``tests/test_sharded.py`` (FSDP2 with 2 gloo processes
   equals 1 process in float64; bf16-mixed FSDP2 near fp32).

``trainer=fsdp`` is FSDP2 (``diffusion_lab/strategies.py``: per-block ``fully_shard``, ``MixedPrecisionPolicy`` for
bf16-mixed, the EMA sharded like the weights, one consolidated ``last.ckpt``).

Writes one JSON (``--out``, default ``benchmarks/results/gpu_check.json``) and prints it. Each stage records
its own ``ok`` and error text, so one failing stage does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
RUN_ARGS = [
    "dataset=shapes", "model=unet", "model.resolution=32", "dataset.batch_size=64", "precision=bf16-mixed",
    "trainer.max_steps=40", "ema.decay=0.9", "logger=csv", "metrics=none", "eval.num_samples=0",
    "eval.bpd_examples=0", "callbacks.sample_every_n_steps=0", "trainer.limit_val_batches=0", "seed=0",
]  # fmt: skip


def run(cmd: list[str], timeout: int) -> dict[str, Any]:
    """Run ``cmd``; its wall time, return code and the tail of its output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = -1, f"timed out after {timeout} s: {err}"
    return {"cmd": " ".join(cmd), "rc": code, "wall_s": time.perf_counter() - start, "tail": out[-1500:]}


def train_run(out_dir: Path, extra: list[str], timeout: int) -> dict[str, Any]:
    """One ``dlab-train`` run into ``out_dir``; adds its metrics.json when it finished."""
    result = run([sys.executable, "-m", "diffusion_lab.train", *RUN_ARGS, *extra, f"hydra.run.dir={out_dir}"], timeout)
    metrics = out_dir / "metrics.json"
    if metrics.is_file():
        result["metrics"] = {k: v for k, v in json.loads(metrics.read_text()).items() if k != "protocol"}
    return result


def compare_checkpoints(a: Path, b: Path) -> dict[str, Any]:
    """Largest difference between two checkpoints' raw and EMA tensors; every key and shape must match."""
    import torch

    from diffusion_lab.checkpoint_loading import load_checkpoint

    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    mismatched = sorted(set(sa) ^ set(sb)) + [k for k in sa if k in sb and sa[k].shape != sb[k].shape]
    diffs = {"raw": 0.0, "ema": 0.0}
    for key in set(sa) & set(sb):
        if sa[key].is_floating_point() and sa[key].shape == sb[key].shape:
            part = "ema" if key.startswith("ema.") else "raw"
            diffs[part] = max(diffs[part], float((sa[key].float() - sb[key].float()).abs().max()))
    ema_moved = max(
        float((sa[k].float() - sa[k.replace("ema.module.", "", 1)].float()).abs().max())
        for k in sa
        if k.startswith("ema.module.") and k.replace("ema.module.", "", 1) in sa and sa[k].is_floating_point()
    )
    return {
        "mismatched_keys_or_shapes": mismatched[:20],
        "max_abs_diff": diffs,
        "ema_vs_raw_max_abs_diff": ema_moved,
        "num_tensors": len(sa),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu_check_runs")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    throughput_json = args.work / "train_throughput.json"
    report["throughput"] = run(
        [sys.executable, "benchmarks/train_throughput.py", "--device", "cuda", "--batch-size", "128", "--steps", "30",
         "--warmup", "5", "--rounds", "3", "--precision", "bf16-mixed", "--out", str(throughput_json)],
        timeout=150,
    )  # fmt: skip
    if throughput_json.is_file():
        report["throughput"]["result"] = json.loads(throughput_json.read_text())
    report["eager"] = train_run(args.work / "eager", ["trainer=gpu"], timeout=90)
    report["fsdp"] = train_run(args.work / "fsdp", ["trainer=fsdp", "trainer.devices=1"], timeout=90)
    eager_ckpt, fsdp_ckpt = args.work / "eager/checkpoints/last.ckpt", args.work / "fsdp/checkpoints/last.ckpt"
    if eager_ckpt.is_file() and fsdp_ckpt.is_file():
        report["fsdp"]["vs_eager"] = compare_checkpoints(eager_ckpt, fsdp_ckpt)
        report["fsdp"]["sample"] = run(
            [sys.executable, "-m", "diffusion_lab.sample", f"ckpt_path={fsdp_ckpt}", "num_samples=16",
             "sampler=ddim", "sampler.steps=20", f"out_dir={args.work / 'fsdp_samples'}"],
            timeout=60,
        )  # fmt: skip
    report["compile"] = train_run(args.work / "compiled", ["trainer=gpu", "compile=true"], timeout=150)
    report["sharded_cpu"] = run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-m", "", "tests/test_sharded.py", "-k", "fsdp",
         f"--basetemp={args.work / 'sharded_tests'}"],
        timeout=100,
    )  # fmt: skip
    text = json.dumps(report, indent=1, default=str)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
