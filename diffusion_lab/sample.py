"""dlab-sample: draw samples from a checkpoint with any configured sampler.

    dlab-sample ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt sampler=ddim sampler.steps=50 num_samples=64
    dlab-sample ckpt_path=… guidance_scale=3 class_labels=[3,7]   # classifier-free guidance, a conditional model

Writes ``samples.npz`` and ``grid.png`` in the output directory and prints the NFE and samples/s.
``samples.npz`` holds ``x0`` (the samples), ``y`` (their labels; only for a conditional model), ``nfe``
(denoiser calls per sample), ``network_evals`` (network evaluations per sample: ``2·nfe`` under guidance,
whose calls each run the conditional and unconditional branch in one batch), ``guided``,
``guidance_scale`` (NaN when unguided), ``seed``, ``time_grid`` (the grid's name) and ``time_grid_file`` (for
``sampler.grid=tuned``, the file of the grid fitted by ``dlab-tune-grid``; else empty). The sampler defaults to
the one stored with the run.
A conditional model samples labels cycling over ``class_labels`` (default: all classes).

The job is recorded like a training run (:func:`track`): ``summary.json`` in the output directory and a W&B
run with ``job_type=sample`` in the training run's group (or the job's own sweep), the grid as media.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.atomic import atomic_write, atomic_write_json
from diffusion_lab.callbacks import generate_in_batches, sampling_protocol, save_png
from diffusion_lab.callbacks.checkpoint import RUN_KEY, WANDB_KEY
from diffusion_lab.config import check_guidance, check_sampler
from diffusion_lab.module import load_checkpoint, load_module
from diffusion_lab.run_dir import prepare_output_dir, run_lock
from diffusion_lab.samplers.base import TUNED_GRID
from diffusion_lab.samplers.tuning import grid_protocol, load_tuned_grid
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.tracking import track_job, training_run
from diffusion_lab.tracking.filing import SUMMARY_FILE

SAMPLES_FILE, GRID_FILE, SAMPLE_SUMMARY_FILE = "samples.npz", "grid.png", "sample_summary.json"
# What a sample job leaves in its directory; a re-run removes them all before it samples.
SAMPLE_RECORDS = (SAMPLES_FILE, GRID_FILE, SAMPLE_SUMMARY_FILE, SUMMARY_FILE)


def render(run_config: dict[str, Any], samples: torch.Tensor) -> np.ndarray:
    """Render with the training run's datamodule (built, not set up: no data is loaded)."""
    datamodule = instantiate(OmegaConf.create(run_config)["dataset"])
    return datamodule.render(samples)


def sampler_config(cfg: DictConfig, module: Any, overrides: list[str]) -> DictConfig:
    """The requested sampler's config node, or the run's when ``cfg.sampler`` is null.

    A sampler chosen here keeps the run's ``clip_x0`` (a property of the data's range: [−1, 1] images or
    unbounded vectors) unless ``sampler.clip_x0`` is itself among the command-line ``overrides``.
    """
    if cfg.sampler is None:
        return OmegaConf.create(module.config["sampler"])
    sampler_cfg = cfg.sampler.copy()
    run_clip = module.config.get("sampler", {}).get("clip_x0", "missing")
    if run_clip != "missing" and not any(o.split("=")[0].lstrip("+~") == "sampler.clip_x0" for o in overrides):
        sampler_cfg.clip_x0 = run_clip
    return sampler_cfg


def build_sampler(cfg: DictConfig, module: Any, overrides: list[str]) -> Any:
    """The requested sampler (or the run's, :func:`sampler_config`), checked against the checkpoint's schedule.

    ``sampler.grid=tuned`` attaches the grid ``dlab-tune-grid`` fitted for ``cfg.ckpt_path``, these sampler
    settings and ``cfg.use_ema`` (:func:`~diffusion_lab.samplers.tuning.load_tuned_grid`), or refuses.
    """
    if cfg.sampler is None:
        return module.sampler
    sampler_cfg = sampler_config(cfg, module, overrides)
    try:
        sampler = instantiate(sampler_cfg)
    except Exception as err:  # hydra wraps the constructor's ValueError
        raise ConfigError(f"sampler: {err.__cause__ or err}") from err
    if sampler.grid == TUNED_GRID:
        identity = OmegaConf.to_container(sampler_cfg, resolve=True, enum_to_str=True)
        try:
            load_tuned_grid(sampler, identity, cfg.ckpt_path, cfg.use_ema)  # type: ignore[arg-type]
        except ValueError as err:
            raise ConfigError(str(err)) from err
    check_sampler(sampler, module.denoiser.schedule)
    return sampler


def run(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Sample from ``cfg.ckpt_path`` into ``out_dir``; returns a summary dict. ``overrides``: the command line's."""
    check_num_samples(cfg.num_samples)
    with run_lock(out_dir, "dlab-sample"):  # a second job into out_dir is refused at once
        prepare_output_dir(out_dir, SAMPLE_RECORDS)  # writable, and no old record beside new samples
        return draw_samples(cfg, out_dir, overrides)


def draw_samples(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the checkpoint, sample, write ``samples.npz``, ``grid.png`` and ``sample_summary.json`` (each atomically)
    into ``out_dir`` (held and prepared by :func:`run`); returns the summary dict."""
    module = load_module(cfg.ckpt_path, map_location=cfg.device)
    assert module.config is not None
    check_sampling_request(cfg, module.num_classes, module.p_uncond)
    sampler = build_sampler(cfg, module, overrides or [])
    labels = None if cfg.class_labels is None else list(cfg.class_labels)
    out, rate = generate_in_batches(
        module, cfg.num_samples, cfg.batch_size, cfg.seed, sampler, cfg.use_ema, progress=True,
        class_labels=labels, guidance_scale=cfg.guidance_scale,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    w = out.guidance_scale
    arrays: dict[str, Any] = {"x0": out.x0.numpy(), "nfe": out.nfe, "network_evals": out.network_evals}
    arrays |= {"guided": out.guided, "guidance_scale": float("nan") if w is None else w, "seed": cfg.seed}
    grid = grid_protocol(sampler)
    arrays |= {"time_grid": grid["time_grid"], "time_grid_file": grid["time_grid_file"] or ""}
    if out.y is not None:
        arrays["y"] = out.y.numpy()
    atomic_write(out_dir / SAMPLES_FILE, lambda f: np.savez(f, **arrays))
    if cfg.grid:
        save_png(render(module.config, out.x0), out_dir / GRID_FILE)
    summary = {
        **sampling_protocol(out, module.num_classes),
        "samples_per_s": rate,
        "num_samples": cfg.num_samples,
        "sampler": sampler.name,
        "steps": sampler.steps,
        **grid,
        "ema": cfg.use_ema,
        "out_dir": str(out_dir),
    }
    if labels is not None:
        summary["labels"] = f"cycled over {labels}"
    atomic_write_json(out_dir / SAMPLE_SUMMARY_FILE, summary, sort_keys=False)
    return summary


def track(
    cfg: DictConfig, out_dir: Path, job_type: str, metrics: dict[str, Any], media: dict[str, Path] | None = None
) -> Path:
    """Record a ``sample`` / ``eval`` job on ``cfg.ckpt_path``: ``summary.json`` + a W&B run grouped with the
    training run (:func:`diffusion_lab.tracking.track_job`); returns the summary's path."""
    ckpt = load_checkpoint(cfg.ckpt_path, mmap=True)  # the config and run entries; the weights stay on disk
    train_config = ckpt["diffusion_lab_config"]
    train = training_run(cfg.ckpt_path, train_config, ckpt.get(WANDB_KEY), ckpt.get(RUN_KEY))
    with run_lock(out_dir, f"dlab-{job_type}"):  # never while another job writes out_dir
        return track_job(cfg, out_dir, job_type, metrics, train_config, train, media)


def check_num_samples(num_samples: int) -> None:
    """``num_samples`` must be an integer >= 1 (0 would write an empty ``samples.npz`` and exit 0); raise
    :class:`ConfigError` before the checkpoint is loaded."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r}: must be an integer >= 1")


def check_sampling_request(cfg: DictConfig, num_classes: int | None, p_uncond: float) -> None:
    """``guidance_scale`` and ``class_labels`` must suit the checkpoint's model; raise :class:`ConfigError`."""
    check_guidance("guidance_scale", cfg.guidance_scale, num_classes, p_uncond)
    if cfg.class_labels is None:
        return
    if num_classes is None:
        raise ConfigError(
            f"class_labels={list(cfg.class_labels)} needs a class-conditional model; this one is unconditional "
            "(valid: class_labels=null)"
        )
    bad = [c for c in cfg.class_labels if not 0 <= c <= num_classes]
    if bad or len(cfg.class_labels) == 0:
        raise ConfigError(
            f"class_labels={list(cfg.class_labels)}: valid labels are 0..{num_classes - 1} "
            f"(and {num_classes}, the null label), as a non-empty list"
        )


def describe(summary: dict[str, Any]) -> str:
    """The one-line printout: NFE (denoiser calls per sample), guidance, samples/s."""
    nfe, evals = summary["nfe"], summary["network_evals_per_sample"]
    if summary["guided"]:
        cost = f"guided, CFG w={summary['guidance_scale']:g}: {evals} network evaluations per sample, 2 per call"
    else:
        cost = "unguided"
    labels = f", labels {summary['labels']}" if summary["labels"] else ""
    return (
        f"NFE: {nfe} ({cost})  samples/s: {summary['samples_per_s']:.1f}  "
        f"({summary['num_samples']} samples, {summary['sampler']}, {summary['steps']} steps{labels})"
    )


if __name__ == "__main__":  # python -m diffusion_lab.sample …: the same entry point as dlab-sample
    from diffusion_lab.cli import sample_main

    sample_main()
