"""``Denoiser.velocity``: the probability-flow ODE drift, against the exact flow of Gaussian data."""

import pytest
import torch

from diffusion_lab.diffusion import (
    Denoiser,
    EpsParameterization,
    RectifiedFlowSchedule,
    SigmoidSchedule,
    VESchedule,
    VParameterization,
)
from diffusion_lab.diffusion.analytic import GaussianMixture, OracleNetwork

MU, S = 0.5, 0.7
F64 = torch.float64
GAUSS = GaussianMixture(torch.ones(1, dtype=F64), torch.full((1, 3), MU, dtype=F64), torch.tensor([S], dtype=F64))


@pytest.mark.parametrize("schedule", [SigmoidSchedule(), RectifiedFlowSchedule(), VESchedule()], ids=type)
@pytest.mark.parametrize("param", [EpsParameterization(), VParameterization()], ids=lambda p: p.name)
def test_velocity_is_the_derivative_of_the_exact_gaussian_flow(schedule, param):
    """For N(μ, s²) data the PF-ODE keeps ``z = (x − αμ)/√(α²s² + σ²)`` fixed: ``x(t) = αμ + √(α²s² + σ²)·z``."""
    denoiser = Denoiser(OracleNetwork(GAUSS, schedule, param), schedule, param)
    torch.manual_seed(0)
    x, t, h = torch.randn(5, 3), 0.4, 1e-3

    def flow(tt: float, z: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.alpha_sigma(torch.tensor([tt], dtype=torch.float64))
        return alpha * MU + torch.sqrt(alpha**2 * S**2 + sigma**2) * z

    alpha, sigma = schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    z = (x.double() - alpha * MU) / torch.sqrt(alpha**2 * S**2 + sigma**2)
    expected = (flow(t + h, z) - flow(t - h, z)) / (2 * h)
    got = denoiser.velocity(x, torch.full((5,), t))
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-4)
