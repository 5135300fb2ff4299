"""Loss weightings ``w(λ)`` applied to one canonical error, the ε-MSE (Kingma & Gao 2023 view).

``L = E_t[ w(λ_t) · ‖ε̂ − ε‖² ]``. In this table the familiar objectives are rows:

==============  ==========================  =========================================
name            w(λ) (relative to ε-MSE)    same loss written in x0-space, w·SNR
==============  ==========================  =========================================
eps (simple)    1                           SNR          (Ho et al. 2020)
x0              1/SNR = e^{−λ}              1
v               1 + 1/SNR                   SNR + 1      (Salimans & Ho 2022)
min_snr (γ)     min(SNR, γ)/SNR             min(SNR, γ)  (Hang et al. 2023)
==============  ==========================  =========================================

with ``SNR = e^{λ}``. Adding a weighting is a subclass plus one YAML file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Weighting(ABC):
    """A loss weighting ``w(λ) ≥ 0``; called on a ``(B,)`` log-SNR, returns ``(B,)``."""

    name: str

    @abstractmethod
    def __call__(self, log_snr: Tensor) -> Tensor:
        """``w(λ)`` with the shape of ``log_snr``."""


# Ho et al. 2020 eq. 14, L_simple: unweighted ε-MSE.
class EpsMSEWeighting(Weighting):
    """Uniform ε-MSE, ``w(λ) = 1``."""

    name = "eps_mse"

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.ones_like(log_snr)


# Hang et al. 2023 eq. 10: x0-space weight min(SNR, γ), i.e. min(SNR, γ)/SNR on the ε-MSE.
class MinSNRWeighting(Weighting):
    """Min-SNR-γ: ``w(λ) = min(1, γ e^{−λ})``, computed in log space (finite at λ = ±∞)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"weighting.gamma must be > 0, got {gamma}")
        self.gamma = gamma

    def __call__(self, log_snr: Tensor) -> Tensor:
        return torch.exp(torch.clamp(math.log(self.gamma) - log_snr, max=0.0))
