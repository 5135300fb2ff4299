"""Class-conditional training with label dropout and classifier-free-guided sampling, through the real configs."""

import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion_lab.callbacks import guidance_suffix
from diffusion_lab.checkpoint_loading import load_checkpoint, load_module
from diffusion_lab.config import register_configs, validate_config
from diffusion_lab.module import build_module, set_num_classes
from diffusion_lab.sample import check_sampling_request, describe, run
from diffusion_lab.samplers import DDIMSampler
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.train import train
from tests.test_train import TINY_DIGITS

register_configs()
TINY_CFG = ["experiment=digits_cfg", *TINY_DIGITS]


def compose_cfg(config_name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


# ---------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["experiment=toy2d", "cond.enabled=true"], "cond.enabled=true needs a dataset with class labels"),
        (["cond.enabled=true", "cond.p_uncond=1.5"], "cond.p_uncond=1.5 is out of range; valid: a probability in"),
        (["cond.p_uncond=-0.1"], "cond.p_uncond=-0.1 is out of range; valid: a probability in [0, 1]"),
        (["eval.guidance_scale=3"], "eval.guidance_scale=3.0 needs a class-conditional model"),
        (["experiment=toy2d", "eval.guidance_scale=1"], "valid value is eval.guidance_scale=null"),
        (["experiment=digits_cfg", "eval.guidance_scale=-1"], "eval.guidance_scale=-1.0 is out of range; valid: null"),
        (["experiment=digits_cfg", "cond.p_uncond=0"], "cond.p_uncond=0 never trained the null label"),
        (["model.num_classes=10"], "model.num_classes=10 without cond.enabled=true"),
        (["cond.enabled=true", "model.num_classes=7"], "model.num_classes=7 but the dataset has 10 classes"),
    ],
)
def test_config_refusals_name_the_key_and_valid_values(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg("train", overrides))
    assert needle in str(err.value)


def test_refusal_lists_the_labelled_datasets():
    with pytest.raises(ConfigError, match=r"dataset=digits, dataset=cifar10"):
        validate_config(compose_cfg("train", ["experiment=toy2d", "cond.enabled=true"]))


def test_conditional_configs_validate():
    cfg = compose_cfg("train", TINY_CFG)
    validate_config(cfg)
    assert cfg.cond.enabled and cfg.cond.p_uncond == 0.1 and cfg.eval.guidance_scale == 2.0
    validate_config(compose_cfg("train", ["cond.enabled=true", "cond.p_uncond=0"]))  # conditional, never guided
    validate_config(compose_cfg("train", ["cond.enabled=true", "eval.guidance_scale=0"]))


# ------------------------------------------------------------------------------------ module wiring
def conditional_module(overrides=()):
    cfg = compose_cfg("train", [*TINY_CFG, *overrides])
    set_num_classes(cfg, 10)
    return build_module(cfg, (1, 8, 8))


class RecordingLoss:
    """Wraps the module's loss and records the labels the network trained on."""

    def __init__(self, loss):
        self.loss, self.labels = loss, []

    def __call__(self, denoiser, x0, y=None, generator=None):
        self.labels.append(y)
        return self.loss(denoiser, x0, y, generator)

    def __getattr__(self, name):
        return getattr(self.loss, name)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_training_step_drops_labels_at_rate_p(p):
    module = conditional_module([f"cond.p_uncond={p}"])
    recorder = RecordingLoss(module.loss_fn)
    module.loss_fn = recorder
    x0 = torch.zeros(128, 1, 8, 8)
    y = torch.arange(128) % 10
    torch.manual_seed(0)
    module.training_step((x0, y), 0)
    (labels,) = recorder.labels
    dropped = labels == 10  # the null label is row num_classes of the label embedding
    n = labels.numel()
    if p in (0.0, 1.0):
        assert dropped.sum().item() == n * p
    else:
        assert abs(dropped.sum().item() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(labels[~dropped], y[~dropped])
    # Reproducible: the draws come from the seeded global RNG, like the loss's noise and times.
    torch.manual_seed(0)
    module.training_step((x0, y), 0)
    torch.testing.assert_close(recorder.labels[1], labels)


def test_unconditional_module_trains_without_labels():
    cfg = compose_cfg("train", ["experiment=toy2d", "model.hidden=32", "model.num_layers=2"])
    set_num_classes(cfg, None)
    module = build_module(cfg, (2,))
    assert module.num_classes is None and module.training_labels(torch.zeros(4, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="unconditional"):
        module.sample_labels(range(3), [1])


def test_sample_labels_cycle_over_the_classes_by_index():
    module = conditional_module()
    assert module.sample_labels(range(8, 13)).tolist() == [8, 9, 0, 1, 2]
    assert module.sample_labels(range(5), [3, 7]).tolist() == [3, 7, 3, 7, 3]
    assert module.sample_labels(range(2), [10]).tolist() == [10, 10]  # the null label: unconditional
    with pytest.raises(ValueError, match=r"0\.\.9"):
        module.sample_labels(range(2), [11])


def test_guidance_suffix():
    assert guidance_suffix(None) == "" and guidance_suffix(3.0) == "_cfg3" and guidance_suffix(1.5) == "_cfg1.5"


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cond_run")
    metrics = train(compose_cfg("train", [*TINY_CFG, "debug=default"]), run_dir)
    return run_dir, metrics


def test_conditional_run_logs_guided_metrics_with_nfe(cond_run):
    run_dir, _ = cond_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    # debug=default: 8 eval samples, 2 DDIM steps; guidance w = 2 from experiment=digits_cfg.
    assert "val/fd_digits@8_nfe2_cfg2" in saved and np.isfinite(saved["val/fd_digits@8_nfe2_cfg2"])
    assert "val/samples_per_s_nfe2_cfg2" in saved
    sampling = saved["protocol"]["sampling"]
    assert sampling == {
        "nfe": 2,
        "network_evals_per_sample": 4,
        "guided": True,
        "guidance_scale": 2.0,
        "guidance": "cfg",
        "guidance_interval": None,
        "guided_calls_per_sample": 2,
        "labels": "cycled over 0..9",
        "ranks": 1,
    }
    assert saved["protocol"]["conditioning"]["num_classes"] == 10
    assert saved["protocol"]["conditioning"]["p_uncond"] == 0.1
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["diffusion_lab_config"]["model"]["num_classes"] == 10
    assert ckpt["state_dict"]["ema.module.net.cond.label_emb.weight"].shape[0] == 11  # 10 classes + null


def test_checkpoint_samples_each_class_with_guidance(cond_run):
    run_dir, _ = cond_run
    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    assert module.num_classes == 10 and module.p_uncond == 0.1
    # Five steps barely move the EMA weights off their init, whose zero-initialised residual convolutions
    # hide the label embedding; a seeded perturbation makes the labels matter.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sampler = DDIMSampler(steps=3)  # no x̂0 clipping, so differences are not clipped away
    guided = module.generate(range(4), sampler=sampler, class_labels=[3], guidance_scale=3.0)
    assert guided.y.tolist() == [3, 3, 3, 3] and guided.guided and guided.nfe == 3 and guided.network_evals == 6
    plain = module.generate(range(4), sampler=sampler, class_labels=[3])
    assert not plain.guided and plain.nfe == plain.network_evals == 3
    # Same seeds and labels: guidance changes the samples; w = 1 guided equals unguided conditional.
    assert not torch.allclose(guided.x0, plain.x0)
    w1 = module.generate(range(4), sampler=sampler, class_labels=[3], guidance_scale=1.0)
    torch.testing.assert_close(w1.x0, plain.x0, atol=1e-4, rtol=1e-4)


def test_sample_cli_with_guidance_and_labels(cond_run, tmp_path):
    """``dlab-sample … guidance_scale=3 class_labels=[3,7]``, composed and run in-process (the CLI's own
    ``main`` is two lines around these calls; tests/test_train.py runs it in a subprocess)."""
    run_dir, _ = cond_run
    out = tmp_path / "samples"
    overrides = [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "sampler=ddpm",
        "sampler.steps=3",
        "num_samples=5",
        "batch_size=2",
        "guidance_scale=3",
        "class_labels=[3,7]",
    ]
    summary = run(compose_cfg("sample", overrides), out)
    line = describe(summary)
    assert line.startswith("NFE: 3 (guided, CFG w=3: 6 network evaluations per sample, 2 per call)"), line
    assert "labels cycled over [3, 7]" in line
    data = np.load(out / "samples.npz")
    assert data["x0"].shape == (5, 1, 8, 8) and data["y"].tolist() == [3, 7, 3, 7, 3]
    assert int(data["nfe"]) == 3 and int(data["network_evals"]) == 6 and bool(data["guided"])
    assert float(data["guidance_scale"]) == 3.0
    saved = json.loads((out / "sample_summary.json").read_text())
    assert saved["nfe"] == 3 and saved["guided"] and saved["network_evals_per_sample"] == 6
    # Unguided sampling of the conditional model: labels cycle over all classes, one network call per step.
    plain = run(compose_cfg("sample", [*overrides[:5], "grid=false"]), tmp_path / "plain")
    assert describe(plain).startswith("NFE: 3 (unguided)") and "labels cycled over 0..9" in describe(plain)
    assert np.load(tmp_path / "plain" / "samples.npz")["y"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["class_labels=[12]"], "valid labels are 0..9"),
        (["guidance_scale=-2"], "guidance_scale=-2.0 is out of range; valid: null"),
    ],
)
def test_sample_refuses_bad_requests_for_a_conditional_checkpoint(cond_run, tmp_path, overrides, needle):
    run_dir, _ = cond_run
    cfg = compose_cfg("sample", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *overrides])
    with pytest.raises(ConfigError, match=needle):
        run(cfg, tmp_path)


def test_sample_refuses_guidance_and_labels_for_an_unconditional_model():
    with pytest.raises(ConfigError, match=r"guidance_scale=3\.0 needs a class-conditional model"):
        check_sampling_request(compose_cfg("sample", ["ckpt_path=x", "guidance_scale=3"]), None, 0.1)
    with pytest.raises(ConfigError, match=r"class_labels=\[1\] needs a class-conditional model"):
        check_sampling_request(compose_cfg("sample", ["ckpt_path=x", "class_labels=[1]"]), None, 0.1)
    with pytest.raises(ConfigError, match=r"cond\.p_uncond=0 never trained the null label"):
        check_sampling_request(compose_cfg("sample", ["ckpt_path=x", "guidance_scale=2"]), 10, 0.0)
    check_sampling_request(compose_cfg("sample", ["ckpt_path=x"]), None, 0.1)  # unguided, unconditional: fine
