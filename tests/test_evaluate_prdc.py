"""dlab-evaluate's precision / recall / density / coverage scores, and the DiT backbone from the CLI's entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusion_lab.config import check_evaluate_request
from diffusion_lab.evaluate import sample_scores_of
from diffusion_lab.metrics.prdc import PRDC_KEYS
from diffusion_lab.schema.errors import ConfigError
from tests.test_evaluate import _compose, _train

TINY_DIT = ["model=dit_digits", "model.hidden_size=32", "model.depth=2", "dataset.batch_size=16"]


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "dit_digits", TINY_DIT)


@pytest.mark.parametrize(
    ("scores", "shape", "expected"),
    [
        (["precision", "recall"], (2,), ["toy2d"]),
        (["density"], (1, 8, 8), ["fd_digits"]),
        (["precision"], (3, 32, 32), ["fid"]),
        (["fid", "precision"], (1, 8, 8), ["fid"]),  # the requested one's features, not the data's default
        (["bpd"], (1, 8, 8), []),
    ],
)
def test_the_feature_space_follows_the_request_then_the_data(
    scores: list[str], shape: tuple[int, ...], expected: list[str]
) -> None:
    assert sample_scores_of(scores, shape) == expected


def test_density_and_coverage_in_inception_features_are_refused_before_loading() -> None:
    cfg = _compose("evaluate", ["ckpt_path=/nonexistent.ckpt", "scores=[fid,precision,density,coverage]"])
    with pytest.raises(ConfigError, match=r"\['density', 'coverage'\] are not computed in Inception features"):
        check_evaluate_request(cfg)


def test_a_dit_checkpoint_is_scored_with_the_four_in_the_digits_features(dit_ckpt: Path, tmp_path: Path) -> None:
    """model=dit_digits trains, checkpoints, reloads and samples through the same entry points as the UNet; the
    four scores alone are computed in the digits CNN's features, each logged with its protocol."""
    from diffusion_lab.evaluate import run

    overrides = ["scores=[precision,recall,density,coverage]", "sampler=ddim", "sampler.steps=2", "num_samples=12"]
    results = run(_compose("evaluate", [f"ckpt_path={dit_ckpt}", *overrides]), tmp_path, overrides)
    for key in PRDC_KEYS:
        value = results[f"val/{key}@12_nfe2"]
        assert value >= 0.0 and (key == "density" or value <= 1.0)
    assert "val/fd_digits@12_nfe2" in results  # the feature space they were computed in
    prdc = results["protocol"]["fd_digits"]["prdc"]
    assert prdc["k"] == 3 and prdc["fake_examples"] == 12 and prdc["real_examples"] > 1000
    assert prdc["features"].startswith("digits_cnn-v")
    assert json.loads((tmp_path / "evaluation.json").read_text())["protocol"]["fd_digits"]["prdc"] == prdc


def test_the_training_record_carries_the_four_and_their_protocol(tmp_path: Path) -> None:
    """The end-of-training evaluation logs them beside fd_digits, and summary.json records the protocol."""
    from diffusion_lab.train import train

    run_dir = tmp_path / "run"
    cfg = _compose("train", [*TINY_DIT, "debug=default", "trainer.max_steps=2", "eval.num_samples=8"])
    metrics = train(cfg, run_dir)
    assert {f"val/{k}@8_nfe2" for k in PRDC_KEYS} <= set(metrics)
    assert metrics["protocol"]["metric_protocol"]["prdc"]["fake_examples"] == 8


def _metric_for(scores: list[str], score: str, run_metrics: dict | None = None) -> object:
    """The metric dlab-evaluate builds for ``score`` under ``scores`` on a digits checkpoint (nothing loaded)."""
    from types import SimpleNamespace

    from diffusion_lab.evaluate import sample_metric

    cfg = _compose("evaluate", ["ckpt_path=x.ckpt", f"scores=[{','.join(scores)}]"])
    config = {"dataset": {"resize": None}, "metrics": run_metrics}
    module = SimpleNamespace(config=config, data_shape=(1, 8, 8))
    return sample_metric(cfg, module, score, SimpleNamespace())  # type: ignore[arg-type]


def test_precision_with_fid_turns_on_torch_fidelitys_prc_and_off_the_digits_ones() -> None:
    scores = ["fid", "fd_digits", "precision", "recall"]
    assert _metric_for(scores, "fid").prc is True  # type: ignore[attr-defined]
    assert _metric_for(scores, "fd_digits").prdc is False  # type: ignore[attr-defined]  # one feature space
    assert _metric_for(["fid"], "fid").prc is False  # type: ignore[attr-defined]


def test_the_four_override_a_run_that_switched_them_off() -> None:
    run_metrics = {"_target_": "diffusion_lab.metrics.DigitsFDMetric", "prdc": False, "prdc_k": 5}
    metric = _metric_for(["precision"], "fd_digits", run_metrics)
    assert metric.prdc is True and metric.prdc_k == 5  # type: ignore[attr-defined]


def test_fid_records_the_k_torch_fidelity_runs_with(tmp_path: Path) -> None:
    from diffusion_lab.metrics.fidelity import FidelityMetric

    metric = FidelityMetric(prc=True)
    metric._weights = tmp_path / "weights.pth"  # no Inception needed to read the arguments
    metric._weights.write_bytes(b"not read here")
    assert metric._kwargs(10, 10)["prc_neighborhood"] == metric.protocol()["prc_k"] == 3
    assert "prc_k" not in FidelityMetric(prc=False).protocol()
