"""dlab-sample with autoguidance and a guidance interval: the checks before sampling, the guide refused when its data
shape or conditioning differs (naming both), and the recorded network evaluations."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion_lab.checkpoint_file import atomic_torch_save, with_checksum
from diffusion_lab.checkpoint_loading import load_checkpoint
from diffusion_lab.cli import validate_sample
from diffusion_lab.diffusion.guidance import sigma_over_alpha
from diffusion_lab.sample import describe, run
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.train import train
from tests.test_train import TINY_TOY, compose_train


def compose_sample(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("sample", overrides=["logger.wandb=null", *overrides])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy")
    train(compose_train([*TINY_TOY, "debug=default", "trainer.max_steps=4", "eval.num_samples=0"]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def sample(ckpt, out_dir, *overrides):
    cfg = compose_sample([f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=10", "num_samples=6", "grid=false",
                          f"out_dir={out_dir}", *overrides])  # fmt: skip
    validate_sample(cfg)
    return run(cfg, out_dir), np.load(out_dir / "samples.npz")


def test_a_guide_equal_to_the_model_changes_nothing_and_counts_two_evaluations(ckpt, tmp_path):
    """D_guide + w·(D_main − D_guide) with D_guide = D_main is D_main, bit for bit; each call still runs both."""
    _, plain = sample(ckpt, tmp_path / "plain")
    summary, auto = sample(ckpt, tmp_path / "auto", "guidance=auto", f"guide_ckpt={ckpt}", "guidance_scale=3")
    np.testing.assert_array_equal(auto["x0"], plain["x0"])
    assert int(plain["network_evals"]) == 10 and str(plain["guidance"]) == ""
    assert int(auto["network_evals"]) == 20 and float(auto["guided_calls"]) == 10 and str(auto["guidance"]) == "auto"
    assert "NFE: 10 (guided, autoguidance w=3: 20 network evaluations per sample, 2 per call)" in describe(summary)


def test_an_interval_guides_only_the_calls_inside_it(ckpt, tmp_path):
    from diffusion_lab.checkpoint_loading import load_module
    from diffusion_lab.samplers import DDIMSampler

    schedule = load_module(ckpt).denoiser.schedule
    times = DDIMSampler(steps=10).time_grid(schedule)[:-1]  # DDIM evaluates D at every grid point but the last
    level = sigma_over_alpha(schedule, times.float())
    lo, hi = float(level.sort().values[2]), float(level.sort().values[6])
    inside = int(((level > lo) & (level <= hi)).sum())
    assert inside == 4
    summary, out = sample(ckpt, tmp_path / "iv", "guidance=auto", f"guide_ckpt={ckpt}", "guidance_scale=2",
                          f"guidance_interval=[{lo!r},{hi!r}]")  # fmt: skip
    assert float(out["guided_calls"]) == inside and int(out["network_evals"]) == 10 + inside
    assert out["guidance_interval"].tolist() == [lo, hi]
    assert describe(summary).startswith(
        f"NFE: 10 (guided, autoguidance w=2 in σ/α ∈ ({lo:g}, {hi:g}]: {inside} of 10 calls guided, "
        f"{10 + inside} network evaluations per sample (2 per guided call, 1 otherwise))"
    )
    assert summary["guided_calls_per_sample"] == inside and summary["network_evals_per_sample"] == 10 + inside


def crafted(ckpt, tmp_path, name, change):
    data = load_checkpoint(ckpt)
    change(data)
    path = tmp_path / name
    atomic_torch_save(with_checksum(data), path)
    return path


def test_a_guide_with_another_data_shape_or_conditioning_is_refused_naming_both(ckpt, tmp_path):
    wide = crafted(ckpt, tmp_path, "wide.ckpt", lambda d: d.update(data_shape=[3]))
    labelled = crafted(ckpt, tmp_path, "cond.ckpt", lambda d: d["diffusion_lab_config"]["model"].update(num_classes=4))
    with pytest.raises(ConfigError) as err:
        sample(ckpt, tmp_path / "a", "guidance=auto", f"guide_ckpt={wide}", "guidance_scale=2")
    assert str(err.value) == (f"guide_ckpt={wide} has data shape [3], but ckpt_path={ckpt} has [2]; valid: a guide "
                              "trained on the same data with the same conditioning")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"guide_ckpt={labelled} has conditioning .* 4, but ckpt_path=.* has None"):
        sample(ckpt, tmp_path / "b", "guidance=auto", f"guide_ckpt={labelled}", "guidance_scale=2")
    assert not (tmp_path / "a" / "samples.npz").exists() and not (tmp_path / "b" / "samples.npz").exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["guidance=auto", "guidance_scale=2"], "guidance=auto needs guide_ckpt=<a checkpoint of a weaker model>"),
        (["guidance=auto", "guide_ckpt=x.ckpt"], "guidance=auto needs .* guidance_scale=w"),
        (["guide_ckpt=x.ckpt", "guidance_scale=2"], "guide_ckpt=x.ckpt is the guide of autoguidance"),
        (["guidance_interval=[0.5,2]"], "guidance_interval=\\[0.5, 2.0\\] limits guidance, but guidance_scale=null"),
        (["guidance_interval=[2,0.5]", "guidance_scale=2"], "valid: null \\(everywhere\\) or \\[σ_lo, σ_hi\\]"),
    ],
)
def test_guidance_requests_are_checked_before_anything_is_read(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_sample(compose_sample(["ckpt_path=missing.ckpt", *overrides]))


def test_cfg_on_an_unconditional_model_is_still_refused_and_autoguidance_is_not(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        sample(ckpt, tmp_path / "cfg", "guidance_scale=2")
    _, out = sample(ckpt, tmp_path / "auto", "guidance=auto", f"guide_ckpt={ckpt}", "guidance_scale=2")
    assert torch.isfinite(torch.from_numpy(out["x0"])).all()
