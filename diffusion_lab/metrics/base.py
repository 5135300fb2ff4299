"""One interface for sample metrics, its two built-in implementations, and protocol-carrying log keys."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffusion_lab.metrics import toy2d
from diffusion_lab.metrics.digits import DigitsFrechetDistance
from diffusion_lab.metrics.prdc import prdc_scores
from diffusion_lab.metrics.toy2d import DEFAULT_BANDWIDTHS
from diffusion_lab.schema.domains import POSITIVE_INT

__all__ = ["DigitsFDMetric", "SampleMetric", "Toy2DMetric", "format_count", "metric_key", "protocol_key"]


@runtime_checkable
class SampleMetric(Protocol):
    """Scores generated ``samples`` against ``reference`` data; returns raw numbers keyed by metric name.

    The keys are bare (``"fd_digits"``); the evaluation loop turns them into protocol-carrying keys with
    :func:`protocol_key`.
    """

    name: str

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        """``samples (N, ...)``, ``reference (M, ...)`` -> ``{metric_name: value}``."""
        ...


class Toy2DMetric:
    """Energy distance, MMD² (sum of Gaussian kernels) and SW2 for ``(N, 2)`` point sets.

    Args:
        num_projections: directions for :func:`sliced_wasserstein`, drawn from a generator seeded with
            ``seed`` at every call, so repeated calls use the same directions.
        log_prob: optional true log-density ``(N, 2) -> (N,)``; adds ``mean_log_prob`` and
            ``finite_density_fraction``.
        bandwidths: Gaussian-kernel widths for :func:`mmd_rbf`.
        seed: seed of the projection generator.
        exact_w2: also the exact ``w2_sq`` (:func:`~diffusion_lab.metrics.toy2d.wasserstein2_squared`) and ``w2``
            (its root) between the samples and the first ``N`` reference points (``N`` = the sample count, which the
            reference must reach); about a minute per 10k-point set on one core, so off by default.
        prdc: also ``precision``, ``recall``, ``density``, ``coverage`` (:mod:`diffusion_lab.metrics.prdc`) in the
            raw 2-D coordinates.
        prdc_k: the k of their k-NN balls.
    """

    name = "toy2d"

    def __init__(
        self,
        num_projections: int = 256,
        log_prob: Callable[[Tensor], Tensor] | None = None,
        bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
        seed: int = 0,
        exact_w2: bool = False,
        prdc: bool = True,
        prdc_k: Annotated[int, POSITIVE_INT] = 3,
    ) -> None:
        self.num_projections, self.bandwidths, self.seed = num_projections, tuple(bandwidths), seed
        self.log_prob = log_prob
        self.exact_w2 = exact_w2
        self.prdc, self.prdc_k = prdc, prdc_k
        self._protocol: dict[str, Any] = {}

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        """``samples (N, 2)``, ``reference (M, 2)`` -> ``{energy_distance, mmd_rbf, sliced_wasserstein}``.

        Plus ``mean_log_prob`` and ``finite_density_fraction`` when ``log_prob`` was given, and the four
        :data:`~diffusion_lab.metrics.prdc.PRDC_KEYS` when :attr:`prdc`.
        """
        gen = torch.Generator().manual_seed(self.seed)
        out = {
            "energy_distance": toy2d.energy_distance(samples, reference),
            "mmd_rbf": toy2d.mmd_rbf(samples, reference, self.bandwidths),
            "sliced_wasserstein": toy2d.sliced_wasserstein(samples, reference, self.num_projections, gen),
        }
        if self.exact_w2:
            if reference.shape[0] < samples.shape[0]:
                raise ValueError(
                    f"metrics.exact_w2 needs at least as many reference points as samples ({samples.shape[0]}), "
                    f"got {reference.shape[0]}"
                )
            w2_sq = toy2d.wasserstein2_squared(samples, reference[: samples.shape[0]])
            out |= {"w2_sq": w2_sq, "w2": w2_sq**0.5}
        if self.log_prob is not None:
            lp = toy2d.mean_log_prob(samples, self.log_prob)
            out |= {"mean_log_prob": lp.mean_log_prob, "finite_density_fraction": lp.finite_density_fraction}
        if self.prdc:
            scores, self._protocol = prdc_scores(reference, samples, self.prdc_k, "raw 2-D coordinates")
            out |= scores
        return out

    def protocol(self) -> dict[str, Any]:
        """``{"prdc": …}``: feature space, k and set sizes of the last :meth:`compute` (empty before it)."""
        return {"prdc": self._protocol} if self._protocol else {}


class DigitsFDMetric:
    """``fd_digits``, ``class_coverage`` and ``class_entropy`` via :class:`DigitsFrechetDistance`, and precision /
    recall / density / coverage (:mod:`diffusion_lab.metrics.prdc`) in the same CNN features.

    The classifier is loaded (or trained and cached) on the first :meth:`compute`, not at construction,
    so building a config never trains anything.

    Args:
        cache_dir: classifier cache directory (default ``~/.cache/diffusion_lab/digits_classifier``).
        device: feature-extraction device.
        resize: ``"pool"`` or ``"center_crop"`` (see :mod:`diffusion_lab.metrics.digits`).
        prdc: also ``precision``, ``recall``, ``density``, ``coverage`` (samples vs every reference image).
        prdc_k: the k of their k-NN balls.
    """

    name = "digits"

    def __init__(
        self,
        cache_dir: str | None = None,
        device: str = "cpu",
        resize: str = "pool",
        prdc: bool = True,
        prdc_k: Annotated[int, POSITIVE_INT] = 3,
    ) -> None:
        self.cache_dir, self.device, self.resize = cache_dir, device, resize
        self.prdc, self.prdc_k = prdc, prdc_k
        self._fd: DigitsFrechetDistance | None = None
        self._protocol: dict[str, Any] = {}

    @property
    def extractor(self) -> DigitsFrechetDistance:
        """The underlying :class:`DigitsFrechetDistance` (created on first access)."""
        if self._fd is None:
            self._fd = DigitsFrechetDistance(self.cache_dir, self.device, self.resize)
        return self._fd

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        """``samples (N, 1, H, W)``, ``reference (M, 1, H', W')`` in ``[-1, 1]`` -> the three digits keys (and the
        four :data:`~diffusion_lab.metrics.prdc.PRDC_KEYS` when :attr:`prdc`)."""
        out = self.extractor.compute(samples, reference)
        if self.prdc:
            fd = self.extractor
            features = f"{fd.extractor_id} penultimate layer, inputs brought to 8x8 by resize={self.resize}"
            scores, self._protocol = prdc_scores(fd.features(reference), fd.features(samples), self.prdc_k, features)
            out |= scores
        return out

    def protocol(self) -> dict[str, Any]:
        """``{"prdc": …}``: feature space, k and set sizes of the last :meth:`compute` (empty before it)."""
        return {"prdc": self._protocol} if self._protocol else {}


# Largest unit first; a count is abbreviated only when the unit divides it exactly (no rounding).
_COUNT_UNITS: tuple[tuple[int, str], ...] = ((1_000_000, "M"), (1_000, "k"))


def format_count(n: int) -> str:
    """Sample count as written in metric keys: 500 -> ``"500"``, 1000 -> ``"1k"``, 50000 -> ``"50k"``,
    2_000_000 -> ``"2M"``, 1500 -> ``"1500"`` (exact, never rounded)."""
    if n <= 0:
        raise ValueError(f"sample count must be positive, got {n}")
    unit = next(((size, suffix) for size, suffix in _COUNT_UNITS if n % size == 0), (1, ""))
    return f"{n // unit[0]}{unit[1]}"


def protocol_key(prefix: str, name: str, num_samples: int, nfe: int) -> str:
    """Log key carrying the sampling protocol: ``protocol_key("val", "fd_digits", 1000, 50)`` ->
    ``"val/fd_digits@1k_nfe50"``. An empty ``prefix`` drops the ``"prefix/"`` part.

    The reference set and feature extractor are not in the key; the caller records them in the run
    summary (e.g. :attr:`DigitsFrechetDistance.extractor_id`).
    """
    if nfe <= 0:
        raise ValueError(f"nfe must be positive, got {nfe}")
    key = f"{name}@{format_count(num_samples)}_nfe{nfe}"
    return f"{prefix}/{key}" if prefix else key


def metric_key(prefix: str, name: str, num_samples: int, nfe: int, suffix: str = "") -> str:
    """:func:`protocol_key` plus ``suffix`` (e.g. ``"_cfg3"``), except that a ``name`` already carrying its
    protocol (an ``@``, like ``"fid_floor@1k"``, which involves no sampler) is only prefixed."""
    if "@" in name:
        return f"{prefix}/{name}" if prefix else name
    return protocol_key(prefix, name, num_samples, nfe) + suffix
