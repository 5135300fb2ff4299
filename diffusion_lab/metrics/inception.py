"""torch-fidelity's InceptionV3 with nothing unpickled on trust: the weights file located (or downloaded once), read
weights-only and checked against the network (:class:`WeightsOnlyInceptionV3`, registered as
:data:`INCEPTION_WEIGHTS_ONLY`), and a reference's cache files read weights-only before torch-fidelity opens them
(:func:`check_cache_files`) and checked against the sha256 recorded when they were written
(:func:`verify_cache_checksums`, :func:`seal_cache_files`).

Split out of :mod:`diffusion_lab.metrics.fidelity`, which re-exports every name here.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from numpy._core.multiarray import _reconstruct  # what a pickled np.ndarray names
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from diffusion_lab.cache_files import checksum_path, seal, verify_or_discard

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
# The first 8 hex digits of the official file's sha256, as torch hub names files; checked on download.
INCEPTION_SHA256_PREFIX = torch.hub.HASH_REGEX.findall(INCEPTION_WEIGHTS_FILE)[-1]
INCEPTION_WEIGHTS_ONLY = f"{INCEPTION}-weights-only"  # torch-fidelity registry name of WeightsOnlyInceptionV3
# What a torch-fidelity cache file may hold beyond tensors: float numpy arrays (the FID mean and covariance).
_ARRAY_GLOBALS: list[Any] = [
    _reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.Float32DType,
    np.dtypes.Float64DType,
]


class InceptionWeightsError(RuntimeError):
    """The InceptionV3 weights are neither at ``metrics.inception_weights`` nor downloadable, or the file is not a
    weights-only InceptionV3 state dict."""


class FidelityCacheError(RuntimeError):
    """A file in ``metrics.cache_dir`` holds more than tensors and float arrays: refused, never unpickled."""


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """16 hex digits of a file's sha256 (memoised on path, size and mtime)."""
    st = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _weights_help(reason: str) -> str:
    return (
        f"{reason}. metrics=fid needs torch-fidelity's InceptionV3 weights ({INCEPTION}), the file "
        f"{INCEPTION_WEIGHTS_FILE} (~96 MB) from {INCEPTION_WEIGHTS_URL}. Download it where there is network "
        f"access and set metrics.inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE} "
        f"(or place it at {_hub_weights_path()})."
    )


def _hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _download(dst: Path, timeout: float) -> None:
    """Download the Inception weights to ``dst``; ``timeout`` bounds every socket operation (never a hang)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(
            INCEPTION_WEIGHTS_URL, str(dst), hash_prefix=INCEPTION_SHA256_PREFIX, progress=False
        )
    finally:
        socket.setdefaulttimeout(previous)


def resolve_inception_weights(path: str | Path | None, timeout: float = 60.0) -> Path:
    """The local InceptionV3 weights file: ``path`` (``metrics.inception_weights``) if given, else torch hub's copy,
    downloaded once if missing.

    Raises:
        InceptionWeightsError: ``path`` does not exist, or there is no local copy and the download fails; the
            message names ``metrics.inception_weights`` and the expected file.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(_weights_help(f"metrics.inception_weights={path} is not a file"))
        return p
    hub = _hub_weights_path()
    if hub.is_file():
        return hub
    try:
        _download(hub, timeout)
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "no weights here"
        raise InceptionWeightsError(
            _weights_help(f"metrics.inception_weights=null and downloading the weights failed ({err!r})")
        ) from err
    return hub


def _brief(err: BaseException) -> str:
    """``"Type: first line of the message"`` (torch's unpickling errors run to a page)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


@functools.lru_cache(maxsize=1)
def _read_state_dict(path: str, size: int, mtime_ns: int) -> dict[str, Tensor]:
    """The weights-only read behind :func:`load_inception_state_dict` (memoised on path, size and mtime)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, pickled objects, truncated, empty ...
        raise InceptionWeightsError(
            _weights_help(
                f"metrics.inception_weights: {path} is not a weights-only torch state dict ({_brief(err)}); "
                "it is never unpickled as arbitrary objects"
            )
        ) from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise InceptionWeightsError(
            _weights_help(
                f"metrics.inception_weights: {path} holds a {type(state).__name__}, not a {{name: Tensor}} dict"
            )
        )
    return state


def load_inception_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read an InceptionV3 weights file with ``torch.load(weights_only=True)``: ``{name: Tensor}``.

    Raises:
        InceptionWeightsError: the file is not a weights-only state dict (text, empty, pickled objects, …).
    """
    st = Path(path).stat()
    return _read_state_dict(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


class WeightsOnlyInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` network, its weights file read weights-only.

    torch-fidelity's own class unpickles ``feature_extractor_weights_path`` with ``weights_only=False``; this one
    reads it with :func:`load_inception_state_dict` and hands the parent the same tensors re-serialised in memory,
    so only plain tensors ever reach its loader. Missing/unexpected keys or wrong shapes raise
    :class:`InceptionWeightsError`. Registered as :data:`INCEPTION_WEIGHTS_ONLY`.
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any
    ) -> None:
        if feature_extractor_weights_path is None:
            raise InceptionWeightsError(_weights_help(f"{INCEPTION_WEIGHTS_ONLY} needs a local weights file"))
        path = feature_extractor_weights_path
        buffer = io.BytesIO()
        torch.save(load_inception_state_dict(path), buffer)
        buffer.seek(0)
        try:
            super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys, size mismatches
            raise InceptionWeightsError(
                _weights_help(f"metrics.inception_weights: {path} is not an {INCEPTION} state dict ({_brief(err)})")
            ) from err


if INCEPTION_WEIGHTS_ONLY not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(INCEPTION_WEIGHTS_ONLY, WeightsOnlyInceptionV3)


@functools.lru_cache(maxsize=256)
def _check_cache_file(path: str, size: int, mtime_ns: int) -> None:
    """Read one cache file weights-only (tensors, float arrays); memoised on path, size and mtime."""
    try:
        with torch.serialization.safe_globals(_ARRAY_GLOBALS):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise FidelityCacheError(
            f"metrics.cache_dir: {path} is not a weights-only cache file ({_brief(err)}); refused, never "
            "unpickled. Delete it (it is recomputed) or point metrics.cache_dir at a directory you trust."
        ) from err


def _cache_files(cache_root: Path, cache_name: str) -> list[Path]:
    """torch-fidelity's cache files of ``cache_name``: ``<cache_root>/<cache_name>*.pt``."""
    return sorted(cache_root.glob(glob.escape(cache_name) + "*.pt"))


def check_cache_files(cache_root: Path, cache_name: str) -> None:
    """Read every torch-fidelity cache file of ``cache_name`` (``<cache_root>/<cache_name>*.pt``) weights-only,
    before torch-fidelity loads them with ``weights_only=False``.

    Raises:
        FidelityCacheError: a file holds anything but tensors and float arrays (e.g. a pickled object).
    """
    for path in _cache_files(cache_root, cache_name):
        st = path.stat()
        _check_cache_file(str(path.resolve()), st.st_size, st.st_mtime_ns)


def verify_cache_checksums(cache_root: Path, cache_name: str) -> None:
    """Compare every cache file of ``cache_name`` with its ``<file>.sha256``; one that does not match (or has no
    checksum) is deleted with a :class:`~diffusion_lab.cache_files.CacheChecksumWarning` naming it and both hashes,
    so torch-fidelity recomputes it instead of reading corrupted statistics."""
    for path in _cache_files(cache_root, cache_name):
        verify_or_discard(path, "metrics.cache_dir: reference statistics")


def seal_cache_files(cache_root: Path, cache_name: str) -> None:
    """Write ``<file>.sha256`` for every cache file of ``cache_name`` that has none: the files torch-fidelity has
    just written (every older one was verified or deleted before it ran)."""
    for path in _cache_files(cache_root, cache_name):
        if not checksum_path(path).is_file():
            seal(path)
