"""The console entry points: every option of every group is checked at composition, config errors are
reported before Lightning is imported, and a run writes its log and counts its progress in steps."""

import os
import subprocess
import sys
import textwrap

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from diffusion_lab.cli import CONFIG_DIR, check_hardware
from diffusion_lab.config import register_configs
from diffusion_lab.schema.errors import ConfigError

register_configs()


@pytest.mark.parametrize(
    ("entry", "overrides", "missing"),
    [
        ("sample", ["ckpt_path=x.ckpt", "sampler=dpm_solvr"], "sampler/dpm_solvr"),
        ("evaluate", ["ckpt_path=x.ckpt", "sampler=hun"], "sampler/hun"),
        ("train", ["debug=defualt"], "debug/defualt"),
        ("train", ["sampler=hun"], "sampler/hun"),
    ],
)
def test_misspelled_option_fails_at_composition_with_the_valid_list(entry, overrides, missing):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"), pytest.raises(MissingConfigException) as err:
        compose(entry, overrides=overrides)
    group = missing.split("/")[0]
    assert f"Could not find '{missing}'" in str(err.value)
    assert f"Available options in '{group}'" in str(err.value)
    assert ("heun" if group == "sampler" else "default") in str(err.value)


@pytest.mark.parametrize("entry", ["sample", "evaluate"])
def test_sample_and_evaluate_take_a_sampler_by_name_or_keep_the_runs(entry):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        chosen = compose(entry, overrides=["ckpt_path=x.ckpt", "sampler=heun"])
        default = compose(entry, overrides=["ckpt_path=x.ckpt"])
    assert chosen.sampler._target_.endswith("HeunSampler")
    assert default.get("sampler") is None  # None: the sampler stored in the checkpoint


# Runs an entry point in a fresh interpreter and reports whether Lightning had been imported when it failed.
_PROBE = textwrap.dedent(
    """
    import sys
    from diffusion_lab import cli
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    try:
        getattr(cli, sys.argv.pop(1))()
    except SystemExit as exit:
        print("exit", exit.code)
    print("lightning imported:", "lightning" in sys.modules)
    print("torch imported:", "torch" in sys.modules)
    """
)


@pytest.mark.parametrize(
    ("entry", "overrides", "message", "needs_torch"),
    [
        ("train_main", ["schedule=cosin"], "Could not find 'schedule/cosin'", False),
        ("train_main", ["ema.decay=1.5"], "ema.decay=1.5 is out of range", False),
        ("train_main", ["metrics=digits_fd", "dataset=toy2d"], "metrics=digits_fd needs dataset=digits", False),
        ("train_main", ["trainer=fsdp"], "needs a CUDA GPU", True),
        ("sample_main", ["ckpt_path=x.ckpt", "sampler=dpm_solvr"], "Could not find 'sampler/dpm_solvr'", False),
    ],
)
def test_config_errors_are_reported_before_lightning_is_imported(tmp_path, entry, overrides, message, needs_torch):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the fsdp case must see no GPU on any machine
    cmd = [sys.executable, "-c", _PROBE, entry, *overrides, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert message in proc.stderr + proc.stdout
    assert "exit 1" in proc.stdout
    assert "lightning imported: False" in proc.stdout
    assert f"torch imported: {needs_torch}" in proc.stdout  # range and pairing checks need no torch either


def test_check_hardware_refuses_gpus_the_machine_does_not_have():
    fsdp = OmegaConf.create({"trainer": {"accelerator": "gpu", "strategy": "fsdp", "devices": 2}})
    with pytest.raises(ConfigError, match=r"trainer.strategy=fsdp \(Lightning's FSDP is CUDA-only\) needs a CUDA GPU"):
        check_hardware(fsdp, cuda_devices=0)
    gpu = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 1}})
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu needs a CUDA GPU.*trainer=cpu"):
        check_hardware(gpu, cuda_devices=0)
    check_hardware(fsdp, cuda_devices=1)
    check_hardware(OmegaConf.create({"trainer": {"accelerator": "cpu"}}), cuda_devices=0)


def test_a_cli_run_writes_train_log_and_counts_steps_of_max_steps(tmp_path):
    steps = 3
    cmd = [
        sys.executable, "-m", "diffusion_lab.train", "experiment=toy2d", "debug=default", "logger=csv",
        f"trainer.max_steps={steps}", "eval.num_samples=0", "eval.bpd_examples=0",
        "callbacks.sample_every_n_steps=1000", "trainer.limit_val_batches=0", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "train.log").read_text()
    assert f"`Trainer.fit` stopped: `max_steps={steps}` reached." in log
    assert f"run directory: {tmp_path}" in log
    bar = proc.stdout + proc.stderr
    assert f"step {steps}/{steps}" in bar
    assert "Epoch" not in bar


@pytest.mark.parametrize("module", ["diffusion_lab", "diffusion_lab.train", "diffusion_lab.sample"])
def test_python_dash_m_runs_the_same_entry_point(tmp_path, module):
    typo = "sampler=dpm_solvr" if module.endswith("sample") else "schedule=cosin"
    cmd = [sys.executable, "-m", module, typo, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert f"Could not find '{typo.replace('=', '/')}'" in proc.stderr
