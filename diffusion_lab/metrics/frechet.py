"""Fréchet distance between Gaussians fitted to feature sets (the FID formula, any extractor).

Everything is computed in float64 numpy, as pytorch-fid and torch-fidelity do: the trace of a matrix
square root of a product of two ill-conditioned covariances is the one place where float32 visibly fails.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

Float64Array = npt.NDArray[np.float64]
ArrayLike = Tensor | npt.NDArray[np.floating]

__all__ = ["feature_statistics", "frechet_distance", "trace_sqrt_product"]


def _to_float64(a: ArrayLike) -> Float64Array:
    """Convert a tensor or array to a float64 numpy array (copying off any device)."""
    if isinstance(a, Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def feature_statistics(features: ArrayLike) -> tuple[Float64Array, Float64Array]:
    """Mean and unbiased covariance of a feature set, in float64.

    Args:
        features: ``(N, D)`` features, ``N >= 2``.

    Returns:
        ``mu`` of shape ``(D,)`` and ``sigma`` of shape ``(D, D)`` (``np.cov`` normalisation ``N - 1``,
        as in pytorch-fid).
    """
    f = _to_float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {f.shape}")
    mu = f.mean(axis=0)
    sigma = np.atleast_2d(np.cov(f, rowvar=False))
    return mu, sigma


def _psd_eigvals_sqrt(w: npt.NDArray[np.floating]) -> Float64Array:
    """``sqrt`` of PSD eigenvalues, zeroing those within round-off of 0.

    Eigenvalues below ``D · eps · max(w)`` (numpy's ``matrix_rank`` tolerance) are noise of a null space;
    taking their square root would turn ``1e-15`` into ``3e-8`` per direction.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(w.max(initial=0.0)), 0.0)
    return np.sqrt(np.where(w > tol, w, 0.0)).astype(np.float64)


def _psd_sqrt(sigma: Float64Array) -> Float64Array:
    """Symmetric PSD square root ``(D, D)`` via ``eigh``."""
    w, v = np.linalg.eigh(sigma)
    return (v * _psd_eigvals_sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """``tr((Σ1 Σ2)^½)`` for symmetric PSD ``(D, D)`` matrices.

    ``Σ1 Σ2`` is similar to the symmetric PSD matrix ``M = Σ1^½ Σ2 Σ1^½``, so both have the same
    (real, non-negative) eigenvalues and ``tr((Σ1 Σ2)^½) = Σ_i sqrt(eig_i(M))``. This is what
    ``scipy.linalg.sqrtm`` + "drop tiny imaginary parts" approximates in pytorch-fid, without the
    imaginary parts and without the ``eps·I`` retry for singular covariances: rank deficiency just
    shows up as zero eigenvalues, and round-off ones (negative or tiny) are set to 0.
    """
    a, b = _to_float64(sigma1), _to_float64(sigma2)
    s1 = _psd_sqrt(0.5 * (a + a.T))
    m = s1 @ b @ s1
    return float(_psd_eigvals_sqrt(np.linalg.eigvalsh(0.5 * (m + m.T))).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein²) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Dowson & Landau 1982 / Heusel et al. 2017:
    ``d² = ||μ1 − μ2||² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½)``.

    Args:
        mu1, mu2: ``(D,)`` means.
        sigma1, sigma2: ``(D, D)`` covariances (symmetric PSD; singular is fine).

    Returns:
        The squared distance as a float, clamped at 0 (it is ``>= 0`` mathematically; the clamp only
        removes ``-1e-12``-size round-off for identical statistics).
    """
    m1, m2 = np.atleast_1d(_to_float64(mu1)), np.atleast_1d(_to_float64(mu2))
    s1, s2 = np.atleast_2d(_to_float64(sigma1)), np.atleast_2d(_to_float64(sigma2))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        shapes = {"mu1": m1.shape, "sigma1": s1.shape, "mu2": m2.shape, "sigma2": s2.shape}
        raise ValueError(f"inconsistent shapes: {shapes}")
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ValueError("statistics contain NaN or inf")
    diff = m1 - m2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(fd), 0.0)
