"""Time grids: diffusers' integer spacings, Karras et al. 2022 eq. 5, uniform log-SNR, and their options."""

import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion import (
    CosineSchedule,
    LinearSchedule,
    RectifiedFlowSchedule,
    SigmoidSchedule,
    VESchedule,
)
from diffusion_lab.samplers import (
    GRID_OPTIONS,
    TIME_GRIDS,
    DDIMSampler,
    EulerMaruyamaSampler,
    HeunSampler,
    PCSampler,
    time_grid,
)

F64 = torch.float64

SCHEDULES = {
    "linear": lambda: LinearSchedule(),
    "linear_T37": lambda: LinearSchedule(num_timesteps=37),
    "linear_zero_snr": lambda: LinearSchedule(zero_terminal_snr=True),
    "cosine_continuous": lambda: CosineSchedule(discrete=False),
    "sigmoid": lambda: SigmoidSchedule(),
    "ve": lambda: VESchedule(),
    "rectified_flow": lambda: RectifiedFlowSchedule(),
}


def sigma_e(schedule, t):
    """σ/α = e^{−λ/2} at the grid points, float64."""
    return torch.exp(-0.5 * schedule.log_snr(t.double()))


def karras_eq5(n, sigma_min, sigma_max, rho):
    """Karras et al. 2022 eq. 5 written out independently: n points from σ_max to σ_min."""
    i = np.arange(n, dtype=np.float64)
    denom = max(n - 1, 1)
    return torch.from_numpy(
        (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    )


def diffusers_grid(spacing, T, steps):
    """diffusers' DDIMScheduler timesteps k mapped to t = (k + 1)/T, with the final t = 0 appended.

    For some (T, N) diffusers' trailing ``arange`` yields N + 1 timesteps, the last being k = −1 (t = 0):
    it is then the final point itself.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    t = (scheduler.timesteps.to(F64) + 1) / T
    return t if t[-1] == 0 else torch.cat([t, torch.zeros(1, dtype=F64)])


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("T", [1000, 37])
def test_leading_and_trailing_equal_diffusers_ddim_timesteps(spacing, T):
    schedule = LinearSchedule(num_timesteps=T)
    steps_list = range(1, T + 1) if T < 100 else [*range(1, 130), 200, 201, 250, 333, 500, 999, 1000]
    for steps in steps_list:
        expected = diffusers_grid(spacing, T, steps)
        ours = time_grid(spacing, steps, schedule)
        assert ours.shape == (steps + 1,), (spacing, steps)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12, msg=f"{spacing} T={T} steps={steps}")


def test_leading_starts_below_one_and_trailing_at_one():
    """Lin et al. 2024 Table 2: leading spacing never reaches the last timestep, trailing does."""
    schedule = LinearSchedule()
    assert time_grid("leading", 10, schedule)[0].item() == pytest.approx(901 / 1000)
    assert time_grid("trailing", 10, schedule)[0].item() == 1.0
    assert time_grid("trailing", 10, schedule)[-2].item() == pytest.approx(100 / 1000)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("linear", {}),
        ("linear", {"rho": 3.0, "sigma_min": 0.05, "sigma_max": 20.0}),
        ("cosine_continuous", {"sigma_max": 80.0}),
        ("sigmoid", {"rho": 5.0}),
        ("rectified_flow", {}),
        ("rectified_flow", {"sigma_min": 0.01, "sigma_max": 10.0, "rho": 1.0}),
        ("linear_zero_snr", {}),
    ],
)
@pytest.mark.parametrize("steps", [1, 2, 18, 100])
def test_karras_grid_is_eq5_in_sigma_over_alpha(name, options, steps):
    schedule = SCHEDULES[name]()
    grid = time_grid("karras", steps, schedule, **options)
    assert grid.shape == (steps + 1,) and grid[-1] == 0  # σ_N = 0 is t = 0
    lam_1, _ = schedule.log_snr_bounds()
    top = math.exp(-0.5 * lam_1)
    sigma_max = options.get("sigma_max", top if math.isfinite(top) else 80.0)
    if "sigma_min" in options:
        sigma_min = options["sigma_min"]
    elif schedule.num_timesteps is not None:  # the discrete model's first step, σ_e(1/T)
        sigma_min = sigma_e(schedule, torch.tensor([1 / schedule.num_timesteps]))[0].item()
    else:
        sigma_min = 0.002
    expected = karras_eq5(steps, sigma_min, sigma_max, options.get("rho", 7.0))
    torch.testing.assert_close(sigma_e(schedule, grid[:-1]), expected, rtol=1e-6, atol=0)
    if "sigma_max" not in options and math.isfinite(top):
        assert grid[0] == 1.0


@pytest.mark.parametrize("options", [{}, {"rho": 2.0, "sigma_max": 40.0}])
def test_karras_grid_on_ve_ends_at_the_schedules_sigma_min(options):
    """VE: t = 0 has σ = σ_min > 0, so the N + 1 points follow eq. 5 (i/N) from σ_max down to σ_min at t = 0."""
    schedule = VESchedule(sigma_min=0.002, sigma_max=80.0)
    grid = time_grid("karras", 10, schedule, **options)
    expected = karras_eq5(11, 0.002, options.get("sigma_max", 80.0), options.get("rho", 7.0))
    torch.testing.assert_close(sigma_e(schedule, grid), expected, rtol=1e-9, atol=0)
    assert grid[-1] == 0 and (grid[0] == 1.0) == ("sigma_max" not in options)


@pytest.mark.parametrize("name", ["linear", "cosine_continuous", "ve", "rectified_flow", "linear_zero_snr"])
def test_log_snr_grid_is_uniform_in_lambda(name):
    schedule = SCHEDULES[name]()
    grid = time_grid("log_snr", 25, schedule)
    interior = grid if name == "ve" else grid[:-1]  # VE's last point is σ_min itself
    steps = torch.diff(schedule.log_snr(interior))
    assert bool((steps > 0).all())
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-7, atol=0)
    # Same σ range as karras: the two grids share their first and smallest nonzero noise levels.
    karras = time_grid("karras", 25, schedule)
    ends = [0, -1] if name == "ve" else [0, -2, -1]
    torch.testing.assert_close(grid[ends], karras[ends], rtol=1e-9, atol=1e-12)


def test_karras_tends_to_log_snr_as_rho_grows():
    """(a + i/(N−1)(b − a))^ρ with a = σ_max^{1/ρ} → log-linear in σ as ρ → ∞: the uniform-λ grid."""
    schedule = LinearSchedule(discrete=False)
    lam_karras = schedule.log_snr(time_grid("karras", 20, schedule, rho=1e5)[:-1])
    lam_uniform = schedule.log_snr(time_grid("log_snr", 20, schedule)[:-1])
    torch.testing.assert_close(lam_karras, lam_uniform, rtol=0, atol=1e-3)
    assert (lam_karras - schedule.log_snr(time_grid("karras", 20, schedule)[:-1])).abs().max() > 0.5


@pytest.mark.parametrize("grid_name", sorted(TIME_GRIDS))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_grid_is_strictly_decreasing_in_unit_interval_and_ends_at_zero(grid_name, name):
    schedule = SCHEDULES[name]()
    if grid_name in ("leading", "trailing") and schedule.num_timesteps is None:
        with pytest.raises(ValueError, match="discrete-time schedule"):
            time_grid(grid_name, 10, schedule)
        return
    for steps in [1, 2, 7, 30]:
        grid = time_grid(grid_name, steps, schedule)
        assert grid.dtype == F64 and grid.shape == (steps + 1,)
        assert bool((grid[1:] < grid[:-1]).all()) and grid[-1] == 0 and grid[0] <= 1


def test_grid_options_are_passed_from_the_sampler_config():
    schedule = LinearSchedule()
    heun = HeunSampler(steps=12, grid="karras", rho=3.0, sigma_min=0.02, sigma_max=50.0)
    torch.testing.assert_close(
        heun.time_grid(schedule), time_grid("karras", 12, schedule, rho=3.0, sigma_min=0.02, sigma_max=50.0)
    )
    assert not torch.equal(heun.time_grid(schedule), HeunSampler(steps=12, grid="karras").time_grid(schedule))
    em = EulerMaruyamaSampler(steps=9, grid="log_snr", sigma_max=10.0)
    torch.testing.assert_close(em.time_grid(schedule), time_grid("log_snr", 9, schedule, sigma_max=10.0))
    pc = PCSampler(steps=5, grid="trailing")
    torch.testing.assert_close(pc.time_grid(schedule), time_grid("trailing", 5, schedule))
    # DDIM takes the option-free σ-grids too (its own constructor forwards no grid options).
    torch.testing.assert_close(
        DDIMSampler(steps=6, grid="karras").time_grid(schedule), time_grid("karras", 6, schedule)
    )


def test_prior_is_drawn_at_the_first_grid_point():
    schedule = VESchedule(sigma_min=0.002, sigma_max=80.0)
    gen = torch.Generator().manual_seed(0)
    x = HeunSampler(grid="karras", sigma_max=20.0).prior((20000, 1), schedule, gen)
    assert x.std().item() == pytest.approx(20.0, rel=0.02)
    assert HeunSampler(grid="karras").prior((20000, 1), schedule, gen).std().item() == pytest.approx(80.0, rel=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": "karas"}, r"valid choices: \['karras', 'leading', 'log_snr', 'time_power', 'trailing', 'uniform'\]"),
        ({"grid": "uniform", "rho": 7.0}, r"takes no option \['rho'\]; valid options: \[\]"),
        ({"grid": "log_snr", "rho": 7.0}, r"valid options: \['sigma_min', 'sigma_max'\]"),
        ({"grid": "karras", "rho": 0.0}, "rho must be a finite number > 0"),
        ({"grid": "karras", "rho": -1.0}, "rho must be a finite number > 0"),
        ({"grid": "karras", "rho": math.nan}, "rho must be a finite number > 0"),
        ({"grid": "karras", "sigma_min": 0.0}, "sigma_min must be a finite number > 0"),
        ({"grid": "karras", "sigma_max": math.inf}, "sigma_max must be a finite number > 0"),
        ({"grid": "karras", "sigma_min": 2.0, "sigma_max": 1.0}, "must be < sampler.sigma_max"),
        ({"grid": "uniform", "steps": 0}, "positive integer"),
    ],
)
def test_bad_grid_names_and_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeunSampler(**kwargs)


def test_bad_grid_requests_raise_with_the_reason():
    with pytest.raises(ValueError, match="valid choices"):
        time_grid("karras_typo", 10, LinearSchedule())
    with pytest.raises(ValueError, match="exceeds the schedule's largest"):
        time_grid("karras", 10, VESchedule(sigma_max=80.0), sigma_max=100.0)
    with pytest.raises(ValueError, match="below the schedule's smallest"):
        time_grid("log_snr", 10, VESchedule(sigma_min=0.002), sigma_min=0.001)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        time_grid("karras", 10, LinearSchedule(), sigma_min=200.0)  # above the schedule's σ_e(1) ≈ 157 default
    with pytest.raises(ValueError, match="discrete-time schedule"):
        time_grid("trailing", 10, RectifiedFlowSchedule())
    for name in ("leading", "trailing", "uniform"):
        with pytest.raises(ValueError, match="exceeds"):
            time_grid(name, 38, LinearSchedule(num_timesteps=37))
    with pytest.raises(ValueError, match="positive integer"):
        time_grid("karras", 0, LinearSchedule())
    assert set(GRID_OPTIONS) == set(TIME_GRIDS)


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_time_power_grid_is_dpm_solvers_time_quadratic(steps):
    """ρ = 2: ``t = linspace(1, √t_min, N)²`` (DPM-Solver's ``time_quadratic``), t_min = 1/T (to the precision of
    ``t_from_log_snr``); ρ = 1: uniform in t."""
    schedule = LinearSchedule(num_timesteps=1000)
    quadratic = torch.linspace(1.0, math.sqrt(1e-3), steps, dtype=F64) ** 2
    torch.testing.assert_close(time_grid("time_power", steps, schedule)[:-1], quadratic, rtol=1e-7, atol=0)
    linear = torch.linspace(1.0, 1e-3, steps, dtype=F64)
    torch.testing.assert_close(time_grid("time_power", steps, schedule, rho=1.0)[:-1], linear, rtol=1e-7, atol=0)
    t_min = float(time_grid("time_power", steps, schedule, sigma_min=0.1)[-2])
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t_min, dtype=F64))
    assert float(sigma / alpha) == pytest.approx(0.1, rel=1e-6)
