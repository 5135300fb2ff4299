"""Turn a Hydra multirun directory into a Markdown table: one row per run, its overrides and metrics.

    python scripts/make_table.py multirun/digits/<date> --metrics train/loss 'val/bpd@*' 'val/fd_digits@*'

Each job directory holds ``.hydra/overrides.yaml`` (the swept values) and ``metrics.json`` (written by
``dlab-train``). A metric pattern may use ``*`` to match the protocol suffix (sample count, NFE).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """``[{"overrides": {key: value}, "metrics": {...}, "dir": path}]`` for every finished job."""
    runs = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_path.parent
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        runs.append({"overrides": pairs, "metrics": json.loads(metrics_path.read_text()), "dir": job})
    if not runs:
        raise SystemExit(f"no */metrics.json under {sweep_dir}: is it a finished multirun directory?")
    return runs


def select(metrics: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """Metric keys matching the patterns, in pattern order."""
    out = {}
    for pattern in patterns:
        for key in sorted(metrics):
            if fnmatch.fnmatchcase(key, pattern) and isinstance(metrics[key], int | float):
                out[key] = metrics[key]
    return out


def markdown(runs: list[dict[str, Any]], patterns: list[str]) -> str:
    """A Markdown table: the swept keys that vary as the first columns, then every selected metric.

    Overrides shared by every run are listed once, above the table."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    values = {k: {r["overrides"].get(k, "") for r in runs} for k in keys}
    axes = [k for k in keys if len(values[k]) > 1 or len(runs) == 1]
    fixed = [f"`{k}={next(iter(values[k]))}`" for k in keys if k not in axes]
    columns = sorted({k for r in runs for k in select(r["metrics"], patterns)}, key=_pattern_order(patterns))
    lines = [f"Every run: {' '.join(fixed)}", ""] if fixed else []
    lines += ["| " + " | ".join(axes + columns) + " |", "|" + "---|" * (len(axes) + len(columns))]
    for run in runs:
        chosen = select(run["metrics"], patterns)
        cells = [run["overrides"].get(a, "") for a in axes] + [_fmt(chosen.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pattern_order(patterns: list[str]) -> Any:
    return lambda key: next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(key, p))


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metrics", nargs="+", default=["train/loss", "val/bpd@*"])
    args = parser.parse_args(argv)
    print(markdown(load_runs(args.sweep_dir), args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
