"""Experiment tracking: the run's loggers (CSV + W&B) and its local ``summary.json``.

Every run is described the same way to W&B and to the local summary, so a sweep can be tabulated
from either (``scripts/make_table.py``):

- ``group``: the sweep (``logger.wandb.group`` if set; in a Hydra multirun ``<name>/<sweep dir>``, or the
  sweep dir's name when it already is ``name``; else ``name``);
- ``job_type``: ``train`` / ``sample`` / ``eval`` by entry point (``logger.wandb.job_type`` overrides);
- ``tags``: one ``axis:option`` per ablation axis chosen through Hydra's config groups
  (``schedule:cosine``, ``parameterization:v``) plus one ``key:value`` per plain command-line override
  (``weighting.gamma:5``), then ``logger.wandb.tags``;
- the full resolved config, Hydra's group choices and overrides, and the final metrics.

A ``sample`` / ``eval`` job (:func:`track_job`) joins its training run's group unless it is itself a sweep,
adds the training run's tags for the axes it does not set itself, and records the training run (directory,
config, W&B id). :func:`read_offline_run` reads a W&B offline run back (group, tags, config, summary), so
tables can be built from W&B's own record without the network.

Nothing here imports the diffusion code; it only needs the composed config.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

# Config groups that are axes of an ablation: their Hydra choice becomes a W&B tag ``axis:option``.
ABLATION_AXES = (
    "experiment",
    "sweep",
    "dataset",
    "schedule",
    "parameterization",
    "weighting",
    "time_sampler",
    "sampler",
    "model",
    "metrics",
)
# Overrides that say where or how a run is stored, not what it is: never tags.
_NOT_TAGS = (
    "hydra.",
    "name",
    "ckpt_path",
    "logger.",
    "out_dir",
    "seed",
    "optimize_metric",
    "trainer.enable_progress_bar",
)
_MAX_TAG_LEN = 64  # W&B refuses longer tags
SUMMARY_FILE = "summary.json"
# Seconds between flushes of the W&B run log (run-<id>.wandb). W&B's default of 15 s lost a killed run's whole
# record (its log held just the 7-byte header); W&B's service still writes what it received after a SIGKILL.
WANDB_FLUSH_INTERVAL_S = 0.1


@dataclass(frozen=True)
class RunInfo:
    """How one run is filed: W&B ``group``/``job_type``/``tags`` and the Hydra context they come from."""

    name: str
    group: str
    job_type: str
    tags: list[str]
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    sweep_dir: str | None = None
    job_num: int | None = None


def hydra_context() -> dict[str, Any]:
    """Group choices, task overrides, sweep dir and job number of the running Hydra job ({} outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra")}
    return {
        "choices": {k: v for k, v in choices.items() if not k.startswith("schema")},
        "overrides": list(hc.overrides.task),
        "sweep_dir": str(hc.sweep.dir) if multirun else None,
        "job_num": int(hc.job.num) if multirun else None,
    }


def ablation_tags(choices: Mapping[str, str], overrides: Sequence[str], extra: Iterable[str] = ()) -> list[str]:
    """``axis:option`` for the chosen ablation groups, ``key:value`` for plain overrides, then ``extra``."""
    tags = [f"{axis}:{choices[axis]}" for axis in ABLATION_AXES if axis in choices]
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key not in choices and not key.startswith(_NOT_TAGS):
            tags.append(f"{key}:{value}")
    tags += list(extra)
    return list(dict.fromkeys(t for t in tags if len(t) <= _MAX_TAG_LEN))


def sweep_group(name: str, sweep_dir: str | None) -> str:
    """The W&B group of a run: its sweep (``name`` or ``name/<sweep dir>``), or ``name`` outside a sweep."""
    if sweep_dir is None:
        return name
    base = Path(sweep_dir).name
    return base if base == name else f"{name}/{base}"


def run_info(cfg: DictConfig, job_type: str | None = None) -> RunInfo:
    """The run's :class:`RunInfo` from its config and (when running under Hydra) Hydra's runtime."""
    ctx = hydra_context()
    wb = cfg.get("logger", {}).get("wandb") if "logger" in cfg else None
    name = str(cfg.get("name", "default"))
    group = wb.group if wb is not None and wb.group else sweep_group(name, ctx.get("sweep_dir"))
    kind = _job_type(wb, job_type or "train")
    extra = list(wb.tags) if wb is not None else []
    tags = ablation_tags(ctx.get("choices", {}), ctx.get("overrides", []), extra)
    return RunInfo(name, group, kind, tags, ctx.get("choices", {}), ctx.get("overrides", []),
                   ctx.get("sweep_dir"), ctx.get("job_num"))  # fmt: skip


def _job_type(wb: Any, default: str) -> str:
    """``logger.wandb.job_type`` when set, else the entry point's ``default``."""
    return (wb.job_type if wb is not None and wb.job_type else None) or default


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
        tmp = Path(self.metrics_file_path).with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.metrics_file_path)


def write_summary(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` (final metrics with protocol) atomically and return its path."""
    return _write_json(run_dir / "metrics.json", metrics)


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path


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
    return _write_json(run_dir / SUMMARY_FILE, summary)


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


# ------------------------------------------------------------------------------------ sample / eval jobs


def training_run(
    ckpt_path: str | Path,
    train_config: Mapping[str, Any],
    wandb_id: str | None,
    filed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a job on a checkpoint records of its training run: name, group, tags (from ``summary.json`` when the
    checkpoint sits in ``<run dir>/checkpoints/`` of a finished run, else ``filed``: what the checkpoint stores
    of them), run directory and W&B run id."""
    run_dir = Path(ckpt_path).resolve().parent.parent
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else dict(filed or {})
    name = str(summary.get("name") or train_config.get("name", "default"))
    return {
        "name": name,
        "group": summary.get("group") or name,
        "tags": list(summary.get("tags", [])),
        "run_dir": str(run_dir) if summary_path.is_file() else None,
        "wandb_id": wandb_id,
    }


def job_info(cfg: DictConfig, job_type: str, train: Mapping[str, Any]) -> RunInfo:
    """The :class:`RunInfo` of a ``sample`` / ``eval`` job on a checkpoint of the training run ``train``.

    Group: ``logger.wandb.group``, else the job's own sweep when it is a multirun, else the training run's group.
    Tags: the job's axes (``sampler:euler``, ``sampler.steps:20``), then the training run's tags on other axes."""
    ctx = hydra_context()
    wb = cfg.logger.wandb
    name = str(cfg.get("name") or train["name"])
    sweep_dir = ctx.get("sweep_dir")
    group = (wb.group if wb is not None else None) or (sweep_group(name, sweep_dir) if sweep_dir else train["group"])
    kind = _job_type(wb, job_type)
    overrides = ctx.get("overrides", [])
    requested = {o.lstrip("+~").partition("=")[0] for o in overrides}
    choices = {k: v for k, v in ctx.get("choices", {}).items() if k in requested}  # not the job config's defaults
    own = ablation_tags(choices, overrides, list(wb.tags) if wb is not None else [])
    axes = {t.split(":", 1)[0].split(".", 1)[0] for t in own}
    inherited = [t for t in train["tags"] if t.split(":", 1)[0].split(".", 1)[0] not in axes]
    tags = list(dict.fromkeys([*own, *inherited]))
    return RunInfo(name, group, kind, tags, ctx.get("choices", {}), ctx.get("overrides", []), sweep_dir,
                   ctx.get("job_num"))  # fmt: skip


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


# ------------------------------------------------------------------------------ reading W&B offline runs

_LOG_BLOCK = 32 * 1024  # the W&B run log is a LevelDB-style log: 32 KiB blocks of chunked records
_LOG_MAGIC = b":W&B"


def _log_records(path: Path) -> Iterable[bytes]:
    """The records of a W&B ``run-<id>.wandb`` log, reassembled from their chunks (checksums verified)."""
    import struct
    import zlib

    data = path.read_bytes()
    if len(data) < 7:
        return  # just created: not even the header is written yet (an unfinished run)
    if data[:4] != _LOG_MAGIC:
        raise ValueError(f"{path} is not a W&B run log (it does not start with {_LOG_MAGIC!r})")
    pos, record = 7, b""  # 7-byte file header: magic, 2-byte version magic, 1-byte version
    while pos + 7 <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:
            break  # a run still being written (or killed) ends in a partial chunk
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            yield record


def _apply_items(target: dict[str, Any], items: Iterable[Any]) -> None:
    for item in items:
        node, keys = target, [item.key] if item.key else list(item.nested_key)
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """A W&B offline run (its ``run-<id>.wandb`` log, its directory, or a ``wandb/`` directory holding one run)
    as ``{"id", "group", "job_type", "tags", "config", "summary", "dir", "finished"}``: what the W&B UI shows once
    synced. ``finished`` is False until the log holds the run's exit record: W&B's writer may still be flushing
    it after ``run.finish()`` returns, or the run was killed; what is read then may be partial."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    logs = [path]
    if path.is_dir():
        logs = sorted(path.glob("run-*.wandb")) or sorted(path.glob("offline-run-*/run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"expected one W&B run log (run-*.wandb) in {path}, found {len(logs)}")
    log = logs[0]
    # The id is also the log's name (run-<id>.wandb): a run killed before its first flush is still one run.
    run: dict[str, Any] = {"id": log.stem.removeprefix("run-"), "group": "", "job_type": "", "tags": [],
                           "config": {}, "summary": {}, "dir": str(log.parent), "finished": False}  # fmt: skip
    for raw in _log_records(log):
        record = pb.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"id": record.run.run_id, "group": record.run.run_group, "job_type": record.run.job_type}
            run["tags"] = list(record.run.tags)
            _apply_items(run["config"], record.run.config.update)
        elif kind == "config":
            _apply_items(run["config"], record.config.update)
        elif kind == "summary":
            _apply_items(run["summary"], record.summary.update)
            for item in record.summary.remove:
                node, keys = run["summary"], [item.key] if item.key else list(item.nested_key)
                for key in keys[:-1]:
                    node = node.get(key, {})
                node.pop(keys[-1], None)
        elif kind == "exit":
            run["finished"] = True
    run["config"].pop("_wandb", None)
    return run
