"""What minibatch OT adds to a training step: one exact assignment of a plan, per plan size.

    OMP_NUM_THREADS=1 python benchmarks/coupling_cost.py            # ≈ 1 min on a free core

For each plan size n, ``OTCoupling().pair`` (float64 squared distances + ``scipy.optimize.linear_sum_assignment``) on
n moons points and n draws of C2OT's 8-Gaussian source (the Fig. 1 pair), median of ``--repeats`` plans, and the
independent coupling for reference; per training step the cost is ``plan_s × batch / n``. Prints one JSON line and
writes ``benchmarks/results/coupling_cost.json``. The number depends on the machine's load: quote it with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from diffusion_lab.data.toy2d import sample_c2ot_eight_gaussians, sample_torchdyn_moons
from diffusion_lab.diffusion.couplings import IndependentCoupling, OTCoupling

RESULTS = Path(__file__).resolve().parent / "results" / "coupling_cost.json"


def time_plans(coupling: OTCoupling | IndependentCoupling, n: int, repeats: int) -> float:
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
    }
    line = json.dumps(result)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
