"""Every sampler at several step counts on one checkpoint, scored with the run's own sample metric.

    python scripts/sampler_nfe.py outputs/digits/<run>/checkpoints/last.ckpt --out multirun/sampler_nfe
    python scripts/sampler_nfe.py <ckpt> --samplers ddim euler heun dpm_solver --steps 5 10 20 50 --num-samples 1000
    python scripts/make_plots.py multirun/sampler_nfe --by sampler --metric 'val/fd_digits@*'
    python scripts/make_table.py multirun/sampler_nfe --rows sampler --cols steps --metric 'val/fd_digits@*'

Writes one run directory per (sampler, steps), ``<out>/<sampler>_steps<N>/summary.json`` and a W&B run
(job_type ``sample``, group: ``<out>``'s name; ``--wandb-mode``), whose metrics are keyed by the protocol
(``val/fd_digits@1k_nfe19``) and carry ``nfe``, so the table and the plot can put samplers side by side at
equal NFE (Heun/EDM spend 2·steps − 1 denoiser calls). The same index-seeded noise is used for every sampler;
the reference set is the run's training split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion_lab.callbacks import generate_in_batches
from diffusion_lab.callbacks.exact_resume import RUN_KEY, WANDB_KEY
from diffusion_lab.checkpoint_jobs import build_sampler
from diffusion_lab.checkpoint_loading import load_checkpoint, load_module
from diffusion_lab.config import register_configs
from diffusion_lab.metrics import protocol_key
from diffusion_lab.schema.registry import CONFIG_DIR, build_option
from diffusion_lab.tracking import RunInfo, track_job, training_run
from diffusion_lab.train import build_metric

MAX_REFERENCE = 10_000  # reference examples, as the training-time evaluation uses


def sampler_config(ckpt: str, sampler: str, steps: int, wandb_mode: str = "auto") -> Any:
    """The ``dlab-sample`` config for one combination (validated by its schema)."""
    overrides = [f"ckpt_path={ckpt}", f"sampler={sampler}", f"sampler.steps={steps}", f"logger.wandb.mode={wandb_mode}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("sample", overrides=overrides)


def run(args: argparse.Namespace) -> list[Path]:
    """Sample and score every combination; returns the run directories written."""
    register_configs()
    module = load_module(args.ckpt)
    assert module.config is not None
    run_cfg = OmegaConf.create(module.config)
    datamodule = build_option("dataset", run_cfg.dataset)
    datamodule.setup("fit")
    metric = build_metric(run_cfg, datamodule)
    if metric is None:
        raise SystemExit(f"the run at {args.ckpt} has metrics=none: nothing to score")
    reference = datamodule.train_tensor()[:MAX_REFERENCE]
    written = []
    ckpt = load_checkpoint(args.ckpt, mmap=True)  # the W&B id and run entries; the weights stay on disk
    train = training_run(args.ckpt, module.config, ckpt.get(WANDB_KEY), ckpt.get(RUN_KEY))
    for name in args.samplers:
        for steps in args.steps:
            written.append(score_one(args, module, metric, reference, name, steps, train))
    return written


def score_one(
    args: argparse.Namespace, module: Any, metric: Any, reference: Any, name: str, steps: int, train: dict[str, Any]
) -> Path:
    """Sample with one (sampler, steps), score against ``reference``, write its run dir; returns the dir."""
    cfg = sampler_config(args.ckpt, name, steps, args.wandb_mode)
    sampler = build_sampler(cfg, module, [])
    start = time.perf_counter()
    out, rate = generate_in_batches(module, args.num_samples, args.batch_size, args.seed, sampler)
    raw = metric.compute(out.x0, reference)
    metrics: dict[str, Any] = {protocol_key("val", k, args.num_samples, out.nfe): float(v) for k, v in raw.items()}
    metrics |= {"nfe": out.nfe, "samples_per_s": rate, "wall_s": time.perf_counter() - start}
    run_dir = Path(args.out) / f"{name}_steps{steps}"
    info = RunInfo(
        name="sampler_nfe",
        group=Path(args.out).name,
        job_type="sample",
        tags=[f"sampler:{name}", f"steps:{steps}"],
        choices={"sampler": name},
        overrides=[f"sampler={name}", f"steps={steps}"],
    )
    cfg.num_samples, cfg.batch_size, cfg.seed = args.num_samples, args.batch_size, args.seed
    track_job(cfg, run_dir, "sample", metrics, module.config, train, info=info)
    print(json.dumps({"sampler": name, "steps": steps, **metrics}))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a dlab-train checkpoint (last.ckpt)")
    parser.add_argument("--out", type=Path, default=Path("multirun/sampler_nfe"))
    parser.add_argument("--samplers", nargs="+", default=["ddim", "euler", "heun", "dpm_solver", "ddpm"])
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wandb-mode",
        choices=["auto", "online", "offline", "disabled"],
        default="auto",
        help="one W&B run per combination (job_type sample); auto: offline unless logged in",
    )
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
