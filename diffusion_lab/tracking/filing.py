"""How a run is filed: its W&B ``group``, ``job_type`` and ablation ``tags`` (:class:`RunInfo`), from the composed
config and Hydra's runtime, for a training run (:func:`run_info`) and for a ``sample`` / ``eval`` job on one of its
checkpoints (:func:`job_info`, :func:`training_run`). Needs neither Lightning nor W&B.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffusion_lab.records import TypeSpec, read_record

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
# What a job reads of its training run's summary (each optional).
FILED_KEYS: dict[str, TypeSpec] = {"name": str, "group": (str, type(None)), "tags": list}


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
    found = summary_path.is_file()  # a summary that cannot be read is a RecordError naming it, not a guess
    summary = read_record(summary_path, {}, "training run summary", optional=FILED_KEYS) if found else dict(filed or {})
    name = str(summary.get("name") or train_config.get("name", "default"))
    return {
        "name": name,
        "group": summary.get("group") or name,
        "tags": list(summary.get("tags", [])),
        "run_dir": str(run_dir) if found else None,
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
