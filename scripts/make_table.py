"""Turn a sweep into a table: one row per run (the default), or a paper table pivoted on config axes.

    python scripts/make_table.py multirun/digits/<date> --metrics train/loss 'val/bpd@*' 'val/fd_digits@*'
    python scripts/make_table.py multirun/schedule_x_param/<date> --rows schedule --cols parameterization \
        --metric 'val/fd_digits@*' --format latex
    python scripts/make_table.py --wandb <entity>/<project> --group schedule_x_param --rows schedule ...
    python scripts/make_table.py multirun/schedule_x_param/<date> --wandb-offline --rows schedule ...

Runs are read from (1) every ``summary.json`` under the directory (written by ``dlab-train``: the resolved
config, Hydra's group choices and overrides, the final metrics; a W&B offline run lives inside such a run
directory and mirrors it), else (2) every ``*/metrics.json`` with ``.hydra/overrides.yaml`` beside it (older
runs), (3) the W&B API (``--wandb entity/project`` [``--group``]), or (4) the W&B offline runs under the
directory (``--wandb-offline``: W&B's own run logs, read without the network; the same table as (1)).
A metric pattern may use ``*`` to match the protocol suffix (sample count, NFE). An axis is a config group
(``schedule``: its chosen option), an override key, or a dotted config path (``weighting.gamma``, ``seed``).
Cells of a pivot table are the mean ± standard error (std / √n) over the runs that share the row and column
values and differ only in ``seed``; the caption says so and gives n (in each cell when it differs; n = 1: no ±).
A table never averages over another axis silently: runs of one cell that differ in a config group or override
other than ``seed`` are an error naming it, unless ``--average-over AXIS`` pools them (said in the caption) or
``--where AXIS=VALUE`` keeps one value. An axis no run records, or a metric no run has, is an error listing the
valid ones; a metric some runs lack is averaged over the runs that have it (n counts those), a cell where none
has it reads ``—``, and a warning names the runs that lack it.
Formats: ``markdown`` (default), ``latex`` (booktabs), ``csv`` (long form: axes, metric, mean, sem, std, n).
A W&B group also holds the sample/eval jobs filed with its training runs: ``--job-type auto`` (default) tables the
training runs when there are any, ``--job-type eval|sample|any`` the others. A resumed run's offline segments
(one directory per process) count once, with the latest segment's record.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import fnmatch
import io
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from diffusion_lab.records import RecordError, read_record

Run = dict[str, Any]  # {"overrides": {key: value}, "choices": {...}, "config": {...}, "metrics": {...}, "dir": str}


SUMMARY_KEYS = {"metrics": dict}  # what a table reads from summary.json; the rest is optional
SUMMARY_OPTIONAL = {"overrides": list, "choices": dict, "config": dict, "job_type": (str, type(None))}


class Sweep(NamedTuple):
    """The finished runs of a sweep directory, the run directories that started but hold no ``record``, and the
    record's file name (``summary.json``, or ``metrics.json`` for older runs)."""

    runs: list[Run]
    unfinished: list[Path]
    record: str

    def note(self) -> str:
        """The table's note on the runs it leaves out ("" when none)."""
        if not self.unfinished:
            return ""
        n = len(self.unfinished)
        return f"{n} started run(s) without {self.record} (crashed, killed or running) are not in the table"


def read_sweep(sweep_dir: Path) -> Sweep:
    """Every finished run under ``sweep_dir`` (from ``summary.json`` files, else ``*/metrics.json``) and the run
    directories that started (:func:`unfinished_runs`) but hold no such record: crashed, killed or still running.
    Those are named in a warning (a table says what it leaves out); a record that cannot be read is an error naming
    it."""
    summaries = sorted(sweep_dir.rglob("summary.json"))
    if summaries:
        runs = [_from_summary(_read(p, SUMMARY_KEYS, "run summary", SUMMARY_OPTIONAL), p.parent) for p in summaries]
        return Sweep(runs, _warn_unfinished(sweep_dir, "summary.json"), "summary.json")
    runs = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_path.parent
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        runs.append({"overrides": pairs, "choices": {}, "config": {}, "metrics": _read(metrics_path, {}, "run metrics"),
                     "dir": job})  # fmt: skip
    if not runs:
        raise SystemExit(f"no */metrics.json under {sweep_dir}: is it a finished multirun directory?")
    return Sweep(runs, _warn_unfinished(sweep_dir, "metrics.json"), "metrics.json")


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every finished run under ``sweep_dir`` (:func:`read_sweep`; the unfinished ones are warned about)."""
    return read_sweep(sweep_dir).runs


def _read(path: Path, required: Mapping[str, Any], what: str, optional: Mapping[str, Any] | None = None) -> Any:
    """:func:`~diffusion_lab.records.read_record`, its error as SystemExit (the message names the file)."""
    try:
        return read_record(path, required, what, optional=optional, fix="re-run that job, or move it out of the sweep")
    except RecordError as err:
        raise SystemExit(f"error: {err}") from err


def unfinished_runs(sweep_dir: Path, record: str) -> list[Path]:
    """Run directories under ``sweep_dir`` that started (a ``.hydra/`` folder or ``csv/metrics.csv``) but hold no
    ``record`` (``summary.json``): crashed, killed or still running."""
    started = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    started |= {p.parent.parent for p in sweep_dir.rglob("metrics.csv") if p.parent.name == "csv"}
    return sorted(d for d in started if not (d / record).is_file())


def _warn_unfinished(sweep_dir: Path, record: str) -> list[Path]:
    """:func:`unfinished_runs`, each named in a warning."""
    unfinished = unfinished_runs(sweep_dir, record)
    if unfinished:
        warn(f"{len(unfinished)} run(s) started but have no {record} (crashed, killed or still running) and are left "
             "out: " + ", ".join(str(d) for d in unfinished))  # fmt: skip
    return unfinished


def override_pairs(overrides: Sequence[str]) -> dict[str, str]:
    """``{key: value}`` of a run's command-line overrides (``+``/``~`` prefixes dropped, ``hydra.*`` left out)."""
    plain = [o.lstrip("+~") for o in overrides]
    return dict(o.split("=", 1) for o in plain if "=" in o and not o.startswith("hydra."))


def _from_summary(summary: dict[str, Any], run_dir: Path) -> Run:
    return {
        "overrides": override_pairs(summary.get("overrides", [])),
        "choices": summary.get("choices", {}),
        "config": summary.get("config", {}),
        "metrics": summary.get("metrics", {}),
        "dir": run_dir,
        "job_type": summary.get("job_type"),
    }


def load_wandb_runs(path: str, group: str | None = None) -> list[Run]:
    """Runs of a W&B project (``entity/project``), optionally one group (a sweep), through the public API."""
    import wandb

    filters = {"group": group} if group else {}
    api_runs = wandb.Api().runs(path, filters=filters)
    runs = [_from_wandb(dict(r.config), dict(r.summary), r.url, getattr(r, "job_type", None)) for r in api_runs]
    if not runs:
        raise SystemExit(f"no W&B runs in {path}" + (f" group {group}" if group else ""))
    return runs


def load_wandb_offline_runs(root: Path, group: str | None = None) -> list[Run]:
    """W&B offline runs under ``root`` (``wandb/offline-run-*``), read from W&B's own run log, optionally one
    group: the table W&B will show once the runs are synced, built without the network."""
    from diffusion_lab.tracking import read_offline_run

    latest: dict[str, dict[str, Any]] = {}  # a resumed run has one offline directory per process: keep the last
    for run_dir in sorted(root.rglob("offline-run-*"), key=lambda d: d.name):  # offline-run-<time>-<id>
        run = read_offline_run(run_dir)
        if group is None or run["group"] == group:
            latest[run["id"] or str(run_dir)] = run
    runs = []
    for run in latest.values():
        if not run["finished"]:
            print(f"warning: {run['dir']} has no exit record (running, killed or still flushing): it may be partial",
                  file=sys.stderr)  # fmt: skip
        runs.append(_from_wandb(run["config"], run["summary"], run["dir"], run["job_type"]))
    if not runs:
        raise SystemExit(f"no W&B offline runs under {root}" + (f" in group {group}" if group else ""))
    return runs


def _from_wandb(config: dict[str, Any], summary: dict[str, Any], where: str, job_type: str | None) -> Run:
    """A W&B run's config (the resolved config + ``hydra_choices`` + ``overrides``) and summary as a :data:`Run`."""
    choices = config.pop("hydra_choices", {}) or {}
    return {
        "overrides": override_pairs(config.pop("overrides", []) or []),
        "choices": choices, "config": config, "metrics": summary, "dir": where, "job_type": job_type or None,
    }  # fmt: skip


def select_job_type(runs: list[Run], job_type: str) -> list[Run]:
    """``auto``: the training runs when there are any (a group also holds its sample/eval jobs, whose config is
    the job's, with the training run's under ``train``), else every run; ``any``: every run; else that type.
    Runs that do not record a job type are kept."""
    if job_type == "any" or (job_type == "auto" and not any(r.get("job_type") == "train" for r in runs)):
        return runs
    wanted = "train" if job_type == "auto" else job_type
    kept = [r for r in runs if r.get("job_type") in (wanted, None)]
    if not kept:
        raise SystemExit(f"no runs with job_type={wanted}; found {sorted({str(r.get('job_type')) for r in runs})}")
    return kept


def axis_value(run: Run, axis: str) -> str:
    """A run's value on an axis: its config-group choice, its override, or its config at a dotted path."""
    if axis == SEED and isinstance(run["config"].get("train"), dict):
        # A sample/eval job: the training run's seed, then the job's own sampling seed.
        return f"{run['config']['train'].get(SEED, '')}/{run['config'].get(SEED, '')}"
    if axis in run["choices"]:
        return str(run["choices"][axis])
    if axis in run["overrides"]:
        return str(run["overrides"][axis])
    node: Any = run["config"]
    for part in axis.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return str(node)


def select(metrics: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """Metric keys matching the patterns, in pattern order."""
    out = {}
    for pattern in patterns:
        for key in sorted(metrics):
            if fnmatch.fnmatchcase(key, pattern) and _is_number(metrics[key]):
                out[key] = metrics[key]
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -------------------------------------------------------------- what a table or plot may claim (DESIGN: the record)

SEED = "seed"  # the one axis a mean runs over without being asked
DEFAULT_METRICS = ["train/loss", "val/bpd@*"]
MISSING = "—"  # a cell whose runs lack the metric


class Stat(NamedTuple):
    """Mean, standard error of the mean and sample standard deviation (None for a single value), count n, and how
    many of the n values are not finite (nan or ±inf: then the mean is nan or ±inf and there is no s.e.)."""

    mean: float
    sem: float | None
    std: float | None
    n: int
    nonfinite: int = 0


def summarize(values: Sequence[float]) -> Stat:
    """The :class:`Stat` of one or more values: s.e. = std / √n. A non-finite value is never averaged away: the
    mean is then the IEEE sum over n (nan, or ±inf), without s.e., and ``nonfinite`` counts those values."""
    nonfinite = sum(not math.isfinite(v) for v in values)
    if nonfinite:
        return Stat(sum(values) / len(values), None, None, len(values), nonfinite)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Stat(mean, None, None, len(values))
    std = statistics.stdev(values)
    return Stat(mean, std / math.sqrt(len(values)), std, len(values))


def nonfinite_note(stat: Stat) -> str:
    """``"1 of 3 not finite"`` for a :class:`Stat` with non-finite values, else ""."""
    return f"{stat.nonfinite} of {stat.n} not finite" if stat.nonfinite else ""


def warn(message: str) -> None:
    """A warning on stderr: the table is still printed, but not silently."""
    print(f"warning: {message}", file=sys.stderr)


def _config_paths(node: Any, prefix: str = "") -> list[str]:
    """The dotted path of every leaf of a nested config."""
    if not isinstance(node, dict) or not node:
        return [prefix] if prefix else []
    return [p for k, v in node.items() for p in _config_paths(v, f"{prefix}.{k}" if prefix else str(k))]


def known_axes(runs: list[Run]) -> dict[str, list[str]]:
    """The axes of these runs by kind: config groups, override keys and dotted config paths."""
    return {
        "config groups": sorted({k for r in runs for k in r["choices"]}),
        "overrides": sorted({k for r in runs for k in r["overrides"]}),
        "config paths": sorted({p for r in runs for p in _config_paths(r["config"])}),
    }


def has_axis(run: Run, axis: str) -> bool:
    """Whether the run records ``axis`` (a group choice, an override or a config node)."""
    if axis in run["choices"] or axis in run["overrides"]:
        return True
    node: Any = run["config"]
    for part in axis.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    """`` (did you mean a or b?)`` for the closest of ``names``, or ""."""
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_axes(runs: list[Run], axes: Iterable[str]) -> None:
    """Refuse (SystemExit, message on stderr) an axis that no run records, listing the valid axes."""
    unknown = [a for a in dict.fromkeys(axes) if not any(has_axis(r, a) for r in runs)]
    if not unknown:
        return
    valid = known_axes(runs)
    lines = [f"unknown axis {a!r}{_did_you_mean(a, {n for v in valid.values() for n in v})}" for a in unknown]
    lines += [f"the axes of these {len(runs)} runs:"] + [f"  {k}: {', '.join(v) or '(none)'}" for k, v in valid.items()]
    raise SystemExit("error: " + "\n".join(lines))


def metric_keys(runs: list[Run]) -> list[str]:
    """Every numeric metric key that some run records."""
    return sorted({k for r in runs for k, v in r["metrics"].items() if _is_number(v)})


def check_metrics(runs: list[Run], patterns: Sequence[str] | None) -> list[str]:
    """The metric patterns to table: ``patterns`` (each must match a metric of some run, else SystemExit listing
    the metrics present), or with None the defaults that match. A pattern some runs lack is warned about, naming
    those runs (a cell counts the runs that have it; a cell where none has it reads —)."""
    keys = metric_keys(runs)
    found = [p for p in (patterns or DEFAULT_METRICS) if any(fnmatch.fnmatchcase(k, p) for k in keys)]
    unknown = [p for p in (patterns or DEFAULT_METRICS) if p not in found]
    if unknown and (patterns is not None or not found):
        names = ", ".join(f"{p!r}{_did_you_mean(p, keys)}" for p in unknown)
        listing = ", ".join(keys) or "(none)"
        raise SystemExit(f"error: no run records metric {names}; the metrics of these runs: {listing}")
    for pattern in found:
        lacking = [str(r["dir"]) for r in runs if first_match(r["metrics"], pattern) is None]
        if lacking:
            where = ", ".join(lacking)
            warn(f"{pattern} is missing from {len(lacking)} of {len(runs)} runs (not in their cells' n; a cell with "
                 f"none of it reads {MISSING}): {where}")  # fmt: skip
    return found


CHECKPOINT = "ckpt_path"  # a sample/eval job's model: pooled over only when the training runs differ in seed alone


def run_axes(runs: Iterable[Run]) -> set[str]:
    """The config groups and override keys of the runs, and the checkpoint a sample/eval job scored: the axes a
    sweep can vary."""
    runs = list(runs)
    checkpoint = {CHECKPOINT} if any(r["config"].get(CHECKPOINT) for r in runs) else set()
    return {k for r in runs for k in (*r["choices"], *r["overrides"])} | checkpoint


def training_seed_only(members: list[Run]) -> bool:
    """Whether the jobs' checkpoints come from training runs whose configs differ in ``seed`` alone (the
    training config a sample/eval job stores under ``train``): then their spread is a spread over seeds."""
    configs = [r["config"].get("train") for r in members]
    if not all(isinstance(c, dict) for c in configs):
        return False
    unseeded = [json.dumps({k: v for k, v in c.items() if k != SEED}, sort_keys=True, default=str) for c in configs]
    return len(set(unseeded)) == 1


def mixed_axes(groups: Iterable[list[Run]], shown: Iterable[str]) -> dict[str, list[str]]:
    """``{axis: values}`` of each group or override, other than ``seed`` and the ``shown`` axes, whose value
    differs between the runs of one group (a table cell, a plotted point): what their mean would silently average."""
    ignore = {SEED, *shown}
    mixed: dict[str, set[str]] = {}
    for members in groups:
        seed_only = training_seed_only(members)
        for axis in run_axes(members) - ignore - ({CHECKPOINT} if seed_only else set()):
            values = {axis_value(r, axis) or "(unset)" for r in members}
            if len(values) > 1:
                mixed.setdefault(axis, set()).update(values)
    return {a: sorted(v) for a, v in sorted(mixed.items())}


def refuse_mixed(mixed: Mapping[str, list[str]], what: str, hint: str) -> None:
    """SystemExit naming the axes (and values) that ``what`` would average over besides the seed."""
    if mixed:
        listing = "; ".join(f"{a} ({', '.join(v)})" for a, v in mixed.items())
        raise SystemExit(f"error: {what} would average over runs that differ in {listing}, not only in {SEED}: {hint}")


def filter_runs(runs: list[Run], where: Sequence[str]) -> list[Run]:
    """The runs whose value on each ``AXIS=VALUE`` of ``where`` is VALUE."""
    for condition in where:
        axis, sep, value = condition.partition("=")
        if not sep:
            raise SystemExit(f"error: --where takes AXIS=VALUE, not {condition!r}")
        check_axes(runs, [axis])
        kept = [r for r in runs if axis_value(r, axis) == value]
        if not kept:
            values = sorted({axis_value(r, axis) for r in runs})
            raise SystemExit(f"error: no run has {axis}={value}; its values: {', '.join(values)}")
        runs = kept
    return runs


# ------------------------------------------------------------------------------------- one row per run


def per_run_rows(runs: list[Run], patterns: list[str]) -> tuple[list[str], list[str], list[list[str]]]:
    """Header, the settings every run shares, and one row per run (varying overrides, then metrics)."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    values = {k: {r["overrides"].get(k, "") for r in runs} for k in keys}
    axes = [k for k in keys if len(values[k]) > 1 or len(runs) == 1]
    fixed = [f"`{k}={next(iter(values[k]))}`" for k in keys if k not in axes]
    columns = sorted({k for r in runs for k in select(r["metrics"], patterns)}, key=_pattern_order(patterns))
    rows = []
    for run in runs:
        chosen = select(run["metrics"], patterns)
        rows.append([run["overrides"].get(a, "") for a in axes] + [_fmt(chosen.get(c)) for c in columns])
    return axes + columns, fixed, rows


def markdown(runs: list[Run], patterns: list[str]) -> str:
    """A Markdown table: the swept keys that vary as the first columns, then every selected metric.

    Overrides shared by every run are listed once, above the table."""
    header, fixed, rows = per_run_rows(runs, patterns)
    lines = [f"Every run: {' '.join(fixed)}", ""] if fixed else []
    return "\n".join(lines + _md_table(header, rows))


def _pattern_order(patterns: list[str]) -> Any:
    return lambda key: next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(key, p))


def _fmt(value: Any) -> str:
    return MISSING if value is None else f"{value:.4g}"


# ------------------------------------------------------------------------------------------ pivot table


def first_match(metrics: dict[str, Any], pattern: str) -> tuple[str, float] | None:
    """The first numeric metric matching ``pattern`` (sorted by key), or None."""
    found = select(metrics, [pattern])
    return next(iter(found.items())) if found else None


def cell_runs(runs: list[Run], rows: list[str], cols: list[str]) -> dict[tuple[Any, ...], list[Run]]:
    """``{(row key, column key): runs}`` in the order the keys first appear (the sweep's order)."""
    cells: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        key = (tuple(axis_value(run, a) for a in rows), tuple(axis_value(run, a) for a in cols))
        cells.setdefault(key, []).append(run)
    return cells


def pivot(runs: list[Run], rows: list[str], cols: list[str], patterns: list[str],
          average_over: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """``{"row_keys", "col_keys", "metrics", "cells": {(row, col, metric): [values]}, "labels": {pattern: key},
    "averaged": {axis: values}}``.

    A cell pools runs that differ only in ``seed`` (and the ``average_over`` axes, said in the caption): runs of one
    cell that differ in any other group or override, or that match different metrics for one pattern, are refused
    (SystemExit). Rows and columns keep the order in which their values first appear (the sweep's order)."""
    groups = cell_runs(runs, rows, cols)
    hint = ("add it to --rows/--cols, keep one value with --where AXIS=VALUE, or average over it explicitly with "
            "--average-over AXIS (stated in the caption)")  # fmt: skip
    refuse_mixed(mixed_axes(groups.values(), [*rows, *cols, *average_over]), "a cell", hint)
    cells: dict[tuple[Any, ...], list[float]] = {}
    labels: dict[str, set[str]] = {p: set() for p in patterns}
    for (r, c), members in groups.items():
        for pattern in patterns:
            hits = [h for h in (first_match(run["metrics"], pattern) for run in members) if h is not None]
            if len({k for k, _ in hits}) > 1:
                raise SystemExit(f"error: {pattern} matches {sorted({k for k, _ in hits})} in the cell {r + c}: "
                                 "different protocols in one mean; give the metric key itself")  # fmt: skip
            labels[pattern].update(k for k, _ in hits)
            if hits:
                cells[(r, c, pattern)] = [float(v) for _, v in hits]
            _warn_nonfinite(members, pattern)
    names = {p: next(iter(k)) if len(k) == 1 else p for p, k in labels.items()}
    averaged = {a: sorted({axis_value(run, a) for run in runs}) for a in average_over}
    repeats = repeated_runs(groups.values(), average_over)
    for same in repeats:
        dirs, seed = ", ".join(str(r["dir"]) for r in same), axis_value(same[0], SEED) or "(none recorded)"
        warn(f"{dirs} share one cell and {SEED}={seed}: repeats, not independent seeds")
    row_keys, col_keys = list(dict.fromkeys(r for r, _ in groups)), list(dict.fromkeys(c for _, c in groups))
    return {"row_keys": row_keys, "col_keys": col_keys, "metrics": patterns, "cells": cells, "labels": names,
            "averaged": averaged, "repeats": bool(repeats)}  # fmt: skip


def _warn_nonfinite(members: list[Run], pattern: str) -> None:
    """Name the runs of a cell whose ``pattern`` metric is nan or ±inf (the cell shows it; no mean is taken)."""
    bad = [(run, hit) for run in members if (hit := first_match(run["metrics"], pattern)) and not math.isfinite(hit[1])]
    for run, (key, value) in bad:
        warn(f"{run['dir']} recorded {key} = {value}: its cell reads {value} with the count, not a mean over seeds")


def repeated_runs(groups: Iterable[list[Run]], average_over: Sequence[str] = ()) -> list[list[Run]]:
    """Runs of one group that share the ``seed`` (and every ``average_over`` value): the same setting run twice,
    which a mean ± s.e. over seeds would count as independent (runs that record no seed share the empty one)."""
    out = []
    for members in groups:
        settings: dict[tuple[str, ...], list[Run]] = {}
        for run in members:
            settings.setdefault(tuple(axis_value(run, a) for a in (SEED, *average_over)), []).append(run)
        out += [same for same in settings.values() if len(same) > 1]
    return out


def caption(table: dict[str, Any]) -> str:
    """What a cell is (:func:`cell_caption`), then what the table leaves out: cells with non-finite runs and
    started runs without a record (``table["left_out"]``)."""
    notes = [cell_caption(table)]
    nonfinite = sum(1 for v in table["cells"].values() if not all(math.isfinite(x) for x in v))
    if nonfinite:
        notes.append(f"{nonfinite} cell(s) hold a nan or inf run: shown as nan/inf with the count, no mean over it")
    return "; ".join(notes + ([table["left_out"]] if table.get("left_out") else []))


def cell_caption(table: dict[str, Any]) -> str:
    """What a cell is: mean ± standard error over n seeds (n per cell when it differs), or a single run."""
    counts = sorted({len(v) for v in table["cells"].values()})
    if counts in ([], [1]):
        return "n = 1 per cell: a single run, no standard error"
    extra = "; ".join(f"{a} ∈ {{{', '.join(v)}}}" for a, v in table["averaged"].items())
    seeds = "seeds, some repeated" if table["repeats"] else "seeds"
    unit = f"runs ({seeds}, averaged over {extra})" if extra else f"runs ({seeds})" if table["repeats"] else "seeds"
    if len(counts) == 1:
        return f"mean ± standard error over n = {counts[0]} {unit} per cell"
    return f"mean ± standard error over {unit}, n in each cell"


def _cell(values: list[float] | None, pm: str, digits: int, show_n: bool, wrap: Callable[[str], str] = str) -> str:
    """``mean ± s.e.`` (no ± for one value), with ``(n = …)`` when n differs across cells; — without values."""
    if not values:
        return MISSING
    stat = summarize(values)
    if stat.nonfinite:  # "nan (1 of 3 not finite)": a run that diverged is shown, not averaged away
        return wrap(f"{stat.mean}") + f" ({nonfinite_note(stat)})"
    text = f"{stat.mean:.{digits}g}" + ("" if stat.sem is None else f"{pm}{stat.sem:.2g}")
    return wrap(text) + (f" (n = {stat.n})" if show_n else "")


def _varying_n(table: dict[str, Any]) -> bool:
    """Whether the cells hold different numbers of runs (then each cell states its n)."""
    return len({len(v) for v in table["cells"].values()}) > 1


def _column_headers(table: dict[str, Any], cols: list[str]) -> list[tuple[tuple[str, ...], str, str]]:
    """(column key, metric pattern, header) for every column of the pivot table."""
    out = []
    for c in table["col_keys"]:
        for pattern in table["metrics"]:
            label = table["labels"][pattern]
            name = ", ".join(f"{a}={v}" if len(cols) > 1 else v for a, v in zip(cols, c, strict=True))
            out.append((c, pattern, (f"{name}: {label}" if len(table["metrics"]) > 1 else name) if cols else label))
    return out


def render_pivot(table: dict[str, Any], rows: list[str], cols: list[str], fmt: str, digits: int = 4) -> str:
    """The pivot table as Markdown, LaTeX (booktabs) or long-form CSV."""
    columns = _column_headers(table, cols)
    if fmt == "csv":
        return _csv_long(table, rows, cols)
    note, show_n = caption(table), _varying_n(table)
    if fmt == "latex":
        return _latex(table, rows, columns, digits, note)
    header = [" / ".join(rows) or "run"] + [h for _, _, h in columns]
    body = [
        [" / ".join(r) or "all"] + [_cell(table["cells"].get((r, c, p)), " ± ", digits, show_n) for c, p, _ in columns]
        for r in table["row_keys"]
    ]
    metric_note = ", ".join(table["labels"][p] for p in table["metrics"]) if cols else ""
    title = f"{metric_note} ({note})" if metric_note else f"({note})"
    return "\n".join([title, "", *_md_table(header, body)])


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _latex(table: dict[str, Any], rows: list[str], columns: list[Any], digits: int, note: str) -> str:
    def esc(text: str) -> str:
        return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    lines = [
        r"\begin{tabular}{l" + "c" * len(columns) + "}",
        r"\toprule",
        " & ".join([esc(" / ".join(rows) or "run")] + [esc(h) for _, _, h in columns]) + r" \\",
        r"\midrule",
    ]
    show_n = _varying_n(table)
    for r in table["row_keys"]:
        cells = [_cell(table["cells"].get((r, c, p)), r" \pm ", digits, show_n, lambda s: f"${s}$")
                 for c, p, _ in columns]  # fmt: skip
        lines.append(" & ".join([esc(" / ".join(r)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% {note}"]
    return "\n".join(lines)


def _csv_long(table: dict[str, Any], rows: list[str], cols: list[str]) -> str:
    """One line per cell and metric: the axes, metric, mean, sem, std, n (a cell without values: n = 0)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*rows, *cols, "metric", "mean", "sem", "std", "n"])
    for r in table["row_keys"]:
        for c in table["col_keys"]:
            for pattern in table["metrics"]:
                values = table["cells"].get((r, c, pattern))
                stat = summarize(values) if values else None
                numbers = ["" if x is None else repr(x) for x in (stat[:3] if stat else (None,) * 3)]
                writer.writerow([*r, *c, table["labels"][pattern], *numbers, stat.n if stat else 0])
    return out.getvalue().rstrip("\n")


def render_per_run(runs: list[Run], patterns: list[str], fmt: str, note: str = "") -> str:
    """The one-row-per-run table in the requested format; ``note`` (what the table leaves out) follows a Markdown
    table and is a ``%`` comment after a LaTeX one (CSV: stderr's warning only, the file stays plain data)."""
    if fmt == "markdown":
        return markdown(runs, patterns) + (f"\n\n{note}" if note else "")
    header, _, rows = per_run_rows(runs, patterns)
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *rows])
        return out.getvalue().rstrip("\n")
    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows] + [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines).replace("_", r"\_") + (f"\n% {note}" if note else "")


def int_in(flag: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer flag in ``[low, high]`` (no upper bound when ``high`` is None); anything
    else is a usage error naming the flag, the valid range and the value given."""
    valid = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{flag} must be {valid}, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, nargs="?", help="a multirun directory (or any tree of run dirs)")
    parser.add_argument("--metrics", "--metric", nargs="+", help=f"metric keys or patterns (default: {DEFAULT_METRICS}"
                        " where the runs have them)")  # fmt: skip
    parser.add_argument("--rows", nargs="+", default=[], help="axes of the rows (pivot table)")
    parser.add_argument("--cols", nargs="+", default=[], help="axes of the columns (pivot table)")
    parser.add_argument(
        "--average-over",
        nargs="+",
        default=[],
        metavar="AXIS",
        help="pool the runs of a cell across these axes too (besides seed); said in the caption",
    )
    parser.add_argument("--where", nargs="+", default=[], metavar="AXIS=VALUE", help="only the runs with these values")
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    parser.add_argument("--digits", type=int_in("--digits", 1, 17), default=4, help="significant digits of the means "
                        "(1 to 17)")  # fmt: skip
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from the W&B API instead")
    parser.add_argument(
        "--wandb-offline",
        action="store_true",
        help="read the W&B offline runs under sweep_dir (W&B's own record) instead of summary.json",
    )
    parser.add_argument("--group", help="with --wandb / --wandb-offline: only this group (sweep)")
    parser.add_argument(
        "--job-type",
        default="auto",
        help="train / sample / eval / any; auto: the training runs when there are any, else all",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    note = ""
    if args.wandb:
        runs = load_wandb_runs(args.wandb, args.group)
    elif args.sweep_dir is not None and args.wandb_offline:
        runs = load_wandb_offline_runs(args.sweep_dir, args.group)
    elif args.sweep_dir is not None:
        sweep = read_sweep(args.sweep_dir)
        runs, note = sweep.runs, sweep.note()
    else:
        parser.error("give a sweep directory or --wandb ENTITY/PROJECT")
    if args.average_over and not (args.rows or args.cols):
        parser.error("--average-over pools the cells of a pivot table: give --rows and/or --cols")
    runs = filter_runs(select_job_type(runs, args.job_type), args.where)
    check_axes(runs, [*args.rows, *args.cols, *args.average_over])
    patterns = check_metrics(runs, args.metrics)
    if args.rows or args.cols:
        table = pivot(runs, args.rows, args.cols, patterns, args.average_over) | {"left_out": note}
        print(render_pivot(table, args.rows, args.cols, args.format, args.digits))
    else:
        print(render_per_run(runs, patterns, args.format, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
