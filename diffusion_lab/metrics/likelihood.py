"""Bits per dimension of a trained denoiser on held-out data.

A discrete-time model is scored with its own variational bound (Ho et al. 2020 eq. 5, discretised
Gaussian decoder for 8-bit images); a continuous-time one with the continuous ELBO (Kingma et al.
2021 eq. 17–19). Both are upper bounds on the negative log-likelihood, reported in bits per data
dimension with their standard error; every number carries its method in the protocol.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.likelihood import continuous_elbo, discrete_elbo

METHODS = ("auto", "discrete", "continuous")


@dataclass(frozen=True)
class BitsPerDim:
    """``bpd``: mean bits/dim; ``sem``: its standard error; ``num_examples``; and how it was computed."""

    bpd: float
    sem: float
    num_examples: int
    method: str
    decoder: str
    num_t_samples: int | None

    def protocol(self) -> dict[str, object]:
        """Everything but the numbers, for the run's ``protocol`` record."""
        return {k: v for k, v in asdict(self).items() if k not in ("bpd", "sem")}


def resolve_method(method: str, denoiser: Denoiser) -> str:
    """``auto`` → ``discrete`` for a discrete-time schedule, else ``continuous``."""
    if method not in METHODS:
        raise ValueError(f"unknown bits/dim method {method!r}; valid choices: {list(METHODS)}")
    if method == "auto":
        return "discrete" if denoiser.schedule.is_discrete else "continuous"
    return method


@torch.no_grad()
def bits_per_dim(
    denoiser: Denoiser,
    data: Tensor,
    batch_size: int = 256,
    method: str = "auto",
    num_t_samples: int | None = 50,
    decoder: str | None = None,
    seed: int = 0,
) -> BitsPerDim:
    """Bits/dim of ``denoiser`` on ``data (N, ...)`` (images in [−1, 1] or continuous vectors).

    ``decoder`` defaults to ``discretized`` for ``(N, C, H, W)`` images and ``gaussian`` otherwise;
    ``num_t_samples`` diffusion terms per example (None: all T terms of a discrete model).
    """
    method = resolve_method(method, denoiser)
    decoder = decoder or ("discretized" if data.dim() == 4 else "gaussian")
    device = next(iter(denoiser.parameters()), torch.empty(0)).device
    gen = torch.Generator(device=device).manual_seed(seed)
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
    sem = bpd.std().item() / math.sqrt(bpd.numel()) if bpd.numel() > 1 else float("nan")
    return BitsPerDim(bpd.mean().item(), sem, bpd.numel(), method, decoder, num_t_samples)
