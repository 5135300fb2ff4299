"""One checkpoint file on disk, in pure torch (no Lightning): atomic writes, SHA-256 checksums, verified reads.

- :func:`atomic_torch_save`: written to a hidden temp file in the target directory, flushed, ``fsync``-ed and moved
  over the target with ``os.replace`` (atomic on POSIX), so a crash mid-write leaves the previous file intact and
  no partial ``*.ckpt`` file (:func:`remove_stale_temp_files` clears what a killed process left).
- :func:`with_checksum`: a SHA-256 of each top-level entry, stored in the checkpoint and verified when it is read
  (:func:`read_checkpoint`, weights-only): a flipped bit, an empty or a foreign file is one :class:`CheckpointError`
  line.

Split out of :mod:`diffusion_lab.callbacks.checkpoint` (which re-exports every name) so that code which only reads
checkpoints (:mod:`diffusion_lab.checkpoint_loading`) needs neither Lightning nor the callbacks package.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusion_lab.atomic import TMP_PREFIX, atomic_write

CHECKSUM_KEY = "diffusion_lab_checksum"  # {"algorithm": "sha256", "entries": {top-level key: hex digest}}
FORMAT_KEY = "diffusion_lab_format"  # the checkpoint format's version (an int); absent: format 1
# 1: no format entry; 2: the entry exists, the stored config is checked against the schemas and built through the
# registries on load. Bump when what a checkpoint holds changes meaning.
FORMAT_VERSION = 2


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temp file in the same directory + fsync + ``os.replace``
    (:func:`~diffusion_lab.atomic.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files a killed process left behind in ``directory``; returns what was removed."""
    directory = Path(directory)
    stale = sorted(directory.glob(f"{TMP_PREFIX}*")) if directory.is_dir() else []
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


def checkpoint_format(checkpoint: dict[str, Any]) -> int | str:
    """The format a checkpoint declares (1 when it has no :data:`FORMAT_KEY` entry, as before the entry existed)."""
    value = checkpoint.get(FORMAT_KEY, 1)
    return value if isinstance(value, int) and not isinstance(value, bool) else repr(value)


# ---------------------------------------------------------------------------------------------- checksums


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, not a PyTorch checkpoint, or corrupted (checksum)."""


def _digest_into(h: Any, obj: Any) -> None:
    """Feed ``obj`` (nested dicts/lists/tuples of tensors and plain values) into the hash ``h``.

    A tensor contributes its dtype, shape and raw bytes; a dict its keys in sorted order; anything else its
    type and ``repr`` (ints, floats, strings, None: what ``torch.load(weights_only=True)`` gives back)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest_into(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _digest_into(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checkpoint_digests(checkpoint: dict[str, Any]) -> dict[str, str]:
    """SHA-256 hex digest of every top-level entry of a checkpoint (``state_dict`` holds raw and EMA weights,
    ``optimizer_states`` the Adam moments, …) except the checksum itself."""
    digests = {}
    for key in sorted(checkpoint, key=str):
        if key != CHECKSUM_KEY:
            h = hashlib.sha256()
            _digest_into(h, checkpoint[key])
            digests[str(key)] = h.hexdigest()
    return digests


def with_checksum(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` carrying :func:`checkpoint_digests` under ``diffusion_lab_checksum``."""
    return {**checkpoint, CHECKSUM_KEY: {"algorithm": "sha256", "entries": checkpoint_digests(checkpoint)}}


def verify_checksum(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the entries whose digest differs from the stored one; a checkpoint
    written before checksums existed loads with a warning."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(stored, dict) or not isinstance(stored.get("entries"), dict):
        warnings.warn(f"{path}: no checksum (a checkpoint from an older version); loading it unverified", stacklevel=3)
        return
    expected, actual = stored["entries"], checkpoint_digests(checkpoint)
    bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch in {', '.join(bad)} (file corrupted)")


def _load_failure(err: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    if "Weights only load failed" in lines[0]:  # pickled code (or a class) the weights-only unpickler refuses
        detail = next((line for line in lines if "Unsupported" in line), "")
        return f"refused by torch.load(weights_only=True): Weights only load failed ({detail[:200]})"
    return f"not a PyTorch checkpoint ({type(err).__name__}: {lines[0][:200]})"


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, verify: bool | None = None
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure as one :class:`CheckpointError` line naming
    the file (empty, not a PyTorch checkpoint, code refused by the weights-only unpickler, checksum mismatch).

    ``verify`` (default: ``not mmap``) checks the checksum; a mapped read skips it, since hashing would read
    every tensor that ``mmap`` leaves on disk (callers that only want the config and bookkeeping entries).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path=<path to a .ckpt file>)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # every failure of torch.load becomes one line naming the file
        raise CheckpointError(f"{path}: {_load_failure(err)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    if verify if verify is not None else not mmap:
        verify_checksum(ckpt, path)
    return ckpt
