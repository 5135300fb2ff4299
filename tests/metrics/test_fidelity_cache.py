"""FID reference statistics cached by torch-fidelity carry a sha256: a corrupted file is recomputed, never read.

Runs the real torch-fidelity path on the random-init InceptionV3 of ``conftest.inception_weights``, 64-channel
layer and a handful of 32×32 images (as tests/metrics/test_fidelity.py does), so each compute takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch_fidelity.utils
from torch import Tensor

from diffusion_lab.cache_files import CacheChecksumWarning, checksum_path, sha256_of, verify
from diffusion_lab.metrics.fidelity import FidelityMetric


def _images(n: int, seed: int) -> Tensor:
    """``(n, 1, 32, 32)`` images in ``[-1, 1]`` on the uint8 grid."""
    u = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return u.float() / 127.5 - 1.0


def _metric(weights: Path, cache: Path) -> FidelityMetric:
    return FidelityMetric(
        str(weights), str(cache), isc=False, kid=False, noise_floor=False, feature_layer="64", device="cpu",
        reference_name="ref",
    )  # fmt: skip


def _shift_mu(path: Path) -> None:
    """Rewrite the cached statistics with ``mu`` moved by 1000: a file that still loads, and would give a FID off by
    about 64·10⁶ if it were read."""
    stats = torch.load(path, weights_only=False)  # our own test file
    torch.save({**stats, "mu": stats["mu"] + 1000.0}, path)


@pytest.fixture
def counted() -> Iterator[list[int]]:
    """The sizes of the image sets torch-fidelity extracts features of (a cached reference is not among them)."""
    seen: list[int] = []
    real = torch_fidelity.utils.get_featuresdict_from_dataset

    def counting(input, *args, **kwargs):
        seen.append(len(input))
        return real(input, *args, **kwargs)

    with mock.patch.object(torch_fidelity.utils, "get_featuresdict_from_dataset", counting):
        yield seen


def test_reference_statistics_are_sealed_and_changed_ones_are_recomputed(
    inception_weights: Path, tmp_path: Path, counted: list[int]
) -> None:
    samples, reference = _images(4, 1), _images(6, 2)
    first = _metric(inception_weights, tmp_path).compute(samples, reference)["fid64"]
    (stats,) = tmp_path.glob("*stat-fid-64.pt")
    assert sorted(counted) == [4, 6] and len(list(tmp_path.glob("*.pt"))) == 2  # features and statistics
    assert all(verify(p) is None for p in tmp_path.glob("*.pt"))  # every file torch-fidelity wrote is sealed
    recorded = sha256_of(stats)
    _shift_mu(stats)
    changed = sha256_of(stats)
    with pytest.warns(CacheChecksumWarning) as caught:
        second = _metric(inception_weights, tmp_path).compute(samples, reference)["fid64"]
    (message,) = [str(w.message) for w in caught]
    assert str(stats) in message and changed in message and recorded in message
    assert second == pytest.approx(first, rel=1e-9)  # recomputed (from the verified features), not read
    assert verify(stats) is None  # and sealed again
    counted.clear()
    assert _metric(inception_weights, tmp_path).compute(samples, reference)["fid64"] == second
    assert counted == [4]  # the next evaluation reads the reference from the cache


def test_reference_statistics_without_a_checksum_are_recomputed(inception_weights: Path, tmp_path: Path) -> None:
    """Statistics cached before checksums existed (or whose checksum write was cut off) are not trusted."""
    samples, reference = _images(4, 1), _images(6, 2)
    first = _metric(inception_weights, tmp_path).compute(samples, reference)["fid64"]
    for path in tmp_path.glob("*.pt"):
        checksum_path(path).unlink()
    (stats,) = tmp_path.glob("*stat-fid-64.pt")
    _shift_mu(stats)
    with pytest.warns(CacheChecksumWarning, match=r"no checksum file .*stat-fid-64\.pt\.sha256"):
        assert _metric(inception_weights, tmp_path).compute(samples, reference)["fid64"] == pytest.approx(first)
    assert all(verify(p) is None for p in tmp_path.glob("*.pt"))
