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
Cells of a pivot table are the mean ± sample standard deviation over the runs that share the row and column
values (e.g. seeds).
Formats: ``markdown`` (default), ``latex`` (booktabs), ``csv`` (long form: axes, metric, mean, std, n).
A W&B group also holds the sample/eval jobs filed with its training runs: ``--job-type auto`` (default) tables the
training runs when there are any, ``--job-type eval|sample|any`` the others. A resumed run's offline segments
(one directory per process) count once, with the latest segment's record.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

Run = dict[str, Any]  # {"overrides": {key: value}, "choices": {...}, "config": {...}, "metrics": {...}, "dir": str}


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every finished run under ``sweep_dir``: from ``summary.json`` files, else ``*/metrics.json``."""
    summaries = sorted(sweep_dir.rglob("summary.json"))
    if summaries:
        return [_from_summary(json.loads(p.read_text()), p.parent) for p in summaries]
    runs = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_path.parent
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        runs.append({"overrides": pairs, "choices": {}, "config": {}, "metrics": json.loads(metrics_path.read_text()),
                     "dir": job})  # fmt: skip
    if not runs:
        raise SystemExit(f"no */metrics.json under {sweep_dir}: is it a finished multirun directory?")
    return runs


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
    return "" if value is None else f"{value:.4g}"


# ------------------------------------------------------------------------------------------ pivot table


def first_match(metrics: dict[str, Any], pattern: str) -> tuple[str, float] | None:
    """The first numeric metric matching ``pattern`` (sorted by key), or None."""
    found = select(metrics, [pattern])
    return next(iter(found.items())) if found else None


def pivot(runs: list[Run], rows: list[str], cols: list[str], patterns: list[str]) -> dict[str, Any]:
    """``{"row_keys", "col_keys", "metrics", "cells": {(row, col, metric): [values]}, "labels": {pattern: key}}``.

    Rows and columns keep the order in which their values first appear (the sweep's order)."""
    row_keys: list[tuple[str, ...]] = []
    col_keys: list[tuple[str, ...]] = []
    cells: dict[tuple[Any, ...], list[float]] = {}
    labels: dict[str, set[str]] = {p: set() for p in patterns}
    for run in runs:
        r = tuple(axis_value(run, a) for a in rows)
        c = tuple(axis_value(run, a) for a in cols)
        row_keys += [r] if r not in row_keys else []
        col_keys += [c] if c not in col_keys else []
        for pattern in patterns:
            hit = first_match(run["metrics"], pattern)
            if hit is not None:
                labels[pattern].add(hit[0])
                cells.setdefault((r, c, pattern), []).append(float(hit[1]))
    names = {p: next(iter(k)) if len(k) == 1 else p for p, k in labels.items()}
    return {"row_keys": row_keys, "col_keys": col_keys, "metrics": patterns, "cells": cells, "labels": names}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def _cell(values: list[float] | None, pm: str, digits: int, wrap: Callable[[str], str] = str) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "nan"
    text = f"{mean:.{digits}g}" + ("" if std is None else f"{pm}{std:.2g}")
    return wrap(text)


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
    counts = sorted({len(v) for v in table["cells"].values()})
    note = f"mean ± std over {'/'.join(map(str, counts))} runs per cell" if counts != [1] else "one run per cell"
    if fmt == "latex":
        return _latex(table, rows, columns, digits, note)
    header = [" / ".join(rows) or "run"] + [h for _, _, h in columns]
    body = [
        [" / ".join(r) or "all"] + [_cell(table["cells"].get((r, c, p)), " ± ", digits) for c, p, _ in columns]
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
    for r in table["row_keys"]:
        cells = [_cell(table["cells"].get((r, c, p)), r" \pm ", digits, lambda s: f"${s}$") for c, p, _ in columns]
        lines.append(" & ".join([esc(" / ".join(r)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% {note}"]
    return "\n".join(lines)


def _csv_long(table: dict[str, Any], rows: list[str], cols: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*rows, *cols, "metric", "mean", "std", "n"])
    for (r, c, pattern), values in table["cells"].items():
        mean, std = mean_std(values)
        writer.writerow([*r, *c, table["labels"][pattern], repr(mean), "" if std is None else repr(std), len(values)])
    return out.getvalue().rstrip("\n")


def render_per_run(runs: list[Run], patterns: list[str], fmt: str) -> str:
    """The one-row-per-run table in the requested format."""
    if fmt == "markdown":
        return markdown(runs, patterns)
    header, _, rows = per_run_rows(runs, patterns)
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *rows])
        return out.getvalue().rstrip("\n")
    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows] + [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines).replace("_", r"\_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, nargs="?", help="a multirun directory (or any tree of run dirs)")
    parser.add_argument("--metrics", "--metric", nargs="+", default=["train/loss", "val/bpd@*"])
    parser.add_argument("--rows", nargs="+", default=[], help="axes of the rows (pivot table)")
    parser.add_argument("--cols", nargs="+", default=[], help="axes of the columns (pivot table)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    parser.add_argument("--digits", type=int, default=4, help="significant digits of the means")
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
    args = parser.parse_args(argv)
    if args.wandb:
        runs = load_wandb_runs(args.wandb, args.group)
    elif args.sweep_dir is not None and args.wandb_offline:
        runs = load_wandb_offline_runs(args.sweep_dir, args.group)
    elif args.sweep_dir is not None:
        runs = load_runs(args.sweep_dir)
    else:
        parser.error("give a sweep directory or --wandb ENTITY/PROJECT")
    runs = select_job_type(runs, args.job_type)
    if args.rows or args.cols:
        table = pivot(runs, args.rows, args.cols, args.metrics)
        print(render_pivot(table, args.rows, args.cols, args.format, args.digits))
    else:
        print(render_per_run(runs, args.metrics, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
