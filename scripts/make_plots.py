"""Plots of a sweep, one line per value of an ablation axis, written as PNG.

    python scripts/make_plots.py multirun/weighting/<date> --by weighting
    python scripts/make_plots.py multirun/weighting --by weighting,seed --step-metric val/fd_digits@500_nfe50
    python scripts/make_plots.py multirun/sampler_nfe --by sampler --metric 'val/fd_digits@*'

From the run directories under the sweep (each with ``summary.json``; see scripts/make_table.py):

- ``metric_vs_step.png``: ``--step-metric`` (default ``train/loss``) against the training step, from each
  run's ``csv/metrics.csv`` (smoothed by a running mean over ``--smooth`` logged points), mean over the runs
  (seeds) that share the axis value;
- ``loss_vs_logsnr.png``: the training loss per log-SNR bucket (``train/loss_by_logsnr/<bucket>``, logged by
  the module; edges ``LOG_SNR_EDGES``), averaged over the last ``--tail`` logged points of each run: where
  along λ the objective spends its loss (Kingma & Gao 2023 plot the weighted loss against λ);
- ``metric_vs_nfe.png``: a sample metric (``--metric``) against the NFE of runs that record ``nfe``
  (``scripts/sampler_nfe.py``), log-scaled.

A line is the mean over the runs (seeds) that share its axis value, with a band of ± one standard error, and its
legend gives n; runs of one line (or one NFE point) that differ in another group or override are refused unless
``--average-over AXIS`` pools them (said in the title). An axis (``--by``) or ``--metric`` that no run has, or a
``--step-metric`` that no run's CSV has, is an error listing the valid ones; runs without the data are named in a
warning on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import matplotlib.pyplot as plt

from diffusion_lab.plots import logsnr_profile, plot_band, plot_loss_vs_logsnr, read_metrics_csv, save

_spec = importlib.util.spec_from_file_location("make_table", Path(__file__).resolve().parent / "make_table.py")
assert _spec is not None and _spec.loader is not None
make_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_table)


Run = dict[str, Any]
Stat: TypeAlias = Any  # make_table.Stat (mean, sem, std, n); make_table is loaded from its path, so untyped here
HINT = "add it to --by (a,b), or average over it explicitly with --average-over AXIS (stated in the title)"


def line_value(run: Run, by: str) -> str:
    """The run's value on the line axis ``by``; several axes joined (``--by weighting,parameterization``)."""
    return "/".join(make_table.axis_value(run, axis) for axis in by.split(","))


def legend(by: str, value: str, stats: list[Stat]) -> str:
    """``axis=value (n = …)``: the number of runs (seeds) behind the line, a range where it changes along it, and
    at how many points a run was nan/inf (the line has no mean there: it shows nan or inf, i.e. a gap)."""
    ns = sorted({s.n for s in stats})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    bad = sum(1 for s in stats if s.nonfinite)
    return f"{by.replace(',', '/')}={value} (n = {n}" + (f"; nan/inf at {bad} point(s))" if bad else ")")


def _refuse_mixed(groups: list[list[Run]], by: str, average_over: Sequence[str], what: str) -> None:
    """SystemExit when the runs of one line or point differ in an axis other than seed, --by, --average-over."""
    make_table.refuse_mixed(make_table.mixed_axes(groups, [*by.split(","), *average_over]), what, HINT)


def _csv_path(run: Run) -> Path:
    """The run's Lightning CSVLogger file."""
    return Path(run["dir"]) / "csv" / "metrics.csv"


def _warn_lacking(runs: list[Run], kept: list[Run], what: str) -> None:
    """Name on stderr the runs left out of a plot for lacking ``what`` (when some other run has it)."""
    lacking = [str(r["dir"]) for r in runs if all(r is not k for k in kept)]
    if kept and lacking:
        make_table.warn(f"{what} is missing from {len(lacking)} of {len(runs)} runs (no line from them): "
                        + ", ".join(lacking))  # fmt: skip


def step_series(runs: list[Run], metric: str) -> list[tuple[Run, list[tuple[float, float]]]]:
    """Each run's ``(step, metric)`` points from its csv/metrics.csv ([] when no run has a CSV). A metric that no
    CSV has is refused (SystemExit, listing the columns); runs without it are named in a warning."""
    tables = [(run, read_metrics_csv(_csv_path(run))) for run in runs if _csv_path(run).is_file()]
    series = [(run, [(r["step"], r[metric]) for r in rows if metric in r and "step" in r]) for run, rows in tables]
    series = [(run, points) for run, points in series if points]
    if tables and not series:
        columns = sorted({c for _, rows in tables for r in rows for c in r})
        raise SystemExit(f"error: no run's csv/metrics.csv has {metric!r}; its columns: {', '.join(columns)}")
    _warn_lacking(runs, [run for run, _ in series], f"{metric} (csv/metrics.csv)")
    return series


def step_curves(runs: list[Run], by: str, metric: str, smooth: int,
                average_over: Sequence[str] = ()) -> dict[str, dict[float, Stat]]:  # fmt: skip
    """``{axis value: {step: Stat over its runs}}`` of ``metric`` (each run's running mean over ``smooth`` logged
    points) from each run's csv/metrics.csv; a line pools only seeds (and ``average_over``)."""
    per_value: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    members: dict[str, list[Run]] = defaultdict(list)
    for run, points in step_series(runs, metric):
        members[line_value(run, by)].append(run)
        for i, (step, _) in enumerate(points):
            window = [v for _, v in points[max(0, i - smooth + 1) : i + 1]]
            per_value[line_value(run, by)][step].append(sum(window) / len(window))  # nan/inf stay nan/inf
    _refuse_mixed(list(members.values()), by, average_over, "a line of metric_vs_step.png")
    return {k: {s: make_table.summarize(v) for s, v in sorted(c.items())} for k, c in per_value.items()}


def logsnr_curves(runs: list[Run], by: str, tail: int, average_over: Sequence[str] = ()) -> dict[str, dict[str, Stat]]:
    """``{axis value: {bucket: Stat}}``: each run's mean of its last ``tail`` logs per bucket, over the line's runs."""
    profiles: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    members: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        profile = logsnr_profile(read_metrics_csv(_csv_path(run)), tail) if _csv_path(run).is_file() else {}
        members[line_value(run, by)] += [run] if profile else []
        for bucket, loss in profile.items():
            profiles[line_value(run, by)][bucket].append(loss)
    _warn_lacking(runs, [r for m in members.values() for r in m], "train/loss_by_logsnr/* (csv/metrics.csv)")
    _refuse_mixed(list(members.values()), by, average_over, "a line of loss_vs_logsnr.png")
    return {k: {b: make_table.summarize(v) for b, v in p.items()} for k, p in profiles.items()}


def nfe_curves(runs: list[Run], by: str, pattern: str,
               average_over: Sequence[str] = ()) -> tuple[str, dict[str, list[tuple[int, Stat]]]]:  # fmt: skip
    """The metric's key (or pattern) and ``{axis value: [(nfe, Stat)]}`` over runs that record ``nfe``; a point
    pools only seeds (and ``average_over``) and one metric key (one protocol)."""
    points: dict[tuple[str, int], list[tuple[str, float, Run]]] = defaultdict(list)
    for run in runs:
        hit, nfe = make_table.first_match(run["metrics"], pattern), run["metrics"].get("nfe")
        if hit is not None and nfe is not None:
            points[(line_value(run, by), int(nfe))].append((hit[0], float(hit[1]), run))
    _warn_lacking(runs, [r for p in points.values() for _, _, r in p], f"{pattern} with nfe")
    _refuse_mixed([[r for _, _, r in p] for p in points.values()], by, average_over, "a point of metric_vs_nfe.png")
    for (value, nfe), hits in points.items():
        if len({k for k, _, _ in hits}) > 1:
            raise SystemExit(f"error: {pattern} matches {sorted({k for k, _, _ in hits})} at {by}={value}, nfe={nfe}: "
                             "different protocols in one mean; give the metric key itself")  # fmt: skip
    keys = {re.sub(r"_nfe\d+", "", k) for p in points.values() for k, _, _ in p}
    curves: dict[str, list[tuple[int, Stat]]] = defaultdict(list)
    for (value, nfe), hits in sorted(points.items(), key=lambda kv: kv[0][1]):
        curves[value].append((nfe, make_table.summarize([v for _, v, _ in hits])))
    return (next(iter(keys)) if len(keys) == 1 else pattern), dict(curves)


def _subtitle(average_over: Sequence[str], note: str = "") -> str:
    """What a line is: the mean ± s.e. over seeds (and the axes pooled on request); then ``note``, what the plot
    leaves out (started runs without a summary)."""
    extra = f", averaged over {', '.join(average_over)}" if average_over else ""
    return f"mean ± s.e. over seeds{extra}" + (f"\n{note}" if note else "")


def _plot_steps(runs: list[Run], by: str, out: Path, metric: str, smooth: int,
                average_over: Sequence[str], note: str = "") -> Path | None:  # fmt: skip
    """metric_vs_step.png (None without CSVs)."""
    curves = step_curves(runs, by, metric, smooth, average_over)
    if not curves:
        make_table.warn("no run has csv/metrics.csv: metric_vs_step.png not written")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, curve in curves.items():
        stats = list(curve.values())
        plot_band(ax, list(curve), [s.mean for s in stats], [s.sem for s in stats], legend(by, value, stats))
    title = f"{metric} by {by}\n{_subtitle(average_over, note)}"
    ax.set(xlabel="training step", ylabel=metric, yscale="log", title=title)
    ax.legend()
    return save(fig, out / "metric_vs_step.png")


def _plot_logsnr(runs: list[Run], by: str, out: Path, tail: int, average_over: Sequence[str],
                 note: str = "") -> Path | None:  # fmt: skip
    """loss_vs_logsnr.png (None when no run logs log-SNR buckets)."""
    curves = logsnr_curves(runs, by, tail, average_over)
    if not curves:
        return None
    labels = {value: legend(by, value, list(c.values())) for value, c in curves.items()}
    means = {labels[v]: {b: s.mean for b, s in c.items()} for v, c in curves.items()}
    sems = {labels[v]: {b: s.sem for b, s in c.items()} for v, c in curves.items()}
    title = f"loss vs log-SNR (last {tail} logs) by {by}\n{_subtitle(average_over, note)}"
    return plot_loss_vs_logsnr(means, out / "loss_vs_logsnr.png", title, sems)


def _plot_nfe(runs: list[Run], by: str, out: Path, metric: str, average_over: Sequence[str], note: str = "") -> Path:
    """metric_vs_nfe.png; SystemExit when no run with the metric records its NFE."""
    label, curves = nfe_curves(runs, by, metric, average_over)
    if not curves:
        raise SystemExit(f"error: no run with {metric} records nfe: metric_vs_nfe.png needs sampler runs "
                         "(scripts/sampler_nfe.py)")  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, pts in curves.items():
        stats = [s for _, s in pts]
        plot_band(ax, [n for n, _ in pts], [s.mean for s in stats], [s.sem for s in stats],
                  legend(by, value, stats), marker="o")  # fmt: skip
    ax.set(xlabel="NFE (denoiser calls per sample)", ylabel=label, xscale="log", yscale="log",
           title=f"{label} vs NFE\n{_subtitle(average_over, note)}")  # fmt: skip
    ax.legend()
    return save(fig, out / "metric_vs_nfe.png")


def plot_all(sweep_dir: Path, by: str, out: Path, metric: str | None, step_metric: str, smooth: int, tail: int,
             average_over: Sequence[str] = ()) -> list[Path]:  # fmt: skip
    """Write every plot the sweep has data for; returns the PNG paths. An axis or metric no run has is refused
    (SystemExit) with the valid list; a line pools only runs that differ in ``seed`` (and ``average_over``)."""
    sweep = make_table.read_sweep(sweep_dir)
    runs, note = sweep.runs, sweep.note().replace("the table", "the plot")
    make_table.check_axes(runs, [*by.split(","), *average_over])
    if metric is not None:
        make_table.check_metrics(runs, [metric])
    written = [_plot_steps(runs, by, out, step_metric, smooth, average_over, note),
               _plot_logsnr(runs, by, out, tail, average_over, note),
               _plot_nfe(runs, by, out, metric, average_over, note) if metric is not None else None]  # fmt: skip
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--by", required=True, help="the axis with one line per value (schedule, sampler, …): a or a,b")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: <sweep_dir>/plots)")
    parser.add_argument("--metric", help="sample metric for metric_vs_nfe.png, e.g. 'val/fd_digits@*'")
    parser.add_argument("--step-metric", default="train/loss")
    parser.add_argument("--smooth", type=make_table.int_in("--smooth", 1), default=5,
                        help="running mean over this many logged points (>= 1; 1: no smoothing)")  # fmt: skip
    parser.add_argument("--tail", type=make_table.int_in("--tail", 1), default=10,
                        help="logged points per run for loss vs log-SNR (>= 1)")  # fmt: skip
    parser.add_argument(
        "--average-over",
        nargs="+",
        default=[],
        metavar="AXIS",
        help="pool the runs of a line across these axes too (besides seed); said in the title",
    )
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dir / "plots"
    paths = plot_all(args.sweep_dir, args.by, out, args.metric, args.step_metric, args.smooth, args.tail,
                     args.average_over)  # fmt: skip
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
