"""Tests for diffusion_lab.metrics.digits (the classifier is trained once per session, in a tmp cache)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.cache_files import CacheChecksumWarning, checksum_path, seal, sha256_of, verify
from diffusion_lab.metrics.base import DigitsFDMetric, SampleMetric
from diffusion_lab.metrics.digits import (
    DigitsClassifierConfig,
    DigitsFrechetDistance,
    class_coverage,
    class_entropy,
    class_histogram,
    classifier_path,
    digits_split,
    load_classifier_file,
    load_or_train_classifier,
    train_digits_classifier,
)
from diffusion_lab.metrics.prdc import PRDC_KEYS

Split = tuple[Tensor, Tensor, Tensor, Tensor]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def fd(cache_dir: Path) -> DigitsFrechetDistance:
    return DigitsFrechetDistance(cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def split() -> Split:
    return digits_split()


def _pad16(x: Tensor) -> Tensor:
    return F.pad(x, (4, 4, 4, 4), value=-1.0)  # 8x8 digit centred on a −1 background


# --- data split ------------------------------------------------------------------------------------


def test_digits_split_shapes_range_and_stratification(split: Split) -> None:
    x_tr, y_tr, x_va, y_va = split
    assert x_tr.shape == (1617, 1, 8, 8) and x_va.shape == (180, 1, 8, 8)
    assert y_tr.shape == (1617,) and y_va.shape == (180,) and y_va.dtype == torch.int64
    assert x_tr.min() == -1.0 and x_tr.max() == 1.0 and x_tr.dtype == torch.float32
    counts = torch.bincount(y_va, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19
    assert all(torch.equal(a, b) for a, b in zip(split, digits_split(), strict=True))


# --- classifier, cache, determinism ----------------------------------------------------------------


def test_classifier_accuracy_on_held_out(fd: DigitsFrechetDistance, split: Split) -> None:
    _, _, x_va, y_va = split
    acc = float((fd.predict(x_va) == y_va).double().mean())
    print(f"digits classifier held-out accuracy {acc:.4f}, trained in {fd.train_seconds:.1f} s")
    assert acc >= 0.95
    assert fd.val_accuracy == pytest.approx(acc)


def test_second_construction_loads_from_cache(fd: DigitsFrechetDistance, cache_dir: Path) -> None:
    assert not fd.loaded_from_cache
    (path,) = cache_dir.glob("digits_cnn-*.pt")  # exactly one file and its checksum, no leftover temp files
    assert sorted(cache_dir.iterdir()) == [path, checksum_path(path)]
    assert verify(path) is None
    mtime, rng_before = path.stat().st_mtime_ns, torch.get_rng_state()
    again = DigitsFrechetDistance(cache_dir=str(cache_dir))
    assert again.loaded_from_cache and path.stat().st_mtime_ns == mtime
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert again.extractor_id == fd.extractor_id and again.extractor_id in path.name
    for a, b in zip(fd.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert set(torch.load(path, weights_only=True)) == {"cache_key", "config", "info", "state_dict"}


def test_training_is_deterministic_and_leaves_global_rng_alone(fd: DigitsFrechetDistance) -> None:
    torch.manual_seed(12345)  # a global RNG state unlike the fixture's: only the config seed may matter
    rng_before = torch.get_rng_state()
    model, info = train_digits_classifier(DigitsClassifierConfig())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert info["val_accuracy"] == fd.val_accuracy
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fd.model.state_dict()[name]), name


CHEAP = DigitsClassifierConfig(epochs=1)  # trains in well under a second, and a cache key of its own


def test_corrupt_cache_file_is_retrained(tmp_path: Path) -> None:
    _, _, loaded = load_or_train_classifier(tmp_path, CHEAP)
    path = classifier_path(tmp_path, CHEAP)
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(CacheChecksumWarning, match=rf"digits classifier cache {re.escape(str(path))}: its sha256"):
        _, _, loaded_again = load_or_train_classifier(tmp_path, CHEAP)
    assert not loaded and not loaded_again and verify(path) is None
    assert load_or_train_classifier(tmp_path, CHEAP)[2]


def test_unreadable_cache_file_with_a_matching_checksum_is_retrained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file whose checksum matches but that is no classifier payload (e.g. written by hand) is retrained too."""
    load_or_train_classifier(tmp_path, CHEAP)
    path = classifier_path(tmp_path, CHEAP)
    path.write_bytes(b"not a checkpoint")
    seal(path)
    with caplog.at_level(logging.WARNING):
        assert not load_or_train_classifier(tmp_path, CHEAP)[2]
    assert "ignoring digits classifier cache" in caplog.text


def _flip_a_weight_bit(path: Path, tensor: Tensor) -> None:
    """Flip the top exponent bit of ``tensor[0]``'s float32 bytes where they sit in the (uncompressed) torch file:
    the file still loads, with one weight about 2^128 times too large."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0 and data.find(tensor.numpy().tobytes(), at + 1) < 0  # exactly one place
    data[at + 3] ^= 0x40  # little-endian float32: byte 3 holds the sign and the top exponent bits
    path.write_bytes(bytes(data))


def test_a_bit_flipped_cache_is_rebuilt_with_a_warning_naming_both_hashes(tmp_path: Path) -> None:
    model, _, _ = load_or_train_classifier(tmp_path, CHEAP)
    path = classifier_path(tmp_path, CHEAP)
    recorded = sha256_of(path)
    _flip_a_weight_bit(path, model.head.bias.detach())
    flipped = sha256_of(path)
    trusted = torch.load(path, weights_only=True)["state_dict"]["head.bias"]  # what the old reader used silently
    assert not torch.equal(trusted, model.head.bias) and trusted.abs().max() > 1e30
    with pytest.warns(CacheChecksumWarning) as caught:
        rebuilt, _, loaded = load_or_train_classifier(tmp_path, CHEAP)
    (message,) = [str(w.message) for w in caught]
    assert str(path) in message and flipped in message and recorded in message
    assert not loaded and verify(path) is None  # retrained and rewritten with a checksum that matches
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name  # the correct weights, bit for bit
    again, _, loaded_again = load_or_train_classifier(tmp_path, CHEAP)
    assert loaded_again and torch.equal(again.head.bias, model.head.bias)


def test_a_cache_without_its_checksum_is_not_trusted(tmp_path: Path) -> None:
    """A cache from before checksums (or whose write stopped before the checksum) is rebuilt, not used."""
    load_or_train_classifier(tmp_path, CHEAP)
    path = classifier_path(tmp_path, CHEAP)
    checksum_path(path).unlink()
    with pytest.warns(CacheChecksumWarning, match=r"no checksum file .*\.pt\.sha256"):
        assert not load_or_train_classifier(tmp_path, CHEAP)[2]
    assert verify(path) is None


def test_the_feature_extractor_file_is_checked_against_its_checksum(tmp_path: Path) -> None:
    model, _, _ = load_or_train_classifier(tmp_path, CHEAP)
    path = classifier_path(tmp_path, CHEAP)
    assert torch.equal(load_classifier_file(path).head.bias, model.head.bias)
    _flip_a_weight_bit(path, model.head.bias.detach())
    with pytest.raises(
        ValueError, match=rf"digits classifier {re.escape(str(path))}: its sha256 is [0-9a-f]{{64}}, but"
    ):
        load_classifier_file(path)


def test_cache_key_depends_on_hyper_parameters() -> None:
    assert DigitsClassifierConfig().cache_key() == DigitsClassifierConfig().cache_key()
    assert DigitsClassifierConfig().cache_key() != DigitsClassifierConfig(epochs=21).cache_key()


# --- Fréchet digits distance -----------------------------------------------------------------------


def test_fd_real_is_small_and_noise_is_large(fd: DigitsFrechetDistance, split: Split) -> None:
    x_tr, _, x_va, _ = split
    mu, sigma = fd.reference_stats(x_tr)
    real = fd.compute_from_stats(x_va, mu, sigma)["fd_digits"]
    noise = torch.rand(x_va.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = fd.compute_from_stats(noise, mu, sigma)["fd_digits"]
    print(f"fd_digits: val vs train {real:.3f}, uniform noise vs train {fake:.3f}")
    assert fake >= 10 * real
    assert fd.compute(x_va, x_tr)["fd_digits"] == pytest.approx(real)


def test_features_shape_and_dtype(fd: DigitsFrechetDistance, split: Split) -> None:
    feats = fd.features(split[2])
    assert feats.shape == (180, fd.config.feature_dim) and feats.dtype == torch.float32


def test_class_scores_on_real_and_collapsed_sets(fd: DigitsFrechetDistance, split: Split) -> None:
    x_tr, _, x_va, _ = split
    real = fd.compute(x_va, x_tr)
    assert real["class_coverage"] == 1.0 and real["class_entropy"] > 0.99
    collapsed = fd.compute(x_va[:1].repeat(64, 1, 1, 1), x_tr)
    assert collapsed["class_coverage"] == pytest.approx(0.1) and collapsed["class_entropy"] == 0.0
    assert collapsed["fd_digits"] > 10 * real["fd_digits"]


def test_class_score_functions_by_hand() -> None:
    hist = class_histogram(torch.tensor([0, 0, 1, 1]))
    assert hist.tolist() == [0.5, 0.5] + [0.0] * 8
    assert class_coverage(hist) == pytest.approx(0.2)
    assert class_entropy(hist) == pytest.approx(math.log(2) / math.log(10))
    uniform = class_histogram(torch.arange(10).repeat(3))
    assert class_coverage(uniform) == 1.0 and class_entropy(uniform) == pytest.approx(1.0)
    rare = class_histogram(torch.cat([torch.zeros(999, dtype=torch.long), torch.ones(1, dtype=torch.long)]))
    assert class_coverage(rare) == pytest.approx(0.1)  # 0.1 % of predictions is below the 1 % share


# --- larger inputs ---------------------------------------------------------------------------------


def test_upsampled_inputs_pool_back_exactly(fd: DigitsFrechetDistance, split: Split) -> None:
    x_va = split[2]
    for factor in (2, 4):  # 16x16 and 32x32 nearest-neighbour upsampling
        up = F.interpolate(x_va, scale_factor=factor, mode="nearest")
        assert torch.allclose(fd.features(up), fd.features(x_va), atol=1e-5)


def test_padded_inputs_with_center_crop(fd: DigitsFrechetDistance, cache_dir: Path, split: Split) -> None:
    x_tr, _, x_va, _ = split
    crop = DigitsFrechetDistance(cache_dir=str(cache_dir), resize="center_crop")
    assert crop.loaded_from_cache
    assert torch.equal(crop.features(_pad16(x_va)), fd.features(x_va))
    mu, sigma = fd.reference_stats(x_tr)  # reference at 8x8, samples padded to 16x16
    assert crop.compute_from_stats(_pad16(x_va), mu, sigma)["fd_digits"] == pytest.approx(
        fd.compute_from_stats(x_va, mu, sigma)["fd_digits"]
    )
    pooled = fd.compute_from_stats(_pad16(x_va), mu, sigma)["fd_digits"]  # wrong hint: digit shrunk to 4x4
    assert pooled > 10 * fd.compute_from_stats(x_va, mu, sigma)["fd_digits"]


def test_invalid_resize_and_shapes(cache_dir: Path, fd: DigitsFrechetDistance) -> None:
    with pytest.raises(ValueError, match="center_crop"):
        DigitsFrechetDistance(cache_dir=str(cache_dir), resize="bilinear")
    with pytest.raises(ValueError):
        fd.features(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError):
        fd.features(torch.zeros(4, 1, 4, 4))


# --- SampleMetric wrapper --------------------------------------------------------------------------


def test_digits_fd_metric_lazy_and_same(fd: DigitsFrechetDistance, cache_dir: Path, split: Split) -> None:
    x_tr, _, x_va, _ = split
    metric = DigitsFDMetric(cache_dir=str(cache_dir))
    assert isinstance(metric, SampleMetric) and metric._fd is None
    out = metric.compute(x_va, x_tr)
    assert set(out) == {"fd_digits", "class_coverage", "class_entropy", *PRDC_KEYS}
    assert metric.extractor.loaded_from_cache
    assert {k: out[k] for k in ("fd_digits", "class_coverage", "class_entropy")} == fd.compute(x_va, x_tr)
