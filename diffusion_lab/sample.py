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

The job is recorded like a training run (:func:`~diffusion_lab.checkpoint_jobs.track`): ``summary.json`` in the
output directory and a W&B run with ``job_type=sample`` in the training run's group (or the job's own sweep), the
grid as media.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion_lab.atomic import atomic_write, atomic_write_json
from diffusion_lab.cli import output_dir, validate_sample
from diffusion_lab.config import check_guidance
from diffusion_lab.run_dir import prepare_output_dir, run_lock
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR, build_option

if TYPE_CHECKING:
    import torch

SAMPLES_FILE, GRID_FILE, SAMPLE_SUMMARY_FILE = "samples.npz", "grid.png", "sample_summary.json"


def render(run_config: dict[str, Any], samples: torch.Tensor) -> np.ndarray:
    """Render with the training run's datamodule (built, not set up: no data is loaded)."""
    datamodule = build_option("dataset", run_config["dataset"])
    return datamodule.render(samples)


def run(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Sample from ``cfg.ckpt_path`` into ``out_dir``; returns a summary dict. ``overrides``: the command line's.

    The config is checked first (:func:`~diffusion_lab.cli.validate_sample`: ranges, the device), before torch is
    imported or the checkpoint read."""
    validate_sample(cfg)
    from diffusion_lab.tracking.filing import SUMMARY_FILE  # the tracking package imports Lightning

    # What a sample job leaves in its directory; a re-run removes them all before it samples.
    records = (SAMPLES_FILE, GRID_FILE, SAMPLE_SUMMARY_FILE, SUMMARY_FILE)
    with run_lock(out_dir, "dlab-sample"):  # a second job into out_dir is refused at once
        prepare_output_dir(out_dir, records)  # writable, and no old record beside new samples
        return draw_samples(cfg, out_dir, overrides)


def draw_samples(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the checkpoint, sample, write ``samples.npz``, ``grid.png`` and ``sample_summary.json`` (each atomically)
    into ``out_dir`` (held and prepared by :func:`run`); returns the summary dict."""
    from diffusion_lab.autoguidance import check_guide, job_guidance
    from diffusion_lab.callbacks.evaluation import generate_in_batches, sampling_protocol
    from diffusion_lab.callbacks.sample_grid import save_png
    from diffusion_lab.checkpoint_jobs import build_sampler, checkpoint_conditioning
    from diffusion_lab.checkpoint_loading import load_module
    from diffusion_lab.samplers.tuning import grid_protocol

    check_sampling_request(cfg, *checkpoint_conditioning(cfg.ckpt_path))  # before the module is built
    if cfg.guide_ckpt:
        check_guide(cfg.ckpt_path, cfg.guide_ckpt)  # both configs read, neither model built
    module = load_module(cfg.ckpt_path, map_location=cfg.device)
    assert module.config is not None
    sampler = build_sampler(cfg, module, overrides or [])
    labels = None if cfg.class_labels is None else list(cfg.class_labels)
    out, rate = generate_in_batches(
        module, cfg.num_samples, cfg.batch_size, cfg.seed, sampler, cfg.use_ema, progress=True,
        class_labels=labels, guidance=job_guidance(cfg, module),
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    w, interval = out.guidance_scale, out.guidance_interval
    arrays: dict[str, Any] = {"x0": out.x0.numpy(), "nfe": out.nfe, "network_evals": out.network_evals}
    arrays |= {"guided": out.guided, "guidance_scale": float("nan") if w is None else w, "seed": cfg.seed}
    arrays |= {"guidance": out.guidance or "", "guide_ckpt": cfg.guide_ckpt or ""}
    arrays |= {"guidance_interval": np.array([] if interval is None else interval, dtype=np.float64)}
    arrays |= {"guided_calls": float("nan") if not out.guided else out.nfe if interval is None else out.guided_calls}
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


def check_sampling_request(cfg: DictConfig, num_classes: int | None, p_uncond: float) -> None:
    """``guidance_scale`` and ``class_labels`` must suit the checkpoint's model; raise :class:`ConfigError`.
    Classifier-free guidance needs a conditional model trained with label dropout; autoguidance any model."""
    if str(getattr(cfg.guidance, "value", cfg.guidance)) == "cfg":
        check_guidance("guidance_scale", cfg.guidance_scale, num_classes, p_uncond)
    if cfg.class_labels is None:
        return
    if num_classes is None:
        raise ConfigError(
            f"class_labels={list(cfg.class_labels)} needs a class-conditional model; this one is unconditional "
            "(valid: class_labels=null)"
        )
    # Label num_classes is the null label of classifier-free guidance (Ho & Salimans 2022), not a class to ask for.
    if len(cfg.class_labels) == 0 or not all(0 <= c < num_classes for c in cfg.class_labels):
        raise ConfigError(
            f"class_labels={list(cfg.class_labels)}: valid labels are 0..{num_classes - 1} (this model's classes), "
            "as a non-empty list"
        )


def describe(summary: dict[str, Any]) -> str:
    """The one-line printout: NFE (denoiser calls per sample), guidance, samples/s."""
    nfe, evals = summary["nfe"], summary["network_evals_per_sample"]
    kind = "CFG" if summary.get("guidance") == "cfg" else "autoguidance"
    interval = summary.get("guidance_interval")
    if summary["guided"] and interval:
        cost = (
            f"guided, {kind} w={summary['guidance_scale']:g} in σ/α ∈ ({interval[0]:g}, {interval[1]:g}]: "
            f"{summary['guided_calls_per_sample']:g} of {nfe} calls guided, {evals:g} network evaluations per sample "
            "(2 per guided call, 1 otherwise)"
        )
    elif summary["guided"]:
        cost = f"guided, {kind} w={summary['guidance_scale']:g}: {evals} network evaluations per sample, 2 per call"
    else:
        cost = "unguided"
    labels = f", labels {summary['labels']}" if summary["labels"] else ""
    return (
        f"NFE: {nfe} ({cost})  samples/s: {summary['samples_per_s']:.1f}  "
        f"({summary['num_samples']} samples, {summary['sampler']}, {summary['steps']} steps{labels})"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """``dlab-sample``: samples.npz, grid.png and summary.json in the output directory (:func:`run` checks the config
    before torch is imported)."""
    out_dir = output_dir(cfg)
    with run_lock(out_dir, "dlab-sample"):  # one lock from the samples to their record: no job can slip between
        summary = run(cfg, out_dir, list(HydraConfig.get().overrides.task))
        from diffusion_lab.checkpoint_jobs import track

        track(cfg, out_dir, "sample", summary, {"samples/grid": out_dir / GRID_FILE})
    print(describe(summary))
    print(f"wrote {out_dir / SAMPLES_FILE}, {out_dir / GRID_FILE} and {out_dir / 'summary.json'}")


if __name__ == "__main__":  # python -m diffusion_lab.sample …: the same entry point as dlab-sample
    main()
