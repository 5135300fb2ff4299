"""Reverse-SDE samplers: Euler–Maruyama and predictor–corrector with a Langevin corrector (Song et al. 2021).

The forward process ``x_t = α_t x0 + σ_t ε`` is the SDE ``dx = f(t) x dt + g(t) dw`` with
``f = d log α/dt`` and ``g² = dσ²/dt − 2 f σ² = −σ² dλ/dt`` (Lu et al. 2022, DPM-Solver eq. 2.2; Kingma et al.
2021 App. A), so one code path serves VP, VE and rectified-flow schedules. Its reverse (Song et al. 2021 eq. 6) is
``dx = [f x − g² ∇log p_t(x)] dt + g dw̄`` with the score ``∇log p_t = −ε̂/σ``.

Euler–Maruyama is stable only while ``|f·Δt| ≲ 1``: schedules with a steep end (cosine's clipped ``β_T``,
zero terminal SNR just below ``t = 1``) need many steps, where the ancestral DDPM sampler is exact per step.
A first step from ``α = 0`` (zero terminal SNR, ``f = −∞``) is taken with the ancestral step
``x ← α_r x̂0 + σ_r z`` (the posterior ``q(x_r | x_1, x̂0)``, exact there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.samplers.base import CountingDenoiser, Generator, Sampler, noise_like, posterior_coefficients
from diffusion_lab.samplers.grids import schedule_alpha_sigma
from diffusion_lab.schema.domains import FINITE_POSITIVE, NON_NEGATIVE_INT
from diffusion_lab.schema.signature import enforce_domains

F64 = torch.float64


def sde_coefficients(schedule: NoiseSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(t), g²(t))`` of the forward SDE at times ``t``, as CPU float64 tensors (shape of ``t``).

    ``f = α'/α`` and ``g² = dσ²/dt − 2fσ² (= α²·d(σ²/α²)/dt = −σ² dλ/dt)``, from float64 forward-mode derivatives
    of the schedule. ``f = −∞`` where ``α = 0``.
    """
    ref = next(iter(schedule.parameters()), next(iter(schedule.buffers()), None))
    t = t.to(device=ref.device if ref is not None else "cpu", dtype=F64)
    with torch.no_grad():
        primals, tangents = torch.func.jvp(schedule.alpha_sigma, (t,), (torch.ones_like(t),))[:2]
    alpha, sigma, d_alpha, d_sigma = (v.double().cpu() for v in (*primals, *tangents))
    f = d_alpha / alpha
    return f, 2.0 * sigma * d_sigma - 2.0 * f * sigma**2


@dataclass(frozen=True)
class SDEGrid:
    """A grid with the schedule and SDE coefficients at every point (CPU float64, each ``(N+1,)``)."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    f: Tensor
    g2: Tensor

    @classmethod
    def on(cls, schedule: NoiseSchedule, grid: Tensor) -> SDEGrid:
        """Evaluate everything at the points of ``grid``."""
        alpha, sigma = schedule_alpha_sigma(schedule, grid)
        return cls(grid, alpha, sigma, *sde_coefficients(schedule, grid))


# Song et al. 2021 eq. 6 by Euler–Maruyama (score_sde's EulerMaruyamaPredictor), Δt = t_{i+1} − t_i < 0.
def euler_maruyama_step(
    model: CountingDenoiser, x: Tensor, g: SDEGrid, i: int, y: Tensor | None, generator: Generator, last: bool
) -> Tensor:
    """``x_{i+1} = x_i + (f x_i + g² ε̂/σ_i)Δt + g √|Δt| z``; no noise on the ``last`` step (score_sde's ``x_mean``)."""
    t, alpha, sigma = float(g.t[i]), float(g.alpha[i]), float(g.sigma[i])
    if alpha == 0:  # zero terminal SNR: f = −∞; the exact ancestral step from x_1, which is independent of x0
        a, b, var = posterior_coefficients(g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1])
        mean = a * x + b * model(x, t, y)
        return mean if last else mean + math.sqrt(var) * noise_like(x, generator)
    f, g2 = float(g.f[i]), float(g.g2[i])
    _, eps_hat = model.x0_eps(x, t, alpha, sigma, y)
    dt = float(g.t[i + 1]) - t
    mean = x + (f * x + (g2 / sigma) * eps_hat) * dt
    return mean if last else mean + math.sqrt(g2 * -dt) * noise_like(x, generator)


# Song et al. 2021, Alg. 4 (VE) / Alg. 5 (VP) corrector: Langevin MCMC with step ε = 2 (r‖z‖/‖s‖)².
def langevin_correct(
    model: CountingDenoiser, x: Tensor, g: SDEGrid, i: int, y: Tensor | None, generator: Generator, snr: float
) -> Tensor:
    """One Langevin step on ``p_{t_i}``: ``x ← x + ε s + √(2ε) z`` with ``s = −ε̂/σ``; one evaluation.

    As in score_sde's ``LangevinCorrector``, ``‖z‖`` and ``‖s‖`` are per-example norms averaged over the batch:
    per-example ratios are heavy-tailed in low dimension (``‖s‖ → 0`` at a mode), but the step then depends
    on the batch. Song et al.'s VP factor ``α_i = 1 − β_i`` (≈ 1 for T = 1000) is left out so the rule, which
    is scale-free in ``x``, is the same for every schedule family.
    """
    t, sigma = float(g.t[i]), float(g.sigma[i])
    _, eps_hat = model.x0_eps(x, t, float(g.alpha[i]), sigma, y)
    score = -eps_hat / sigma
    z = noise_like(x, generator)
    flat = (x.shape[0], -1)
    z_norm, s_norm = z.reshape(flat).norm(dim=1).mean(), score.reshape(flat).norm(dim=1).mean()
    step = 2.0 * (snr * z_norm / s_norm.clamp_min(1e-20)) ** 2
    return x + step * score + (2.0 * step).sqrt() * z


class EulerMaruyamaSampler(Sampler):
    """Euler–Maruyama on the reverse SDE; NFE = steps. The last step adds no noise."""

    name = "euler_maruyama"

    def __init__(self, steps: int = 1000, **options: Any) -> None:
        super().__init__(steps, **options)

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        g, last = SDEGrid.on(model.schedule, grid), grid.numel() - 2
        for i in self.intervals(grid, progress):
            x = euler_maruyama_step(model, x, g, i, y, generator, i == last)
        return x


# Song et al. 2021, Alg. 4/5 in score_sde's order: at each t_i, `corrector_steps` Langevin steps, then the predictor.
class PCSampler(Sampler):
    """Predictor–corrector: Langevin corrector (signal-to-noise ratio ``snr`` > 0, ``corrector_steps`` ≥ 0 per
    grid point) followed by the Euler–Maruyama predictor. NFE = steps·(corrector_steps + 1).

    ``corrector_steps = 0`` is exactly :class:`EulerMaruyamaSampler`. Song et al. use ``snr = 0.16`` (VE, CIFAR-10)
    and ``0.01``–``0.075`` for VP models.
    """

    name = "pc"

    @enforce_domains
    def __init__(
        self,
        steps: int = 1000,
        *,
        snr: Annotated[float, FINITE_POSITIVE] = 0.16,
        corrector_steps: Annotated[int, NON_NEGATIVE_INT] = 1,
        **options: Any,
    ) -> None:
        super().__init__(steps, **options)
        self.snr, self.corrector_steps = snr, corrector_steps

    def solve(
        self, model: CountingDenoiser, x: Tensor, grid: Tensor, y: Tensor | None, generator: Generator, progress: bool
    ) -> Tensor:
        g, last = SDEGrid.on(model.schedule, grid), grid.numel() - 2
        for i in self.intervals(grid, progress):
            for _ in range(self.corrector_steps):
                x = langevin_correct(model, x, g, i, y, generator, self.snr)
            x = euler_maruyama_step(model, x, g, i, y, generator, i == last)
        return x
