"""Pins of diffusion_lab.metrics.inception: a download of the InceptionV3 weights always asks torch hub to check the
official file's sha256 prefix, with a socket timeout that is restored afterwards; no network is used."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from diffusion_lab.metrics import inception as inception_module
from diffusion_lab.metrics.inception import InceptionWeightsError, resolve_inception_weights

OFFICIAL_PREFIX = "6726825d"  # weights-inception-2015-12-05-6726825d.pth: the first 8 hex digits of its sha256


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub directory (no cached weights)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_the_download_passes_the_official_hash_prefix_and_a_timeout(hub_dir, monkeypatch):
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append({"url": url, "dst": dst, "hash_prefix": hash_prefix, "timeout": socket.getdefaulttimeout()})
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    before = socket.getdefaulttimeout()
    expected = hub_dir / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert resolve_inception_weights(None, timeout=12.5) == expected
    assert calls == [{"url": URL_INCEPTION_V3, "dst": str(expected), "hash_prefix": OFFICIAL_PREFIX, "timeout": 12.5}]
    assert socket.getdefaulttimeout() == before  # restored
    assert resolve_inception_weights(None) == expected and len(calls) == 1  # the local copy: no second download


def test_a_download_whose_hash_differs_is_refused_and_leaves_no_weights(hub_dir, tmp_path, monkeypatch):
    """torch hub's own downloader on a local file:// URL: a file whose sha256 does not start with the official
    prefix is an InceptionWeightsError naming metrics.inception_weights, and nothing is left where the weights go."""
    impostor = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    impostor.write_bytes(b"not the official weights")
    monkeypatch.setattr(inception_module, "INCEPTION_WEIGHTS_URL", impostor.as_uri())
    refused = rf"metrics\.inception_weights=null and downloading the weights failed .*invalid hash.*{OFFICIAL_PREFIX}"
    with pytest.raises(InceptionWeightsError, match=refused):
        resolve_inception_weights(None, timeout=5.0)
    checkpoints = hub_dir / "checkpoints"
    assert not (checkpoints / impostor.name).exists()
    assert not any(p.name.endswith(".partial") for p in checkpoints.iterdir())
