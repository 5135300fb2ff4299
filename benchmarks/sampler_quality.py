"""Sampler error vs NFE on a Gaussian mixture with its exact denoiser: ours and diffusers' schedulers.

    .venv/bin/python benchmarks/sampler_quality.py            # ~20 minutes on 2 CPU cores shared with other jobs
    .venv/bin/python benchmarks/sampler_quality.py --num-samples 2048 --nfe 5 10 20
    .venv/bin/python benchmarks/sampler_quality.py --data aniso8 --num-samples 1024 --nfe 5 10 20 50
    .venv/bin/python benchmarks/sampler_quality.py --only-tuned   # add the tuned rows to the existing JSON

Data (``--data``): ``ring``, 8 isotropic Gaussians on a circle in 2-D; ``aniso8``, 4 Gaussians in 8-D with
covariances ``U_k diag(e) U_kᵀ`` (``e`` log-spaced from 1e-3 to 1e-1: two orders of magnitude; ``U_k`` random
rotations, fixed seed), their exact Bayes denoiser from :class:`FullCovarianceMixture`.

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
``vs_diffusers_unipc`` in the JSON: per NFE, our best path error over diffusers' best UniPC (any of its grids),
and over diffusers' best DPM-Solver++, with and without the tuned rows.

Model-tuned rows (``ours/dpm_solver_2m+tuned``, ``ours/unipc+tuned``, at NFE 5 and 10 unless ``--tuned-nfe``;
``--no-tuned`` skips them):
the ``log_snr`` grid is fitted by :func:`diffusion_lab.samplers.tuning.fit_grid` (``dlab-tune-grid``'s method and
defaults) to the exact denoiser as the model, on noise draws from the generator seeded ``seed + 1`` (fit and
held-out draws), disjoint from the evaluation noise (seed ``seed``), then evaluated on the benchmark's noise like
every other row; the fitting cost is recorded in each row's ``tuning``. This is the Align-Your-Steps use: a grid
fitted to the model on separate draws, not to the evaluation noise.
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
from diffusion_lab.diffusion.analytic import FullCovarianceMixture, GaussianMixture, Mixture, OracleNetwork
from diffusion_lab.metrics.toy2d import energy_distance
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.tuning import fit_grid
from diffusion_lab.schema.jobs import FitOptions

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


def aniso_mixture(dim: int = 8, num_modes: int = 4, seed: int = 0) -> FullCovarianceMixture:
    """``num_modes`` equal Gaussians in ``dim`` dims: means ``0.6·`` random unit vectors, covariances with
    eigenvalues log-spaced over [1e-3, 1e-1] (stds 0.03–0.32) in random orthogonal bases (QR of Gaussian
    matrices), all from ``torch.Generator`` seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_modes, dim, generator=g, dtype=torch.float64)
    means = 0.6 * means / means.norm(dim=1, keepdim=True)
    rotations = torch.linalg.qr(torch.randn(num_modes, dim, dim, generator=g, dtype=torch.float64))[0]
    eigvals = torch.logspace(-3, -1, dim, dtype=torch.float64).expand(num_modes, dim).contiguous()
    weights = torch.full((num_modes,), 1 / num_modes, dtype=torch.float64)
    return FullCovarianceMixture(weights, means, rotations, eigvals)


# --data: (mixture, its description in the JSON, default JSON, default plot)
DATA: dict[str, tuple[Callable[[], Mixture], str, str, str]] = {
    "ring": (
        ring_mixture,
        "8-mode ring mixture in 2-D (radius 0.8, std 0.08), exact Bayes denoiser, linear β T=1000",
        "benchmarks/results/sampler_quality.json",
        "docs/sampler_quality.png",
    ),
    "aniso8": (
        aniso_mixture,
        "4-mode Gaussian mixture in 8-D, means 0.6·random unit vectors, covariances U_k diag(e) U_kᵀ with e "
        "log-spaced 1e-3..1e-1 and random rotations U_k (torch seed 0), exact Bayes denoiser, linear β T=1000",
        "benchmarks/results/sampler_quality_aniso8.json",
        "docs/sampler_quality_aniso8.png",
    ),
}


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def reference_solution(mixture: Mixture, x_T: Tensor, sigma_max: float, sigma_end: float = 1e-6) -> Tensor:
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


def run_diffusers(make: Callable[[], Any], steps: int, mixture: Mixture, z: Tensor) -> tuple[Tensor, int]:
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


# Model-tuned grids: (registry name, kwargs of the start grid); fitted at these NFE budgets only.
TUNED: dict[str, tuple[str, dict[str, Any]]] = {
    "ours/dpm_solver_2m+tuned": ("dpm_solver", {"grid": "log_snr", "order": 2}),
    "ours/unipc+tuned": ("unipc", {"grid": "log_snr"}),
}
TUNED_NFES = (5, 10)


def run_tuned(
    name: str, kwargs: dict[str, Any], steps: int, denoiser: Denoiser, z: Tensor, seed: int
) -> tuple[Tensor, int, dict[str, Any]]:
    """Fit the grid on draws from seed ``seed + 1`` (``dlab-tune-grid``'s defaults), then sample ``z``'s
    trajectories on it; returns ``(x0, nfe, the fit's record)``."""
    sampler = our_registry()[name](steps=steps, clip_x0=None, **kwargs)
    options = FitOptions(seed=seed + 1)
    sigma_1 = float(denoiser.schedule.alpha_sigma(torch.ones((), dtype=torch.float64))[1])
    g = torch.Generator().manual_seed(options.seed)
    x_fit = sigma_1 * torch.randn(options.num_draws, z.shape[1], generator=g, dtype=torch.float64).float()
    x_held = sigma_1 * torch.randn(options.num_heldout, z.shape[1], generator=g, dtype=torch.float64).float()
    fit = fit_grid(sampler, denoiser, x_fit, x_held, options)
    out = sampler.sample(denoiser, sigma_1 * z.float(), t_grid=fit.grid)
    record = {
        "fit_seed": options.seed, "fit_draws": options.num_draws, "heldout_draws": options.num_heldout,
        "start_grid": fit.start.tolist(), "grid": fit.grid.tolist(), "accepted": fit.accepted,
        "heldout_rmse_before": fit.heldout_before, "heldout_rmse_after": fit.heldout_after,
        "loss_evaluations": fit.loss_evaluations, "sampler_evals": fit.sampler_evals,
        "reference_evals": fit.reference_evals, "reference_rmse": fit.reference_error, "wall_s": fit.wall_s,
    }  # fmt: skip
    return out.x0.double(), out.nfe, record


# --------------------------------------------------------------------------------------------------- run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="ring")
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: per --data (see DATA)")
    parser.add_argument("--plot", type=Path, default=None, help="default: per --data (see DATA)")
    parser.add_argument("--no-tuned", action="store_true", help="skip the model-tuned rows")
    parser.add_argument("--tuned-nfe", type=int, nargs="+", default=list(TUNED_NFES), help="budgets (in --nfe) to tune")
    parser.add_argument(
        "--only-tuned", action="store_true",
        help="keep --out's rows (same data, seed and num_samples) and run only the tuned rows",
    )  # fmt: skip
    args = parser.parse_args(argv)
    make_mixture, description, default_out, default_plot = DATA[args.data]
    args.out = args.out or Path(default_out)
    args.plot = args.plot or Path(default_plot)
    previous = _previous(args, description) if args.only_tuned else None

    torch.manual_seed(args.seed)
    mixture = make_mixture()
    schedule = LinearSchedule(num_timesteps=T)
    param = EpsParameterization()
    denoiser = Denoiser(OracleNetwork(mixture, schedule, param), schedule, param)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.num_samples, mixture.dim, generator=g, dtype=torch.float64)
    truth = mixture.sample(args.num_samples, g)
    if previous is None:
        # Two independent samples of the mixture are this far apart on average (the estimate's own noise level).
        n = args.num_samples
        pairs = [energy_distance(mixture.sample(n, g), mixture.sample(n, g)) for _ in range(8)]
        floor, floor_std = float(np.mean(pairs)), float(np.std(pairs))
    else:
        floor, floor_std = previous["energy_distance_floor"], previous["energy_distance_floor_std"]
    sigma_max = float(sigma_from_alpha_bar(schedule.alpha_sigma(torch.ones((), dtype=torch.float64))[0] ** 2))
    start = time.perf_counter()
    x_ref = reference_solution(mixture, z, sigma_max)
    reference = {"energy_distance": energy_distance(x_ref, truth), "seconds": time.perf_counter() - start}

    if previous is None:
        rows, missing = _untuned_rows(args, denoiser, mixture, z, x_ref, truth)
    else:
        rows = [r for r in previous["rows"] if r["sampler"] not in TUNED]
        missing = previous["not_run"]
    if not args.no_tuned:
        rows += _tuned_rows(args, denoiser, z, x_ref, truth)
    result = {
        "benchmark": "sampler_quality",
        "data": description,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "energy_distance_floor": floor,
        "energy_distance_floor_std": floor_std,
        "reference": reference,
        "not_run": missing,
        "host": {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "tuned_rows": None if args.no_tuned else _tuned_protocol(args),
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
            f"{r['diffusers_unipc_best']['sampler']} = {r['ratio_to_diffusers_unipc']:.2f} "
            f"(untuned {r['ratio_to_diffusers_unipc_untuned']:.2f})"
        )
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _previous(args: argparse.Namespace, description: str) -> dict[str, Any]:
    """The JSON ``--only-tuned`` extends; refused unless it is the same benchmark (data, seed, samples)."""
    if not args.out.is_file():
        raise SystemExit(f"--only-tuned: {args.out} does not exist; run without --only-tuned first")
    previous: dict[str, Any] = json.loads(args.out.read_text())
    theirs = (previous["data"], previous["seed"], previous["num_samples"])
    if theirs != (description, args.seed, args.num_samples):
        raise SystemExit(f"--only-tuned: {args.out} holds (data, seed, num_samples) = {theirs}, not "
                         f"{(description, args.seed, args.num_samples)}")  # fmt: skip
    return previous


def _untuned_rows(
    args: argparse.Namespace, denoiser: Denoiser, mixture: Mixture, z: Tensor, x_ref: Tensor, truth: Tensor
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every sampler of :data:`OURS` and diffusers' at every ``--nfe`` budget; and the names not available."""
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
    return rows, missing


def _tuned_rows(
    args: argparse.Namespace, denoiser: Denoiser, z: Tensor, x_ref: Tensor, truth: Tensor
) -> list[dict[str, Any]]:
    """:data:`TUNED` at the ``--tuned-nfe`` budgets that are in ``--nfe`` (grid fitted per budget)."""
    rows: list[dict[str, Any]] = []
    for nfe_budget in (b for b in args.nfe if b in args.tuned_nfe):
        for label, (reg, kwargs) in TUNED.items():
            x, nfe, record = run_tuned(reg, kwargs, nfe_budget, denoiser, z, args.seed)
            rows.append({**_row(label, "ours", nfe_budget, nfe_budget, nfe, x, x_ref, truth, True), "tuning": record})
            print(f"  {label:28s} {nfe:4d} {rows[-1]['path_error']:.2e}  (fit {record['wall_s']:.0f} s)")
    return rows


def _tuned_protocol(args: argparse.Namespace) -> dict[str, Any]:
    options = FitOptions(seed=args.seed + 1)
    return {
        "samplers": {label: {"registry": reg, **kwargs} for label, (reg, kwargs) in TUNED.items()},
        "nfe": [b for b in args.nfe if b in args.tuned_nfe],
        "method": "diffusion_lab.samplers.tuning.fit_grid (dlab-tune-grid), exact denoiser as the model",
        "fit_options": {k: getattr(options, k) for k in options.__dataclass_fields__},
        "draws": f"fit and held-out noise from torch.Generator seed {options.seed}; evaluation noise: seed "
        f"{args.seed} (disjoint draws)",
    }


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
    """Per NFE budget: our best path error (any deterministic sampler and grid; ``_untuned``: without the
    model-tuned rows) over diffusers' best UniPC (any of its grids), best DPM-Solver++ and best overall;
    the lower the better, < 1 means we lead."""
    out: dict[str, Any] = {}
    for budget in sorted({r["nfe_budget"] for r in rows}):
        scored = [r for r in rows if r["nfe_budget"] == budget and r["path_error"] is not None]

        def best(keep: Callable[[dict[str, Any]], bool], scored: list[dict[str, Any]] = scored) -> dict[str, Any]:
            top = min((r for r in scored if keep(r)), key=lambda r: r["path_error"])
            return {"sampler": top["sampler"], "path_error": top["path_error"]}

        entry = {
            "ours_best": best(lambda r: r["library"] == "ours"),
            "ours_best_untuned": best(lambda r: r["library"] == "ours" and r["sampler"] not in TUNED),
            "diffusers_unipc_best": best(lambda r: r["sampler"].startswith("diffusers/unipc")),
            "diffusers_dpmpp_best": best(lambda r: r["sampler"].startswith("diffusers/dpmsolver++")),
            "diffusers_best": best(lambda r: r["library"] == "diffusers"),
        }
        for ours in ("", "_untuned"):
            for peer in ("unipc", "dpmpp", "best"):
                key = "diffusers_best" if peer == "best" else f"diffusers_{peer}_best"
                value = entry[f"ours_best{ours}"]["path_error"] / entry[key]["path_error"]
                entry[f"ratio_to_diffusers_{peer}{ours}"] = value
        out[str(budget)] = entry
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
