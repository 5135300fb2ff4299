"""Evaluation: DDP-sharded sampling in the callback, and dlab-evaluate's sample-quality scores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion_lab.callbacks.evaluation import shard_indices
from diffusion_lab.metrics import metric_key
from tests.test_train import TINY_DIGITS, TINY_TOY


def test_shards_are_disjoint_and_cover_every_index() -> None:
    for n, w in [(11, 2), (8, 3), (2, 4), (1, 1)]:
        shards = [list(shard_indices(n, r, w)) for r in range(w)]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n)) and len(set(flat)) == n


def test_metric_key_keeps_a_protocol_carrying_name() -> None:
    assert metric_key("val", "fid", 1000, 50) == "val/fid@1k_nfe50"
    assert metric_key("val", "fid", 1000, 50, "_cfg3") == "val/fid@1k_nfe50_cfg3"
    assert metric_key("val", "fid_floor@1k", 1000, 50, "_cfg3") == "val/fid_floor@1k"


ROOT = Path(__file__).resolve().parents[1]
DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_lab.callbacks.evaluation import SampleEvaluation, generate_in_batches
from diffusion_lab.config import register_configs
from diffusion_lab.module import build_module
from diffusion_lab.schema.registry import CONFIG_DIR

OUT, N = Path(sys.argv[1]), int(sys.argv[2])


class Recorder:
    name = "recorder"

    def compute(self, samples, reference):
        torch.save(samples, OUT / "ddp.pt")
        return {"n": float(len(samples))}


def main():
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*sys.argv[3:], "debug=default"])
    L.seed_everything(0)
    datamodule = instantiate(cfg.dataset)
    module = build_module(cfg, datamodule.data_shape)
    evaluation = SampleEvaluation(Recorder(), N, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, enable_checkpointing=False,
        callbacks=[evaluation],
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        single, _ = generate_in_batches(module, N, 5)  # one process, other batch boundaries
        torch.save(single.x0, OUT / "single.pt")
        torch.save(evaluation.results, OUT / "results.pt")


if __name__ == "__main__":
    main()
"""


def assert_sharded_generation_equals_single(script_text: str, tmp_path: Path, n: int = 11) -> None:
    """Run a 2-rank evaluation script (:data:`DDP_SCRIPT` or a variant of it) with ``n`` samples: rank 0 holds exactly
    ``n`` unique samples, equal to one process sampling all ``n``."""
    script = tmp_path / "sharded_eval.py"
    script.write_text(textwrap.dedent(script_text))
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(n), *TINY_TOY],
        capture_output=True, text=True, timeout=500, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    assert sharded.shape == (n, 2) and len(torch.unique(sharded, dim=0)) == n
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~80 s on 2 shared cores: three Python processes import torch + Lightning
def test_ddp_sharded_generation_equals_single_process(tmp_path: Path) -> None:
    """2 CPU ranks (gloo): exactly N unique samples on rank 0, equal to the single-process set."""
    n = 11  # odd: one rank has a padded shard
    assert_sharded_generation_equals_single(DDP_SCRIPT, tmp_path, n)
    results = torch.load(tmp_path / "results.pt")
    assert results["val/n@11_nfe2"] == n


# ------------------------------------------------------------------------------------ dlab-evaluate scores


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from diffusion_lab.config import register_configs
    from diffusion_lab.schema.registry import CONFIG_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _train(tmp_path_factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> Path:
    from diffusion_lab.train import train

    run_dir = tmp_path_factory.mktemp(name)
    train(_compose("train", [*overrides, "debug=default", "trainer.max_steps=3", "eval.num_samples=0"]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "toy", TINY_TOY)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "digits", TINY_DIGITS)


def test_evaluate_toy_scores_with_another_sampler(toy_ckpt: Path, tmp_path: Path) -> None:
    from diffusion_lab.evaluate import run

    overrides = ["scores=[toy2d,bpd]", "sampler=ddim", "sampler.steps=3", "num_samples=16", "num_examples=16"]
    cfg = _compose("evaluate", [f"ckpt_path={toy_ckpt}", *overrides, "num_t_samples=2"])
    results = run(cfg, tmp_path, overrides)
    assert {"val/energy_distance@16_nfe3", "val/mmd_rbf@16_nfe3", "val/bpd@16"} <= set(results)
    assert results["val/sliced_wasserstein@16_nfe3"] > 0
    protocol = results["protocol"]["samples"]
    assert protocol["sampler"] == "ddim" and protocol["nfe"] == 3 and protocol["num_samples"] == 16
    assert (tmp_path / "evaluation.json").is_file()


def test_evaluate_unknown_score_lists_the_valid_ones(toy_ckpt: Path, tmp_path: Path) -> None:
    from diffusion_lab.evaluate import run
    from diffusion_lab.schema.errors import ConfigError

    valid = r"\['bpd', 'coverage', 'density', 'fd_digits', 'fid', 'precision', 'recall', 'toy2d'\]"
    with pytest.raises(
        ConfigError, match=rf"scores=\['fdi'\] is out of range; valid: a non-empty list of scores from {valid}"
    ):
        run(_compose("evaluate", [f"ckpt_path={toy_ckpt}", "scores=[fdi]"]), tmp_path)


def test_evaluate_fid_and_fd_digits_on_a_digits_checkpoint(digits_ckpt, inception_weights, tmp_path) -> None:
    """FID through torch-fidelity (random Inception, 64-d layer for speed) and fd_digits from one sample set;
    ``ref_stats_only=true`` fills the reference cache that the scoring run then reuses."""
    from diffusion_lab.evaluate import format_table, run

    fid_opts = [
        f"metrics.inception_weights={inception_weights}", f"metrics.cache_dir={tmp_path / 'fid_cache'}",
        "metrics.feature_layer=64", "metrics.isc=false", "metrics.kid=false", "metrics.max_reference=12",
        "metrics.device=cpu",
    ]  # fmt: skip
    common = [f"ckpt_path={digits_ckpt}", *fid_opts, "num_samples=8", "batch_size=8"]
    stats = run(_compose("evaluate", [*common, "scores=[fid]", "ref_stats_only=true"]), tmp_path / "ref")
    assert stats["val/fid64_floor@8"] > 0 and "samples" not in stats["protocol"]
    cache = stats["protocol"]["fid"]["cache_name"]
    assert cache.startswith("DigitsDataModule-train-") and "-8px-w" in cache  # the default digits run is 8×8
    assert any(p.name.startswith(cache) for p in (tmp_path / "fid_cache").iterdir())

    import torch_fidelity.utils

    seen: list[int] = []
    real = torch_fidelity.utils.get_featuresdict_from_dataset

    def counting(input, *args, **kwargs):
        seen.append(len(input))
        return real(input, *args, **kwargs)

    from unittest import mock

    cfg = _compose("evaluate", [*common, "scores=[fid,fd_digits]", "sampler=ddim", "sampler.steps=2"])
    with mock.patch.object(torch_fidelity.utils, "get_featuresdict_from_dataset", counting):
        results = run(cfg, tmp_path / "eval", ["sampler=ddim"])
    assert seen == [8], "the reference statistics and the floor came from the cache"
    assert results["val/fid64@8_nfe2"] > 0 and results["val/fid64_floor@8"] == stats["val/fid64_floor@8"]
    assert results["val/fd_digits@8_nfe2"] > 0 and 0 <= results["val/class_coverage@8_nfe2"] <= 1
    assert results["protocol"]["fid"]["feature_extractor"].startswith("inception-v3-compat-")
    assert results["protocol"]["fd_digits"]["feature_extractor"].startswith("digits_cnn-v")
    assert "| val/fid64@8_nfe2" in format_table(results)


# ------------------------------------------------------------ requests that cannot produce a result: refused early


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sampling and the likelihood evaluation fail loudly if reached (a refusal must come first)."""
    import diffusion_lab.callbacks.evaluation as evaluation
    import diffusion_lab.evaluate as evaluate

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the request was refused")

    monkeypatch.setattr(evaluation, "generate_in_batches", forbidden)
    monkeypatch.setitem(evaluate.EVALUATORS, "bpd", forbidden)


@pytest.mark.parametrize("num_samples", [1, 0, -3])
def test_evaluate_refuses_num_samples_below_two_before_loading(
    num_samples: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusion_lab.checkpoint_loading as checkpoint_loading
    import diffusion_lab.evaluate as evaluate
    from diffusion_lab.schema.errors import ConfigError

    monkeypatch.setattr(checkpoint_loading, "load_module", lambda *a, **k: pytest.fail("checkpoint loaded"))
    cfg = _compose("evaluate", ["ckpt_path=missing.ckpt", "scores=[fd_digits]", f"num_samples={num_samples}"])
    with pytest.raises(ConfigError, match=rf"^num_samples={num_samples} is out of range; valid: an integer >= 2"):
        evaluate.run(cfg, tmp_path)


@pytest.mark.parametrize("num_samples", [0, -1])
def test_sample_refuses_num_samples_below_one_before_loading(
    num_samples: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusion_lab.checkpoint_loading as checkpoint_loading
    import diffusion_lab.sample as sample
    from diffusion_lab.schema.errors import ConfigError

    monkeypatch.setattr(checkpoint_loading, "load_module", lambda *a, **k: pytest.fail("checkpoint loaded"))
    cfg = _compose("sample", ["ckpt_path=missing.ckpt", f"num_samples={num_samples}"])
    with pytest.raises(ConfigError, match=rf"^num_samples={num_samples} is out of range; valid: an integer >= 1"):
        sample.run(cfg, tmp_path)
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize(
    ("ckpt", "score", "valid"),
    [
        ("toy_ckpt", "fd_digits", "['toy2d', 'bpd']"),
        ("toy_ckpt", "fid", "['toy2d', 'bpd']"),
        ("digits_ckpt", "toy2d", "['fid', 'fd_digits', 'bpd']"),
    ],
)
def test_evaluate_refuses_a_score_that_does_not_fit_the_data(
    ckpt: str, score: str, valid: str, request: pytest.FixtureRequest, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from diffusion_lab.evaluate import run
    from diffusion_lab.schema.errors import ConfigError

    _no_work(monkeypatch)
    path = request.getfixturevalue(ckpt)
    cfg = _compose("evaluate", [f"ckpt_path={path}", f"scores=[bpd,{score}]", "num_samples=10"])
    with pytest.raises(
        ConfigError, match=rf"scores=\['{score}'\] cannot score .*valid choices for this checkpoint"
    ) as info:
        run(cfg, tmp_path)
    assert str(info.value).endswith(f"valid choices for this checkpoint: {valid}")


@pytest.mark.parametrize("content", ["text", "empty", "wrong keys"])
def test_evaluate_refuses_a_bad_inception_file_before_sampling(
    content: str, digits_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text file, an empty file or another network's state dict as Inception weights: refused before the
    likelihood evaluation and the sampling, naming the key."""
    from diffusion_lab.evaluate import run
    from diffusion_lab.metrics import InceptionWeightsError

    weights = tmp_path / "weights.pth"
    if content == "text":
        weights.write_text("this is not a weights file\n")
    elif content == "empty":
        weights.write_bytes(b"")
    else:
        torch.save({"conv.weight": torch.zeros(3, 3)}, weights)
    _no_work(monkeypatch)
    cfg = _compose("evaluate", [f"ckpt_path={digits_ckpt}", "scores=[bpd,fid]", f"metrics.inception_weights={weights}"])
    with pytest.raises(InceptionWeightsError, match=rf"metrics\.inception_weights: {re.escape(str(weights))}"):
        run(cfg, tmp_path)
    assert not (tmp_path / "evaluation.json").exists()


def test_bits_per_dim_of_a_non_gaussian_prior_checkpoint_is_refused_before_any_work(tmp_path_factory, tmp_path):
    """A flow trained from C2OT's 8 Gaussians: the ELBO and the PF-ODE likelihood assume ε ~ N(0, I), so
    ``scores=[bpd]`` is refused naming the checkpoint and the reason, and nothing is written; sample scores run."""
    from diffusion_lab.evaluate import run
    from diffusion_lab.schema.errors import ConfigError
    from diffusion_lab.train import train

    tiny = ["experiment=c2ot_fig1_fm", "dataset.num_train=512", "dataset.num_val=64", "dataset.batch_size=64",
            "model.hidden=16", "model.num_blocks=1", "logger=csv", "callbacks.grid_samples=0", "eval.num_samples=0",
            "trainer.max_steps=3", "callbacks.checkpoint_every_n_steps=3", "callbacks.sample_every_n_steps=3",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    run_dir = tmp_path_factory.mktemp("c2ot")
    train(_compose("train", tiny), run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as err:
        run(_compose("evaluate", [f"ckpt_path={ckpt}", "scores=[toy2d,bpd]", "num_samples=16"]), tmp_path)
    assert f"scores=['bpd']: {ckpt} has a non-Gaussian prior, and bits/dim needs a Gaussian prior" in str(err.value)
    assert not (tmp_path / "evaluation.json").exists()
    overrides = ["scores=[toy2d]", "sampler=euler", "sampler.steps=2", "sampler.grid=uniform", "num_samples=16"]
    results = run(_compose("evaluate", [f"ckpt_path={ckpt}", *overrides]), tmp_path, overrides)
    assert results["val/sliced_wasserstein@16_nfe2"] > 0
