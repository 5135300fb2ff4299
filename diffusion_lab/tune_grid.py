"""``dlab-tune-grid``: fit a sampler's N-step time grid to one checkpoint and save it beside the checkpoint.

    dlab-tune-grid ckpt_path=outputs/digits/<run>/checkpoints/last.ckpt sampler=dpm_solver sampler.steps=10
    dlab-sample ckpt_path=… sampler=dpm_solver sampler.steps=10 sampler.grid=tuned

The fit (:func:`diffusion_lab.samplers.tuning.fit_grid`) starts from the sampler's configured grid and minimises
its endpoint error against an RK45 solve of the same noise on ``num_draws`` draws; ``num_heldout`` other draws
report the error before and after and decide whether the fit is kept. The file
``<ckpt dir>/grids/<ckpt stem>/<sampler>_<steps>.json`` holds the grid and its protocol: the sampler settings,
checkpoint path, SHA-256 and step, weights (EMA or raw), draws and seed, reference solver and tolerances, errors,
search cost (wall time, evaluations). ``sampler.grid=tuned`` in dlab-sample / dlab-evaluate reads it and refuses
it for another checkpoint file, sampler setting, step count or weights.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.cli import validate_tune_grid
from diffusion_lab.config import check_sampler
from diffusion_lab.run_dir import probe_writable, run_lock
from diffusion_lab.schema.domains import SEED_STRIDE
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.jobs import FitOptions
from diffusion_lab.schema.registry import CONFIG_DIR, build_option

if TYPE_CHECKING:
    import torch

    from diffusion_lab.module import DiffusionModule
    from diffusion_lab.samplers.base import Sampler
    from diffusion_lab.samplers.tuning import GridFit

# Example i of the fit draws is seeded seed·SEED_STRIDE + i (as DiffusionModule.generate); held-out ones follow on.


def fit_options(cfg: DictConfig) -> FitOptions:
    """The search options of ``cfg``; an out-of-range value raises :class:`ConfigError` (before any loading)."""
    try:
        return FitOptions(**{f.name: cfg[f.name] for f in dataclasses.fields(FitOptions)})
    except ValueError as err:
        raise ConfigError(str(err)) from err


def build_tunable_sampler(cfg: DictConfig, module: DiffusionModule, overrides: list[str]) -> tuple[Sampler, dict]:
    """The sampler to tune (``cfg.sampler``, or the run's) and its settings as a plain dict; refuses an adaptive
    solver and ``grid=tuned`` (the fit starts from a named grid)."""
    from diffusion_lab.checkpoint_jobs import sampler_config
    from diffusion_lab.samplers.grids import TUNED_GRID
    from diffusion_lab.samplers.ode import RK45Sampler

    node = sampler_config(cfg, module, overrides)
    settings: dict[str, Any] = OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[assignment]
    sampler = build_option("sampler", node)
    if isinstance(sampler, RK45Sampler):
        raise ConfigError("sampler=rk45 chooses its own steps (adaptive); tune a fixed-step sampler, e.g. dpm_solver")
    if sampler.grid == TUNED_GRID:
        raise ConfigError("sampler.grid=tuned: the fit starts from a named grid (e.g. log_snr, karras, uniform)")
    check_sampler(sampler, module.denoiser.schedule)
    return sampler, settings


def draws(module: DiffusionModule, sampler: Sampler, indices: range, seed: int) -> tuple[torch.Tensor, Any]:
    """Prior noise ``(len(indices), *data_shape)`` at the sampler's first grid point, example ``i`` seeded by
    ``(seed, i)``, and its labels (cycled over the classes of a conditional model; None otherwise)."""
    from diffusion_lab.samplers.base import IndexedGenerator

    gen = IndexedGenerator([seed * SEED_STRIDE + i for i in indices], device=module.device)
    x_T = sampler.prior((len(indices), *module.data_shape), module.denoiser.schedule, gen, module.device, module.prior)
    return x_T, module.sample_labels(indices)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fit the grid for ``cfg.ckpt_path`` and ``cfg.sampler``; write and return its record (with ``path``). The config
    is checked first (:func:`~diffusion_lab.cli.validate_tune_grid`), before torch is imported or the checkpoint read.
    """
    validate_tune_grid(cfg)
    options = fit_options(cfg)
    from diffusion_lab.samplers.tuning import grid_dir

    # One fit at a time per checkpoint's grid folder; it must be writable before the checkpoint is loaded.
    with run_lock(grid_dir(cfg.ckpt_path), "dlab-tune-grid", what="grid directory"):
        probe_writable(grid_dir(cfg.ckpt_path), "grid directory")
        return fit_and_save(cfg, options, overrides)


def fit_and_save(cfg: DictConfig, options: FitOptions, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the checkpoint, fit the grid and write its record (atomically); returns the record (with ``path``)."""
    import torch

    from diffusion_lab.checkpoint_loading import load_module
    from diffusion_lab.samplers.tuning import fit_grid, grid_file, save_grid_record

    module = load_module(cfg.ckpt_path, map_location=cfg.device)
    sampler, settings = build_tunable_sampler(cfg, module, overrides or [])
    denoiser = module.ema_denoiser() if cfg.use_ema else module.denoiser
    denoiser.eval()
    n, m = options.num_draws, options.num_heldout
    x_fit, y_fit = draws(module, sampler, range(n), options.seed)
    x_held, y_held = draws(module, sampler, range(n, n + m), options.seed)
    with torch.no_grad():
        fit = fit_grid(sampler, denoiser, x_fit, x_held, options, y_fit, y_held)
    path = grid_file(cfg.ckpt_path, sampler.name, sampler.steps)
    record = grid_record(cfg, module, sampler, settings, options, fit)
    save_grid_record(path, record)
    return {**record, "path": str(path)}


def grid_record(
    cfg: DictConfig, module: DiffusionModule, sampler: Sampler, settings: dict, options: FitOptions, fit: GridFit
) -> dict[str, Any]:
    """The grid and its protocol, as written to the grid file."""
    from diffusion_lab.cache_files import sha256_of
    from diffusion_lab.checkpoint_loading import load_checkpoint
    from diffusion_lab.samplers.tuning import sampler_identity

    step = load_checkpoint(cfg.ckpt_path, mmap=True).get("global_step")
    labels = None if module.num_classes is None else f"cycled over 0..{module.num_classes - 1}, unguided"
    return {
        "grid": fit.grid.tolist(),
        "sampler_name": sampler.name,
        "steps": sampler.steps,
        "sampler": sampler_identity(settings),
        "start_grid": {"name": settings.get("grid"), "grid": fit.start.tolist()},
        "checkpoint": {
            "path": str(Path(cfg.ckpt_path).resolve()),
            "sha256": sha256_of(cfg.ckpt_path),
            "global_step": step,
        },
        "ema": bool(cfg.use_ema),
        "draws": {
            "fit": options.num_draws,
            "heldout": options.num_heldout,
            "seed": options.seed,
            "seeding": f"example i: seed·{SEED_STRIDE} + i; held-out i = num_draws…",
            "labels": labels,
        },
        "reference": {
            "solver": "rk45",
            "method": "RK45",
            "rtol": options.reference_rtol,
            "atol": options.reference_atol,
            "sigma_stop": fit.sigma_floor,
            "rmse_vs_10x_tighter": fit.reference_error,
        },
        "error": {
            "metric": "endpoint RMSE per dimension vs the reference",
            "fit_before": fit.fit_before,
            "fit_after": fit.fit_after,
            "heldout_before": fit.heldout_before,
            "heldout_after": fit.heldout_after,
        },
        "accepted": fit.accepted,
        "search": {
            "method": "Nelder-Mead (scipy, adaptive) on softmax increments of log σ/α",
            "max_evals": options.max_evals,
            "loss_evaluations": fit.loss_evaluations,
        },
        "cost": {
            "wall_s": fit.wall_s,
            "sampler_evals": fit.sampler_evals,
            "reference_evals": fit.reference_evals,
            "unit": "denoiser evaluations of one example (NFE × examples)",
            "device": str(cfg.device),
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def describe(record: dict[str, Any]) -> str:
    """The printout: held-out error before → after, whether kept, the cost and the file."""
    err, cost = record["error"], record["cost"]
    kept = "kept" if record["accepted"] else "NOT better on held-out draws: the start grid is saved unchanged"
    return (
        f"{record['sampler_name']} {record['steps']} steps: held-out endpoint RMSE {err['heldout_before']:.4g} "
        f"({record['start_grid']['name']}) -> {err['heldout_after']:.4g} (tuned), {kept}; "
        f"{record['search']['loss_evaluations']} loss evaluations, {cost['wall_s']:.1f} s, "
        f"{cost['sampler_evals'] + cost['reference_evals']} example evaluations\nwrote {record['path']}"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="tune_grid")
def main(cfg: DictConfig) -> None:
    """``dlab-tune-grid``: fit the sampler's grid to the checkpoint; write it to ``<ckpt dir>/grids/`` (:func:`run`
    checks the config before torch is imported)."""
    print(describe(run(cfg, list(HydraConfig.get().overrides.task))))


if __name__ == "__main__":  # python -m diffusion_lab.tune_grid …: the same entry point as dlab-tune-grid
    main()
