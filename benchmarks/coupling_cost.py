"""What minibatch OT adds to a training step: one exact assignment of a plan, per plan size.

    OMP_NUM_THREADS=1 python benchmarks/coupling_cost.py            # ≈ 1 min on a free core

For each plan size n, ``OTCoupling().pair`` (float64 squared distances + :func:`diffusion_lab.assignment.
optimal_permutation`, POT's network simplex) on n moons points and n draws of C2OT's 8-Gaussian source (the Fig. 1
pair), median of ``--repeats`` plans; beside it the same plan by ``scipy.optimize.linear_sum_assignment`` (the
solver C2OT's code calls; the project used it before), ``solver=sinkhorn`` at reg 0.05 (plan + drawn pairs) and the
independent coupling. Per training step the cost is
``plan_s × batch / n``. Prints one JSON line and writes ``benchmarks/results/coupling_cost.json``. The numbers depend
on the machine's load: quote them with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from diffusion_lab.data.toy2d import sample_c2ot_eight_gaussians, sample_torchdyn_moons
from diffusion_lab.diffusion.couplings import IndependentCoupling, OTCoupling, squared_distances

RESULTS = Path(__file__).resolve().parent / "results" / "coupling_cost.json"


def scipy_plan(x0: torch.Tensor, eps: torch.Tensor, y: None) -> None:
    """The same assignment by scipy's shortest augmenting path solver (the reference)."""
    linear_sum_assignment(squared_distances(x0, eps).numpy())


def time_plans(coupling: Callable[[torch.Tensor, torch.Tensor, None], object], n: int, repeats: int) -> float:
    """Median seconds of one coupling call on an n-point plan."""
    gen = torch.Generator().manual_seed(n)
    times = []
    for _ in range(repeats):
        x0, eps = sample_torchdyn_moons(n, gen), sample_c2ot_eight_gaussians(n, gen)
        start = time.perf_counter()
        coupling(x0, eps, None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = {
        "benchmark": "coupling_cost",
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
        "repeats": args.repeats,
        "independent_s": {str(n): time_plans(IndependentCoupling(), n, args.repeats) for n in args.sizes},
        "ot_plan_s": {str(n): time_plans(OTCoupling(), n, args.repeats) for n in args.sizes},
        "scipy_plan_s": {str(n): time_plans(scipy_plan, n, args.repeats) for n in args.sizes},
        "sinkhorn_reg": 0.05,
        "sinkhorn_plan_s": {str(n): time_plans(OTCoupling(solver="sinkhorn"), n, args.repeats) for n in args.sizes},
    }
    line = json.dumps(result)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
