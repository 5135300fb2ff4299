"""FID, Inception Score, KID and precision/recall through torch-fidelity, with cached reference statistics.

Protocol (what a reported ``val/fid@N_nfeK`` means):

- Features: torch-fidelity's ``inception-v3-compat`` (the TF-Inception port of Heusel et al. 2017, bit-compatible
  with the original FID code), layer ``2048`` for FID/KID/precision-recall and ``logits_unbiased`` for IS.
  Another ``feature_layer`` (``64``, ``192``, ``768``; pytorch-fid's ``--dims``) renames the keys ``fid<layer>``,
  ``kid<layer>``, ``precision<layer>``, ``recall<layer>``.
  Precision/recall (Kynkäänniemi et al. 2019) are computed in the same Inception-2048 space, not the paper's VGG16.
- Images: ``(N, C, H, W)`` in ``[-1, 1]`` become uint8 ``round((x + 1) · 127.5)``; grayscale is repeated to 3
  channels; torch-fidelity resizes to 299×299 as TF1 did.
- Reference: the training split handed in as ``reference``; its features/statistics are cached on disk under
  ``<cache_dir>/<reference_name>-<content hash>-<H>px-w<weights hash>-…`` (torch-fidelity's own cache), so a
  second evaluation against the same data, resolution and weights never recomputes them.
- Files from outside are never unpickled on trust (torch-fidelity itself loads both with ``weights_only=False``):
  the Inception weights are read ``weights_only=True`` and checked against the network's keys and shapes
  (:class:`WeightsOnlyInceptionV3`, registered as :data:`INCEPTION_WEIGHTS_ONLY`), and every cache file of a
  reference is read weights-only (tensors and float arrays) before torch-fidelity opens it
  (:func:`check_cache_files`). Each cache file carries its sha256 (``<file>.sha256``, written after it); one that
  does not match is deleted with a warning and recomputed, never read.
- Noise floor: ``fid_floor@N`` is the FID of ``N`` random training images (``N`` = the sample count, a fixed
  seeded subset) against the full reference: the FID a perfect generator would score with that many samples.

The Inception weights and cache checks live in :mod:`diffusion_lab.metrics.inception`, the digits extractor in
:mod:`diffusion_lab.metrics.digits_fidelity` (callers import those names from there); importing this module registers
both extractors with torch-fidelity.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_lab.metrics.base import format_count
from diffusion_lab.metrics.digits_fidelity import register_digits_extractors
from diffusion_lab.metrics.inception import (
    INCEPTION,
    INCEPTION_WEIGHTS_ONLY,
    WeightsOnlyInceptionV3,
    check_cache_files,
    file_digest,
    resolve_inception_weights,
    seal_cache_files,
    verify_cache_checksums,
)
from diffusion_lab.metrics.prdc import DEFAULT_K

__all__ = [
    "DEFAULT_CACHE_DIR",
    "FidelityMetric",
    "UInt8Images",
    "images_digest",
    "to_uint8",
]

log = logging.getLogger(__name__)
register_digits_extractors()  # idempotent: FidelityMetric finds the digits extractors by name

DEFAULT_CACHE_DIR = Path("~/.cache/diffusion_lab/fidelity")
_CHUNK = 4096


def to_uint8(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` in ``[-1, 1]`` (C = 1 or 3) -> uint8 ``(N, 3, H, W)``, ``round((x + 1) · 127.5)``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images in [-1, 1], got shape {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class UInt8Images(Dataset):
    """Dataset over ``(N, C, H, W)`` images in ``[-1, 1]`` returning uint8 ``(3, H, W)`` (torch-fidelity's input)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return to_uint8(self.images[i : i + 1])[0].contiguous()


def images_digest(images: Tensor) -> str:
    """16 hex digits of the sha256 of the uint8 images and their shape (what the reference cache is keyed by)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    for chunk in images.split(_CHUNK):
        h.update(to_uint8(chunk).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- the metric

# torch-fidelity result key -> our metric name; {L} is the feature layer when it is not the standard 2048.
_RENAME = {
    torch_fidelity.KEY_METRIC_FID: "fid{L}",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "inception_score",
    torch_fidelity.KEY_METRIC_ISC_STD: "inception_score_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid{L}",
    torch_fidelity.KEY_METRIC_KID_STD: "kid{L}_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision{L}",
    torch_fidelity.KEY_METRIC_RECALL: "recall{L}",
}


def _safe(name: str) -> str:
    """A cache-file-name-safe version of ``name``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "reference"


class FidelityMetric:
    """FID / IS / KID / precision-recall of samples vs a reference set, by ``torch_fidelity.calculate_metrics``.

    Args:
        inception_weights: local path of :data:`INCEPTION_WEIGHTS_FILE` (``metrics.inception_weights``);
            ``None`` uses torch hub's copy, downloading it once (a clear :class:`InceptionWeightsError` offline).
        cache_dir: reference features/statistics cache (default :data:`DEFAULT_CACHE_DIR`).
        fid, isc, kid, prc: which metrics to compute.
        noise_floor: also report ``fid_floor@N`` (and ``kid_floor@N``), ``N`` = the sample count.
        feature_layer: Inception layer of FID/KID/PRC (``"2048"`` is standard; others add the layer to the keys).
        kid_subset_size: KID subset size (capped at the sample and reference counts).
        isc_splits: Inception Score splits.
        batch_size: feature-extraction batch size.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        reference_name: readable prefix of the reference cache entry (e.g. ``"cifar10-train"``); the content hash
            and resolution are always added.
        seed: torch-fidelity's ``rng_seed`` (IS/KID splits) and the noise-floor subset.
        max_reference: reference images the training callback hands in (``None``: all of them).
        verbose: torch-fidelity progress output.
    """

    name = "fid"

    def __init__(
        self,
        inception_weights: str | None = None,
        cache_dir: str | None = None,
        fid: bool = True,
        isc: bool = True,
        kid: bool = True,
        prc: bool = False,
        noise_floor: bool = True,
        feature_layer: str = "2048",
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        batch_size: int = 64,
        device: str = "auto",
        reference_name: str = "reference",
        seed: int = 0,
        max_reference: int | None = None,
        verbose: bool = False,
    ) -> None:
        if not (fid or isc or kid or prc):
            raise ValueError("metrics=fid: enable at least one of fid, isc, kid, prc")
        self.inception_weights, self.cache_dir = inception_weights, cache_dir
        self.fid, self.isc, self.kid, self.prc, self.noise_floor = fid, isc, kid, prc, noise_floor
        self.feature_layer, self.kid_subset_size, self.isc_splits = str(feature_layer), kid_subset_size, isc_splits
        self.batch_size, self.device, self.reference_name, self.seed = batch_size, device, reference_name, seed
        self.max_reference, self.verbose = max_reference, verbose
        self._weights: Path | None = None

    # -- protocol ------------------------------------------------------------------------------------------
    def key(self, torch_fidelity_key: str) -> str:
        """Our name of a torch-fidelity result: ``"fid"``, or ``"fid64"`` when computed on layer ``64``."""
        return _RENAME[torch_fidelity_key].format(L="" if self.feature_layer == "2048" else self.feature_layer)

    @property
    def weights_path(self) -> Path:
        """The resolved InceptionV3 weights file (downloaded on first access if needed)."""
        if self._weights is None:
            self._weights = resolve_inception_weights(self.inception_weights)
        return self._weights

    def check_ready(self) -> None:
        """Locate the Inception weights and build the network from them now: a missing file, one that is not a
        weights-only state dict, or one with the wrong keys/shapes is a clear :class:`InceptionWeightsError`
        before any sampling."""
        WeightsOnlyInceptionV3(INCEPTION_WEIGHTS_ONLY, ["2048"], feature_extractor_weights_path=str(self.weights_path))

    @property
    def extractor_id(self) -> str:
        """``inception-v3-compat-<weights sha256[:16]>`` (``…-unresolved`` before the weights were located)."""
        digest = file_digest(self._weights) if self._weights is not None else "unresolved"
        return f"{INCEPTION}-{digest}"

    @property
    def extractor(self) -> FidelityMetric:
        """Itself (the training summary reads ``metric.extractor.extractor_id``)."""
        return self

    def reference_cache_name(self, reference: Tensor) -> str:
        """``<reference_name>-<content hash>-<H>px-w<weights hash>``: dataset + split + resolution + weights."""
        res = (
            f"{reference.shape[-2]}px"
            if reference.shape[-2] == reference.shape[-1]
            else "x".join(map(str, reference.shape[-2:]))
        )
        return f"{_safe(self.reference_name)}-{images_digest(reference)}-{res}-w{file_digest(self.weights_path)}"

    # -- computation ---------------------------------------------------------------------------------------
    @property
    def cache_root(self) -> Path:
        """The reference cache directory (``cache_dir``, default :data:`DEFAULT_CACHE_DIR`)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()

    def _calculate(self, cache_name: str, **kwargs: Any) -> dict[str, float]:
        """``torch_fidelity.calculate_metrics`` after checking the cache files of ``cache_name`` weights-only and
        against their sha256 (a mismatch is recomputed, with a warning); the files it writes get their sha256."""
        check_cache_files(self.cache_root, cache_name)
        verify_cache_checksums(self.cache_root, cache_name)
        result = dict(torch_fidelity.calculate_metrics(**kwargs))
        seal_cache_files(self.cache_root, cache_name)
        return result

    def _kwargs(self, n1: int, n2: int) -> dict[str, Any]:
        cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        root = self.cache_root
        return {
            "feature_extractor": INCEPTION_WEIGHTS_ONLY,
            "feature_extractor_weights_path": str(self.weights_path),
            "feature_layer_fid": self.feature_layer,
            "feature_layer_kid": self.feature_layer,
            "feature_layer_prc": self.feature_layer,
            "kid_subset_size": min(self.kid_subset_size, n1, n2),
            "isc_splits": self.isc_splits,
            "batch_size": self.batch_size,
            "cuda": cuda,
            "cache_root": str(root),
            "cache": True,
            "save_cpu_ram": True,  # no DataLoader worker processes
            "rng_seed": self.seed,
            "prc_neighborhood": DEFAULT_K,  # the k of precision/recall's k-NN balls (Kynkäänniemi et al. 2019)
            "verbose": self.verbose,
        }

    def _rename(self, raw: dict[str, float], suffix: str = "") -> dict[str, float]:
        return {f"{self.key(k)}{suffix}": float(v) for k, v in raw.items() if k in _RENAME}

    def compute(self, samples: Tensor, reference: Tensor) -> dict[str, float]:
        """``samples (N, C, H, W)``, ``reference (M, C, H, W)`` in ``[-1, 1]`` -> ``{fid, inception_score, kid, …}``
        plus ``fid_floor@N`` when :attr:`noise_floor` (that key already carries its protocol: no NFE applies).
        """
        ref_name = self.reference_cache_name(reference)
        kwargs = self._kwargs(len(samples), len(reference))
        raw = self._calculate(
            ref_name, input1=UInt8Images(samples), input2=UInt8Images(reference), input2_cache_name=ref_name,
            fid=self.fid, isc=self.isc, kid=self.kid, prc=self.prc, **kwargs,
        )  # fmt: skip
        out = self._rename(raw)
        if self.noise_floor:
            out |= self.floor(len(samples), reference, ref_name)
        return out

    def floor(self, n: int, reference: Tensor, ref_name: str | None = None) -> dict[str, float]:
        """``{fid_floor@n, kid_floor@n}``: a seeded ``n``-subset of ``reference`` scored against all of it.

        Empty (with a warning) when ``n >= len(reference)`` or only IS is enabled. Both entries are cached.
        """
        if n >= len(reference) or n < 2 or not (self.fid or self.kid):
            if self.fid or self.kid:
                log.warning("no noise floor: %d samples >= %d reference images", n, len(reference))
            return {}
        ref_name = ref_name or self.reference_cache_name(reference)
        idx = torch.randperm(len(reference), generator=torch.Generator().manual_seed(self.seed))[:n]
        raw = self._calculate(
            ref_name,
            input1=UInt8Images(reference[idx]), input1_cache_name=f"{ref_name}-subset{n}-seed{self.seed}",
            input2=UInt8Images(reference), input2_cache_name=ref_name,
            fid=self.fid, kid=self.kid, **self._kwargs(n, len(reference)),
        )  # fmt: skip
        return {f"{k}_floor@{format_count(n)}": v for k, v in self._rename(raw).items() if not k.endswith("_std")}

    def prepare_reference(self, reference: Tensor, num_samples: int) -> dict[str, Any]:
        """Compute and cache the reference features/statistics (and the noise floor for ``num_samples``).

        Returns ``{"cache_name", "cache_dir", "fid_floor@N", …}``.
        """
        ref_name = self.reference_cache_name(reference)
        floor = self.floor(num_samples, reference, ref_name)
        if not floor:  # still fill the cache: score the reference against itself
            n = min(len(reference), max(num_samples, 2))
            self._calculate(
                ref_name, input1=UInt8Images(reference[:n]), input2=UInt8Images(reference), input2_cache_name=ref_name,
                fid=self.fid, kid=self.kid, prc=self.prc, isc=not (self.fid or self.kid or self.prc),
                **self._kwargs(n, len(reference)),
            )  # fmt: skip
        return {"cache_name": ref_name, "cache_dir": self._kwargs(2, 2)["cache_root"], **floor}

    def protocol(self) -> dict[str, Any]:
        """The feature half of the protocol: extractor, weights hash, layers, KID/IS settings."""
        return {
            "feature_extractor": self.extractor_id,
            "feature_layer": self.feature_layer,
            "metrics": [m for m in ("fid", "isc", "kid", "prc") if getattr(self, m)],
            "kid_subset_size": self.kid_subset_size,
            "isc_splits": self.isc_splits,
            "reference_name": self.reference_name,
            "implementation": f"torch-fidelity {torch_fidelity.__version__}",
            **({"prc_k": DEFAULT_K} if self.prc else {}),
        }
