"""What a run writes: its loggers (CSV, continued on resume; W&B, offline unless logged in), ``metrics.json`` and
``summary.json``, the W&B run of a ``sample`` / ``eval`` job, and the value a sweeper optimises.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.atomic import atomic_write_json, atomic_write_text
from diffusion_lab.tracking.filing import SUMMARY_FILE, RunInfo, job_info, run_info

# Seconds between flushes of the W&B run log (run-<id>.wandb). W&B's default of 15 s lost a killed run's whole
# record (its log held just the 7-byte header); W&B's service still writes what it received after a SIGKILL.
WANDB_FLUSH_INTERVAL_S = 0.1
METRICS_FILE = "metrics.json"  # a training run's final metrics with their protocol


def _wandb_mode_of(wb: Any) -> str:
    """The W&B mode of a ``logger.wandb`` node (``disabled`` when the node is null; ``auto`` resolved)."""
    return wandb_mode(str(getattr(wb.mode, "value", wb.mode))) if wb is not None else "disabled"


def _close_wandb_run(run: Any, metrics: Mapping[str, Any], media: Mapping[str, Path]) -> None:
    """Put the scalar ``metrics`` and the existing ``media`` images in the W&B run's summary, then finish it."""
    import wandb

    run.summary.update(scalar_metrics(metrics))
    for key, path in media.items():
        if path.is_file():
            run.summary[key] = wandb.Image(str(path))
    run.finish()


def wandb_mode(requested: str) -> str:
    """``auto`` → ``online`` when an API key is configured (env or ~/.netrc), else ``offline``."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text() else "offline"


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers, interpolations resolved, enums as strings."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    info: RunInfo | None = None,
    wandb_id: str | None = None,
    resumed: Sequence[Mapping[str, Any]] = (),
) -> list[Logger]:
    """CSV metrics in the run dir, plus W&B (offline unless logged in) with the resolved config,
    the run's group, job type and ablation tags (see the module docstring). ``wandb_id``: continue that
    W&B run (a resumed checkpoint's run, ``resume="allow"``). ``resumed``: the run's resume history
    (:mod:`diffusion_lab.resume`); when given, the CSV is continued (:class:`AppendingCSVLogger`) and the history
    is put in the W&B config under ``resumed``."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="", append=bool(resumed)))
    wb = cfg.logger.wandb
    mode = _wandb_mode_of(wb)
    if wb is not None and mode != "disabled":
        import wandb

        info = info or run_info(cfg)
        logger = WandbLogger(
            project=wb.project,
            entity=wb.entity,
            group=info.group,
            tags=info.tags,
            job_type=info.job_type,
            name=f"{cfg.name}-{run_dir.name}",
            save_dir=str(run_dir),
            mode=mode,
            id=wandb_id,
            resume="allow" if wandb_id else None,
            settings=wandb.Settings(x_transaction_log_flush_interval=WANDB_FLUSH_INTERVAL_S),
        )
        hyperparams = {**resolved_config(cfg), "hydra_choices": info.choices, "overrides": info.overrides}
        logger.log_hyperparams({**hyperparams, "resumed": [dict(r) for r in resumed]})
        loggers.append(logger)
    return loggers


class AppendingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that writes every logged row to disk at once (a kill loses at most the row being
    written) and, with ``append=True``, continues an existing ``metrics.csv`` instead of deleting it: see
    :class:`_AppendingWriter`."""

    def __init__(self, save_dir: str, name: str, version: str, append: bool = False) -> None:
        super().__init__(save_dir=save_dir, name=name, version=version, flush_logs_every_n_steps=1)
        self.append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The run's :class:`_AppendingWriter`."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.append)
        assert isinstance(self._experiment, ExperimentWriter)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    """Continues ``metrics.csv``: its rows are kept (the header grows to the union of old and new columns) except
    the rows at or after the first step this process logs, which a killed process logged after its last checkpoint
    and the resumed run logs again, so every step appears once. Every rewrite is atomic (temp file + replace)."""

    def __init__(self, log_dir: str, append: bool) -> None:
        self._append = append  # read by _check_log_dir_exists, which the parent's __init__ calls
        super().__init__(log_dir)
        self._cut_pending = append and self._fs.isfile(self.metrics_file_path)

    def _check_log_dir_exists(self) -> None:
        if not self._append:
            super()._check_log_dir_exists()  # a fresh run replaces the file

    def save(self) -> None:
        """Append the buffered rows (after dropping what the previous process logged from their first step on)."""
        if self.metrics and self._cut_pending:
            first = min(int(row["step"]) for row in self.metrics)
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                kept = [row for row in reader if row.get("step") and int(float(row["step"])) < first]
                header = list(reader.fieldnames or [])
            self.metrics_keys = sorted(set(header) | set().union(*self.metrics))
            self._write_rows(self.metrics_keys, kept)
            self._cut_pending = False
        super().save()

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_rows(fieldnames, rows)

    def _write_rows(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, text.getvalue())


def write_summary(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` (final metrics with protocol) atomically and return its path."""
    return atomic_write_json(run_dir / METRICS_FILE, metrics)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (protocol, paths and flags left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def write_run_summary(
    run_dir: Path,
    cfg: DictConfig | Mapping[str, Any],
    metrics: Mapping[str, Any],
    info: RunInfo,
    resumed: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """``summary.json``: what the run was (config, group choices, overrides, tags) and what it scored.
    ``resumed``: a training run's resume history (``[{"step", "changed"}]``, see :mod:`diffusion_lab.resume`).

    The local mirror of the W&B run: ``scripts/make_table.py`` builds tables from it offline."""
    config = resolved_config(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    summary = {**asdict(info), "run_dir": str(run_dir), "config": config, "metrics": dict(metrics)}
    if resumed is not None:
        summary["resumed"] = [dict(r) for r in resumed]
    return atomic_write_json(run_dir / SUMMARY_FILE, summary)


def finish_run(
    run_dir: Path,
    cfg: DictConfig,
    metrics: Mapping[str, Any],
    loggers: Sequence[Logger],
    info: RunInfo | None = None,
    resumed: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``summary.json`` (with the resume history ``resumed``), copy the final metrics into each W&B run's
    summary (with the final sample grid and the loss-vs-log-SNR plot as media) and close the W&B run, so the next
    job of a sweep in this process gets its own run."""
    info = info or run_info(cfg)
    media = {"samples/final": run_dir / "samples_ema.png", "plots/loss_vs_logsnr": run_dir / "loss_vs_logsnr.png"}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _close_wandb_run(logger.experiment, metrics, media)
    return write_run_summary(run_dir, cfg, metrics, info, resumed)


def objective(metrics: Mapping[str, Any], pattern: str | None) -> float | None:
    """The value a sweeper optimises: the metric matching ``pattern`` (``*`` allowed), None when unset.

    A missing or non-finite metric is ``nan`` (Optuna records the trial as failed)."""
    if pattern is None:
        return None
    values = [v for k, v in sorted(scalar_metrics(metrics).items()) if fnmatch.fnmatchcase(k, pattern)]
    if len(values) > 1:
        raise ValueError(f"optimize_metric={pattern!r} matches {len(values)} metrics; make it specific")
    return values[0] if values and math.isfinite(values[0]) else float("nan")


def track_job(
    cfg: DictConfig,
    out_dir: Path,
    job_type: str,
    metrics: Mapping[str, Any],
    train_config: Mapping[str, Any],
    train: Mapping[str, Any],
    media: Mapping[str, Path] | None = None,
    info: RunInfo | None = None,
) -> Path:
    """Record a ``sample`` / ``eval`` job: a W&B run (offline unless logged in; group, job type, tags, the job's
    config with the training run's under ``train``, the scalar metrics and ``media`` images in its summary) and
    ``summary.json`` in ``out_dir``; returns the summary's path. ``info``: how to file it, when the job is not
    described by Hydra's runtime (a driver script's loop); default :func:`job_info`."""
    info = info or job_info(cfg, job_type, train)
    config = {**resolved_config(cfg), "train": dict(train_config), "train_run": dict(train)}
    wb = cfg.logger.wandb
    mode = _wandb_mode_of(wb)
    if wb is not None and mode != "disabled":
        import wandb

        run = wandb.init(
            project=wb.project, entity=wb.entity, group=info.group, job_type=info.job_type, tags=info.tags,
            name=f"{info.name}-{job_type}-{out_dir.name}", dir=str(out_dir), mode=mode,  # type: ignore[arg-type]
            config={**config, "hydra_choices": info.choices, "overrides": info.overrides},
        )  # fmt: skip
        _close_wandb_run(run, metrics, media or {})
    return write_run_summary(out_dir, config, metrics, info)
