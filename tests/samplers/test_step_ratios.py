"""Steps much longer than their neighbours, on the sampler-quality benchmark's ring mixture (8 modes of std 0.08 at
radius 0.8, exact denoiser, linear β, T = 1000): a multistep quadratic extrapolated over a step more than twice the
previous one (DPM-Solver++ 3M and UniP-3 on diffusers' ``leading`` spacing), and Heun's trapezoid over a step that
divides σ/α by more than 10 (``karras`` and ``log_snr`` at 3 steps = NFE 5). Both used to diverge or grow with the
step count; the reference is the PF-ODE solved by RK45 from the grid's first point."""

import itertools
import math

import pytest
import torch
from scipy.integrate import solve_ivp

from diffusion_lab.diffusion import Denoiser, EpsParameterization, LinearSchedule
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.samplers import DPMSolverSampler, EulerSampler, HeunSampler, UniPCSampler, dpm_solver, ode, time_grid
from diffusion_lab.samplers.dpm_solver import half_log_snr

F64 = torch.float64
SCHEDULE = LinearSchedule(num_timesteps=1000)
PARAM = EpsParameterization()
ANGLE = torch.arange(8, dtype=F64) * 2 * math.pi / 8
MEANS = 0.8 * torch.stack([ANGLE.cos(), ANGLE.sin()], 1)
RING = GaussianMixture(torch.full((8,), 1 / 8, dtype=F64), MEANS, torch.full((8,), 0.08, dtype=F64))
DENOISER = Denoiser(OracleNetwork(RING, SCHEDULE, PARAM), SCHEDULE, PARAM)


def start_and_reference(grid: torch.Tensor, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ∼ N(0, σ²)`` at ``grid[0]`` and its PF-ODE endpoint (RK45 in ``σ_e = σ/α`` on ``x/α``, to σ_e = 1e-6)."""
    alpha, sigma = SCHEDULE.alpha_sigma(grid[:1].double())
    x = float(sigma[0]) * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def denoise(x_hat, s):
        a = 1 / math.sqrt(1 + s**2)
        return RING.denoise(a * x_hat, torch.full((n,), a, dtype=F64), torch.full((n,), s * a, dtype=F64))

    def rhs(s, y):
        x_hat = torch.from_numpy(y).view(n, 2)
        return ((x_hat - denoise(x_hat, s)) / s).reshape(-1).numpy()

    s0 = float(sigma[0] / alpha[0])
    sol = solve_ivp(rhs, (s0, 1e-6), (x / alpha[0]).reshape(-1).numpy(), rtol=1e-8, atol=1e-8)
    return x.float(), denoise(torch.from_numpy(sol.y[:, -1]).view(n, 2), 1e-6)


def error(sampler, grid_name: str, steps: int) -> float:
    grid = time_grid(grid_name, steps, SCHEDULE)
    x, ref = start_and_reference(grid)
    return (sampler.sample(DENOISER, x, t_grid=grid).x0.double() - ref).norm(dim=1).mean().item()


def test_third_order_step_into_leadings_last_point_is_second_order():
    lam = half_log_snr(*SCHEDULE.alpha_sigma(time_grid("leading", 20, SCHEDULE))).tolist()
    orders = DPMSolverSampler(20, order=3).step_orders(lam)
    assert orders[-2:] == [2, 1] and orders.count(3) == 16  # the step into t = 1/T (4.3× the previous one in λ)
    for grid in ("trailing", "karras", "log_snr"):  # ratios ≤ 1.6: untouched
        lam = half_log_snr(*SCHEDULE.alpha_sigma(time_grid(grid, 20, SCHEDULE))).tolist()
        assert DPMSolverSampler(20, order=3).step_orders(lam).count(3) == 17


@pytest.mark.parametrize(
    "make", [lambda n: DPMSolverSampler(n, order=3), lambda n: UniPCSampler(n, order=3, lower_order_final=False)]
)
def test_third_order_on_leading_improves_with_steps(make, monkeypatch):
    errors = [error(make(n), "leading", n) for n in (14, 15, 20, 30)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[1] < 1.2 * error(DPMSolverSampler(15, order=2), "leading", 15)
    monkeypatch.setattr(dpm_solver, "MAX_THIRD_ORDER_STEP_RATIO", math.inf)  # the uncapped quadratic
    assert error(make(15), "leading", 15) > 2 * errors[1]


@pytest.mark.parametrize("grid", ["karras", "log_snr"])
def test_heun_at_nfe5_does_not_diverge(grid, monkeypatch):
    """3 steps (NFE 5): the σ/α ratios are 27 and 591 (karras), 125 (log_snr); the trapezoid's correction is
    (ratio − 1)/2 times the change of x̂0, so those steps take the exponential trapezoid from the same evaluations."""
    heun, euler = error(HeunSampler(3, grid=grid), grid, 3), error(EulerSampler(3, grid=grid), grid, 3)
    assert heun < 0.8 and heun < euler
    out = HeunSampler(3, grid=grid).sample(DENOISER, torch.zeros(4, 2))
    assert out.nfe == 5
    monkeypatch.setattr(ode, "HEUN_MAX_SIGMA_RATIO", math.inf)  # Karras et al.'s trapezoid on every step
    assert error(HeunSampler(3, grid=grid), grid, 3) > 4
