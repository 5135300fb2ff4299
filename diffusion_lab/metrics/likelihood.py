"""Bits per dimension of a trained denoiser on held-out data.

A discrete-time model is scored with its own variational bound (``bound: discrete_vlb``, Ho et al. 2020 eq. 5,
discretised Gaussian decoder of variance β̃_2 for 8-bit images); a continuous-time one with the continuous ELBO
(``bound: continuous_elbo``, Kingma et al. 2021 eq. 17–19, λ drawn uniformly per example). Both are upper
bounds on the negative log-likelihood, but not the same number: the protocol names the bound.
``method="ode"`` instead computes the likelihood of the probability-flow ODE model (``bound: ode_nll``, Song et
al. 2021 App. D.2), with uniform dequantisation for 8-bit images (:mod:`diffusion_lab.diffusion.ode_likelihood`);
it is never chosen by ``auto``. Results are in bits per data dimension with their standard error; every number
carries its method and bound in the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.likelihood import continuous_elbo, discrete_elbo, elbo_time_range
from diffusion_lab.diffusion.ode_likelihood import ODELikelihoodOptions, ode_nll

METHODS = ("auto", "discrete", "continuous", "ode")


@dataclass(frozen=True)
class BitsPerDim:
    """``bpd``: mean bits/dim; ``sem``: its standard error; ``num_examples``; and how it was computed."""

    bpd: float
    sem: float
    num_examples: int
    method: str
    decoder: str
    num_t_samples: int | None
    # Method-specific protocol, merged into protocol(): for "ode" the solver, tolerances, probe, t_eps, NFE.
    details: dict[str, object] = field(default_factory=dict)

    def protocol(self) -> dict[str, object]:
        """Everything but the numbers, for the run's ``protocol`` record."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("bpd", "sem", "details")}
        return {**fields, **self.details}


def resolve_method(method: str, denoiser: Denoiser) -> str:
    """``auto`` → ``discrete`` for a discrete-time schedule, else ``continuous``; ``ode`` only when asked."""
    if method not in METHODS:
        raise ValueError(f"unknown bits/dim method {method!r}; valid choices: {list(METHODS)}")
    if method == "auto":
        return "discrete" if denoiser.schedule.is_discrete else "continuous"
    return method


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate without dropout (a random drift breaks the ODE solver), then restore the training flag."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _sem(values: Tensor) -> float:
    """Standard error of the mean of ``values (N,)`` (nan for a single value).

    A real standard error because every estimator here draws its times independently per example.
    """
    return values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")


def _ode_bits_per_dim(
    denoiser: Denoiser,
    data: Tensor,
    batch_size: int,
    options: ODELikelihoodOptions,
    dequantize: bool,
    gen: torch.Generator,
    device: torch.device,
) -> BitsPerDim:
    """Bits/dim of the probability-flow ODE model; NFE per batch in the protocol."""
    values, nfes = [], []
    protocol: dict[str, object] = {}
    for lo in range(0, data.shape[0], batch_size):
        x0 = data[lo : lo + batch_size].to(device).float()
        out = ode_nll(denoiser, x0, options=options, dequantize=dequantize, generator=gen)
        values.append(out.bits_per_dim.double().cpu())
        nfes.append(out.nfe)
        protocol = out.protocol
    bpd = torch.cat(values)
    details = {
        **protocol,
        "bound": "ode_nll",
        "batch_size": batch_size,
        "nfe_mean": sum(nfes) / len(nfes),
        "nfe_max": max(nfes),
    }
    decoder = "uniform_dequantization" if dequantize else "density"
    return BitsPerDim(bpd.mean().item(), _sem(bpd), bpd.numel(), "ode", decoder, None, details)


@torch.no_grad()
def bits_per_dim(
    denoiser: Denoiser,
    data: Tensor,
    batch_size: int = 256,
    method: str = "auto",
    num_t_samples: int | None = 50,
    decoder: str | None = None,
    seed: int = 0,
    *,
    ode: ODELikelihoodOptions | None = None,
    dequantize: bool | None = None,
) -> BitsPerDim:
    """Bits/dim of ``denoiser`` on ``data (N, ...)`` (images in [−1, 1] or continuous vectors).

    ELBO methods: ``decoder`` defaults to ``discretized`` for ``(N, C, H, W)`` images and ``gaussian`` otherwise;
    ``num_t_samples`` diffusion terms per example (None: all T terms of a discrete model).
    ``method="ode"``: ``ode`` options (default :class:`ODELikelihoodOptions`); ``dequantize`` defaults to True
    for ``(N, C, H, W)`` images (8-bit bound, +log₂127.5 bits/dim) and False otherwise (a density, in bits).
    The denoiser is evaluated in eval mode.
    """
    method = resolve_method(method, denoiser)
    if method == "ode" and decoder is not None:
        raise ValueError("method='ode' has no decoder; discrete data are handled by dequantize=True")
    if method != "ode" and (ode is not None or dequantize is not None):
        raise ValueError(f"ode options and dequantize apply to method='ode' only, got method={method!r}")
    device = next(iter(denoiser.parameters()), torch.empty(0)).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with _eval_mode(denoiser):
        if method == "ode":
            dequantize = data.dim() == 4 if dequantize is None else dequantize
            return _ode_bits_per_dim(denoiser, data, batch_size, ode or ODELikelihoodOptions(), dequantize, gen, device)
        return _elbo_bits_per_dim(denoiser, data, batch_size, method, num_t_samples, decoder, gen, device)


def _elbo_bits_per_dim(
    denoiser: Denoiser,
    data: Tensor,
    batch_size: int,
    method: str,
    num_t_samples: int | None,
    decoder: str | None,
    gen: torch.Generator,
    device: torch.device,
) -> BitsPerDim:
    """Bits/dim by the discrete VLB or the continuous ELBO; the bound and its decoder variance in the protocol."""
    decoder = decoder or ("discretized" if data.dim() == 4 else "gaussian")
    dims = data[0].numel()
    values = []
    for lo in range(0, data.shape[0], batch_size):
        x0 = data[lo : lo + batch_size].to(device).float()
        if method == "discrete":
            out = discrete_elbo(denoiser, x0, decoder=decoder, num_t_samples=num_t_samples, generator=gen)
        else:
            out = continuous_elbo(denoiser, x0, decoder=decoder, num_t_samples=num_t_samples or 1, generator=gen)
        values.append(out.bits_per_dim(dims).double().cpu())
    bpd = torch.cat(values)
    details = bound_protocol(denoiser, method)
    return BitsPerDim(bpd.mean().item(), _sem(bpd), bpd.numel(), method, decoder, num_t_samples, details)


def bound_protocol(denoiser: Denoiser, method: str) -> dict[str, object]:
    """Which bound an ELBO ``method`` computes, with its decoder (and reverse) variance and its estimator.

    ``discrete``: Ho et al. 2020 eq. 5 (``discrete_vlb``), the reverse variance ``β̃_i`` (or learned) and, where
    ``λ_0 = +∞``, a decoder of variance ``β̃_2`` at ``i = 1`` (the same decoder as the training ``elbo`` weighting);
    where ``λ_0`` is finite, VDM's reconstruction at ``t = 0`` (variance ``σ_0²/α_0²``). ``continuous``: Kingma
    et al. 2021 eq. 17 over ``[t_min, t_max]`` (``continuous_elbo``), VDM's reconstruction at ``t_min``, with ``λ``
    drawn uniformly per example. Every bound's s.e. is over independent per-example estimates.
    """
    schedule = denoiser.schedule
    if method == "continuous":
        t_min, t_max = elbo_time_range(schedule)
        return {
            "bound": "continuous_elbo",
            "decoder_variance": "sigma^2/alpha^2 at t_min",
            "estimator": "log_snr_uniform_per_example",
            "t_min": t_min,
            "t_max": t_max,
        }
    learned = denoiser.learned_variance
    finite_at_zero = math.isfinite(schedule.log_snr_bounds()[1])
    first = "sigma^2/alpha^2 at t=0" if finite_at_zero else ("learned" if learned else "beta_tilde_2")
    return {
        "bound": "discrete_vlb",
        "decoder_variance": first,
        "reverse_variance": "learned" if learned else "beta_tilde",
        "estimator": "uniform_step_per_example",
        "num_steps": schedule.num_timesteps,
    }
