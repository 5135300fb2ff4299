"""Sampler error vs NFE on a 2-D Gaussian mixture with its exact denoiser: ours and diffusers' schedulers.

    .venv/bin/python benchmarks/sampler_quality.py            # ~20 minutes on 2 CPU cores shared with other jobs
    .venv/bin/python benchmarks/sampler_quality.py --num-samples 2048 --nfe 5 10 20

Every sampler starts from the same noise ``x_T`` on the same model: DDPM's linear β schedule (T = 1000)
with the exact Bayes denoiser of the mixture, so sampling error is the solver's alone. Two errors per
(sampler, NFE budget):

- ``path_error``: mean ``‖x_sampler − x_ref‖`` over the batch, where ``x_ref`` is the probability-flow
  ODE solution from the same ``x_T`` (deterministic samplers only). The reference integrates the ODE in
  EDM's form ``dx̂/dσ = (x̂ − D(x̂; σ))/σ`` on ``x̂ = x/α``, ``σ = σ_t/α_t`` (Karras et al. 2022 eq. 3)
  with scipy's RK45 at rtol = atol = 1e-9, a form that depends on the noise levels only, not on how
  either library parameterises time.
- ``energy_distance`` of the samples to as many fresh samples of the true mixture (Székely's energy
  distance; 0 for equal distributions; the floor from finite samples is reported as ``floor``).

NFE is the number of denoiser calls per trajectory. diffusers' schedulers use ``timestep_spacing=
"trailing"`` (start at the last training step, like ours) and their defaults otherwise; Heun's NFE is
``2·steps − 1``, so it runs the largest step count within the budget. Results: JSON (``--out``) and a
plot (``--plot``); the goal is that our best sampler at each NFE at least matches the best peer.
``vs_diffusers_unipc`` in the JSON: per NFE, our best path error over diffusers' best UniPC (any of its grids).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

import diffusion_lab.samplers as samplers_module
from diffusion_lab.diffusion import Denoiser, EpsParameterization, LinearSchedule
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.metrics.toy2d import energy_distance
from diffusion_lab.samplers import Sampler

NFES = (5, 10, 20, 50, 100)
T = 1000


def ring_mixture(num_modes: int = 8, radius: float = 0.8, std: float = 0.08) -> GaussianMixture:
    """``num_modes`` equal isotropic Gaussians on a circle, inside ``[−1, 1]²``."""
    angle = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(
        torch.full((num_modes,), 1 / num_modes, dtype=torch.float64),
        means,
        torch.full((num_modes,), std, dtype=torch.float64),
    )


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def reference_solution(mixture: GaussianMixture, x_T: Tensor, sigma_max: float, sigma_end: float = 1e-6) -> Tensor:
    """PF-ODE endpoint from ``x_T`` (at ``σ = sigma_max``, VP scaling), float64, by RK45 in ``σ``."""
    n, d = x_T.shape

    def denoise(x_hat: Tensor, sigma: float) -> Tensor:
        alpha = 1 / math.sqrt(1 + sigma**2)
        a, s = torch.full((n,), alpha, dtype=torch.float64), torch.full((n,), sigma * alpha, dtype=torch.float64)
        return mixture.denoise(alpha * x_hat, a, s)

    def rhs(sigma: float, y: np.ndarray) -> np.ndarray:
        x_hat = torch.from_numpy(y).view(n, d)
        return ((x_hat - denoise(x_hat, sigma)) / sigma).reshape(-1).numpy()

    x_hat0 = (x_T.double() * math.sqrt(1 + sigma_max**2)).reshape(-1).numpy()
    sol = solve_ivp(rhs, (sigma_max, sigma_end), x_hat0, method="RK45", rtol=1e-9, atol=1e-9)
    x_hat = torch.from_numpy(sol.y[:, -1]).view(n, d)
    return denoise(x_hat, sigma_end)  # the remaining O(σ_end²) step, taken exactly


# ------------------------------------------------------------------------------------------ diffusers side


def diffusers_samplers() -> dict[str, tuple[Callable[..., Any], Callable[[int], int]]]:
    """name → (scheduler factory, steps for an NFE budget)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return {
        "diffusers/ddim": (lambda: DDIMScheduler(**common, timestep_spacing="trailing"), lambda nfe: nfe),
        "diffusers/dpmsolver++2m": (
            lambda: DPMSolverMultistepScheduler(**common, timestep_spacing="trailing"),
            lambda nfe: nfe,
        ),
        "diffusers/unipc": (lambda: UniPCMultistepScheduler(**common, timestep_spacing="trailing"), lambda nfe: nfe),
        "diffusers/euler": (lambda: EulerDiscreteScheduler(**common, timestep_spacing="trailing"), lambda nfe: nfe),
        "diffusers/heun": (
            lambda: HeunDiscreteScheduler(**common, timestep_spacing="trailing"),
            lambda nfe: (nfe + 1) // 2,
        ),
        # The same solvers on the σ-grids ours use (diffusers rounds their timesteps for the network call).
        "diffusers/dpmsolver++2m lu_lambdas": (
            lambda: DPMSolverMultistepScheduler(**common, use_lu_lambdas=True),
            lambda nfe: nfe,
        ),
        "diffusers/unipc karras": (lambda: UniPCMultistepScheduler(**common, use_karras_sigmas=True), lambda nfe: nfe),
        # UniPC on log-uniform σ (= our log_snr grid), orders 2 (default) and 3; bh1 is NaN on the step to σ = 0 in
        # diffusers 0.42 (B(h) = −∞ times a zero residual, tests/samplers/test_unipc.py), so only bh2 runs.
        "diffusers/unipc exponential": (
            lambda: UniPCMultistepScheduler(**common, use_exponential_sigmas=True),
            lambda nfe: nfe,
        ),
        "diffusers/unipc-3 exponential": (
            lambda: UniPCMultistepScheduler(**common, use_exponential_sigmas=True, solver_order=3),
            lambda nfe: nfe,
        ),
        "diffusers/euler karras": (lambda: EulerDiscreteScheduler(**common, use_karras_sigmas=True), lambda nfe: nfe),
        "diffusers/heun karras": (
            lambda: HeunDiscreteScheduler(**common, use_karras_sigmas=True),
            lambda nfe: (nfe + 1) // 2,
        ),
    }


def run_diffusers(make: Callable[[], Any], steps: int, mixture: GaussianMixture, z: Tensor) -> tuple[Tensor, int]:
    """Sample with a diffusers scheduler on the exact ε-prediction model; returns ``(x0, nfe)``."""
    scheduler = make()
    scheduler.set_timesteps(steps)
    alpha_bar = scheduler.alphas_cumprod.double()
    log_sigmas = sigma_from_alpha_bar(alpha_bar).log().numpy()
    x = z.float() * float(scheduler.init_noise_sigma)
    nfe = 0
    for timestep in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, timestep)
        # The noise level of a (possibly fractional) timestep, interpolated as diffusers does (log σ, linear).
        sigma_e = float(np.exp(np.interp(float(timestep), np.arange(T), log_sigmas)))
        alpha = 1 / math.sqrt(1 + sigma_e**2)
        n = model_in.shape[0]
        x_t = model_in.double()
        x0 = mixture.denoise(
            x_t, torch.full((n,), alpha, dtype=torch.float64), torch.full((n,), sigma_e * alpha, dtype=torch.float64)
        )
        eps = (x_t - alpha * x0) / (sigma_e * alpha)
        nfe += 1
        x = scheduler.step(eps.float(), timestep, x).prev_sample
    return x.double(), nfe


# ------------------------------------------------------------------------------------------------ ours


# Our samplers, and their settings (each at the NFE budget: steps × evaluations per step ≤ NFE).
OURS: dict[str, tuple[str, dict[str, Any], Callable[[int], int], bool]] = {
    # name: (registry name, kwargs, steps for an NFE budget, deterministic)
    "ours/ddim": ("ddim", {"grid": "trailing"}, lambda nfe: nfe, True),
    "ours/ddpm": ("ddpm", {"grid": "trailing"}, lambda nfe: nfe, False),
    "ours/euler": ("euler", {"grid": "karras"}, lambda nfe: nfe, True),
    "ours/heun": ("heun", {"grid": "karras"}, lambda nfe: (nfe + 1) // 2, True),
    "ours/dpm_solver++2m": ("dpm_solver", {"grid": "log_snr", "order": 2}, lambda nfe: nfe, True),
    "ours/dpm_solver++2m karras": ("dpm_solver", {"grid": "karras", "order": 2}, lambda nfe: nfe, True),
    "ours/dpm_solver++2m trailing": ("dpm_solver", {"grid": "trailing", "order": 2}, lambda nfe: nfe, True),
    "ours/dpm_solver++3m": ("dpm_solver", {"grid": "log_snr", "order": 3}, lambda nfe: nfe, True),
    "ours/dpm_solver++2s": (
        "dpm_solver",
        {"grid": "log_snr", "order": 2, "method": "singlestep"},
        lambda nfe: nfe,
        True,
    ),
    "ours/euler_maruyama": ("euler_maruyama", {"grid": "trailing"}, lambda nfe: nfe, False),
    # UniPC (bh2, order 2 = diffusers' default) on the grids, UniP-3 with bh1, and UniC after our exact 3M.
    "ours/unipc": ("unipc", {"grid": "trailing"}, lambda nfe: nfe, True),
    "ours/unipc log_snr": ("unipc", {"grid": "log_snr"}, lambda nfe: nfe, True),
    "ours/unipc karras": ("unipc", {"grid": "karras"}, lambda nfe: nfe, True),
    "ours/unipc time_power": ("unipc", {"grid": "time_power"}, lambda nfe: nfe, True),
    "ours/unipc time_power rho=3": ("unipc", {"grid": "time_power", "rho": 3.0}, lambda nfe: nfe, True),
    "ours/unipc-3 bh1 log_snr": ("unipc", {"grid": "log_snr", "order": 3, "variant": "bh1"}, lambda nfe: nfe, True),
    "ours/unipc-3 bh1 time_power": (
        "unipc",
        {"grid": "time_power", "order": 3, "variant": "bh1"},
        lambda nfe: nfe,
        True,
    ),
    "ours/dpm_solver++3m+unic log_snr": (
        "unipc",
        {"grid": "log_snr", "order": 3, "predictor": "dpm_solver"},
        lambda nfe: nfe,
        True,
    ),
    "ours/dpm_solver++2m time_power rho=3": ("dpm_solver", {"grid": "time_power", "rho": 3.0}, lambda nfe: nfe, True),
}


def our_registry() -> dict[str, type[Sampler]]:
    """Every sampler class exported by :mod:`diffusion_lab.samplers`, by its ``name``."""
    classes = (getattr(samplers_module, n) for n in dir(samplers_module))
    return {c.name: c for c in classes if isinstance(c, type) and issubclass(c, Sampler) and hasattr(c, "name")}


def run_ours(
    name: str, kwargs: dict[str, Any], steps: int, denoiser: Denoiser, z: Tensor, seed: int
) -> tuple[Tensor, int]:
    sampler = our_registry()[name](steps=steps, clip_x0=None, **kwargs)
    sigma_1 = float(denoiser.schedule.alpha_sigma(torch.ones((), dtype=torch.float64))[1])
    out = sampler.sample(denoiser, sigma_1 * z.float(), generator=torch.Generator().manual_seed(seed))
    return out.x0.double(), out.nfe


# --------------------------------------------------------------------------------------------------- run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampler_quality.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/sampler_quality.png"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    mixture = ring_mixture()
    schedule = LinearSchedule(num_timesteps=T)
    param = EpsParameterization()
    denoiser = Denoiser(OracleNetwork(mixture, schedule, param), schedule, param)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.num_samples, 2, generator=g, dtype=torch.float64)
    truth = mixture.sample(args.num_samples, g)
    # Two independent samples of the mixture are this far apart on average (the estimate's own noise level).
    n = args.num_samples
    pairs = [energy_distance(mixture.sample(n, g), mixture.sample(n, g)) for _ in range(8)]
    floor, floor_std = float(np.mean(pairs)), float(np.std(pairs))
    sigma_max = float(sigma_from_alpha_bar(schedule.alpha_sigma(torch.ones((), dtype=torch.float64))[0] ** 2))
    start = time.perf_counter()
    x_ref = reference_solution(mixture, z, sigma_max)
    reference = {"energy_distance": energy_distance(x_ref, truth), "seconds": time.perf_counter() - start}

    rows: list[dict[str, Any]] = []
    registry = our_registry()
    available = {k: v for k, v in OURS.items() if v[0] in registry}
    missing = sorted(set(OURS) - set(available))
    peers = diffusers_samplers()
    for nfe_budget in args.nfe:
        for label, (reg, kwargs, steps_for, deterministic) in available.items():
            steps = steps_for(nfe_budget)
            if steps < 1:
                continue
            x, nfe = run_ours(reg, kwargs, steps, denoiser, z, args.seed)
            rows.append(_row(label, "ours", nfe_budget, steps, nfe, x, x_ref, truth, deterministic))
        for label, (make, steps_for) in peers.items():
            steps = steps_for(nfe_budget)
            x, nfe = run_diffusers(make, steps, mixture, z)
            rows.append(_row(label, "diffusers", nfe_budget, steps, nfe, x, x_ref, truth, True))
        _print_budget(rows, nfe_budget)

    result = {
        "benchmark": "sampler_quality",
        "data": "8-mode ring mixture in 2-D (radius 0.8, std 0.08), exact Bayes denoiser, linear β T=1000",
        "num_samples": args.num_samples,
        "seed": args.seed,
        "energy_distance_floor": floor,
        "energy_distance_floor_std": floor_std,
        "reference": reference,
        "not_run": missing,
        "host": {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rows": rows,
        "best_per_nfe": _best(rows),
        "vs_diffusers_unipc": _unipc_ratios(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        _plot(rows, floor, args.plot)
    for budget, r in result["vs_diffusers_unipc"].items():
        print(
            f"NFE {budget}: ours best {r['ours_best']['sampler']} / diffusers' best UniPC "
            f"{r['diffusers_unipc_best']['sampler']} = {r['ratio_to_diffusers_unipc']:.2f}"
        )
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _row(
    label: str, library: str, budget: int, steps: int, nfe: int, x: Tensor, x_ref: Tensor, truth: Tensor, det: bool
) -> dict[str, Any]:
    finite = bool(torch.isfinite(x).all())
    path = float((x - x_ref).norm(dim=1).mean()) if det and finite else None
    dist = energy_distance(x, truth) if finite else None
    return {
        "sampler": label,
        "library": library,
        "nfe_budget": budget,
        "steps": steps,
        "nfe": nfe,
        "deterministic": det,
        "path_error": path,
        "energy_distance": dist,
    }


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per NFE budget and library: the sampler with the lowest energy distance and with the lowest path error."""
    best: dict[str, Any] = {}
    for budget in sorted({r["nfe_budget"] for r in rows}):
        entry = {}
        for library in ("ours", "diffusers"):
            mine = [r for r in rows if r["nfe_budget"] == budget and r["library"] == library]
            for key in ("energy_distance", "path_error"):
                scored = [r for r in mine if r[key] is not None]
                if scored:
                    top = min(scored, key=lambda r: r[key])
                    entry[f"{library}_{key}"] = {"sampler": top["sampler"], "value": top[key]}
        best[str(budget)] = entry
    return best


def _unipc_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per NFE budget: our best path error (any deterministic sampler and grid) over diffusers' best UniPC
    (any of its grids), and over diffusers' best overall; the lower the better, < 1 means we lead."""
    out: dict[str, Any] = {}
    for budget in sorted({r["nfe_budget"] for r in rows}):
        scored = [r for r in rows if r["nfe_budget"] == budget and r["path_error"] is not None]
        ours = min((r for r in scored if r["library"] == "ours"), key=lambda r: r["path_error"])
        unipc = min((r for r in scored if r["sampler"].startswith("diffusers/unipc")), key=lambda r: r["path_error"])
        peer = min((r for r in scored if r["library"] == "diffusers"), key=lambda r: r["path_error"])
        out[str(budget)] = {
            "ours_best": {"sampler": ours["sampler"], "path_error": ours["path_error"]},
            "diffusers_unipc_best": {"sampler": unipc["sampler"], "path_error": unipc["path_error"]},
            "diffusers_best": {"sampler": peer["sampler"], "path_error": peer["path_error"]},
            "ratio_to_diffusers_unipc": ours["path_error"] / unipc["path_error"],
            "ratio_to_diffusers_best": ours["path_error"] / peer["path_error"],
        }
    return out


def _print_budget(rows: list[dict[str, Any]], budget: int) -> None:
    print(f"\nNFE ≤ {budget}")
    print(f"  {'sampler':28s} {'nfe':>4s} {'path_error':>11s} {'energy_dist':>11s}")
    for r in (r for r in rows if r["nfe_budget"] == budget):
        path = "-" if r["path_error"] is None else f"{r['path_error']:.2e}"
        dist = "nan" if r["energy_distance"] is None else f"{r['energy_distance']:.2e}"
        print(f"  {r['sampler']:28s} {r['nfe']:4d} {path:>11s} {dist:>11s}")


def _plot(rows: list[dict[str, Any]], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = list(dict.fromkeys(r["sampler"] for r in rows))
    colors = plt.get_cmap("tab20")
    for j, label in enumerate(labels):
        mine = [r for r in rows if r["sampler"] == label]
        style = "-o" if label.startswith("ours") else "--s"
        for ax, key in zip(axes, ("path_error", "energy_distance"), strict=True):
            pts = [(r["nfe"], r[key]) for r in mine if r[key] is not None]
            if pts:
                ax.loglog(*zip(*pts, strict=True), style, label=label, ms=3, color=colors(j % 20), lw=1.2)
    axes[0].set(title="distance to the reference ODE endpoint", xlabel="NFE", ylabel="mean ‖x − x_ref‖")
    axes[1].axhline(floor, color="gray", lw=0.8, ls=":", label="two fresh mixture samples (mean)")
    axes[1].set(title="energy distance to the true mixture", xlabel="NFE")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
