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
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from diffusion_lab.plots import logsnr_profile, plot_loss_vs_logsnr, read_metrics_csv, save

_spec = importlib.util.spec_from_file_location("make_table", Path(__file__).resolve().parent / "make_table.py")
assert _spec is not None and _spec.loader is not None
make_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_table)


def line_value(run: dict[str, Any], by: str) -> str:
    """The run's value on the line axis ``by``; several axes joined (``--by weighting,parameterization``)."""
    return "/".join(make_table.axis_value(run, axis) for axis in by.split(","))


def step_curves(runs: list[dict[str, Any]], by: str, metric: str, smooth: int) -> dict[str, dict[float, float]]:
    """``{axis value: {step: mean over its runs}}`` of ``metric`` from each run's csv/metrics.csv."""
    per_value: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        path = Path(run["dir"]) / "csv" / "metrics.csv"
        if not path.is_file():
            continue
        points = [(r["step"], r[metric]) for r in read_metrics_csv(path) if metric in r and "step" in r]
        for i, (step, _) in enumerate(points):
            window = [v for _, v in points[max(0, i - smooth + 1) : i + 1]]
            per_value[line_value(run, by)][step].append(statistics.fmean(window))
    return {k: {s: statistics.fmean(v) for s, v in sorted(c.items())} for k, c in per_value.items()}


def logsnr_curves(runs: list[dict[str, Any]], by: str, tail: int) -> dict[str, dict[str, float]]:
    """``{axis value: {bucket: mean loss}}``: each run's last ``tail`` logs per bucket, averaged over the runs."""
    profiles: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        path = Path(run["dir"]) / "csv" / "metrics.csv"
        if path.is_file():
            for bucket, loss in logsnr_profile(read_metrics_csv(path), tail).items():
                profiles[line_value(run, by)][bucket].append(loss)
    return {k: {b: statistics.fmean(v) for b, v in p.items()} for k, p in profiles.items()}


def nfe_curves(runs: list[dict[str, Any]], by: str, pattern: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """The metric's key (or pattern) and ``{axis value: [(nfe, mean metric)]}`` over runs that record ``nfe``."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    keys = set()
    for run in runs:
        hit = make_table.first_match(run["metrics"], pattern)
        nfe = run["metrics"].get("nfe")
        if hit is None or nfe is None:
            continue
        keys.add(re.sub(r"_nfe\d+", "", hit[0]))
        points[line_value(run, by)][int(nfe)].append(float(hit[1]))
    label = next(iter(keys)) if len(keys) == 1 else pattern
    return label, {k: sorted((n, statistics.fmean(v)) for n, v in c.items()) for k, c in points.items()}


def plot_all(sweep_dir: Path, by: str, out: Path, metric: str | None, step_metric: str, smooth: int,
             tail: int) -> list[Path]:  # fmt: skip
    """Write every plot the sweep has data for; returns the PNG paths."""
    runs = make_table.load_runs(sweep_dir)
    written = []
    curves = step_curves(runs, by, step_metric, smooth)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for value, curve in curves.items():
            ax.plot(list(curve), list(curve.values()), label=f"{by.replace(',', '/')}={value}")
        ax.set(xlabel="training step", ylabel=step_metric, yscale="log", title=f"{step_metric} by {by}")
        ax.legend()
        written.append(save(fig, out / "metric_vs_step.png"))
    by_logsnr = logsnr_curves(runs, by, tail)
    if by_logsnr:
        profiles = {f"{by.replace(',', '/')}={value}": profile for value, profile in by_logsnr.items()}
        title = f"loss vs log-SNR (last {tail} logs) by {by}"
        written.append(plot_loss_vs_logsnr(profiles, out / "loss_vs_logsnr.png", title))
    if metric is not None:
        label, by_nfe = nfe_curves(runs, by, metric)
        if by_nfe:
            fig, ax = plt.subplots(figsize=(6, 4))
            for value, pts in by_nfe.items():
                ax.plot([n for n, _ in pts], [m for _, m in pts], marker="o", label=f"{by.replace(',', '/')}={value}")
            ax.set(xlabel="NFE (denoiser calls per sample)", ylabel=label, xscale="log", yscale="log",
                   title=f"{label} vs NFE")  # fmt: skip
            ax.legend()
            written.append(save(fig, out / "metric_vs_nfe.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--by", required=True, help="the axis with one line per value (schedule, sampler, …): a or a,b")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: <sweep_dir>/plots)")
    parser.add_argument("--metric", help="sample metric for metric_vs_nfe.png, e.g. 'val/fd_digits@*'")
    parser.add_argument("--step-metric", default="train/loss")
    parser.add_argument("--smooth", type=int, default=5, help="running mean over this many logged points")
    parser.add_argument("--tail", type=int, default=10, help="logged points per run for loss vs log-SNR")
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dir / "plots"
    for path in plot_all(args.sweep_dir, args.by, out, args.metric, args.step_metric, args.smooth, args.tail):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
