"""Plots of a run's logged metrics (matplotlib, Agg): shared by ``dlab-train`` (the loss-vs-log-SNR plot it
writes next to its checkpoints and attaches to the W&B run) and ``scripts/make_plots.py`` (one line per ablation
value over a sweep).

The module logs the mean training loss per log-SNR bucket as ``train/loss_by_logsnr/<bucket>`` (edges
``diffusion_lab.module.LOG_SNR_EDGES``): where along λ the objective spends its loss, the view of Kingma & Gao
2023 (their Fig. 2 plots the weighted loss against λ).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BUCKET_PREFIX = "train/loss_by_logsnr/"


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a Lightning CSVLogger ``metrics.csv`` as ``{column: value}``, empty cells dropped."""
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def bucket_order(name: str) -> float:
    """Sort key of a bucket name ``<-10``, ``[-10,-5)``, …, ``>=10``: its lower edge."""
    if name.startswith("<"):
        return -math.inf
    numbers = re.findall(r"-?\d+(?:\.\d+)?", name)
    return float(numbers[0]) if numbers else math.inf


def logsnr_profile(rows: Sequence[Mapping[str, float]], tail: int) -> dict[str, float]:
    """``{bucket: mean of its last tail logged values}`` in increasing λ (noisy → clean)."""
    names = {c for r in rows for c in r if c.startswith(BUCKET_PREFIX)}
    columns = sorted(names, key=lambda c: bucket_order(c.removeprefix(BUCKET_PREFIX)))
    return {c.removeprefix(BUCKET_PREFIX): statistics.fmean([r[c] for r in rows if c in r][-tail:]) for c in columns}


def plot_band(ax: Any, xs: Sequence[float], means: Sequence[float], sems: Sequence[float | None], label: str,
              marker: str | None = None) -> None:  # fmt: skip
    """One line through (x, mean) with a shaded band mean ± s.e. where the s.e. is known (n > 1)."""
    (line,) = ax.plot(xs, means, marker=marker, label=label)
    if any(s is not None for s in sems):
        lo = [m - (s or 0.0) for m, s in zip(means, sems, strict=True)]
        hi = [m + (s or 0.0) for m, s in zip(means, sems, strict=True)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)


def plot_loss_vs_logsnr(profiles: Mapping[str, Mapping[str, float]], path: Path, title: str,
                        sems: Mapping[str, Mapping[str, float | None]] | None = None) -> Path:  # fmt: skip
    """One line per profile (label → ``{bucket: loss}``) on a shared, λ-ordered bucket axis; log-scaled loss.
    With ``sems`` (label → ``{bucket: standard error}``) each line carries a band of ± one s.e."""
    buckets = sorted({b for p in profiles.values() for b in p}, key=bucket_order)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, profile in profiles.items():
        band = [(sems or {}).get(label, {}).get(b) for b in buckets]
        plot_band(ax, range(len(buckets)), [profile.get(b, math.nan) for b in buckets], band, label, marker="o")
    ax.set_xticks(range(len(buckets)), buckets, rotation=30)
    ax.set(xlabel="log-SNR λ bucket (noisy → clean)", ylabel="training loss", yscale="log", title=title)
    if len(profiles) > 1:
        ax.legend()
    return save(fig, path)


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_loss_vs_logsnr(run_dir: Path, tail: int = 10) -> Path | None:
    """``<run_dir>/loss_vs_logsnr.png`` from the run's ``csv/metrics.csv`` (None without CSV or bucket logs)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    profile = logsnr_profile(read_metrics_csv(path), tail)
    if not profile:
        return None
    return plot_loss_vs_logsnr({run_dir.name: profile}, run_dir / "loss_vs_logsnr.png",
                               f"training loss vs log-SNR (last {tail} logs)")  # fmt: skip
