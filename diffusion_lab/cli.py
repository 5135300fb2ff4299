"""Console entry points ``dlab-train``, ``dlab-sample``, ``dlab-evaluate`` and ``dlab-tune-grid``, thin and fast to
fail.

Each entry point composes its config with Hydra (a mistyped key or option fails there, with the valid
list), validates it (ranges, impossible combinations, the hardware it asks for), and only then imports
the training stack (Lightning alone takes seconds to import), so a typo costs about a second.

    dlab-train experiment=toy2d schedule=cosine
    dlab-sample ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt sampler=dpm_solver
    dlab-evaluate ckpt_path=… scores=[bpd]
    dlab-tune-grid ckpt_path=… sampler=dpm_solver sampler.steps=10   # then sampler.grid=tuned in dlab-sample
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_lab.config import CONFIG_DIR, register_configs, validate_config
from diffusion_lab.schema.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")
log = logging.getLogger(__name__)

register_configs()


def check_hardware(cfg: DictConfig, cuda_devices: int | None = None) -> None:
    """Refuse a trainer that asks for GPUs the machine does not have (before Lightning is imported).

    Args:
        cfg: the composed training config.
        cuda_devices: the number of CUDA devices visible here; None: ask ``torch.cuda.device_count()`` (torch is
            imported only when the trainer asks for a GPU).
    """
    accelerator = str(cfg.trainer.accelerator)
    if accelerator not in GPU_ACCELERATORS:
        return
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    if cuda_devices > 0:
        return
    strategy = str(cfg.trainer.get("strategy", "auto"))
    what = (
        f"trainer.strategy={strategy} (Lightning's FSDP is CUDA-only)"
        if strategy.startswith("fsdp")
        else (f"trainer.accelerator={accelerator}")
    )
    raise ConfigError(
        f"{what} needs a CUDA GPU, and this machine has none (torch.cuda.device_count() == 0); on a CPU use "
        "trainer=cpu, or trainer=ddp trainer.accelerator=cpu trainer.devices=N for N processes"
    )


def route_lightning_logs() -> None:
    """Send Lightning's log records through the root logger Hydra configured (console + ``<run>/train.log``).

    Imported before Hydra set logging up (``python -m diffusion_lab.train``), Lightning gives its loggers a
    console handler of their own and stops them propagating, which leaves ``train.log`` without its messages.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def _output_dir(cfg: DictConfig) -> Path:
    """``cfg.out_dir`` when set, else the Hydra job's output directory."""
    out_dir = cfg.get("out_dir")
    return Path(out_dir) if out_dir else Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """``dlab-train``; returns the ``optimize_metric`` value (for a Hydra sweeper)."""
    check_hardware(cfg)
    validate_config(cfg)  # the dataset's own checks import Lightning (its LightningDataModule)
    from diffusion_lab.tracking import objective
    from diffusion_lab.train import train

    route_lightning_logs()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = train(cfg, run_dir, validated=True)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "protocol"}, indent=2, sort_keys=True))
        log.info("run directory: %s", run_dir)  # also in <run>/train.log, with Lightning's own messages
    return objective(metrics, cfg.optimize_metric)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def sample_main(cfg: DictConfig) -> None:
    """``dlab-sample``: samples.npz, grid.png and summary.json in the output directory."""
    from diffusion_lab.sample import describe, run, track

    out_dir = _output_dir(cfg)
    summary = run(cfg, out_dir, list(HydraConfig.get().overrides.task))
    track(cfg, out_dir, "sample", summary, {"samples/grid": out_dir / "grid.png"})
    print(describe(summary))
    print(f"wrote {out_dir / 'samples.npz'}, {out_dir / 'grid.png'} and {out_dir / 'summary.json'}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def evaluate_main(cfg: DictConfig) -> None:
    """``dlab-evaluate``: evaluation.json and summary.json in the output directory."""
    from diffusion_lab.evaluate import format_table, run
    from diffusion_lab.sample import track

    out_dir = _output_dir(cfg)
    results = run(cfg, out_dir, list(HydraConfig.get().overrides.task))
    track(cfg, out_dir, "eval", results)
    print(format_table(results))
    print(f"wrote {out_dir / 'evaluation.json'} and {out_dir / 'summary.json'}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="tune_grid")
def tune_grid_main(cfg: DictConfig) -> None:
    """``dlab-tune-grid``: fit the sampler's grid to the checkpoint; write it to ``<ckpt dir>/grids/``."""
    from diffusion_lab.tune_grid import describe, fit_options, run

    fit_options(cfg)  # range checks before the checkpoint is loaded
    record = run(cfg, list(HydraConfig.get().overrides.task))
    print(describe(record))
