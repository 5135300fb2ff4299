"""Fréchet digits distance: FID's formula on features of a small CNN trained on scikit-learn digits.

Protocol (what a reported ``fd_digits`` number means):

- Data: ``sklearn.datasets.load_digits()`` (1797 images, 8×8, values 0..16 scaled to ``[-1, 1]`` as
  ``x / 8 − 1``), split by :func:`digits_split` (stratified, 10 % held out, ``random_state=seed``).
- Extractor: :class:`DigitsCNN` trained here on the train split with :class:`DigitsClassifierConfig`
  (fixed seed and data order, CPU, a few seconds); its penultimate layer (``feature_dim`` ReLU units) gives
  the features, its argmax the predicted classes. :attr:`DigitsFrechetDistance.extractor_id` names the
  exact weights (version + hyper-parameter hash) and belongs in the run summary next to the number.
- Inputs: ``(N, 1, H, W)`` in ``[-1, 1]`` (clamped), brought back to 8×8 by the ``resize`` rule:
  ``"pool"`` (adaptive average pooling; exact inverse of nearest/×k upsampling, used for 16×16/32×32
  upsampled digits) or ``"center_crop"`` (the central 8×8 window; exact inverse of padding the 8×8 digit
  with background −1 in the centre).
- Class scores: ``class_coverage`` = fraction of the 10 classes receiving at least
  :data:`COVERAGE_MIN_SHARE` (1 %, a tenth of the uniform share) of the predictions; ``class_entropy`` =
  entropy of the predicted-class histogram divided by ``log 10`` (1 = uniform, 0 = one class).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.atomic import atomic_write
from diffusion_lab.cache_files import seal, verify, verify_or_discard
from diffusion_lab.metrics.frechet import Float64Array, feature_statistics, frechet_distance

__all__ = [
    "COVERAGE_MIN_SHARE",
    "DEFAULT_CACHE_DIR",
    "NUM_CLASSES",
    "VERSION",
    "DigitsCNN",
    "DigitsClassifierConfig",
    "DigitsFrechetDistance",
    "class_coverage",
    "class_entropy",
    "class_histogram",
    "classifier_path",
    "digits_split",
    "load_classifier_file",
    "load_or_train_classifier",
    "train_digits_classifier",
]

log = logging.getLogger(__name__)

VERSION = "1"  # bump when DigitsCNN, the training loop or the data scaling changes: it re-keys the cache
NUM_CLASSES = 10
COVERAGE_MIN_SHARE = 0.1 / NUM_CLASSES
DEFAULT_CACHE_DIR = Path("~/.cache/diffusion_lab/digits_classifier")
_SIDE = 8
_BATCH = 2048


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` and int64 labels ``(N,)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
    return x, bunch.target.astype(np.int64)


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The project's train / held-out split of scikit-learn digits.

    ``train_test_split(test_size=0.1, random_state=seed, stratify=labels)``.

    Returns:
        ``x_train (1617, 1, 8, 8)``, ``y_train (1617,)``, ``x_val (180, 1, 8, 8)``, ``y_val (180,)``;
        images float32 in ``[-1, 1]``, labels int64.
    """
    from sklearn.model_selection import train_test_split

    x, y = _digits_arrays()
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.1, random_state=seed, stratify=y)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (x_tr, y_tr, x_va, y_va))  # type: ignore[return-value]


class DigitsCNN(nn.Module):
    """Two 3×3 convs, a 2×2 max-pool and one hidden linear layer: ``(B, 1, 8, 8) -> (B, 10)`` logits.

    :meth:`features` is the penultimate (post-ReLU) layer, ``(B, feature_dim)``.
    """

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``(B, 1, 8, 8) -> (B, feature_dim)`` penultimate activations."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 1, 8, 8) -> (B, num_classes)`` logits."""
        return self.head(self.body(x))


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Everything that determines the trained weights; hashed (with :data:`VERSION`) into the cache key."""

    seed: int = 0
    split_seed: int = 0
    width: int = 16
    feature_dim: int = 64
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4

    def cache_key(self) -> str:
        """16 hex digits of ``sha256(version + hyper-parameters)``."""
        blob = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(N, 1, 8, 8)`` images with labels ``(N,)``."""
    return float((model(x).argmax(dim=1) == y).double().mean())


def _fit(model: DigitsCNN, x: Tensor, y: Tensor, cfg: DigitsClassifierConfig) -> None:
    """Adam + cross-entropy, fixed data order from a seeded generator (no dropout, no global RNG use)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(x.shape[0], generator=order_gen).split(cfg.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def train_digits_classifier(cfg: DigitsClassifierConfig = DigitsClassifierConfig()) -> tuple[DigitsCNN, dict]:
    """Train :class:`DigitsCNN` on the train split, on CPU, deterministically for a given ``cfg``.

    The global RNG is forked, so calling this does not change the caller's random stream. Training runs
    on one intra-op thread (restored afterwards): the reduction order then does not depend on the core
    count, and tiny ops do not stall on OpenMP barriers when the CPU is shared.

    Returns:
        The model (eval mode) and ``info = {"val_accuracy", "train_seconds"}``.
    """
    x_tr, y_tr, x_va, y_va = digits_split(cfg.split_seed)
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = DigitsCNN(cfg.width, cfg.feature_dim)
            _fit(model, x_tr, y_tr, cfg)
    finally:
        torch.set_num_threads(threads)
    info = {"val_accuracy": _accuracy(model, x_va, y_va), "train_seconds": time.perf_counter() - start}
    log.info("digits classifier: held-out accuracy %.4f, trained in %.1f s", *info.values())
    return model, info


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`~diffusion_lab.atomic.atomic_write` (temp file + fsync + ``os.replace``), then
    its checksum ``<path>.sha256`` (:func:`~diffusion_lab.cache_files.seal`), written after the payload."""
    atomic_write(path, lambda f: torch.save(payload, f))
    seal(path)


def _model_from(payload: dict[str, Any]) -> DigitsCNN:
    """The eval-mode :class:`DigitsCNN` of a cache payload (its ``config`` gives the widths)."""
    config = payload["config"]
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not advance the caller's RNG
        model = DigitsCNN(config["width"], config["feature_dim"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_classifier_file(path: str | os.PathLike[str]) -> DigitsCNN:
    """The classifier in a cache file written by :func:`load_or_train_classifier`, read weights-only and checked
    against its checksum ``<path>.sha256``.

    Raises:
        ValueError: the file does not match its recorded sha256 (or has none), naming the file and both hashes.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)  # weights-only: safe before the hash check
    problem = verify(Path(path))
    if problem is not None:
        raise ValueError(
            f"digits classifier {path}: {problem}; delete it and let load_or_train_classifier rebuild it "
            f"(default cache: {DEFAULT_CACHE_DIR})"
        )
    return _model_from(payload)


def _try_load(path: Path, cfg: DigitsClassifierConfig) -> tuple[DigitsCNN, dict] | None:
    """Load cached weights with ``weights_only=True``; ``None`` if missing, unreadable or mismatched.

    The file's bytes are checked against ``<path>.sha256`` first: a mismatch (or no checksum) warns, naming the
    file and both hashes, and deletes the file, so it is retrained (a flipped bit in the weights once gave
    ``fd_digits = 1e75`` from a cache that was trusted)."""
    if not verify_or_discard(path, "digits classifier cache"):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["cache_key"] != cfg.cache_key():
            raise ValueError(f"cache key {payload['cache_key']} != {cfg.cache_key()}")
        model = _model_from(payload)
    except Exception as err:  # a corrupt or stale file is retrained over, never trusted
        log.warning("ignoring digits classifier cache %s: %s", path, err)
        return None
    return model, dict(payload["info"])


def classifier_path(
    cache_dir: str | os.PathLike[str] | None = None, cfg: DigitsClassifierConfig = DigitsClassifierConfig()
) -> Path:
    """``<cache_dir>/digits_cnn-v<VERSION>-<cfg.cache_key()>.pt`` (default dir :data:`DEFAULT_CACHE_DIR`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()
    return root / f"digits_cnn-v{VERSION}-{cfg.cache_key()}.pt"


def load_or_train_classifier(
    cache_dir: str | os.PathLike[str] | None = None, cfg: DigitsClassifierConfig = DigitsClassifierConfig()
) -> tuple[DigitsCNN, dict, bool]:
    """Load the classifier for ``cfg`` from ``cache_dir``, training and caching it if absent.

    Cache file: ``<cache_dir>/digits_cnn-v<VERSION>-<cfg.cache_key()>.pt`` (default dir
    :data:`DEFAULT_CACHE_DIR`), holding ``{"cache_key", "config", "info", "state_dict"}``, with its sha256 in
    ``<file>.sha256``; a file that does not match it is rebuilt, with a warning.

    Returns:
        ``(model, info, loaded_from_cache)``; ``info`` has ``val_accuracy`` and ``train_seconds``.
    """
    path = classifier_path(cache_dir, cfg)
    cached = _try_load(path, cfg)
    if cached is not None:
        return cached[0], cached[1], True
    model, info = train_digits_classifier(cfg)
    state = model.state_dict()
    _save_atomic({"cache_key": cfg.cache_key(), "config": asdict(cfg), "info": info, "state_dict": state}, path)
    return model, info, False


def _center_crop(x: Tensor) -> Tensor:
    """Central ``8×8`` window of ``(N, 1, H, W)``, ``H, W >= 8`` (inverse of centred −1 padding)."""
    top, left = (x.shape[-2] - _SIDE) // 2, (x.shape[-1] - _SIDE) // 2
    return x[..., top : top + _SIDE, left : left + _SIDE]


_RESIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "pool": lambda x: F.adaptive_avg_pool2d(x, _SIDE),
    "center_crop": _center_crop,
}


def class_histogram(pred: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """Share of predictions per class: int ``(N,)`` -> float64 ``(num_classes,)`` summing to 1."""
    counts = torch.bincount(pred.reshape(-1).cpu(), minlength=num_classes).to(torch.float64)
    return counts / counts.sum().clamp_min(1.0)


def class_coverage(hist: Tensor, min_share: float = COVERAGE_MIN_SHARE) -> float:
    """Fraction of classes with at least ``min_share`` of the predictions (``hist`` as above)."""
    return float((hist >= min_share).double().mean())


def class_entropy(hist: Tensor) -> float:
    """``H(hist) / log K`` in ``[0, 1]``, with ``0 log 0 = 0``."""
    p = hist[hist > 0]
    return float(-(p * p.log()).sum() / math.log(hist.numel())) + 0.0  # + 0.0: no "-0.0"


class DigitsFrechetDistance:
    """Fréchet digits distance and class-coverage scores (protocol in the module docstring).

    Args:
        cache_dir: where trained weights are cached (default :data:`DEFAULT_CACHE_DIR`).
        device: where features are computed (training is always on CPU).
        resize: how ``(N, 1, H, W)`` inputs become 8×8, one of ``"pool"``, ``"center_crop"``.
        config: classifier hyper-parameters (keys the cache).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        resize: str = "pool",
        config: DigitsClassifierConfig = DigitsClassifierConfig(),
    ) -> None:
        if resize not in _RESIZERS:
            raise ValueError(f"unknown resize {resize!r}; valid choices: {sorted(_RESIZERS)}")
        self.resize, self.device, self.config = resize, torch.device(device), config
        model, info, self.loaded_from_cache = load_or_train_classifier(cache_dir, config)
        self.model = model.to(self.device).requires_grad_(False).eval()
        self.val_accuracy: float = info["val_accuracy"]
        self.train_seconds: float = info["train_seconds"]
        self.extractor_id = f"digits_cnn-v{VERSION}-{config.cache_key()}"

    def _to_8x8(self, images: Tensor) -> Tensor:
        """``(N, 1, H, W)`` in ``[-1, 1]`` -> clamped float32 ``(N, 1, 8, 8)`` on ``self.device``."""
        if images.ndim != 4 or images.shape[1] != 1 or min(images.shape[-2:]) < _SIDE:
            raise ValueError(f"expected (N, 1, H, W) images with H, W >= 8, got {tuple(images.shape)}")
        x = images.detach().to(self.device, torch.float32).clamp(-1.0, 1.0)
        return _RESIZERS[self.resize](x)

    @torch.inference_mode()
    def _run(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(N, D)`` and predicted classes ``(N,)`` in batches."""
        feats, preds = [], []
        for chunk in images.split(_BATCH):
            f = self.model.features(self._to_8x8(chunk))
            feats.append(f.cpu())
            preds.append(self.model.head(f).argmax(dim=1).cpu())
        return torch.cat(feats), torch.cat(preds)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features: ``(N, 1, H, W)`` in ``[-1, 1]`` -> float32 ``(N, D)`` on CPU."""
        return self._run(images)[0]

    def predict(self, images: Tensor) -> Tensor:
        """Predicted digit classes: ``(N, 1, H, W)`` -> int64 ``(N,)`` on CPU."""
        return self._run(images)[1]

    def reference_stats(self, images: Tensor) -> tuple[Float64Array, Float64Array]:
        """Float64 feature mean ``(D,)`` and covariance ``(D, D)`` of reference images ``(N, 1, H, W)``."""
        return feature_statistics(self.features(images))

    def compute_from_stats(self, samples: Tensor, mu_ref: Float64Array, sigma_ref: Float64Array) -> dict[str, float]:
        """Like :meth:`compute`, against precomputed :meth:`reference_stats`."""
        feats, preds = self._run(samples)
        mu, sigma = feature_statistics(feats)
        hist = class_histogram(preds)
        return {
            "fd_digits": frechet_distance(mu, sigma, mu_ref, sigma_ref),
            "class_coverage": class_coverage(hist),
            "class_entropy": class_entropy(hist),
        }

    def compute(self, samples: Tensor, reference_images: Tensor) -> dict[str, float]:
        """Scores of ``samples (N, 1, H, W)`` vs ``reference_images (M, 1, H', W')``, both in ``[-1, 1]``.

        Returns:
            Raw ``{"fd_digits", "class_coverage", "class_entropy"}``; the caller adds the protocol suffix
            (:func:`diffusion_lab.metrics.base.protocol_key`) and records :attr:`extractor_id`.
        """
        return self.compute_from_stats(samples, *self.reference_stats(reference_images))
