"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, §4.3 and App. D.2).

Convention (DESIGN.md): ``t ∈ [0, 1]``, ``t = 0`` data, ``x_t = α_t x0 + σ_t ε``. The model is the generative
process the samplers run: ``x_1 ∼ N(0, σ_1² I)`` (:meth:`Sampler.prior`) carried from ``t = 1`` to ``t_eps`` by
the ODE ``dx/dt = f(x, t) = α'_t x̂0 + σ'_t ε̂`` (:meth:`Denoiser.velocity`). Its log-density follows from the
instantaneous change of variables (Chen et al. 2018, Thm. 1), integrated from the data to the prior:

    log p_{t_eps}(x) = log N(x_1; 0, σ_1² I) + ∫_{t_eps}^1 ∇·f(x_t, t) dt,    x_1 = x + ∫_{t_eps}^1 f dt.

``∇·f`` is the exact trace of the Jacobian (``D`` backward passes; small ``D`` only) or the Hutchinson–Skilling
estimate ``vᵀ(∂f/∂x)v`` with one probe ``v`` per example held fixed along the trajectory (Grathwohl et al. 2019,
FFJORD §3.1), which keeps ``log p`` unbiased. The prior is the samplers' ``N(0, σ_1² I)``, not the exact marginal
``q(x_1)``: the number is the likelihood of the model that is actually sampled from (the gap is ``KL(q(x_1) ‖
prior)``, ≈ ``½ SNR_1 E‖x0‖²``, negligible for every shipped schedule). ``t_eps > 0`` avoids ``σ = 0`` at ``t = 0``;
the density reported is that of ``x_{t_eps}``, the data being read as a sample at ``t_eps``.

Bits/dim of 8-bit images (uniform dequantisation, Theis et al. 2016; Ho et al. 2020 §4.2 use the same bins).
Data are the levels ``x_k = −1 + 2k/255``; each level owns the bin ``x_k + [−h/2, h/2)^D`` with ``h = 2/255``
(centred, as the discretised decoder of :mod:`diffusion_lab.diffusion.likelihood`; bins of distinct levels are
disjoint). For ``u ∼ U[−h/2, h/2)^D``, Jensen's inequality gives

    −log P(x_k) = −log(h^D E_u[p(x_k + u)]) ≤ E_u[−log p(x_k + u)] − D log h,
    bpd = (−log p(x_k + u)/D − log(2/255)) / ln 2 = −log p(x_k + u)/(D ln 2) + log₂ 127.5   (+6.9944 bits).

Song et al. (score_sde ``likelihood.py``) dequantise in ``[0, 1]`` as ``(k + u)/256`` and rescale to ``[−1, 1]``,
so their bins are ``2/256`` wide and their offset is ``7`` bits; their data grid is ours shrunk by ``255/256``.
The bound is valid for any data whose distinct values are at least ``h`` apart (e.g. the 17 grey levels of
the digits dataset, then read at 8-bit resolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.likelihood_terms import NUM_LEVELS
from diffusion_lab.diffusion.parameterizations import Coefficients
from diffusion_lab.diffusion.schedules import NoiseSchedule

PROBES = ("rademacher", "gaussian")
# Song et al. 2021, App. D.2 (score_sde likelihood.py): integrate from ε = 1e-5, rtol = atol = 1e-5.
DEFAULT_T_EPS = 1e-5
DEFAULT_TOL = 1e-5
BIN_WIDTH = 2.0 / (NUM_LEVELS - 1)  # h: spacing of the 256 levels on [−1, 1]
BITS_OFFSET = -math.log2(BIN_WIDTH)  # log₂ 127.5: bits/dim added by the bin width

State = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ODELikelihoodOptions:
    """How the PF-ODE likelihood is computed.

    ``t_eps``: start time (None: ``1/T`` for a discrete-time schedule, its first grid point, else ``1e-5``);
    ``rtol``/``atol``: Dormand–Prince tolerances; ``probe``: Hutchinson probe (``rademacher``/``gaussian``);
    ``exact_trace``: the exact divergence instead (``D`` backward passes per evaluation); ``max_steps``:
    accepted + rejected steps before the solver gives up.
    """

    t_eps: float | None = None
    rtol: float = DEFAULT_TOL
    atol: float = DEFAULT_TOL
    probe: str = "rademacher"
    exact_trace: bool = False
    max_steps: int = 10_000

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"unknown Hutchinson probe {self.probe!r}; valid choices: {list(PROBES)}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"ODE tolerances must be > 0, got rtol={self.rtol}, atol={self.atol}")
        if self.t_eps is not None and not 0.0 <= self.t_eps < 1.0:
            raise ValueError(f"t_eps must be in [0, 1), got {self.t_eps}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    def start_time(self, schedule: NoiseSchedule) -> float:
        """``t_eps`` for ``schedule``; raises if the ODE is undefined there (``σ = 0``)."""
        if self.t_eps is None:
            return 1.0 / schedule.num_timesteps if schedule.num_timesteps is not None else DEFAULT_T_EPS
        sigma_0 = float(schedule.alpha_sigma(torch.tensor([self.t_eps], dtype=torch.float64))[1][0])
        if sigma_0 <= 0.0:
            raise ValueError(f"σ(t_eps) = 0 at t_eps={self.t_eps}: the PF-ODE needs t_eps > 0 for this schedule")
        return self.t_eps


@dataclass(frozen=True)
class ODELikelihoodOutput:
    """Per-example results, each ``(B,)`` unless noted.

    ``nll``: nats, ``−log p(x)`` of the continuous model, plus ``D log(1/h)`` when the data were dequantised (then
    an upper bound on the 8-bit NLL); ``bits_per_dim = nll / (D ln 2)``; ``prior_log_prob = log N(x_1; 0, σ_1²I)``;
    ``delta_log_prob = ∫ ∇·f dt``; ``latent``: ``x_1`` ``(B, ...)``; ``nfe``: drift evaluations (each one network
    forward and backward pass; exact traces take ``D`` backward passes); ``protocol``: how it was computed.
    """

    nll: Tensor
    bits_per_dim: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    latent: Tensor
    nfe: int
    protocol: dict[str, object] = field(default_factory=dict)


def dequantize_uniform(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x + u`` with ``u ∼ U[−h/2, h/2)`` elementwise, ``h = 2/255``; ``x`` ``(B, ...)`` in ``[−1, 1]``."""
    # Theis et al. 2016 §3.1: uniform noise over each level's bin turns a density into a discrete-NLL bound.
    if x.numel() and not bool(((x >= -1.0 - 1e-6) & (x <= 1.0 + 1e-6)).all()):
        raise ValueError(
            f"dequantisation needs images scaled to [-1, 1] (levels -1 + 2k/255), got values in "
            f"[{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + (u - 0.5) * BIN_WIDTH


def prior_log_prob(z: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``log N(z; 0, σ_1² I)`` ``(B,)``, the samplers' prior at ``t = 1``; ``z`` ``(B, ...)``."""
    sigma_1 = schedule.alpha_sigma(torch.ones((), dtype=torch.float64, device=z.device))[1].item()
    num_dims = z[0].numel()
    sq = z.flatten(1).double().square().sum(1)
    return -0.5 * sq / sigma_1**2 - num_dims * (math.log(sigma_1) + 0.5 * math.log(2 * math.pi))


def draw_probe(like: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """A Hutchinson probe the shape of ``like``: Rademacher ``±1`` or standard normal (``E[vvᵀ] = I``)."""
    if kind not in PROBES:
        raise ValueError(f"unknown Hutchinson probe {kind!r}; valid choices: {list(PROBES)}")
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2.0 - 1.0


def probability_flow_drift(denoiser: Denoiser, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
    """``f = α' x̂0 + σ' ε̂`` at ``x (B, ...)``, ``t (B,)``: :meth:`Denoiser.velocity`, differentiable in ``x``."""
    # Karras et al. 2022 eq. 4 in (α, σ) form; Song et al. 2021 eq. 13 for a VP/VE SDE.
    coefs = Coefficients.at(denoiser.schedule, t, x, derivatives=True)
    x0_hat = denoiser(x, t, y).to(x.dtype)
    eps_hat = (x - coefs.alpha * x0_hat) / coefs.sigma
    d_alpha, d_sigma = coefs.derivatives()
    return d_alpha * x0_hat + d_sigma * eps_hat


def drift_and_divergence(
    denoiser: Denoiser, x: Tensor, t: Tensor, y: Tensor | None, probe: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(f (B, ...), ∇·f (B,))``: the exact trace when ``probe`` is None, else ``vᵀ(∂f/∂x)v`` for ``v = probe``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = probability_flow_drift(denoiser, x, t, y)
        if probe is not None:
            # Hutchinson 1989 / Skilling 1989: E_v[vᵀJv] = tr J for E[vvᵀ] = I (FFJORD eq. 7).
            (vjp,) = torch.autograd.grad(f, x, grad_outputs=probe)
            return f.detach(), (vjp * probe).flatten(1).sum(1)
        flat_f = f.flatten(1)
        div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for i in range(flat_f.shape[1]):
            (row,) = torch.autograd.grad(flat_f[:, i].sum(), x, retain_graph=i + 1 < flat_f.shape[1])
            div = div + row.flatten(1)[:, i]
    return f.detach(), div


# Dormand & Prince 1980, RK5(4)7FM; Hairer, Nørsett & Wanner 1993, Table II.5.2 (the nodes c_i and rows a_ij).
_DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# 5th-order weights (= the last row of a: first same as last) minus the embedded 4th-order ones.
_DOPRI_E = (
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)


def _combine(state: State, ks: list[State], weights: tuple[float, ...], h: float) -> State:
    """``state + h Σ_j w_j k_j`` componentwise (``weights`` may be shorter than ``ks``)."""
    out = []
    for c, s in enumerate(state):
        acc = s
        for w, k in zip(weights, ks, strict=False):
            if w != 0.0:
                acc = acc + (h * w) * k[c]
        out.append(acc)
    return out[0], out[1]


def _scaled_norm(z: State, ref: State, rtol: float, atol: float) -> float:
    """``max`` over examples of ``max`` over components of ``RMS(z / (atol + rtol |ref|))`` over dimensions."""
    # Hairer et al. 1993, eq. II.4.11, per example so no example's accuracy is averaged away by the batch.
    per_component = []
    for a, r in zip(z, ref, strict=True):
        ratio = (a / (atol + rtol * r.abs())).double().reshape(a.shape[0], -1)
        per_component.append(ratio.square().mean(1).sqrt())
    return float(torch.stack(per_component).amax())


def _initial_step(
    func: Callable[[float, State], State], t0: float, y0: State, f0: State, span: float, rtol: float, atol: float
) -> float:
    """Starting step size, Hairer et al. 1993 §II.4 ("Starting step size", a–f) for order 5; one evaluation."""
    d0, d1 = _scaled_norm(y0, y0, rtol, atol), _scaled_norm(f0, y0, rtol, atol)
    h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, span)
    f1 = func(t0 + h0, _combine(y0, [f0], (1.0,), h0))
    diff = (f1[0] - f0[0], f1[1] - f0[1])
    d2 = _scaled_norm(diff, y0, rtol, atol) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, span)


def dormand_prince(
    func: Callable[[float, State], State],
    t0: float,
    t1: float,
    y0: State,
    rtol: float,
    atol: float,
    max_steps: int = 10_000,
) -> tuple[State, int]:
    """Integrate ``dy/dt = func(t, y)`` from ``t0`` to ``t1 > t0`` with adaptive RK5(4); returns ``(y(t1), nfe)``.

    ``y`` is a pair of tensors with a leading batch dimension. All examples share the step size, controlled by
    the worst example's error (per example: the RMS over its dimensions, the larger over the two components).
    """
    # Dormand & Prince 1980; step-size control of Hairer et al. 1993, eq. II.4.12-13 (safety 0.9, factors 0.2-10).
    nfe = 0

    def counted(t: float, y: State) -> State:
        nonlocal nfe
        nfe += 1
        return func(t, y)

    t, y = t0, y0
    k1 = counted(t, y)
    h = _initial_step(counted, t0, y0, k1, t1 - t0, rtol, atol)
    zero = (torch.zeros_like(y0[0]), torch.zeros_like(y0[1]))
    for _ in range(max_steps):
        h = min(h, t1 - t)
        ks, stage = [k1], y
        for c, row in zip(_DOPRI_C[1:], _DOPRI_A[1:], strict=True):
            stage = _combine(y, ks, row, h)
            ks.append(counted(t + c * h, stage))
        # The last stage is evaluated at the 5th-order solution itself (first same as last).
        err = _combine(zero, ks, _DOPRI_E, h)
        ref = (torch.maximum(y[0].abs(), stage[0].abs()), torch.maximum(y[1].abs(), stage[1].abs()))
        norm = _scaled_norm(err, ref, rtol, atol)
        if not math.isfinite(norm):
            raise FloatingPointError(f"the ODE drift is not finite near t = {t:.6g} (step {h:.3g})")
        if norm <= 1.0:
            t, y, k1 = t + h, stage, ks[-1]
            if t >= t1 - 1e-12:
                return y, nfe
        h *= min(10.0, max(0.2, 0.9 * norm ** (-1 / 5))) if norm > 0 else 10.0
        if h < 1e-14 * (t1 - t0):
            raise RuntimeError(f"ODE step size underflow at t = {t:.6g}; loosen rtol/atol")
    raise RuntimeError(f"ODE solver did not reach t = {t1} in {max_steps} steps (at t = {t:.6g}); loosen rtol/atol")


def _check_zero_snr(denoiser: Denoiser) -> None:
    """The ODE ends at ``t = 1``; with ``α_1 = 0`` the parameterization must define ``x̂0`` there."""
    if denoiser.schedule.zero_terminal_snr and not denoiser.parameterization.defined_at_zero_snr:
        raise ValueError(
            f"the PF-ODE ends at t = 1 where α_1 = 0; parameterization={denoiser.parameterization.name} cannot "
            "recover x̂0 there (use x0, v, flow or edm)"
        )


@torch.no_grad()
def ode_nll(
    denoiser: Denoiser,
    x: Tensor,
    y: Tensor | None = None,
    *,
    options: ODELikelihoodOptions | None = None,
    dequantize: bool = False,
    generator: torch.Generator | None = None,
) -> ODELikelihoodOutput:
    """Negative log-likelihood of ``x`` ``(B, ...)`` under the PF-ODE model of ``denoiser`` (see the module doc).

    ``dequantize``: ``x`` holds 8-bit levels in ``[−1, 1]``; adds ``u ∼ U[−1/255, 1/255)`` and reports the bound
    on the discrete NLL. ``generator`` draws the dequantisation noise, then the probes (one per example,
    fixed along the trajectory). Put ``denoiser`` in eval mode first (dropout would make the drift random).
    """
    # Song et al. 2021, App. D.2 (eq. 39-40); FFJORD (Grathwohl et al. 2019) for the trace estimator.
    options = options or ODELikelihoodOptions()
    _check_zero_snr(denoiser)
    schedule = denoiser.schedule
    t_eps = options.start_time(schedule)
    x0 = dequantize_uniform(x, generator) if dequantize else x
    probe = None if options.exact_trace else draw_probe(x0, options.probe, generator)
    batch = x0.shape[0]

    def func(t: float, state: State) -> State:
        f, div = drift_and_divergence(denoiser, state[0], x0.new_full((batch,), t), y, probe)
        return f, div.to(state[1].dtype)

    init = (x0, torch.zeros(batch, device=x0.device, dtype=torch.float64))
    (z, delta), nfe = dormand_prince(func, t_eps, 1.0, init, options.rtol, options.atol, options.max_steps)
    prior = prior_log_prob(z, schedule)
    num_dims = x0[0].numel()
    nll = -(prior + delta) + (num_dims * math.log(1.0 / BIN_WIDTH) if dequantize else 0.0)
    protocol: dict[str, object] = {
        "t_eps": t_eps,
        "rtol": options.rtol,
        "atol": options.atol,
        "probe": "exact_trace" if options.exact_trace else options.probe,
        "solver": "dopri5",
        "prior": "N(0, sigma_1^2 I)",
        "dequantize": f"uniform, bins of 2/{NUM_LEVELS - 1}" if dequantize else "none",
    }
    return ODELikelihoodOutput(
        nll=nll,
        bits_per_dim=nll / (num_dims * math.log(2.0)),
        prior_log_prob=prior,
        delta_log_prob=delta,
        latent=z,
        nfe=nfe,
        protocol=protocol,
    )
