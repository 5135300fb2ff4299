"""diffusion_lab/tracking.py: W&B group / job_type / tags, the resolved config, summary.json, the sweep objective."""

import json
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger

from diffusion_lab.config import register_configs
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.tracking import (
    ablation_tags,
    build_loggers,
    job_info,
    objective,
    read_offline_run,
    run_info,
    sweep_group,
)
from diffusion_lab.train import train

register_configs()
TINY_TOY = ["experiment=toy2d", "model.hidden=32", "model.num_layers=2", "dataset.num_train=512", "dataset.num_val=64"]


def test_tags_name_each_chosen_axis_and_plain_override():
    choices = {"schedule": "cosine", "parameterization": "v", "trainer": "cpu", "experiment": "toy2d", "sweep": "s"}
    overrides = ["schedule=cosine", "weighting.gamma=5", "hydra.sweep.dir=x", "name=abl", "seed=3", "+sweep=s"]
    tags = ablation_tags(choices, overrides, extra=["mine"])
    assert tags == ["experiment:toy2d", "sweep:s", "schedule:cosine", "parameterization:v", "weighting.gamma:5", "mine"]
    assert ablation_tags({}, [f"k={'x' * 80}"]) == []  # W&B refuses tags over 64 characters


def test_group_is_the_sweep():
    assert sweep_group("digits", None) == "digits"
    assert sweep_group("schedule_x_param", "multirun/schedule_x_param") == "schedule_x_param"
    assert sweep_group("digits", "multirun/digits/2026-11-23_10-00-00") == "digits/2026-11-23_10-00-00"


def test_run_info_reads_hydra_choices():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["schedule=cosine", "parameterization=v"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        info = run_info(cfg)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    assert {"schedule:cosine", "parameterization:v", "experiment:digits", "dataset:digits"} <= set(info.tags)
    assert info.choices["weighting"] == "eps_mse" and info.job_type == "train" and info.group == "digits"


def test_objective_matches_one_metric():
    metrics = {"val/ed@2k_nfe50": 0.25, "val/bpd@180": 5.0, "train/loss": float("nan"), "protocol": {}}
    assert objective(metrics, "val/ed@*") == 0.25
    assert objective(metrics, None) is None
    assert objective(metrics, "val/missing") != objective(metrics, "val/missing")  # nan: a failed trial
    with pytest.raises(ValueError, match="matches 2"):
        objective(metrics, "val/*")


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb_run")
    overrides = [
        *TINY_TOY,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "eval.num_samples=64",
        "eval.batch_size=64",
        "eval.bpd_examples=8",
        "eval.bpd_num_t_samples=2",
        "sampler.steps=2",
        "callbacks.grid_samples=16",
        "logger.wandb.mode=offline",
        "logger.wandb.tags=[mine]",
        "logger.wandb.group=my_sweep",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg, run_dir)
    return run_dir, cfg, metrics


def test_wandb_logger_carries_group_job_type_tags_and_config(wandb_run, tmp_path):
    _, cfg, _ = wandb_run
    (logger,) = [lg for lg in build_loggers(cfg, tmp_path) if isinstance(lg, WandbLogger)]
    run = logger.experiment
    try:
        assert run.group == "my_sweep" and run.job_type == "train" and "mine" in run.tags
        assert run.config["schedule"]["_target_"].endswith("LinearSchedule")
        assert run.config["name"] == "toy2d" and "hydra_choices" in run.config
    finally:
        run.finish()


def test_offline_run_has_summary_media_and_summary_json(wandb_run):
    run_dir, _, metrics = wandb_run
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    # Offline, wandb-core keeps config and summary in the binary run-*.wandb log (written out on `wandb sync`);
    # the sample grids are already media files: one per grid step and the final grid in the summary.
    assert list(offline.glob("run-*.wandb"))
    media = sorted(p.name for p in (offline / "files" / "media" / "images").rglob("*.png"))
    assert any(n.startswith("ema_") for n in media) and any(n.startswith("final_summary") for n in media)
    assert any(n.startswith("loss_vs_logsnr_summary") for n in media) and (run_dir / "loss_vs_logsnr.png").is_file()
    assert read_finished_run(offline)["summary"]["plots/loss_vs_logsnr"]["_type"] == "image-file"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["group"] == "my_sweep" and summary["job_type"] == "train" and summary["tags"] == ["mine"]
    assert summary["config"]["model"]["hidden"] == 32  # the resolved config travels whole
    assert summary["metrics"]["train/steps"] == 3 == metrics["train/steps"]
    assert any(k.startswith("val/bpd@") for k in summary["metrics"])


def test_offline_run_log_holds_what_summary_json_holds(wandb_run):
    """W&B's own record (the offline run log, read back) carries the group, job type, tags, the resolved config
    and the final metrics that summary.json mirrors."""
    run_dir, _, _ = wandb_run
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    run = read_finished_run(offline)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run["group"], run["job_type"], run["tags"]) == ("my_sweep", "train", ["mine"])
    assert run["config"]["model"] == summary["config"]["model"] and run["config"]["seed"] == 0
    for key, value in summary["metrics"].items():
        if key.startswith("val/bpd"):
            assert run["summary"][key] == pytest.approx(value, rel=1e-12)
    with pytest.raises(ValueError, match="not a W&B run log"):
        read_offline_run(run_dir / "summary.json")


def read_finished_run(path, timeout=60.0):
    """The offline run once W&B's writer has flushed its exit record (it may lag ``run.finish()`` under load)."""
    deadline = time.monotonic() + timeout
    while not (run := read_offline_run(path))["finished"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run["finished"], f"{path}: no exit record after {timeout} s"
    return run


def _compose_job(name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def test_sample_and_eval_jobs_are_w_and_b_runs_in_the_training_runs_group(wandb_run, tmp_path):
    """dlab-sample / dlab-evaluate record job_type sample / eval, join the training run's group and tags, link
    its W&B run and config, and write summary.json beside their outputs."""
    from diffusion_lab.checkpoint_jobs import track
    from diffusion_lab.evaluate import run as evaluate
    from diffusion_lab.sample import run as sample

    run_dir, _, _ = wandb_run
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    (train_offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    train_id = read_finished_run(train_offline)["id"]
    wb = ["logger.wandb.mode=offline"]

    cfg = _compose_job("sample", [ckpt, "sampler=euler", "sampler.steps=3", "num_samples=4", "grid=true", *wb])
    out = tmp_path / "sample"
    result = sample(cfg, out)
    track(cfg, out, "sample", result, {"samples/grid": out / "grid.png"})
    cfg = _compose_job("evaluate", [ckpt, "scores=[bpd]", "num_examples=8", "num_t_samples=2", *wb])
    scores = evaluate(cfg, tmp_path / "eval")
    track(cfg, tmp_path / "eval", "eval", scores)

    for job, out_dir in (("sample", out), ("eval", tmp_path / "eval")):
        (offline,) = list((out_dir / "wandb").glob("offline-run-*"))
        run = read_finished_run(offline)
        summary = json.loads((out_dir / "summary.json").read_text())
        assert run["group"] == summary["group"] == "my_sweep" and run["job_type"] == summary["job_type"] == job
        assert run["tags"] == ["mine"] and run["config"]["train"]["model"]["hidden"] == 32
        assert run["config"]["train_run"]["wandb_id"] == train_id == summary["config"]["train_run"]["wandb_id"]
    assert read_offline_run(out / "wandb")["summary"]["nfe"] == 3 == json.loads((out / "summary.json").read_text())[
        "metrics"]["nfe"]  # fmt: skip
    assert read_offline_run(out / "wandb")["summary"]["samples/grid"]["_type"] == "image-file"
    assert read_offline_run(tmp_path / "eval" / "wandb")["summary"]["val/bpd@8"] == pytest.approx(scores["val/bpd@8"])


def test_a_job_sweep_is_its_own_group_and_its_axes_replace_the_training_runs():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt_path=x.ckpt", "sampler=heun", "sampler.steps=7"],
                      return_hydra_config=True)  # fmt: skip
    train = {"name": "digits", "group": "digits", "tags": ["schedule:cosine", "sampler:ddim", "sampler.eta:1"]}
    HydraConfig.instance().set_config(cfg)
    try:
        info = job_info(cfg, "sample", train)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    assert info.group == "digits" and info.job_type == "sample" and info.name == "digits"
    assert info.tags == ["sampler:heun", "sampler.steps:7", "schedule:cosine"]
    assert sweep_group(info.name, "multirun/sampler_nfe") == "digits/sampler_nfe"


def test_logsnr_profile_orders_buckets_by_log_snr_and_averages_the_tail():
    from diffusion_lab.plots import logsnr_profile

    b = "train/loss_by_logsnr/"
    rows = [{"step": 1, f"{b}>=10": 9.0, f"{b}[-5,-2.5)": 1.0},
            {"step": 2, f"{b}>=10": 3.0, f"{b}<-10": 4.0},
            {"step": 3, f"{b}>=10": 5.0, f"{b}[-5,-2.5)": 2.0, "train/loss": 7.0}]  # fmt: skip
    profile = logsnr_profile(rows, tail=2)
    assert list(profile) == ["<-10", "[-5,-2.5)", ">=10"]
    assert profile == {"<-10": 4.0, "[-5,-2.5)": 1.5, ">=10": 4.0}


def test_a_job_on_an_unfinished_runs_checkpoint_is_filed_from_what_the_checkpoint_stores(wandb_run, tmp_path):
    """Before summary.json exists (training still going, or killed), the checkpoint's own record of the run's
    name, group and tags files the job; an evaluate job's default metrics choice is not one of its axes."""
    from diffusion_lab.callbacks.exact_resume import RUN_KEY
    from diffusion_lab.checkpoint_loading import load_checkpoint
    from diffusion_lab.tracking import training_run

    run_dir, _, _ = wandb_run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt[RUN_KEY] == {"name": "toy2d", "group": "my_sweep", "tags": ["mine"]}
    filed = {"name": "digits", "group": "digits/2026-11-23_10-00-00", "tags": ["schedule:cosine", "metrics:digits_fd"]}
    (tmp_path / "checkpoints").mkdir()
    train = training_run(tmp_path / "checkpoints" / "last.ckpt", {"name": "digits"}, None, filed)
    assert train["group"] == "digits/2026-11-23_10-00-00" and train["run_dir"] is None
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt_path=x.ckpt", "scores=[bpd]"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        info = job_info(cfg, "eval", train)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    assert info.group == "digits/2026-11-23_10-00-00"
    assert info.tags == ["scores:[bpd]", "schedule:cosine", "metrics:digits_fd"]
