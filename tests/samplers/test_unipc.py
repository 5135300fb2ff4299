"""UniPC: against diffusers' ``UniPCMultistepScheduler`` step for step in float64, convergence order against a
tight RK45 solution, NFE, endpoints and the config.

Agreement set-up (float64 on both sides): the 2-D mixture and the linear β schedule (T = 1000) of
tests/samplers/test_vs_diffusers.py, the exact x̂0 of the mixture at diffusers' integer timesteps, our ``uniform``
grid = diffusers' ``trailing`` spacing, and diffusers' float32 ``sigmas`` replaced by our float64 ``σ/α`` on that grid
(diffusers' update sees only ``sigmas`` and the model outputs). Compared: every state the network sees; the final
state against diffusers' where that is finite. Deliberate difference: on the step to ``σ = 0`` diffusers' bh1 gives
NaN (``B(h) = −h = −∞`` times a zero residual) and, without ``lower_order_final``, its order-2/3 step divides by
``r = 0``; ours takes the first-order ``h → ∞`` limit ``x = α x̂0`` there, as DPM-Solver++ and diffusers' bh2 do.
"""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from scipy.integrate import quad

from diffusion_lab.diffusion import (
    EpsParameterization,
    LinearSchedule,
    RectifiedFlowSchedule,
    X0Parameterization,
)
from diffusion_lab.samplers import SAMPLERS, UniPCSampler, time_grid
from diffusion_lab.samplers.base import CountingDenoiser
from diffusion_lab.samplers.unipc import order_condition_rhs, unified_weights
from tests.samplers.test_dpm_solver import GMM as SMOOTH_GMM
from tests.samplers.test_dpm_solver import STEPS as ORDER_STEPS
from tests.samplers.test_dpm_solver import log_snr_grid, oracle, reference_solution, start_point
from tests.samplers.test_vs_diffusers import GMM, SCHEDULE, T, x_T

F64 = torch.float64
TOL64 = {"rtol": 0.0, "atol": 1e-6}
STEPS = [10, 25]


class Float64Oracle:
    """The mixture's exact x̂0 in float64 at the integer timestep nearest ``t`` (the denoiser contract, no float32)."""

    schedule = SCHEDULE

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def predict_with_variance(self, x: torch.Tensor, t: torch.Tensor, y=None) -> tuple[torch.Tensor, None]:
        self.inputs.append(x.clone())
        alpha, sigma = SCHEDULE.alpha_sigma(torch.round(t.double() * T) / T)
        return GMM.denoise(x.double(), alpha, sigma), None


def ours64(sampler: UniPCSampler, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our float64 trajectory ``(steps + 1, *x.shape)`` (network inputs, then the output) and the grid."""
    grid = time_grid("uniform", steps, SCHEDULE)
    oracle64 = Float64Oracle()
    model = CountingDenoiser(oracle64, None)  # type: ignore[arg-type]
    out = sampler.solve(model, x.double(), grid, None, None, False)
    assert model.nfe == steps  # UniC reuses the next step's evaluation
    return torch.stack([*oracle64.inputs, out]), grid


def theirs64(scheduler, x: torch.Tensor, steps: int, last: bool, x0_output: bool = False) -> torch.Tensor:
    """diffusers' float64 states: ``x_T`` and each ``prev_sample`` (all ``steps`` of them if ``last``, else one fewer).

    The model output is ε̂ (``x0_output=False``) or x̂0 (``prediction_type="sample"``), exact, at ``t = (k + 1)/T``.
    """
    grid = time_grid("uniform", steps, SCHEDULE)
    scheduler.set_timesteps(steps)
    assert [(int(k) + 1) / T for k in scheduler.timesteps] == grid[:-1].tolist()
    alpha, sigma = SCHEDULE.alpha_sigma(grid)
    sigmas = torch.cat([(sigma / alpha)[:-1], torch.zeros(1, dtype=F64)])
    for s in (scheduler, scheduler.solver_p):
        if s is not None:
            s.sigmas = sigmas.clone()
    x, states = x.double(), [x.double()]
    n = x.shape[0]
    for i, k in enumerate(scheduler.timesteps[: steps if last else steps - 1]):
        a, s = torch.full((n,), float(alpha[i]), dtype=F64), torch.full((n,), float(sigma[i]), dtype=F64)
        x0 = GMM.denoise(x, a, s)
        x = scheduler.step(x0 if x0_output else (x - a[:, None] * x0) / s[:, None], k, x).prev_sample
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", STEPS)
def test_matches_diffusers_unipc_step_for_step(steps, order, variant, corrector, lower_order_final):
    x = x_T((256, 2))
    sampler = UniPCSampler(
        steps, order=order, variant=variant, corrector=corrector, lower_order_final=lower_order_final
    )
    scheduler = UniPCMultistepScheduler(
        solver_order=order,
        solver_type=variant,
        timestep_spacing="trailing",
        lower_order_final=lower_order_final,
        disable_corrector=[] if corrector else list(range(steps)),
    )
    finite_final = variant == "bh2" and lower_order_final  # see the module docstring
    a, grid = ours64(sampler, x, steps)
    b = theirs64(scheduler, x, steps, last=finite_final)
    torch.testing.assert_close(a[: b.shape[0]], b, **TOL64)
    if not finite_final:  # the h → ∞ limit: x̂0 at the last grid point before t = 0
        alpha, sigma = SCHEDULE.alpha_sigma(grid[-2:-1].expand(x.shape[0]))
        torch.testing.assert_close(a[-1], GMM.denoise(a[-2], alpha, sigma), **TOL64)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", STEPS)
def test_unic_after_dpm_solver_matches_diffusers_solver_p(steps, order):
    """UniC after DPM-Solver++ = diffusers' ``solver_p``. Both see x̂0 (``prediction_type="sample"``): from ε̂, diffusers'
    ``solver_p`` re-derives x̂0 from the *corrected* state, which is not the evaluated x̂0. diffusers' DPM-Solver step
    computes in float32 (hence 1e-6, not 1e-14); its 3M has the φ3 term of tests/samplers/test_vs_diffusers.py."""
    x = x_T((256, 2))
    predictor = DPMSolverMultistepScheduler(solver_order=order, timestep_spacing="trailing", prediction_type="sample")
    scheduler = UniPCMultistepScheduler(
        solver_order=order, timestep_spacing="trailing", prediction_type="sample", solver_p=predictor
    )
    a, _ = ours64(UniPCSampler(steps, order=order, predictor="dpm_solver"), x, steps)
    b = theirs64(scheduler, x, steps, last=True, x0_output=True)
    torch.testing.assert_close(a, b, **TOL64)
    plain, _ = ours64(UniPCSampler(steps, order=order, predictor="dpm_solver", corrector=False), x, steps)
    assert (plain[-1] - a[-1]).abs().max() > 1e-3  # the corrector changes the result


# (predictor, order, corrector): expected global order over 16 → 64 steps (p, or p + 1 with UniC).
ORDER_CASES = [
    (predictor, variant, order, corrector)
    for predictor in ("unip", "dpm_solver")
    for variant in ("bh1", "bh2")
    for order in (1, 2, 3)
    for corrector in (False, True)
    if predictor == "unip" or variant == "bh2"
]


@pytest.fixture(scope="module")
def rectified_flow_reference():
    schedule = RectifiedFlowSchedule()
    den = oracle(SMOOTH_GMM, schedule)
    grids = {n: log_snr_grid(schedule, n) for n in ORDER_STEPS}
    x = start_point(schedule, float(grids[ORDER_STEPS[0]][0]))
    return den, grids, x, reference_solution(den, x, float(grids[ORDER_STEPS[0]][0]), float(grids[ORDER_STEPS[0]][-1]))


@pytest.mark.parametrize(("predictor", "variant", "order", "corrector"), ORDER_CASES)
def test_convergence_order(rectified_flow_reference, predictor, variant, order, corrector):
    """Against RK45 on a log-SNR grid (λ ∈ [−3, 3], no step to σ = 0): the predictor alone has order p, with UniC p + 1.

    ``lower_order_final=False``: diffusers' convention lowers the final orders for any number of steps.
    """
    den, grids, x, ref = rectified_flow_reference
    errors = []
    for n in ORDER_STEPS:
        sampler = UniPCSampler(
            n, order=order, variant=variant, predictor=predictor, corrector=corrector, lower_order_final=False
        )
        errors.append((sampler.sample(den, x, t_grid=grids[n]).x0.double() - ref).square().mean().sqrt().item())
    observed = math.log2(errors[0] / errors[-1]) / math.log2(ORDER_STEPS[-1] / ORDER_STEPS[0])
    expected = order + corrector
    assert expected - 0.25 < observed < expected + 0.3, f"errors {errors}, observed order {observed:.2f}"


def test_order_conditions_and_the_paper_simplification():
    """The UniP-3 / UniC-2 weights satisfy the order conditions; K = 1 uses a_1 = 1/2 (the h → 0 limit of k = 1)."""
    for h in (0.01, 0.3, 2.0):  # k! h φ_{k+1}(−h)/B(h) with φ_{k+1}(z) = Σ_j z^j/(j + k + 1)! and bh1's B(h) = h
        series = [math.factorial(k) * sum((-h) ** j / math.factorial(j + k + 1) for j in range(40)) for k in (1, 2, 3)]
        assert order_condition_rhs(h, h, 3) == pytest.approx(series, rel=1e-8)
    h = 0.3
    lam_s, lam_r, nodes = 0.0, h, [-0.25, h]  # UniC-2 after UniP-2: one earlier node and the new point (r = 1)
    w_s, w = unified_weights(lam_s, lam_r, nodes, "bh1")
    # Polynomials of degree ≤ 2 in λ are integrated exactly: Σ w_j q(λ_j) = ∫_0^h e^{−(h−τ)} q(λ_s + τ) dτ.
    for q in (lambda u: 1.0, lambda u: u, lambda u: u * u):
        exact = quad(lambda tau, q=q: math.exp(-(h - tau)) * q(lam_s + tau), 0.0, h, epsabs=1e-14)[0]
        approx = w_s * q(lam_s) + sum(wj * q(lj) for wj, lj in zip(w, nodes, strict=True))
        assert approx == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("grid", ["uniform", "log_snr", "karras", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_nfe_equals_steps_and_output_is_finite(grid, steps):
    schedule = LinearSchedule(num_timesteps=T)
    den = oracle(GMM, schedule, EpsParameterization())
    for kwargs in ({"order": 3, "variant": "bh1"}, {"order": 2, "predictor": "dpm_solver"}, {"corrector": False}):
        sampler = UniPCSampler(steps, grid=grid, **kwargs)
        out = sampler.sample(den, sampler.prior((64, 2), schedule, torch.Generator().manual_seed(0)))
        assert out.nfe == steps and bool(torch.isfinite(out.x0).all())


def test_zero_terminal_snr_start_is_finite():
    """A first point with α = 0 (λ = −∞): first-order step, not corrected, never in a divided difference."""
    schedule = RectifiedFlowSchedule()
    den = oracle(SMOOTH_GMM, schedule, X0Parameterization())
    sampler = UniPCSampler(8, grid="uniform", order=3, variant="bh1")
    lam = [-math.inf, -1.0, 0.0, 1.0, math.inf]
    assert UniPCSampler(4, order=3, lower_order_final=False).step_orders(lam) == [1, 1, 2, 1]
    out = sampler.sample(den, torch.randn(32, 2, generator=torch.Generator().manual_seed(0)))
    assert out.nfe == 8 and bool(torch.isfinite(out.x0).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": 4}, "order must be 1, 2 or 3"),
        ({"variant": "bh3"}, r"valid choices: \['bh1', 'bh2'\]"),
        ({"predictor": "heun"}, r"valid choices: \['dpm_solver', 'unip'\]"),
        ({"grid": "log_snr", "rho": 3.0}, "takes no option"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniPCSampler(**kwargs)


def test_config_composes_and_refuses_typos(config_dir):
    assert SAMPLERS["unipc"] is UniPCSampler
    overrides = ["ckpt_path=x.ckpt", "sampler=unipc", "sampler.order=3", "sampler.variant=bh1"]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("sample", overrides=[*overrides, "sampler.predictor=dpm_solver", "sampler.corrector=false"])
        with pytest.raises(ConfigCompositionException, match=r"sampler\.variant=bh3") as excinfo:
            compose("sample", overrides=["ckpt_path=x.ckpt", "sampler=unipc", "sampler.variant=bh3"])
    assert "bh1" in str(excinfo.value.__cause__) and "bh2" in str(excinfo.value.__cause__)
    sampler = instantiate(cfg.sampler)
    assert isinstance(sampler, UniPCSampler) and sampler.grid == "log_snr" and sampler.steps == 20
    assert (sampler.order, sampler.variant, sampler.predictor, sampler.corrector) == (3, "bh1", "dpm_solver", False)
