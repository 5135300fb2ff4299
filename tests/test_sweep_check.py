"""A ``dlab-train -m`` grid is composed and validated job by job before the first job starts, so a bad value in a
later job refuses the whole sweep instead of stopping it halfway (diffusion_lab/sweep_check.py)."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffusion_lab.config import register_configs
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.sweep_check import check_sweep, sweep_jobs

register_configs()
ROOT = Path(__file__).resolve().parents[1]


def test_sweep_jobs_expand_the_sweep_file_and_the_command_line_like_the_basic_sweeper():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+sweep=weighting"], return_hydra_config=True)
        jobs = sweep_jobs(cfg)
    pairs = {
        (dict(o.split("=", 1) for o in job)["weighting"], dict(o.split("=", 1) for o in job)["seed"]) for job in jobs
    }
    weightings = ["eps_mse", "x0_mse", "v_mse", "min_snr", "p2"]
    assert len(jobs) == 10 and pairs == set(itertools.product(weightings, ["0", "1"]))
    assert all("+sweep=weighting" in job for job in jobs)  # the command line goes into every job, as Hydra does


def test_a_bad_value_in_a_later_job_refuses_the_sweep_naming_the_job():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy2d"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.sweeper.params = {"schedule": "linear,cosine", "ema.decay": "0.99,1.5"}
        jobs = sweep_jobs(cfg)
        assert len(jobs) == 4
        with pytest.raises(
            ConfigError,
            match=r"^sweep job 1 of 4 \(schedule=linear ema.decay=1.5 experiment=toy2d\): "
            r"ema.decay=1.5 is out of range; valid: a number in \(0, 1\); no job was started$",
        ):
            check_sweep(cfg, jobs)
        check_sweep(cfg, [job for job in jobs if "ema.decay=1.5" not in job])  # the good jobs pass


def test_dlab_train_multirun_exits_before_any_job_when_one_is_out_of_range(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusion_lab.train", "-m", "experiment=toy2d", "schedule=linear,cosine",
           "ema.decay=0.99,1.5", "logger=csv", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 1
    assert "sweep job 1 of 4" in proc.stderr and "ema.decay=1.5 is out of range" in proc.stderr
    assert not (tmp_path / "sweep").exists()  # no job directory, no checkpoint, nothing trained
