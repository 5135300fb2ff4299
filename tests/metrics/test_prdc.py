"""Precision / recall / density / coverage: closed-form cases, the reference implementation, self-exclusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from diffusion_lab.config import check_domains
from diffusion_lab.metrics.base import DigitsFDMetric, Toy2DMetric
from diffusion_lab.metrics.digits import digits_split
from diffusion_lab.metrics.prdc import PRDC_KEYS, knn_radii, prdc
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import option_config

prdc_reference = pytest.importorskip("prdc")  # clovaai/generative-evaluation-prdc (dev dependency)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


@pytest.mark.parametrize("k", [1, 3, 5])
def test_identical_sets_score_one_on_all_four(k: int) -> None:
    """Each real ball (radius: k-th nearest *other* point) holds the point and its k − 1 nearer neighbours, so
    every fake copy lies in exactly k balls: density = k·N / (k·N) = 1, and the other three are 1."""
    x = _features(200, 8, seed=0)
    scores = prdc(x, x.clone(), k=k)
    assert scores.as_dict() == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_disjoint_far_sets_score_zero_on_all_four() -> None:
    real, fake = _features(150, 4, seed=0), _features(120, 4, seed=1, shift=1e3)
    assert prdc(real, fake).as_dict() == dict.fromkeys(PRDC_KEYS, 0.0)


def test_knn_radius_excludes_the_point_itself() -> None:
    """Points 0, 1, 3, 6 on a line: the nearest other point of 0 is at 1, its 2nd at 3 (never itself at 0)."""
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]


def test_knn_radius_counts_a_duplicate_as_a_neighbour_at_zero() -> None:
    x = torch.tensor([[0.0], [0.0], [5.0]])
    assert knn_radii(x, k=1).tolist() == [0.0, 0.0, 5.0]


def test_radius_is_the_same_in_every_block_size() -> None:
    x = _features(37, 3, seed=2)
    torch.testing.assert_close(knn_radii(x, 3, block=5), knn_radii(x, 3, block=1000), rtol=0, atol=1e-12)
    assert prdc(x, _features(23, 3, seed=3), block=4) == prdc(x, _features(23, 3, seed=3), block=1000)


def test_a_hand_counted_case() -> None:
    """Reals 0, 1, 3 (k = 1 radii 1, 1, 2) and fakes 0.5, 10, 11 (radii 9.5, 1, 1) on a line."""
    real, fake = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.5], [10.0], [11.0]])
    scores = prdc(real, fake, k=1)
    assert scores.precision == pytest.approx(1 / 3)  # only 0.5 lies in a real ball (those of 0 and 1)
    assert scores.density == pytest.approx(2 / 3)  # 0.5 lies in two balls; 10 and 11 in none
    assert scores.coverage == pytest.approx(2 / 3)  # the balls of 0 and 1 hold a fake, that of 3 does not
    assert scores.recall == pytest.approx(1.0)  # every real lies in the 9.5-ball of 0.5


@pytest.mark.parametrize(("n", "m", "d", "k"), [(300, 250, 16, 3), (120, 200, 5, 5), (64, 64, 64, 1)])
def test_agrees_with_the_reference_implementation(n: int, m: int, d: int, k: int) -> None:
    real, fake = _features(n, d, seed=n), _features(m, d, seed=m + 1, shift=0.3)
    ours = prdc(real, fake, k=k).as_dict()
    ref = prdc_reference.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    for key in PRDC_KEYS:
        assert abs(ours[key] - float(ref[key])) <= 1e-6, (key, ours[key], ref[key])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(7, 60), m=st.integers(7, 60), d=st.integers(1, 6), k=st.integers(1, 5),
    seed=st.integers(0, 2**16), shift=st.floats(0.0, 3.0),
)  # fmt: skip
def test_agrees_with_the_reference_on_random_sets(n: int, m: int, d: int, k: int, seed: int, shift: float) -> None:
    """Sets of at least k + 2 points (the reference indexes out of bounds at k + 1)."""
    rng = np.random.default_rng(seed)
    real, fake = rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), k=k).as_dict()
    ref = prdc_reference.compute_prdc(real, fake, nearest_k=k)
    for key in PRDC_KEYS:
        assert abs(ours[key] - float(ref[key])) <= 1e-6, (key, ours[key], ref[key])


def test_a_shrunken_copy_has_full_precision_and_low_recall() -> None:
    """Fakes concentrated at the real mode (mode collapse) are precise but do not recall the real spread."""
    real = _features(400, 2, seed=0)
    fake = 0.05 * _features(400, 2, seed=1)
    scores = prdc(real, fake)
    assert scores.precision > 0.95 and scores.recall < 0.2 and scores.coverage < 0.2


@pytest.mark.parametrize(
    ("real", "fake", "k", "message"),
    [
        (torch.zeros(10, 3), torch.zeros(10, 4), 3, "differ in dimension: 3 vs 4"),
        (torch.zeros(3, 2), torch.zeros(10, 2), 3, "real: 3 points, but a k-NN radius with k=3 needs at least 4"),
        (torch.zeros(10, 2), torch.zeros(10), 3, r"fake features must have shape \(N, D\), got \(10,\)"),
        (torch.full((10, 2), float("nan")), torch.zeros(10, 2), 3, "real features contain NaN or inf"),
        (torch.zeros(10, 2), torch.zeros(10, 2), 0, "k must be >= 1, got 0"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(real: torch.Tensor, fake: torch.Tensor, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prdc(real, fake, k=k)


# --- in the metrics' feature spaces ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_metric(tmp_path_factory: pytest.TempPathFactory) -> DigitsFDMetric:
    return DigitsFDMetric(cache_dir=str(tmp_path_factory.mktemp("digits_cache")), resize="pool")


def test_digits_metric_scores_in_the_cnn_features_with_its_protocol(digits_metric: DigitsFDMetric) -> None:
    x_tr, _, x_va, _ = digits_split()
    out = digits_metric.compute(x_va, x_tr)
    fd = digits_metric.extractor
    expected = prdc(fd.features(x_tr), fd.features(x_va), k=3).as_dict()
    assert {k: out[k] for k in PRDC_KEYS} == expected
    assert out["precision"] > 0.8 and out["recall"] > 0.8  # held-out digits lie on the train manifold
    protocol = digits_metric.protocol()["prdc"]
    assert protocol["k"] == 3 and protocol["real_examples"] == len(x_tr) and protocol["fake_examples"] == len(x_va)
    assert fd.extractor_id in protocol["features"]


def test_digits_metric_on_noise_has_no_precision(digits_metric: DigitsFDMetric) -> None:
    x_tr, _, _, _ = digits_split()
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = digits_metric.compute(noise, x_tr)
    assert out["precision"] < 0.05 and out["density"] < 0.05


def test_prdc_can_be_switched_off() -> None:
    x = _features(50, 2, seed=0).float()
    metric = Toy2DMetric(num_projections=8, prdc=False)
    assert not set(PRDC_KEYS) & set(metric.compute(x, x)) and metric.protocol() == {}


def test_toy2d_metric_scores_raw_coordinates() -> None:
    x, y = _features(300, 2, seed=0).float(), _features(200, 2, seed=1, shift=0.5).float()
    metric = Toy2DMetric(num_projections=8, prdc_k=5)
    out = metric.compute(y, x)
    assert {k: out[k] for k in PRDC_KEYS} == prdc(x, y, k=5).as_dict()
    assert metric.protocol()["prdc"] | {"k": 5, "real_examples": 300, "fake_examples": 200} == metric.protocol()["prdc"]
    same = metric.compute(x, x)
    assert [same[k] for k in PRDC_KEYS] == [1.0, 1.0, 1.0, 1.0]


def test_prdc_k_is_range_checked_when_the_config_is_composed() -> None:
    with pytest.raises(ConfigError, match=r"metrics.prdc_k=0 is out of range; valid: an integer >= 1"):
        check_domains(OmegaConf.merge(option_config("metrics", "digits_fd"), {"prdc_k": 0}), "metrics.")  # type: ignore[arg-type]
