"""Cache files the project writes and reads back (the digits classifier, torch-fidelity's reference statistics, the
CelebA arrays) carry a checksum: ``<file>.sha256`` holds the sha256 of the file's bytes, written atomically after
the file itself (``sha256sum`` format, ``"<64 hex>  <name>"``).

Before a cache file is used, :func:`verify_or_discard` compares its bytes with the recorded sha256. A mismatch (bit
rot, a partial write, an edit), a missing or malformed checksum file: a :class:`CacheChecksumWarning` naming the
file and both hashes, and the file is deleted, so the caller rebuilds it (and :func:`seal` records the new one). A
cache is never trusted on its name alone.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from diffusion_lab.atomic import atomic_write_text

__all__ = [
    "SUFFIX",
    "CacheChecksumWarning",
    "checksum_path",
    "discard",
    "seal",
    "sha256_of",
    "verify",
    "verify_or_discard",
]

SUFFIX = ".sha256"
_LINE = re.compile(r"([0-9a-f]{64})  (.+)\n?")


class CacheChecksumWarning(UserWarning):
    """A cache file did not match its recorded sha256 (or had none): it is rebuilt, never used."""


def checksum_path(path: str | Path) -> Path:
    """``<path>.sha256``: where the checksum of ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(path: str | Path) -> str:
    """Record the sha256 of ``path`` in :func:`checksum_path` (atomically); returns the hash.

    Call it after the payload is in place: a crash in between leaves a payload whose checksum is stale or absent,
    which :func:`verify` reports (so the payload is rebuilt, not trusted)."""
    path = Path(path)
    digest = sha256_of(path)
    target = checksum_path(path)
    atomic_write_text(target, f"{digest}  {path.name}\n")
    return digest


def verify(path: str | Path) -> str | None:
    """``None`` when ``path``'s bytes match its recorded sha256; else what is wrong, naming both hashes."""
    path, target = Path(path), checksum_path(path)
    try:
        line = target.read_text()
    except FileNotFoundError:
        return f"no checksum file {target} (written by an older version, or the write stopped before it)"
    except (OSError, UnicodeDecodeError) as err:
        return f"checksum file {target} cannot be read ({err})"
    found = _LINE.fullmatch(line)
    if found is None or found.group(2) != path.name:
        return f"checksum file {target} is not '<64 hex digits>  {path.name}'"
    recorded, actual = found.group(1), sha256_of(path)
    if actual != recorded:
        return f"its sha256 is {actual}, but {target} records {recorded}"
    return None


def discard(path: str | Path) -> None:
    """Delete a cache file and its checksum file (either may be absent)."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def verify_or_discard(path: str | Path, what: str) -> bool:
    """Whether ``path`` exists and matches its checksum. When it does not match (or has no checksum), warn
    (:class:`CacheChecksumWarning`, naming ``what``, the file and the two hashes) and delete both files, so the
    caller rebuilds the cache; ``False`` then, and when there is no file."""
    path = Path(path)
    if not path.is_file():
        return False
    problem = verify(path)
    if problem is None:
        return True
    warnings.warn(f"{what} {path}: {problem}; not trusted: deleted and rebuilt", CacheChecksumWarning, stacklevel=2)
    discard(path)
    return False
