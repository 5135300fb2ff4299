"""Atomic file writes (no torch): every result and record the project writes goes through :func:`atomic_write`.

The content is written to a hidden temp file in the target's directory, flushed, ``fsync``-ed and moved over the
target with ``os.replace`` (atomic on POSIX), then the directory entry is ``fsync``-ed; a crash at any point leaves
either the previous file or the new one, never a partial one. Temp files start with :data:`TMP_PREFIX` and end in
the writer's pid, so they never look like a result (``*.ckpt``, ``*.json``) and a killed writer's leftovers can be
found and cleared.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"  # temp files never end in the target's suffix, so a crash leaves nothing that looks like it


def temp_path(path: Path) -> Path:
    """The temp file :func:`atomic_write` fills before it replaces ``path``: ``<dir>/.tmp-<name>.<pid>``."""
    return path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync it and ``os.replace`` it over ``path``
    (creating the parent directories); on any error the temp file is removed and ``path`` is untouched.
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, sort_keys: bool = True) -> Path:
    """Write ``data`` as indented JSON (values JSON cannot hold as ``str``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")


def fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (its entry list); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
