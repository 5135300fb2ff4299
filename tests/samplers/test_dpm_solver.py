"""DPM-Solver++ on the analytic Gaussian-mixture oracle: convergence order against a tight RK45 solution of the
probability-flow ODE, family invariance, the step-order schedule, endpoints and NFE."""

import math

import pytest
import torch
from scipy.integrate import quad, solve_ivp

from diffusion_lab.diffusion import (
    Denoiser,
    EpsParameterization,
    LinearSchedule,
    RectifiedFlowSchedule,
    SigmoidSchedule,
    VESchedule,
    X0Parameterization,
)
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork
from diffusion_lab.samplers import DDIMSampler, time_grid
from diffusion_lab.samplers import dpm_solver as dpm
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler, half_log_snr

F64 = torch.float64
# Overlapping components: x̂0 is smooth in λ, so the asymptotic order shows from ~16 steps on.
GMM = GaussianMixture(
    torch.tensor([0.4, 0.6], dtype=F64),
    torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
    torch.tensor([0.5, 0.7], dtype=F64),
)
GAUSS = GaussianMixture(
    torch.ones(1, dtype=F64), torch.tensor([[1.0, -0.5]], dtype=F64), torch.tensor([0.5], dtype=F64)
)
LAM_START, LAM_END = -3.0, 3.0  # DPM-Solver λ = log(α/σ) = half our log-SNR
STEPS = (16, 32, 64)
SOLVERS = {  # name: (order, method, expected order range over 16 → 64 steps)
    "dpm_solver_1": (1, "multistep", (0.85, 1.15)),
    "dpm_solver_2m": (2, "multistep", (1.8, 2.2)),
    "dpm_solver_3m": (3, "multistep", (2.6, 3.3)),
    "dpm_solver_2s": (2, "singlestep", (1.75, 2.2)),
}


def oracle(mixture, schedule, param=None):
    param = param or X0Parameterization()
    return Denoiser(OracleNetwork(mixture, schedule, param), schedule, param)


def log_snr_grid(schedule, steps, lam_start=LAM_START, lam_end=LAM_END):
    """``steps + 1`` times uniform in DPM-Solver λ (Lu et al. 2022a's "logSNR" spacing)."""
    return schedule.t_from_log_snr(2 * torch.linspace(lam_start, lam_end, steps + 1, dtype=F64))


def start_point(schedule, t_start, n=16, seed=0):
    """``x`` at ``t_start`` on the forward process: ``α x0 + σ ε`` (float32, ``(n, 2)``)."""
    g = torch.Generator().manual_seed(seed)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t_start, dtype=F64))
    return (float(alpha) * GMM.sample(n, g) + float(sigma) * torch.randn(n, 2, generator=g, dtype=F64)).float()


def reference_solution(denoiser, x, t_start, t_end, tol=1e-9):
    """RK45 on the PF-ODE drift ``Denoiser.velocity`` = ``α' x̂0 + σ' ε̂`` from ``t_start`` to ``t_end`` (float64)."""
    shape = x.shape

    def drift(t, y):
        x_t = torch.from_numpy(y).reshape(shape).float()
        return denoiser.velocity(x_t, torch.full((shape[0],), t)).double().numpy().ravel()

    sol = solve_ivp(drift, (t_start, t_end), x.double().numpy().ravel(), method="RK45", rtol=tol, atol=tol)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def observed_orders(schedule):
    """``{solver: (errors per steps in STEPS, order over 16 → 64)}`` against the RK45 reference."""
    den = oracle(GMM, schedule)
    grids = {n: log_snr_grid(schedule, n) for n in STEPS}
    x = start_point(schedule, float(grids[STEPS[0]][0]))
    ref = reference_solution(den, x, float(grids[STEPS[0]][0]), float(grids[STEPS[0]][-1]))
    result = {}
    for name, (order, method, _) in SOLVERS.items():
        errors = []
        for n in STEPS:
            out = DPMSolverSampler(steps=n, order=order, method=method).sample(den, x, t_grid=grids[n])
            assert out.nfe == n
            errors.append((out.x0.double() - ref).square().mean().sqrt().item())
        result[name] = (errors, math.log2(errors[0] / errors[-1]) / math.log2(STEPS[-1] / STEPS[0]))
    return result


def check_orders(result):
    for name, (errors, order) in result.items():
        lo, hi = SOLVERS[name][2]
        assert lo < order < hi, f"{name}: errors {errors}, observed order {order:.2f}"
    assert result["dpm_solver_3m"][0][-1] < result["dpm_solver_2m"][0][-1] / 10


def test_convergence_order_rectified_flow():
    """Rectified flow has closed-form α', σ', so the reference is cheap; VP and VE are in the slow test below."""
    check_orders(observed_orders(RectifiedFlowSchedule()))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [SigmoidSchedule(), VESchedule()], ids=["vp_sigmoid", "ve"])
def test_convergence_order_vp_and_ve(schedule):
    check_orders(observed_orders(schedule))


def test_third_order_term_weighted_as_diffusers_loses_an_order(monkeypatch):
    """diffusers / k-diffusion / the official 3M weight ``D2 = h² x̂0''/2`` by φ3: halving our φ3 reproduces
    their update exactly, and it converges at order 2 only (why we deviate; tests/samplers/test_vs_diffusers.py)."""
    phi = dpm.phi_coefficients
    monkeypatch.setattr(dpm, "phi_coefficients", lambda h: (*phi(h)[:2], phi(h)[2] / 2))
    schedule = RectifiedFlowSchedule()
    den = oracle(GMM, schedule)
    grids = {n: log_snr_grid(schedule, n) for n in STEPS}
    x = start_point(schedule, float(grids[16][0]))
    ref = reference_solution(den, x, float(grids[16][0]), float(grids[16][-1]))
    err = [(DPMSolverSampler(n, order=3).sample(den, x, t_grid=grids[n]).x0.double() - ref).norm() for n in STEPS]
    assert 1.8 < math.log2(err[0] / err[-1]) / 2 < 2.3


@pytest.mark.parametrize(("h", "h0", "h1"), [(0.3, 0.2, 0.5), (0.05, 0.05, 0.05), (2.0, 1.0, 0.4)])
def test_third_order_weights_integrate_quadratics_exactly(h, h0, h1):
    """``Σ_j w_j P(λ_j) = ∫_0^h e^{−(h−u)} P(λ_s + u) du`` for any quadratic P (and first order for constants)."""
    lam_s = 0.7
    lams = [lam_s - h0 - h1, lam_s - h0, lam_s]
    for poly in ([1.0, 0.0, 0.0], [0.3, -1.2, 0.0], [0.5, 2.0, -3.0]):
        p = lambda lam, c=poly: c[0] + c[1] * (lam - lam_s) + c[2] * (lam - lam_s) ** 2  # noqa: E731
        exact = quad(lambda u, p=p: math.exp(-(h - u)) * p(lam_s + u), 0.0, h, epsabs=1e-14, epsrel=1e-14)[0]
        approx = sum(w * p(lam) for w, lam in zip(dpm.multistep_weights(lams, lam_s + h), lams, strict=True))
        assert approx == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert dpm.multistep_weights([lam_s], lam_s + h) == [pytest.approx(-math.expm1(-h))]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_same_log_snr_grid_gives_the_same_path_on_every_family(name):
    """The updates depend on the grid only through λ and σ_r/σ_s, α_r: on VP, VE and rectified flow, ``x/α`` agrees.

    (For the Bayes denoiser x̂0 depends on ``x_t/α`` and λ only, so the PF-ODE path in ``x/α`` is family-free.)
    """
    order, method, _ = SOLVERS[name]
    g = torch.Generator().manual_seed(0)  # the start in the α = 1 (VE) scale: x/α = x0 + e^{−λ} ε at λ = LAM_START
    z = (GMM.sample(16, g) + math.exp(-LAM_START) * torch.randn(16, 2, generator=g, dtype=F64)).float()
    outs = []
    for schedule in (SigmoidSchedule(), VESchedule(sigma_min=0.01, sigma_max=50.0), RectifiedFlowSchedule()):
        grid = log_snr_grid(schedule, 12)
        alpha = schedule.alpha_sigma(grid)[0]
        out = DPMSolverSampler(12, order=order, method=method).sample(oracle(GMM, schedule), alpha[0] * z, t_grid=grid)
        outs.append(out.x0.double() / alpha[-1])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)


def test_step_orders_follow_diffusers():
    lam = half_log_snr(*LinearSchedule().alpha_sigma(time_grid("uniform", 20, LinearSchedule()))).tolist()
    finite_end = lam[:-1]  # ends at t = 1/20, σ > 0
    assert math.isinf(lam[-1]) and not math.isinf(finite_end[-1])
    m3 = DPMSolverSampler(order=3)
    assert m3.step_orders(lam[:11]) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]  # < 15 steps: lower order at the end
    assert m3.step_orders(lam) == [1, 2] + [3] * 17 + [1]  # ≥ 15 steps: only the step to σ = 0 is first order
    assert m3.step_orders(finite_end) == [1, 2] + [3] * 17
    assert DPMSolverSampler(order=3, lower_order_final=False).step_orders(lam[:11]) == [1, 2] + [3] * 8
    assert DPMSolverSampler(order=2).step_orders(lam[:4]) == [1, 2, 1]
    s2 = DPMSolverSampler(order=2, method="singlestep")
    assert s2.step_orders(lam[:11]) == [1, 2] * 4 + [1, 1]  # even: the last pair becomes two first-order steps
    assert s2.step_orders(lam[:10]) == [1, 2] * 4 + [1]  # odd: a lone first-order step at the end
    no_lof = DPMSolverSampler(order=2, method="singlestep", lower_order_final=False)
    assert no_lof.step_orders(finite_end[:11]) == [1, 2] * 5
    assert no_lof.step_orders(lam[-11:]) == [1, 2] * 4 + [1, 1]  # a 2S step cannot end at σ = 0
    from_pure_noise = [-math.inf, *lam[1:]]  # α = 0 at the start (rectified flow, zero terminal SNR)
    assert m3.step_orders(from_pure_noise) == [1, 1, 2] + [3] * 16 + [1]
    assert s2.step_orders(from_pure_noise[:6]) == [1, 1, 2, 1, 1]


def test_order_one_is_ddim():
    """DPM-Solver++1 is DDIM with η = 0 (Lu et al. 2022b §4), on any grid."""
    den = oracle(GMM, LinearSchedule(), EpsParameterization())
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for steps in (7, 30):
        a = DPMSolverSampler(steps, order=1).sample(den, x)
        b = DDIMSampler(steps, eta=0.0).sample(den, x)
        torch.testing.assert_close(a.x0, b.x0, rtol=1e-5, atol=1e-5)
        assert a.nfe == b.nfe == steps


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_final_step_to_t0_returns_x0_hat_at_the_last_point(name):
    """At σ = 0 (λ = +∞) the first-order step's limit is ``x̂0(x_{t_{N−1}}, t_{N−1})``, with no extra evaluation."""
    order, method, _ = SOLVERS[name]
    schedule = RectifiedFlowSchedule()
    den = oracle(GMM, schedule)
    grid = torch.linspace(0.9, 0.0, 21, dtype=F64)
    x = start_point(schedule, 0.9)
    make = lambda n: DPMSolverSampler(n, order=order, method=method, lower_order_final=False)  # noqa: E731
    full = make(20).sample(den, x, t_grid=grid)
    head = make(19).sample(den, x, t_grid=grid[:-1])  # the same first 19 steps, ending at t_{N−1} > 0
    last = grid[-2:-1].float().expand(x.shape[0])
    torch.testing.assert_close(full.x0, den(head.x0, last), rtol=0, atol=0)
    assert full.nfe == 20


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 14, 15])
def test_nfe_equals_steps_from_pure_noise_to_data(name, steps):
    """Rectified flow on the default grid: starts at α = 0 (λ = −∞), ends at σ = 0 (λ = +∞); all finite."""
    order, method, _ = SOLVERS[name]
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    out = DPMSolverSampler(steps, order=order, method=method).sample(oracle(GMM, RectifiedFlowSchedule()), x)
    assert out.nfe == steps
    assert torch.isfinite(out.x0).all()


@pytest.mark.parametrize(
    ("schedule", "param"),
    [(LinearSchedule(), EpsParameterization()), (RectifiedFlowSchedule(), X0Parameterization())],
    ids=["vp_linear_eps", "rectified_flow_x0"],
)
@pytest.mark.parametrize("name", ["dpm_solver_2m", "dpm_solver_3m", "dpm_solver_2s"])
def test_gaussian_mean_and_covariance_in_50_steps(schedule, param, name):
    """The last step returns x̂0 = E[x0 | x_{t_{N−1}}] (module docstring), whose covariance for N(μ, s² I) data is
    ``s² · α² s²/(α² s² + σ²)`` at ``t_{N−1}`` rather than ``s²`` (0.244 instead of 0.25 on the linear schedule)."""
    order, method, _ = SOLVERS[name]
    sampler = DPMSolverSampler(steps=50, order=order, method=method)
    g = torch.Generator().manual_seed(0)
    den = oracle(GAUSS, schedule, param)
    x = sampler.sample(den, sampler.prior((8000, 2), schedule, g)).x0.double()
    torch.testing.assert_close(x.mean(0), GAUSS.means[0], atol=0.02, rtol=0)
    alpha, sigma = schedule.alpha_sigma(sampler.time_grid(schedule)[-2])
    s2 = float(GAUSS.stds[0]) ** 2
    expected = s2 * float(alpha**2 * s2 / (alpha**2 * s2 + sigma**2))
    torch.testing.assert_close(torch.cov(x.T), expected * torch.eye(2, dtype=F64), atol=0.015, rtol=0)


def test_clip_x0_bounds_the_final_sample():
    den = oracle(GMM, LinearSchedule(), EpsParameterization())  # modes at ±1 with std 0.5/0.7 exceed [−1, 1]
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    assert DPMSolverSampler(10).sample(den, x).x0.abs().max() > 1.2
    assert DPMSolverSampler(10, clip_x0=1.0).sample(den, x).x0.abs().max() <= 1.0


def test_invalid_configurations_raise_with_valid_choices():
    with pytest.raises(ValueError, match="valid choices"):
        DPMSolverSampler(method="adaptive")
    with pytest.raises(ValueError, match=r"1\.\.3"):
        DPMSolverSampler(order=4)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        DPMSolverSampler(order=3, method="singlestep")
    with pytest.raises(ValueError, match="valid choices"):
        DPMSolverSampler(grid="karras_typo")
    with pytest.raises(ValueError, match="positive"):
        DPMSolverSampler(steps=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DPMSolverSampler().sample(oracle(GMM, LinearSchedule()), torch.zeros(2, 2), t_grid=torch.tensor([0.0, 1.0]))
