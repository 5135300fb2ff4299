import pytest
import torch

from diffusion_lab.diffusion.parameterizations import (
    EpsParameterization,
    VParameterization,
    X0Parameterization,
    score_from_eps,
    v_from_x0_eps,
)
from diffusion_lab.diffusion.schedules import CosineSchedule

PARAMS = [EpsParameterization(), X0Parameterization(), VParameterization()]


def random_state(n=64, d=5, vp=True):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    if vp:
        alpha, sigma = CosineSchedule().alpha_sigma(torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    else:  # a non-variance-preserving (α, σ): the maps must not assume α² + σ² = 1
        alpha = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1
        sigma = 3 * torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1
    return x0, eps, alpha, sigma


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("vp", [True, False])
def test_round_trip_target_to_x0_eps(param, vp):
    x0, eps, alpha, sigma = random_state(vp=vp)
    x_t = alpha * x0 + sigma * eps
    x0_hat, eps_hat = param.to_x0_eps(param.target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("dst", PARAMS, ids=lambda p: p.name)
def test_conversion_between_parameterizations(src, dst):
    """A prediction in one output space, converted to another and back, is unchanged."""
    x0, eps, alpha, sigma = random_state(vp=False)
    x_t = alpha * x0 + sigma * eps
    out = torch.randn_like(x0)  # an arbitrary (wrong) prediction
    x0_hat, eps_hat = src.to_x0_eps(out, x_t, alpha, sigma)
    # The converted pair is consistent with x_t ...
    torch.testing.assert_close(alpha * x0_hat + sigma * eps_hat, x_t, rtol=1e-9, atol=1e-9)
    out_dst = dst.target(x0_hat, eps_hat, alpha, sigma)
    back = src.target(*dst.to_x0_eps(out_dst, x_t, alpha, sigma), alpha, sigma)
    torch.testing.assert_close(back, out, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: p.name)
@pytest.mark.parametrize("vp", [True, False])
def test_eps_error_scale_converts_native_error_to_eps_error(param, vp):
    x0, eps, alpha, sigma = random_state(vp=vp)
    x_t = alpha * x0 + sigma * eps
    target = param.target(x0, eps, alpha, sigma)
    out = target + 0.1 * torch.randn_like(target)
    _, eps_hat = param.to_x0_eps(out, x_t, alpha, sigma)
    eps_err = (eps_hat - eps).square().sum(1, keepdim=True)
    native = (out - target).square().sum(1, keepdim=True)
    torch.testing.assert_close(eps_err, param.eps_error_scale(alpha, sigma) * native, rtol=1e-9, atol=1e-12)


def test_v_and_score_definitions():
    x0, eps, alpha, sigma = random_state()
    torch.testing.assert_close(VParameterization().target(x0, eps, alpha, sigma), alpha * eps - sigma * x0)
    torch.testing.assert_close(v_from_x0_eps(x0, eps, alpha, sigma), alpha * eps - sigma * x0)
    torch.testing.assert_close(score_from_eps(eps, sigma), -eps / sigma)
    # For a VP schedule, x0 = α x_t − σ v (Salimans & Ho 2022 §4).
    x_t = alpha * x0 + sigma * eps
    torch.testing.assert_close(alpha * x_t - sigma * v_from_x0_eps(x0, eps, alpha, sigma), x0)
