"""Plot every loss weighting as an effective weight per unit λ (the view of Kingma & Gao 2023).

Under uniform ``t`` on a schedule, an ordinary weighting ``w`` puts weight ``w(λ)·(dt/dλ) = w(λ)/(−λ'(t(λ)))``
on each unit of ``λ``; a density weighting (``Weighting.density``) is already per unit λ, ``½·w(λ)``.
Left panel: these curves on the continuous cosine schedule, each normalised to max 1. Right panel: the
multiplier of the ε-MSE at a uniformly drawn ``t``, i.e. ``Weighting.factor`` (``w(λ)``, or ``½·w(λ)·(−λ')``).

    .venv/bin/python scripts/plot_weightings.py [--out docs/weightings.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from diffusion_lab.diffusion.schedules import CosineSchedule
from diffusion_lab.diffusion.weightings import (
    EDMWeighting,
    ELBOWeighting,
    EpsMSEWeighting,
    MinSNRWeighting,
    P2Weighting,
    SigmoidWeighting,
    TruncatedSNRWeighting,
    VMSEWeighting,
    Weighting,
    X0MSEWeighting,
)

WEIGHTINGS: list[tuple[str, Weighting]] = [
    ("eps_mse", EpsMSEWeighting()),
    ("x0_mse", X0MSEWeighting()),
    ("v_mse", VMSEWeighting()),
    ("truncated_snr", TruncatedSNRWeighting()),
    ("min_snr (γ=5)", MinSNRWeighting(5.0)),
    ("p2 (γ=1, k=1)", P2Weighting(1.0, 1.0)),
    ("elbo", ELBOWeighting()),
    ("edm", EDMWeighting()),
    ("sigmoid (b=2)", SigmoidWeighting(2.0)),
]


def curves(lam: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weighting: (effective weight per unit λ, normalised to max 1; multiplier of the ε-MSE at uniform t)."""
    schedule = CosineSchedule(discrete=False)
    t = schedule.t_from_log_snr(lam)
    # −dλ/dt at t(λ) by central differences (float64; exact within each segment of the β-grid interpolation,
    # and it avoids torch.func's slow first call so the script stays fast).
    h = 1e-7
    rate = -(schedule.log_snr(t + h) - schedule.log_snr(t - h)) / (2 * h)
    out = {}
    for label, weighting in WEIGHTINGS:
        w = weighting(lam)
        per_lam = 0.5 * w if weighting.density else w / rate
        multiplier = 0.5 * w * rate if weighting.density else w
        out[label] = (per_lam / per_lam.max(), multiplier)
    return out


def plot(out: Path) -> None:
    """Write the two-panel figure to ``out``."""
    lam = torch.linspace(-12.0, 12.0, 481, dtype=torch.float64)
    fig, (ax_lam, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles = ["-", "--", "-.", ":"]
    for k, (label, (per_lam, multiplier)) in enumerate(curves(lam).items()):
        style = styles[k % len(styles)]
        ax_lam.plot(lam, per_lam, style, label=label, lw=1.6)
        ax_t.plot(lam, multiplier, style, label=label, lw=1.6)
    ax_lam.set(
        yscale="log",
        ylim=(1e-4, 2.0),
        xlabel="log-SNR λ",
        ylabel="weight per unit λ (max = 1)",
        title="Effective weight per unit λ, uniform t, cosine schedule",
    )
    ax_t.set(
        yscale="log",
        ylim=(1e-4, 1e5),
        xlabel="log-SNR λ",
        ylabel="multiplier of the ε-MSE",
        title="factor(t): w(λ), or ½·w(λ)·(−dλ/dt) for per-λ weightings",
    )
    for ax in (ax_lam, ax_t):
        ax.grid(True, which="major", alpha=0.3)
        ax.title.set_fontsize(10)
    ax_lam.legend(fontsize=8, loc="lower center", ncol=3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot the loss weightings per unit λ.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "weightings.png")
    args = parser.parse_args()
    plot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
