"""FidelityMetric runs the real torch-fidelity path offline, on a randomly initialised InceptionV3 saved to a file.

InceptionV3 on a shared CPU costs ~0.4 s per image at 299×299, so the fast tests use ≤ 12 tiny images and the
64-channel layer (torch-fidelity stops the network there); the full 2048-d FID + IS + KID check is ``slow``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.error import URLError

import pytest
import torch
import torch_fidelity
import torch_fidelity.utils
from torch import Tensor

from diffusion_lab.metrics import fidelity
from diffusion_lab.metrics.fidelity import FidelityMetric, UInt8Images, to_uint8
from diffusion_lab.metrics.inception import (
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    InceptionWeightsError,
    resolve_inception_weights,
)


def _images(n: int, seed: int, channels: int = 3, high: int = 256) -> tuple[Tensor, Tensor]:
    """uint8 ``(n, channels, 32, 32)`` and the same images in ``[-1, 1]`` (exactly on the uint8 grid)."""
    u = torch.randint(0, high, (n, channels, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return u, u.float() / 127.5 - 1.0


def _standalone(u1: Tensor, u2: Tensor, weights: Path, **kwargs) -> dict[str, float]:
    class Raw(torch.utils.data.Dataset):
        def __init__(self, u: Tensor) -> None:
            self.u = u.expand(-1, 3, -1, -1)

        def __len__(self) -> int:
            return len(self.u)

        def __getitem__(self, i: int) -> Tensor:
            return self.u[i]

    return torch_fidelity.calculate_metrics(
        input1=Raw(u1), input2=Raw(u2), feature_extractor=INCEPTION, feature_extractor_weights_path=str(weights),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, **kwargs,
    )  # fmt: skip


def test_to_uint8_round_trips_the_grid_and_repeats_grayscale() -> None:
    u, x = _images(4, 0, channels=1)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 32, 32)
    assert torch.equal(out, u.expand(-1, 3, -1, -1))
    assert torch.equal(to_uint8(torch.tensor([[[[-2.0, 2.0]]]]))[0, 0, 0], torch.tensor([0, 255], dtype=torch.uint8))
    assert UInt8Images(x)[1].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="expected"):
        to_uint8(torch.zeros(8, 2))


def test_fid_equals_standalone_torch_fidelity_and_reference_cache_is_reused(inception_weights, tmp_path) -> None:
    u_s, samples = _images(8, 1, channels=1)
    u_r, reference = _images(12, 2, channels=1, high=200)
    metric = FidelityMetric(
        str(inception_weights), str(tmp_path), isc=False, kid=False, feature_layer="64", device="cpu",
        reference_name="test/train",
    )  # fmt: skip
    seen: list[int] = []
    real = torch_fidelity.utils.get_featuresdict_from_dataset

    def counting(input, *args, **kwargs):
        seen.append(len(input))
        return real(input, *args, **kwargs)

    with mock.patch.object(torch_fidelity.utils, "get_featuresdict_from_dataset", counting):
        first = metric.compute(samples, reference)
        assert sorted(seen) == [8, 8, 12]  # samples, the 8-image floor subset, the reference
        seen.clear()
        second = FidelityMetric(
            str(inception_weights), str(tmp_path), isc=False, kid=False, feature_layer="64", device="cpu",
            reference_name="test/train",
        ).compute(samples, reference)  # fmt: skip
        assert seen == [8]  # only the samples: reference statistics and the floor come from the cache
    assert first == second and set(first) == {"fid64", "fid64_floor@8"}
    expected = _standalone(u_s, u_r, inception_weights, fid=True, feature_layer_fid="64")
    assert first["fid64"] == pytest.approx(expected[torch_fidelity.KEY_METRIC_FID], rel=1e-3, abs=1e-3)
    assert first["fid64"] > 0 and first["fid64_floor@8"] > 0
    cached = sorted(p.name for p in tmp_path.iterdir())
    digest = fidelity.file_digest(inception_weights)
    assert any(n.startswith("test_train-") and "-32px-w" + digest in n and "stat-fid-64" in n for n in cached), cached
    assert metric.extractor_id == f"{INCEPTION}-{digest}"


def test_kid_and_precision_recall_equal_standalone(inception_weights, tmp_path) -> None:
    u_s, samples = _images(6, 3)
    u_r, reference = _images(6, 4, high=128)
    metric = FidelityMetric(
        str(inception_weights), str(tmp_path), fid=False, isc=False, kid=True, prc=True, noise_floor=False,
        feature_layer="64", kid_subset_size=6, device="cpu",
    )  # fmt: skip
    ours = metric.compute(samples, reference)
    assert set(ours) == {"kid64", "kid64_std", "precision64", "recall64"}
    layers = {"feature_layer_kid": "64", "feature_layer_prc": "64"}
    theirs = _standalone(u_s, u_r, inception_weights, kid=True, prc=True, kid_subset_size=6, **layers)
    assert ours["kid64"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-3, abs=1e-9)
    assert ours["precision64"] == theirs[torch_fidelity.KEY_METRIC_PRECISION]
    assert ours["recall64"] == theirs[torch_fidelity.KEY_METRIC_RECALL]


@pytest.mark.slow  # ~60 s on a shared CPU: 2048-d features need the whole network, IS the logits
def test_full_fid_is_kid_equal_standalone(inception_weights, tmp_path) -> None:
    u_s, samples = _images(10, 5)
    u_r, reference = _images(10, 6, high=160)
    metric = FidelityMetric(
        str(inception_weights), str(tmp_path), kid_subset_size=10, isc_splits=2, noise_floor=False, device="cpu"
    )
    ours = metric.compute(samples, reference)
    theirs = _standalone(u_s, u_r, inception_weights, fid=True, isc=True, kid=True, kid_subset_size=10, isc_splits=2)
    assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-3)
    assert ours["kid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-3, abs=1e-6)
    assert ours["inception_score"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-3)


def test_no_weights_and_no_network_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionWeightsError, match=r"metrics\.inception_weights") as info:
        resolve_inception_weights(None)
    assert INCEPTION_WEIGHTS_FILE in str(info.value) and isinstance(info.value.__cause__, URLError)
    with pytest.raises(InceptionWeightsError, match=r"metrics\.inception_weights=/no/such\.pth is not a file"):
        FidelityMetric("/no/such.pth").compute(torch.zeros(2, 3, 8, 8), torch.zeros(4, 3, 8, 8))


def test_real_download_failure_offline_subprocess(tmp_path) -> None:
    """The real download code path, without network (``unshare -n`` when available): an error, not a hang."""
    code = (
        "from diffusion_lab.metrics.fidelity import resolve_inception_weights\n"
        "resolve_inception_weights(None, timeout=10)\n"
    )
    cmd = [sys.executable, "-c", code]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", *cmd]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "InceptionWeightsError" in proc.stderr and "metrics.inception_weights" in proc.stderr, proc.stderr[-2000:]
    assert INCEPTION_WEIGHTS_FILE in proc.stderr
