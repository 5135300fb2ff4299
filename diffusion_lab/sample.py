"""dlab-sample: draw samples from a checkpoint with any configured sampler.

    dlab-sample ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt sampler=ddim sampler.steps=50 num_samples=64

Writes ``samples.npz`` (``x0``: the samples, ``nfe``, ``seed``) and ``grid.png`` in the output
directory and prints the NFE and samples/s. The sampler defaults to the one stored with the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks import generate_in_batches, save_png
from diffusion_lab.config import register_configs
from diffusion_lab.module import load_module
from diffusion_lab.train import CONFIG_DIR


def render(run_config: dict[str, Any], samples: torch.Tensor) -> np.ndarray:
    """Render with the training run's datamodule (built, not set up: no data is loaded)."""
    datamodule = instantiate(OmegaConf.create(run_config)["dataset"])
    return datamodule.render(samples)


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Sample from ``cfg.ckpt_path`` into ``out_dir``; returns a summary dict."""
    module = load_module(cfg.ckpt_path, map_location=cfg.device)
    assert module.config is not None
    sampler = instantiate(cfg.sampler) if cfg.sampler is not None else module.sampler
    samples, nfe, rate = generate_in_batches(
        module, cfg.num_samples, cfg.batch_size, cfg.seed, sampler, cfg.use_ema, progress=True
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "samples.npz", x0=samples.numpy(), nfe=nfe, seed=cfg.seed)
    if cfg.grid:
        save_png(render(module.config, samples), out_dir / "grid.png")
    summary = {
        "nfe": nfe,
        "samples_per_s": rate,
        "num_samples": cfg.num_samples,
        "sampler": sampler.name,
        "steps": sampler.steps,
        "ema": cfg.use_ema,
        "out_dir": str(out_dir),
    }
    (out_dir / "sample_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """Console entry point ``dlab-sample``."""
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    summary = run(cfg, out_dir)
    print(
        f"NFE: {summary['nfe']}  samples/s: {summary['samples_per_s']:.1f}  "
        f"({summary['num_samples']} samples, {summary['sampler']}, {summary['steps']} steps)"
    )
    print(f"wrote {out_dir / 'samples.npz'} and {out_dir / 'grid.png'}")


if __name__ == "__main__":
    main()
