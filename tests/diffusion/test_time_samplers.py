"""Time samplers: unbiased importance weights, the intended distributions, and exact resume."""

import io
import math

import pytest
import scipy.stats
import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import CosineSchedule, LinearSchedule, NoiseSchedule
from diffusion_lab.diffusion.time_samplers import (
    DensityTimeSampler,
    ImportanceTimeSampler,
    LogitNormalTimeSampler,
    LogNormalTimeSampler,
    LowDiscrepancyTimeSampler,
    TimeSampler,
    UniformTimeSampler,
)

CPU = torch.device("cpu")
T = 50
T_MIN = 1e-5


class VESchedule(NoiseSchedule):
    """α = 1, σ = σ_min (σ_max/σ_min)^t: ln σ is linear in t, λ = −2 ln σ, exact inverse."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        super().__init__()
        self.ln_min, self.ln_max = math.log(sigma_min), math.log(sigma_max)

    def log_snr(self, t: Tensor) -> Tensor:
        return -2.0 * (self.ln_min + t * (self.ln_max - self.ln_min))

    def t_from_log_snr(self, log_snr: Tensor, iters: int = 60) -> Tensor:
        return (-0.5 * log_snr - self.ln_min) / (self.ln_max - self.ln_min)


SCHEDULES = {
    "discrete_linear": lambda: LinearSchedule(num_timesteps=T),
    "linear": lambda: LinearSchedule(discrete=False),
    "cosine": lambda: CosineSchedule(discrete=False),
}
# Density samplers with parameters that keep Var[weight·ℓ] moderate, so 200k draws resolve the mean to ~0.5 %.
# (With its defaults the logit-normal proposal has weights up to ~1e53 at t_min = 1e-5: unbiased, but no test
# of size 200k could tell; the defaults get exact quadrature checks below instead.)
DENSITY_SAMPLERS = {
    "antithetic": lambda: LowDiscrepancyTimeSampler(t_min=T_MIN),
    "log_normal": lambda: LogNormalTimeSampler(p_mean=-1.0, p_std=2.5, t_min=T_MIN),
    "logit_normal": lambda: LogitNormalTimeSampler(m=0.5, s=3.0, t_min=T_MIN),
}
DEFAULT_DENSITY_SAMPLERS = {
    "antithetic": LowDiscrepancyTimeSampler,
    "log_normal": LogNormalTimeSampler,
    "logit_normal": LogitNormalTimeSampler,
}


def ell(t: Tensor) -> Tensor:
    """A fixed nonconstant test function, steep at both ends."""
    return torch.exp(3.0 * t) + 1.0 / (t + 0.05)


def reference_mean(schedule: NoiseSchedule, t_min: float = T_MIN) -> float:
    """E_ref[ℓ]: an exact sum over the steps, or the closed-form integral over (t_min, 1]."""
    if schedule.num_timesteps is not None:
        return ell(torch.arange(1, T + 1, dtype=torch.float64) / T).mean().item()
    integral = (math.exp(3.0) - math.exp(3.0 * t_min)) / 3.0 + math.log(1.05 / (t_min + 0.05))
    return integral / (1.0 - t_min)


def draws(sampler: TimeSampler, schedule: NoiseSchedule, n: int, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n // batch`` batches of ``batch`` draws, shape ``(n // batch, batch)`` each."""
    g = torch.Generator().manual_seed(seed)
    out = [sampler.sample(batch, schedule, CPU, g) for _ in range(n // batch)]
    return torch.stack([t for t, _ in out]), torch.stack([w for _, w in out])


def assert_unbiased(t: Tensor, w: Tensor, schedule: NoiseSchedule) -> None:
    """Batch means of weight·ℓ(t) (one row per batch) agree with the reference mean within 4 standard errors."""
    est = (w.double() * ell(t.double())).mean(1)
    mean, se, ref = est.mean().item(), est.std().item() / math.sqrt(est.numel()), reference_mean(schedule)
    assert se < 0.01 * ref, "test not informative: standard error too large"
    assert abs(mean - ref) < max(4 * se, 1e-6 * ref), (mean, ref, se)  # se = 0: stratified exactly


def assert_valid(t: Tensor, w: Tensor, schedule: NoiseSchedule) -> None:
    assert t.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.isfinite(w).all() and (w > 0).all()
    if schedule.num_timesteps is not None:
        idx = (t.double() * T).round()
        assert torch.equal(t, (idx / T).float()) and idx.min() >= 1 and idx.max() <= T  # exactly float32(i/T)
    else:
        assert t.min() >= T_MIN and t.max() <= 1.0


@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("sampler_name", DENSITY_SAMPLERS)
def test_density_samplers_are_unbiased_and_in_range(sampler_name, schedule_name):
    schedule, sampler = SCHEDULES[schedule_name](), DENSITY_SAMPLERS[sampler_name]()
    t, w = draws(sampler, schedule, 200_000, 1000)
    assert_valid(t, w, schedule)
    assert_unbiased(t, w, schedule)


@pytest.mark.parametrize("sampler_name", ["log_normal", "logit_normal"])
def test_default_density_samplers_are_unbiased_on_the_discrete_schedule(sampler_name):
    schedule, sampler = SCHEDULES["discrete_linear"](), DEFAULT_DENSITY_SAMPLERS[sampler_name]()
    t, w = draws(sampler, schedule, 1_000_000, 10_000)
    assert_valid(t, w, schedule)
    assert_unbiased(t, w, schedule)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler_name", DEFAULT_DENSITY_SAMPLERS)
def test_pdf_cdf_icdf_agree_by_quadrature(sampler_name, schedule_name):
    """With default parameters: ∫pdf = 1, cdf(t) = ∫_{t_min}^t pdf, icdf ∘ cdf = id, all on (t_min, 1]."""
    schedule, sampler = SCHEDULES[schedule_name](), DEFAULT_DENSITY_SAMPLERS[sampler_name]()
    x = torch.linspace(math.log(T_MIN), 0.0, 200_001, dtype=torch.float64)  # log-spaced: resolves t near t_min
    t = x.exp().float().double()  # the float32 grid the sampler evaluates
    pdf_dt = sampler.log_pdf(t, schedule).exp() * t  # pdf dt = pdf · t dx
    assert torch.isfinite(pdf_dt).all()
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(pdf_dt, x)])
    torch.testing.assert_close(cum[-1].item(), 1.0, rtol=0, atol=2e-4)
    torch.testing.assert_close(sampler.cdf(t, schedule), cum, rtol=0, atol=2e-4)
    u = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(sampler.cdf(sampler.icdf(u, schedule), schedule), u, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler_name", DEFAULT_DENSITY_SAMPLERS)
def test_discrete_steps_have_their_bin_mass_and_weight(sampler_name):
    """Steps are drawn with P(i) = cdf(i/T) − cdf((i−1)/T) (plus the uniform floor) and weighted (1/T)/P(i)."""
    schedule, sampler = SCHEDULES["discrete_linear"](), DEFAULT_DENSITY_SAMPLERS[sampler_name]()
    edges = torch.arange(T + 1, dtype=torch.float64) / T
    mass = torch.diff(sampler.cdf(edges, schedule))
    probs = sampler.step_probabilities(schedule, CPU)
    floor = sampler.mass_floor
    torch.testing.assert_close(probs, (1 - floor) * mass + floor / T, rtol=1e-9, atol=0)
    t, w = draws(sampler, schedule, 200_000, 200_000)
    idx = (t * T).round().long().flatten() - 1
    torch.testing.assert_close(w.flatten(), ((1.0 / T) / probs[idx]).float())
    freq = torch.bincount(idx, minlength=T).double() / idx.numel()
    assert (freq - probs).abs().max() < 4 * (probs * (1 - probs) / idx.numel()).sqrt().max() + 1e-9


def ks_pvalue(x: Tensor, mean: float, std: float) -> float:
    return float(scipy.stats.kstest(x.double().numpy(), "norm", args=(mean, std)).pvalue)


def test_log_normal_draws_ln_sigma_from_edm_normal_on_a_ve_schedule():
    """On σ ∈ [0.002, 80] truncation is negligible: ln σ = −λ/2 of the draws is N(P_mean, P_std²)."""
    schedule, sampler = VESchedule(), LogNormalTimeSampler(t_min=T_MIN)
    t, w = draws(sampler, schedule, 100_000, 100_000)
    ln_sigma = -0.5 * schedule.log_snr(t.flatten().double())
    assert ks_pvalue(ln_sigma, -1.2, 1.2) > 1e-3
    assert ks_pvalue(ln_sigma, -1.1, 1.2) < 1e-6  # the test can tell a shifted mean
    # On VE, ln σ is linear in t, so the density in t is the Gaussian density times d ln σ/dt.
    slope = schedule.ln_max - schedule.ln_min
    z = (ln_sigma + 1.2) / 1.2
    expected_w = (1 / (1 - T_MIN)) / (torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi) / 1.2 * slope)
    torch.testing.assert_close(w.flatten().double(), expected_w, rtol=1e-3, atol=0)


def test_log_normal_is_truncated_to_the_schedule_range():
    """A narrow VE range: every draw stays in (t_min, 1] and the weights still average to 1."""
    schedule, sampler = VESchedule(0.1, 1.0), LogNormalTimeSampler(t_min=T_MIN)
    t, w = draws(sampler, schedule, 100_000, 100_000)
    assert t.min() >= T_MIN and t.max() <= 1.0
    assert abs(w.double().mean().item() - 1.0) < 0.01


def test_log_normal_pdf_is_finite_at_t_equal_one():
    """The β-schedule's clamp at t = 1 has a zero one-sided derivative; the sampler takes the left one."""
    schedule = LinearSchedule(discrete=False)
    assert torch.isfinite(LogNormalTimeSampler().log_pdf(torch.tensor([1.0]), schedule)).all()


def test_logit_normal_draws_logit_t_from_the_normal():
    schedule, sampler = LinearSchedule(discrete=False), LogitNormalTimeSampler(m=0.3, s=0.8, t_min=T_MIN)
    t, _ = draws(sampler, schedule, 100_000, 100_000)
    logit = torch.logit(t.flatten().double())
    assert ks_pvalue(logit, 0.3, 0.8) > 1e-3
    assert ks_pvalue(logit, 0.3, 0.85) < 1e-6


def test_antithetic_draws_are_evenly_spaced_mod_one():
    schedule, sampler = LinearSchedule(discrete=False), LowDiscrepancyTimeSampler(t_min=T_MIN)
    g = torch.Generator().manual_seed(0)
    t, w = sampler.sample(64, schedule, CPU, g)
    u = (t.double() - T_MIN) / (1 - T_MIN)
    expected = torch.remainder(u[0] + torch.arange(64, dtype=torch.float64) / 64, 1.0)
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-6)
    assert (w == 1).all()
    t2, _ = sampler.sample(64, schedule, CPU, g)
    assert not torch.allclose(t, t2)  # a fresh offset per batch


def test_antithetic_discrete_covers_every_step_equally():
    schedule, sampler = LinearSchedule(num_timesteps=T), LowDiscrepancyTimeSampler()
    t, w = sampler.sample(3 * T, schedule, CPU, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount((t * T).round().long() - 1, minlength=T), torch.full((T,), 3))
    assert (w == 1).all()


def test_density_samplers_reject_bad_arguments():
    with pytest.raises(ValueError, match="t_min"):
        LowDiscrepancyTimeSampler(t_min=1.0)
    with pytest.raises(ValueError, match="std"):
        LogNormalTimeSampler(p_std=0.0)
    with pytest.raises(ValueError, match="std"):
        LogitNormalTimeSampler(s=-1.0)


def test_stateless_samplers_have_the_no_op_state_api():
    for sampler in (UniformTimeSampler(), LowDiscrepancyTimeSampler(), LogNormalTimeSampler()):
        sampler.update(torch.rand(4), torch.rand(4))
        assert sampler.state_dict() == {}
        sampler.load_state_dict({})
    assert isinstance(LogNormalTimeSampler(), DensityTimeSampler)


# ------------------------------------------------------------------------------------------- importance sampler
def push_one_at_a_time(losses: Tensor, counts: Tensor, positions: Tensor, bins: Tensor, values: Tensor) -> None:
    """Reference ring-buffer update (improved-diffusion's per-example loop), in place."""
    history = losses.shape[1]
    for b, v in zip(bins.tolist(), values.tolist(), strict=True):
        losses[b, positions[b]] = v
        positions[b] = (positions[b] + 1) % history
        counts[b] = min(int(counts[b]) + 1, history)


def bin_centres(schedule: NoiseSchedule, sampler: ImportanceTimeSampler) -> Tensor:
    """``(K,)`` float32 times, one inside each bin."""
    if schedule.num_timesteps is not None:
        return torch.arange(1, T + 1, dtype=torch.float32) / T
    k = torch.arange(sampler.num_bins, dtype=torch.float64)
    return (T_MIN + (1 - T_MIN) * (k + 0.5) / sampler.num_bins).float()


def spread(K: int) -> Tensor:
    """``(K,)`` ratio between a bin's two alternating losses: makes sqrt(E[L²]) and E[L] differ in shape."""
    return 1.0 + 3.0 * torch.arange(K, dtype=torch.float64) / K


def warm_up(sampler: ImportanceTimeSampler, schedule: NoiseSchedule, profile: Tensor) -> Tensor:
    """Fill every bin's (even-length) history with losses alternating ``profile`` and ``spread·profile``;
    returns the exact ``sqrt(E[L²])`` per bin, float64."""
    centres = bin_centres(schedule, sampler)
    ratio = spread(profile.numel())
    for j in range(sampler.history):
        assert not sampler.is_warm
        sampler.update(centres, profile * (ratio.float() if j % 2 else 1.0))
    assert sampler.is_warm
    return profile.double() * ((1.0 + ratio**2) / 2.0).sqrt()


@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_importance_sampler_uniform_until_warm(schedule_name):
    schedule, sampler = SCHEDULES[schedule_name](), ImportanceTimeSampler(history=3, num_bins=20, t_min=T_MIN)
    t, w = sampler.sample(10_000, schedule, CPU, torch.Generator().manual_seed(0))
    assert_valid(t, w, schedule)
    assert (w == 1).all()
    K = T if schedule.is_discrete else 20
    centres = bin_centres(schedule, sampler)
    for _ in range(3):
        sampler.update(centres[1:], torch.rand(K - 1) + 1)  # bin 0 never filled
    assert not sampler.is_warm and torch.equal(sampler.probabilities(), torch.full((K,), 1.0 / K, dtype=torch.float64))
    counts = torch.bincount(sampler.bin_index(t), minlength=K)
    assert counts.min() > 0.7 * 10_000 / K  # uniform over bins


@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_importance_sampler_probabilities_and_unbiasedness_after_warm_up(schedule_name):
    schedule, sampler = SCHEDULES[schedule_name](), ImportanceTimeSampler(num_bins=40, t_min=T_MIN)
    sampler.sample(1, schedule, CPU)
    K = T if schedule.is_discrete else 40
    profile = ell(bin_centres(schedule, sampler))  # nonuniform, near the variance optimum (p ∝ ℓ)
    rms = warm_up(sampler, schedule, profile)
    expected = 0.999 * rms / rms.sum() + 0.001 / K
    torch.testing.assert_close(sampler.probabilities(), expected, rtol=1e-6, atol=0)
    t, w = draws(sampler, schedule, 200_000, 1000)
    assert_valid(t, w, schedule)
    bins = sampler.bin_index(t.flatten())
    torch.testing.assert_close(w.flatten(), ((1.0 / K) / expected[bins]).float())
    freq = torch.bincount(bins, minlength=K).double() / bins.numel()
    assert (freq - expected).abs().max() < 4 * (expected / bins.numel()).sqrt().max()
    assert_unbiased(t, w, schedule)


def test_importance_update_handles_repeated_bins_like_a_sequential_push():
    schedule, sampler = LinearSchedule(num_timesteps=T), ImportanceTimeSampler(history=4)
    sampler.sample(1, schedule, CPU)
    ref = {k: v.clone() for k, v in sampler.state_dict().items() if isinstance(v, Tensor)}
    g = torch.Generator().manual_seed(0)
    for batch in (5, 37, 300):  # 300 draws over 8 steps: each step repeated far more than `history` times
        idx = torch.randint(1, 9, (batch,), generator=g)
        values = torch.rand(batch, generator=g)
        sampler.update(idx.float() / T, values)
        push_one_at_a_time(ref["losses"], ref["counts"], ref["positions"], idx - 1, values)
        state = sampler.state_dict()
        for key in ("losses", "counts", "positions"):
            assert torch.equal(state[key], ref[key]), key
    assert (state["counts"][:8] == 4).all() and (state["counts"][8:] == 0).all()


def test_importance_update_skips_non_finite_losses():
    schedule, sampler = LinearSchedule(num_timesteps=T), ImportanceTimeSampler(history=2)
    sampler.sample(1, schedule, CPU)
    sampler.update(torch.tensor([1 / T, 1 / T, 2 / T]), torch.tensor([1.0, float("nan"), float("inf")]))
    state = sampler.state_dict()
    assert state["counts"][:2].tolist() == [1, 0] and torch.isfinite(state["losses"]).all()


@pytest.mark.parametrize("schedule_name", ["discrete_linear", "linear"])
def test_importance_state_dict_round_trip_resumes_exactly(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    a = ImportanceTimeSampler(num_bins=30, t_min=T_MIN)
    a.sample(1, schedule, CPU)
    warm_up(a, schedule, torch.rand(T if schedule.is_discrete else 30) + 0.1)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # what a Lightning checkpoint does
    buffer.seek(0)
    b = ImportanceTimeSampler(num_bins=30, t_min=T_MIN)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(3):
        ta, wa = a.sample(256, schedule, CPU, torch.Generator().manual_seed(step))
        tb, wb = b.sample(256, schedule, CPU, torch.Generator().manual_seed(step))
        assert torch.equal(ta, tb) and torch.equal(wa, wb)
        losses = torch.rand(256, generator=torch.Generator().manual_seed(100 + step))
        a.update(ta, losses)
        b.update(tb, losses)
    b.load_state_dict({})
    assert b.state_dict() == {}


def test_importance_sampler_refuses_a_schedule_with_other_bins():
    sampler = ImportanceTimeSampler()
    sampler.sample(4, LinearSchedule(num_timesteps=T), CPU)
    with pytest.raises(ValueError, match="bins"):
        sampler.sample(4, LinearSchedule(num_timesteps=2 * T), CPU)
    with pytest.raises(RuntimeError, match="update"):
        ImportanceTimeSampler().update(torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match="uniform_prob"):
        ImportanceTimeSampler(uniform_prob=1.5)


@pytest.mark.parametrize("cls", [LogNormalTimeSampler, LogitNormalTimeSampler])
def test_importance_weight_off_keeps_the_draws_and_drops_the_weight(cls):
    """EDM / SD3 mode: the same times, weight 1 (the proposal becomes part of the objective)."""
    schedule = LinearSchedule(discrete=False)
    t_w, w = cls().sample(512, schedule, torch.device("cpu"), torch.Generator().manual_seed(3))
    t_1, one = cls(importance_weight=False).sample(512, schedule, torch.device("cpu"), torch.Generator().manual_seed(3))
    torch.testing.assert_close(t_w, t_1)
    assert (one == 1).all() and w.std() > 0.1
