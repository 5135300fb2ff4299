"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3, App. C).

A power-function EMA averages the weights ``θ(τ)`` seen up to training time ``t`` with the profile
``p_t(τ) = (γ + 1) τ^γ / t^(γ+1)`` on ``[0, t]`` (time counted in training images, so it does not depend on the batch
size). Its width is the relative standard deviation ``σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3)))`` (their eq. 123).
Training tracks a few such EMAs (two σ_rel) and stores snapshots of them; afterwards any other profile is
reconstructed as the least-squares combination of the stored ones (their Alg. 3), which is linear in the weights.

Pure math here (numpy, float64); the snapshots are written by :mod:`diffusion_lab.callbacks.phema` and combined into
checkpoints by :mod:`diffusion_lab.phema_cli`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from diffusion_lab.schema.run import MAX_SIGMA_REL


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> np.ndarray:
    """σ_rel of the power profile with exponent ``γ > −1`` (Karras et al. 2024 eq. 123), float64, ``gamma``'s shape."""
    g = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """The exponent γ of σ_rel: the largest real root of ``γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0``
    (Karras et al. 2024 eq. 126, Alg. 2), float64 of ``sigma_rel``'s shape.

    Raises ``ValueError`` for σ_rel outside ``(0, 1/√12)``, where no γ > 0 exists.
    """
    s = np.asarray(sigma_rel, dtype=np.float64)
    bad = s[~((s > 0) & (s < MAX_SIGMA_REL))]
    if bad.size:
        raise ValueError(
            f"sigma_rel={bad.tolist()} has no power-function EMA; valid: numbers in (0, 1/√12 ≈ {MAX_SIGMA_REL:.4f})"
        )
    inv = s.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - k, 12.0 - k]) for k in inv]
    return np.array([r.real[np.abs(r.imag) < 1e-9].max() for r in roots]).reshape(s.shape)


def power_beta(gamma: float, t_next: float, t_delta: float) -> float:
    """The EMA decay β of the update that moves the profile from time ``t_next − t_delta`` to ``t_next``
    (Karras et al. 2024 eq. 127): ``β = (1 − Δt/t)^(γ+1)``; the first update (``t_delta = t_next``) gives β = 0."""
    return float((1.0 - t_delta / t_next) ** (gamma + 1.0))


def profile_inner_product(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """``∫ p_a(τ) p_b(τ) dτ`` of two power profiles ending at ``t_a``, ``t_b`` (broadcast; Karras et al. 2024 eq. 151):
    ``(γa+1)(γb+1) / ((γa+γb+1) t_max) · (t_a/t_b)^γb`` when ``t_a < t_b``, ``(t_b/t_a)^γa`` otherwise."""
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    gamma_a, gamma_b = np.asarray(gamma_a, dtype=np.float64), np.asarray(gamma_b, dtype=np.float64)
    ratio = np.where(t_a < t_b, (t_a / t_b) ** gamma_b, (t_b / t_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    in_time: Sequence[float], in_sigma_rel: Sequence[float], out_time: float, out_sigma_rel: Sequence[float]
) -> np.ndarray:
    """Coefficients ``X (n_in, n_out)`` so that ``Σ_i X[i, j] p_i ≈ p_out_j`` in least squares (Karras et al. 2024
    Alg. 3): the normal equations ``A X = B`` with the Gram matrix ``A`` of the stored profiles (times ``in_time``,
    widths ``in_sigma_rel``) and their inner products ``B`` with the wanted ones; each column is then normalised to
    sum to 1, as the reference implementation does (the weights' average, not a scaled copy)."""
    t_in = np.asarray(in_time, dtype=np.float64).reshape(-1, 1)
    g_in = sigma_rel_to_gamma(np.asarray(in_sigma_rel, dtype=np.float64)).reshape(-1, 1)
    g_out = sigma_rel_to_gamma(np.asarray(out_sigma_rel, dtype=np.float64)).reshape(1, -1)
    gram = profile_inner_product(t_in, g_in, t_in.T, g_in.T)
    cross = profile_inner_product(t_in, g_in, np.full_like(g_out, float(out_time)), g_out)
    x = np.linalg.solve(gram, cross)
    return x / x.sum(axis=0, keepdims=True)


def discrete_power_weights(num_updates: int, gamma: float) -> np.ndarray:
    """The weight of each of ``n`` equally spaced updates in the tracked EMA after the ``n``-th (closed form of the
    recursion with :func:`power_beta`): ``w_k = (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1)``, ``k = 1 … n`` — the profile's
    mass on ``[k−1, k]``, so the weights sum to 1. ``(n,)`` float64."""
    k = np.arange(1, num_updates + 1, dtype=np.float64)
    return (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / float(num_updates) ** (gamma + 1)
