"""The console entry points: every option of every group is checked at composition, config errors are
reported before Lightning is imported, and a run writes its log and counts its progress in steps."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from diffusion_lab.cli import check_device, check_hardware
from diffusion_lab.config import register_configs
from diffusion_lab.schema.domains import DEVICES
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR

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
    import importlib
    import sys
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    try:
        importlib.import_module(sys.argv.pop(1)).main()
    except SystemExit as exit:
        print("exit", exit.code)
    print("lightning imported:", "lightning" in sys.modules)
    print("torch imported:", "torch" in sys.modules)
    """
)


@pytest.mark.parametrize(
    ("entry", "overrides", "message", "needs_torch"),
    [
        ("diffusion_lab.train", ["schedule=cosin"], "Could not find 'schedule/cosin'", False),
        ("diffusion_lab.train", ["ema.decay=1.5"], "ema.decay=1.5 is out of range", False),
        (
            "diffusion_lab.train",
            ["metrics=digits_fd", "dataset=toy2d"],
            "metrics=digits_fd needs dataset=digits",
            False,
        ),
        ("diffusion_lab.train", ["trainer=fsdp"], "needs a CUDA GPU", True),
        (
            "diffusion_lab.sample",
            ["ckpt_path=x.ckpt", "sampler=dpm_solvr"],
            "Could not find 'sampler/dpm_solvr'",
            False,
        ),
        ("diffusion_lab.sample", ["ckpt_path=x.ckpt", "device=cuda"], "device=cuda needs CUDA device 0", True),
        ("diffusion_lab.evaluate", ["ckpt_path=x.ckpt", "scores=[]"], "scores=[] is out of range", False),
        ("diffusion_lab.tune_grid", ["ckpt_path=x.ckpt", "num_draws=0"], "num_draws=0 is out of range", False),
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
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu needs a CUDA GPU"):
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


@pytest.mark.parametrize(
    "module", ["diffusion_lab", "diffusion_lab.train", "diffusion_lab.sample", "diffusion_lab.evaluate",
               "diffusion_lab.tune_grid"])  # fmt: skip
def test_python_dash_m_runs_the_same_entry_point(tmp_path, module):
    typo = "schedule=cosin" if module in ("diffusion_lab", "diffusion_lab.train") else "sampler=dpm_solvr"
    cmd = [sys.executable, "-m", module, typo, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert f"Could not find '{typo.replace('=', '/')}'" in proc.stderr


# One out-of-range value per entry point, each reported by both ways to start it (the console script and
# ``python -m``) before torch is imported: -X importtime lists every module the interpreter imported.
ENTRY_ERRORS = {
    "train": (["optim.lr=inf"], "optim.lr=inf is out of range; valid: a finite number > 0"),
    "sample": (["ckpt_path=x.ckpt", "batch_size=-4"], "batch_size=-4 is out of range; valid: an integer >= 1"),
    "evaluate": (["ckpt_path=x.ckpt", "num_examples=-1"], "num_examples=-1 is out of range; valid: null (the whole"),
    "tune_grid": (["ckpt_path=x.ckpt", "reference_rtol=inf"], "reference_rtol=inf is out of range; valid: a number"),
}


def _imported(importtime: str) -> set[str]:
    """Module names in ``python -X importtime`` output (``import time: self | cumulative | name``)."""
    return {line.split("|")[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("way", ["console script", "python -m"])
@pytest.mark.parametrize("entry", list(ENTRY_ERRORS))
def test_every_way_to_start_every_entry_point_checks_before_importing_torch(tmp_path, entry, way):
    overrides, message = ENTRY_ERRORS[entry]
    script = Path(sys.executable).with_name(f"dlab-{entry.replace('_', '-')}")
    start = [sys.executable, "-X", "importtime", str(script)] if way == "console script" else [
        sys.executable, "-X", "importtime", "-m", f"diffusion_lab.{entry}"]  # fmt: skip
    assert way != "console script" or script.is_file(), f"{script} is not installed (uv sync installs it)"
    proc = subprocess.run(
        [*start, *overrides, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr
    imported = _imported(proc.stderr)
    assert "diffusion_lab.schema.jobs" in imported  # the probe sees the imports
    assert not {"torch", "lightning"} & imported


def test_check_device_refuses_a_device_the_machine_lacks_and_names_the_valid_ones():
    check_device("device", "cpu", cuda_devices=0)
    check_device("device", "cuda:1", cuda_devices=2)
    with pytest.raises(ConfigError, match=r"^device=cuda needs CUDA device 0, and this machine has 0 .*\['cpu'\]"):
        check_device("device", "cuda", cuda_devices=0)
    with pytest.raises(ConfigError) as err:
        check_device("device", "cuda:2", cuda_devices=2)
    assert str(err.value) == (
        "device=cuda:2 needs CUDA device 2, and this machine has 2 (torch.cuda.device_count() == 2); "
        "valid here: ['cpu', 'cuda', 'cuda:0', 'cuda:1'] (the forms: "
        f"{list(DEVICES)})"
    )
    with pytest.raises(ConfigError, match=r"^device=mps needs Apple's Metal backend"):
        check_device("device", "mps", mps=False)


ENTRY_MODULES = {f"diffusion_lab.{name}" for name in ("train", "sample", "evaluate", "tune_grid")}


def test_no_package_module_imports_an_entry_module():
    """cli.py validates and the entry modules import it, never the reverse (function-level imports included);
    only ``python -m diffusion_lab`` (``__main__.py``) starts ``dlab-train``."""
    package = Path(__file__).resolve().parent.parent / "diffusion_lab"
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if ENTRY_MODULES & set(names) and path.name != "__main__.py":
                offenders.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert offenders == []
