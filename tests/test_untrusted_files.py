"""Files from outside are never unpickled on trust (DESIGN.md, "The record").

Every load path gets a crafted pickle whose unpickling would create a marker file (``__reduce__`` returning
``(pathlib.Path.touch, (marker,))``): the load must be refused with a clear error (or, for a cache we own,
ignored and rebuilt) and the marker must never appear. :func:`test_the_crafted_files_are_live` shows that
each crafted file does create the marker when unpickled without those guards.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.data.test_celeba import fake  # noqa: F401  (fixture)
from tests.data.test_celeba import make as make_celeba
from tests.data.test_cifar10 import fake_cifar  # noqa: F401  (fixture)
from tests.data.test_cifar10 import make as make_cifar
from tests.data.test_imagenet_npz import fake32  # noqa: F401  (fixture)
from tests.data.test_imagenet_npz import make as make_imagenet


class Touch:
    """Unpickling this calls ``Path.touch(marker)``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a crafted pickle would leave its trace (absent at the start)."""
    path = tmp_path / "PWNED"
    assert not path.exists()
    return path


def crafted_torch_file(path: Path, marker: Path, payload: Any = None) -> Path:
    """``torch.save`` of a state-dict-looking dict with a :class:`Touch` inside (zip format, as torch writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(1), "evil": Touch(marker)} if payload is None else payload, path)
    return path


def crafted_pickle(marker: Path) -> bytes:
    """A plain protocol-2 pickle of a CIFAR-10-looking batch whose ``data`` is a :class:`Touch`."""
    return pickle.dumps({"data": Touch(marker), "labels": [0]}, protocol=2)


def test_the_crafted_files_are_live(tmp_path: Path, marker: Path) -> None:
    """Control: both crafted formats do run code when unpickled without a guard (so the tests below can fail)."""
    torch.load(crafted_torch_file(tmp_path / "w.pth", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(crafted_pickle(marker))
    assert marker.exists()
    marker.unlink()
    np.save(tmp_path / "a.npy", object_array(marker))
    np.load(tmp_path / "a.npy", allow_pickle=True)
    assert marker.exists()


# ------------------------------------------------------------------------------------ Inception weights


def test_inception_weights_file_is_read_weights_only(tmp_path: Path, marker: Path) -> None:
    from diffusion_lab.metrics.fidelity import FidelityMetric
    from diffusion_lab.metrics.inception import InceptionWeightsError

    path = crafted_torch_file(tmp_path / "weights-inception.pth", marker)
    metric = FidelityMetric(inception_weights=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InceptionWeightsError, match=r"metrics\.inception_weights.*not a weights-only"):
        metric.check_ready()
    assert not marker.exists()


def test_inception_weights_at_the_torch_hub_path_are_read_weights_only(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``metrics.inception_weights=null`` uses torch hub's copy; a planted file there is refused too."""
    from diffusion_lab.metrics.fidelity import FidelityMetric
    from diffusion_lab.metrics.inception import INCEPTION_WEIGHTS_FILE, InceptionWeightsError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    crafted_torch_file(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE, marker)
    with pytest.raises(InceptionWeightsError, match="not a weights-only torch state dict"):
        FidelityMetric(inception_weights=None, cache_dir=str(tmp_path / "cache")).check_ready()
    assert not marker.exists()


def test_torch_fidelity_never_unpickles_the_weights_file(tmp_path: Path, marker: Path) -> None:
    """Skipping ``check_ready``: ``compute`` hands torch-fidelity our weights-only extractor, not its own (whose
    ``torch.load(weights_only=False)`` would run the file)."""
    from diffusion_lab.metrics.fidelity import FidelityMetric
    from diffusion_lab.metrics.inception import InceptionWeightsError

    path = crafted_torch_file(tmp_path / "weights-inception.pth", marker)
    metric = FidelityMetric(
        inception_weights=str(path), cache_dir=str(tmp_path / "cache"), isc=False, kid=False, noise_floor=False,
        device="cpu",
    )  # fmt: skip
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    with pytest.raises(InceptionWeightsError, match="not a weights-only"):
        metric.compute(images, images)
    assert not marker.exists()


# ---------------------------------------------------------------------- torch-fidelity reference cache


def test_reference_cache_file_is_checked_before_torch_fidelity_loads_it(
    tmp_path: Path, marker: Path, inception_weights: Path
) -> None:
    """A planted FID-statistics file, named as torch-fidelity would look it up, is refused before it is read."""
    from diffusion_lab.metrics.fidelity import FidelityMetric
    from diffusion_lab.metrics.inception import INCEPTION_WEIGHTS_ONLY, FidelityCacheError

    cache = tmp_path / "cache"
    metric = FidelityMetric(
        inception_weights=str(inception_weights), cache_dir=str(cache), isc=False, kid=False, noise_floor=False,
        feature_layer="64", device="cpu",
    )  # fmt: skip
    reference = torch.rand(6, 3, 8, 8) * 2 - 1
    name = metric.reference_cache_name(reference)
    crafted_torch_file(cache / f"{name}-{INCEPTION_WEIGHTS_ONLY}-stat-fid-64.pt", marker, Touch(marker))
    with pytest.raises(FidelityCacheError, match=r"metrics\.cache_dir: .*stat-fid-64\.pt is not a weights-only"):
        metric.compute(reference[:3], reference)
    assert not marker.exists()


def test_cache_check_accepts_tensors_and_float_arrays_only(tmp_path: Path, marker: Path) -> None:
    from diffusion_lab.metrics.inception import FidelityCacheError, check_cache_files

    torch.save({"mu": np.zeros(3), "sigma": np.eye(3, dtype=np.float32)}, tmp_path / "ref-x-stat-fid-2048.pt")
    torch.save(torch.zeros(4, 2048), tmp_path / "ref-x-features-2048.pt")
    check_cache_files(tmp_path, "ref-x")  # what torch-fidelity writes passes
    crafted_torch_file(tmp_path / "ref-x-subset3-seed0-features-2048.pt", marker)
    check_cache_files(tmp_path, "other")  # another reference's files are not this one's business
    with pytest.raises(FidelityCacheError, match=r"subset3-seed0-features-2048\.pt"):
        check_cache_files(tmp_path, "ref-x")
    assert not marker.exists()


# ------------------------------------------------------------------------------ digits classifier files


def test_digits_classifier_cache_is_refused_and_retrained(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted classifier cache (~/.cache/diffusion_lab) is ignored with a warning: it would be retrained."""
    from diffusion_lab.metrics import digits

    crafted_torch_file(digits.classifier_path(tmp_path), marker)

    def retrain(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("retraining instead of trusting the cache")

    monkeypatch.setattr(digits, "train_digits_classifier", retrain)
    with pytest.raises(RuntimeError, match="retraining instead"):
        digits.load_or_train_classifier(tmp_path)
    assert not marker.exists()


def test_digits_feature_extractor_weights_are_read_weights_only(tmp_path: Path, marker: Path) -> None:
    from diffusion_lab.metrics.digits_fidelity import DigitsFeatureExtractor

    path = crafted_torch_file(tmp_path / "digits.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        DigitsFeatureExtractor("digits-cnn-pool", ["features"], feature_extractor_weights_path=str(path))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_read_weights_only(tmp_path: Path, marker: Path) -> None:
    from diffusion_lab.checkpoint_loading import load_module

    path = crafted_torch_file(tmp_path / "last.ckpt", marker)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_module(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ datasets


@pytest.mark.parametrize("verify_md5", [True, False])
def test_cifar10_batch_pickle_is_refused(fake_cifar: dict[str, Any], marker: Path, verify_md5: bool) -> None:  # noqa: F811
    """md5-checked by default; with ``verify_md5=False`` the restricted unpickler refuses the crafted global."""
    (fake_cifar["folder"] / "data_batch_3").write_bytes(crafted_pickle(marker))
    reason = "md5" if verify_md5 else "refused to unpickle"
    with pytest.raises(RuntimeError, match=reason):
        make_cifar(fake_cifar["root"], verify_md5=verify_md5).setup("fit")
    assert not marker.exists()


def object_array(marker: Path, shape: tuple[int, ...] = (1,)) -> np.ndarray:
    """An object array of :class:`Touch` objects: numpy stores it as a pickle inside the ``.npy``/``.npz``."""
    array = np.empty(shape, dtype=object)
    array.fill(Touch(marker))
    return array


@pytest.mark.parametrize("form", ["npz with an object array", "raw pickle"])
def test_imagenet_npz_is_read_without_pickle(fake32: dict[str, Any], marker: Path, form: str) -> None:  # noqa: F811
    path = fake32["val_dir"] / "val_data.npz"
    if form == "raw pickle":
        path.write_bytes(crafted_pickle(marker))
    else:
        np.savez(path, data=object_array(marker, (2, 3 * 32 * 32)), labels=[1, 2])
    with pytest.raises(RuntimeError, match=r"Could not read .*val_data\.npz"):
        make_imagenet(fake32["root"]).setup("fit")
    assert not marker.exists()


def test_celeba_cache_pickle_is_ignored_and_rebuilt(fake: dict[str, Any], marker: Path) -> None:  # noqa: F811
    first = make_celeba(fake["root"])
    first.prepare_data()
    expected = first.train_tensor()
    cached = sorted((fake["folder"] / "diffusion_lab_cache").glob("*.npy"))
    assert cached
    for path in cached:  # one a raw pickle, the others .npy files of an object array
        np.save(path, object_array(marker))
    cached[0].write_bytes(crafted_pickle(marker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = make_celeba(fake["root"]).train_tensor()
    assert not marker.exists()
    assert any("ignoring the CelebA cache" in str(w.message) for w in caught)
    torch.testing.assert_close(again, expected)
