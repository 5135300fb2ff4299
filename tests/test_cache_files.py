"""diffusion_lab.cache_files: a cache file carries its sha256; one that does not match it (or has none) is deleted with
a warning naming it and both hashes, and rebuilt. Also the CelebA array cache, which goes through it."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusion_lab.cache_files import (
    CacheChecksumWarning,
    checksum_path,
    seal,
    sha256_of,
    verify,
    verify_or_discard,
)
from tests.data.test_celeba import fake  # noqa: F401  (fixture)
from tests.data.test_celeba import make as make_celeba


def _cache(tmp_path: Path, payload: bytes = b"cached bytes") -> Path:
    path = tmp_path / "stats.pt"
    path.write_bytes(payload)
    return path


def test_seal_writes_sha256sum_format_and_verify_accepts_it(tmp_path: Path) -> None:
    path = _cache(tmp_path)
    digest = seal(path)
    assert digest == hashlib.sha256(b"cached bytes").hexdigest() == sha256_of(path)
    assert checksum_path(path).read_text() == f"{digest}  stats.pt\n"
    assert verify(path) is None and verify_or_discard(path, "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.pt", "stats.pt.sha256"]  # no temp file left


@pytest.mark.parametrize("position", [0, 5, -1])
def test_any_flipped_bit_is_caught_and_the_file_discarded(tmp_path: Path, position: int) -> None:
    path = _cache(tmp_path)
    recorded = seal(path)
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    actual = sha256_of(path)
    assert verify(path) == f"its sha256 is {actual}, but {checksum_path(path)} records {recorded}"
    with pytest.warns(CacheChecksumWarning) as caught:
        assert not verify_or_discard(path, "reference statistics")
    (message,) = [str(w.message) for w in caught]
    assert message == (f"reference statistics {path}: its sha256 is {actual}, but {checksum_path(path)} records "
                       f"{recorded}; not trusted: deleted and rebuilt")  # fmt: skip
    assert not path.exists() and not checksum_path(path).exists()


@pytest.mark.parametrize(
    ("checksum", "problem"),
    [
        (None, r"no checksum file .*stats\.pt\.sha256"),
        ("", r"checksum file .*stats\.pt\.sha256 is not '<64 hex digits>  stats\.pt'"),
        ("abc  stats.pt\n", r"is not '<64 hex digits>  stats\.pt'"),
        ("0" * 64 + "  other.pt\n", r"is not '<64 hex digits>  stats\.pt'"),
        ("0" * 64 + "  stats.pt\n", r"its sha256 is [0-9a-f]{64}, but .* records 0{64}"),
    ],
)
def test_a_missing_or_malformed_checksum_is_not_trusted(tmp_path: Path, checksum: str | None, problem: str) -> None:
    path = _cache(tmp_path)
    if checksum is not None:
        checksum_path(path).write_text(checksum)
    assert re.search(problem, verify(path) or "")
    with pytest.warns(CacheChecksumWarning, match=problem):
        assert not verify_or_discard(path, "cache")
    assert not path.exists()


def test_no_file_is_simply_not_there(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not verify_or_discard(tmp_path / "absent.pt", "cache")


def test_a_bit_flipped_celeba_cache_is_decoded_again(fake: dict[str, Any]) -> None:  # noqa: F811
    first = make_celeba(fake["root"])
    first.prepare_data()
    expected = first.train_tensor()
    path = fake["folder"] / "diffusion_lab_cache" / "train_ddim_64.npy"
    assert verify(path) is None
    array = np.load(path)
    array[0, 0, 0, 0] ^= 0x80  # a pixel 128 levels off: still a valid uint8 array of the right shape
    np.save(path, array)
    with pytest.warns(CacheChecksumWarning, match=rf"ignoring the CelebA cache {re.escape(str(path))}: its sha256"):
        again = make_celeba(fake["root"]).train_tensor()
    assert torch.equal(again, expected) and verify(path) is None  # decoded again and cached with its checksum
