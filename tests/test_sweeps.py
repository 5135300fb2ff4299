"""Sweeps: conf/sweep/* and conf/hydra/launcher/* compose; a real 2×2 multirun becomes a table."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from diffusion_lab.config import register_configs, validate_config
from diffusion_lab.schema.registry import CONFIG_DIR

register_configs()
ROOT = Path(__file__).resolve().parents[1]
TINY_TOY = [
    "experiment=toy2d",
    "model.hidden=32",
    "model.num_layers=2",
    "dataset.num_train=512",
    "dataset.num_val=64",
    "debug=default",
    "trainer.enable_progress_bar=false",
]
TRAIN_SWEEPS = ["schedule_x_param", "weighting", "optuna_lr"]


def _compose(config_name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def multirun(args, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.train", "-m", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("sweep", TRAIN_SWEEPS)
def test_train_sweeps_compose_with_their_axes_in_the_file(sweep):
    cfg = _compose("train", [f"+sweep={sweep}"])
    assert cfg.name == sweep and len(cfg.hydra.sweeper.params) >= 2
    validate_config(cfg)
    for axis, values in cfg.hydra.sweeper.params.items():
        if axis in ("weighting", "schedule", "parameterization"):  # every option of a group axis composes
            for value in values.split(","):
                validate_config(_compose("train", [f"+sweep={sweep}", f"{axis}={value}"]))


def test_optuna_sweep_selects_the_optuna_sweeper_and_an_objective():
    cfg = _compose("train", ["+sweep=optuna_lr"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.optimize_metric == "val/bpd@*" and "optim.lr" in cfg.hydra.sweeper.params


def test_sampler_nfe_sweep_composes_for_dlab_sample():
    cfg = _compose("sample", ["+sweep=sampler_nfe", "ckpt_path=x.ckpt"])
    assert set(cfg.hydra.sweeper.params) == {"sampler", "sampler.steps"}
    for sampler in cfg.hydra.sweeper.params.sampler.split(","):
        _compose("sample", ["ckpt_path=x.ckpt", f"sampler={sampler}", "sampler.steps=5"])


@pytest.mark.parametrize(
    ("launcher", "target", "key", "value"),
    [
        ("parallel", "JoblibLauncher", "n_jobs", 2),
        ("joblib", "JoblibLauncher", "n_jobs", -1),
        ("local_queue", "LocalLauncher", "timeout_min", 60),
        ("slurm", "SlurmLauncher", "gpus_per_node", 1),
    ],
)
def test_launchers_compose(launcher, target, key, value):
    cfg = _compose("train", [f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target) and cfg.hydra.launcher[key] == value


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("multirun") / "schedule_x_param"
    # debug=default's few steps of everything, with W&B kept on (offline) instead of off
    debug = ["trainer.max_steps=5", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
             "callbacks.sample_every_n_steps=5", "callbacks.grid_samples=4", "callbacks.checkpoint_every_n_steps=5",
             "eval.num_samples=8", "eval.batch_size=8", "eval.bpd_examples=16", "eval.bpd_num_t_samples=2",
             "sampler.steps=2", "logger.wandb.mode=offline"]  # fmt: skip
    toy = [a for a in TINY_TOY if a != "debug=default"]
    multirun(["+sweep=schedule_x_param", *toy, *debug, f"hydra.sweep.dir={out}"])
    return out


def test_two_by_two_multirun_writes_summaries_with_group_and_tags(sweep_dir):
    summaries = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in range(4)]
    assert {(s["choices"]["schedule"], s["choices"]["parameterization"]) for s in summaries} == {
        ("linear", "eps"), ("linear", "v"), ("cosine", "eps"), ("cosine", "v")
    }  # fmt: skip
    for s in summaries:
        assert s["group"] == "schedule_x_param" and s["job_type"] == "train"
        assert f"schedule:{s['choices']['schedule']}" in s["tags"] and "sweep:schedule_x_param" in s["tags"]
        assert s["metrics"]["train/steps"] == 5 and s["config"]["trainer"]["max_steps"] == 5


def test_table_from_the_multirun(sweep_dir, capsys):
    make_table = _script("make_table")
    args = [str(sweep_dir), "--rows", "schedule", "--cols", "parameterization", "--metric", "val/bpd@*"]
    assert make_table.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "val/bpd@16 (n = 1 per cell: a single run, no standard error)"
    assert lines[2] == "| schedule | eps | v |"
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| linear", "| cosine"]


def test_table_from_wandb_offline_runs_and_the_wandb_api_equals_the_summary_table(sweep_dir, capsys, monkeypatch):
    """W&B's own record of the sweep (the offline run logs; the public API's run objects) gives the same table
    as the local summary.json files: group, config choices and final metrics all reached W&B."""
    import wandb

    from diffusion_lab.tracking import read_offline_run

    make_table = _script("make_table")
    args = ["--rows", "schedule", "--cols", "parameterization", "--metric", "val/bpd@*", "train/loss"]
    assert make_table.main([str(sweep_dir), *args]) == 0
    from_summaries = capsys.readouterr().out
    assert make_table.main([str(sweep_dir), "--wandb-offline", "--group", "schedule_x_param", *args]) == 0
    assert capsys.readouterr().out == from_summaries
    with pytest.raises(SystemExit, match=r"no W&B offline runs .* in group other"):
        make_table.main([str(sweep_dir), "--wandb-offline", "--group", "other", *args])

    offline = [read_offline_run(p) for p in sorted(sweep_dir.rglob("offline-run-*"))]
    assert len(offline) == 4 and all(r["finished"] for r in offline)  # the subprocess exited: logs complete
    assert {r["job_type"] for r in offline} == {"train"}

    class ApiRun:  # what wandb.Api().runs() yields once the offline runs are synced: config, summary, url
        def __init__(self, run):
            self.config, self.summary, self.url, self.group = run["config"], run["summary"], run["dir"], run["group"]

    class Api:
        def runs(self, path, filters):
            assert path == "me/diffusion_lab"
            return [ApiRun(r) for r in offline if r["group"] == filters.get("group", r["group"])]

    monkeypatch.setattr(wandb, "Api", Api)
    assert make_table.main(["--wandb", "me/diffusion_lab", "--group", "schedule_x_param", *args]) == 0
    assert capsys.readouterr().out == from_summaries


@pytest.mark.slow  # ~50 s: two jobs, each a 2-process CPU DDP launch
def test_multirun_of_ddp_jobs_writes_one_directory_per_job_not_per_rank(tmp_path):
    """Lightning relaunches rank 1 from the job's saved config into the job's own directory: a 2-job sweep of
    2-process DDP runs leaves exactly 2 job directories, each with one summary and rank 1's log."""
    out = tmp_path / "ddp_sweep"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "dataset.batch_size=128"]
    multirun(["seed=0,1", *TINY_TOY, *ddp, f"hydra.sweep.dir={out}"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        summary = json.loads((out / job / "summary.json").read_text())
        assert summary["metrics"]["train/steps"] == 5 and summary["config"]["trainer"]["devices"] == 2
        assert (out / job / "train_ddp_process_1.log").exists() and (out / job / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow  # ~150 s on 2 shared cores: each loky worker imports torch + Lightning
def test_joblib_launcher_runs_two_jobs(tmp_path):
    out = tmp_path / "joblib"
    multirun(["hydra/launcher=parallel", "schedule=linear,cosine", *TINY_TOY, "callbacks.grid_samples=0",
              f"hydra.sweep.dir={out}"])  # fmt: skip
    assert sorted(p.parent.name for p in out.glob("*/summary.json")) == ["0", "1"]


@pytest.mark.slow  # ~50 s: two Optuna trials in a subprocess
def test_optuna_returns_the_objective_and_records_the_best_trial(tmp_path):
    out = tmp_path / "optuna"
    multirun(["+sweep=optuna_lr", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", *TINY_TOY,
              "callbacks.grid_samples=0", f"hydra.sweep.dir={out}"])  # fmt: skip
    results = (out / "optimization_results.yaml").read_text()
    assert "best_params" in results and "optim.lr" in results
    values = [json.loads(p.read_text())["metrics"]["val/bpd@16"] for p in out.glob("*/summary.json")]
    assert len(values) == 2 and f"best_value: {min(values)}" in results


PRESETS = ["iddpm_cifar10", "ddim_cifar10", "v_prediction", "min_snr", "vdm_cifar10", "edm_cifar10", "rectified_flow"]


@pytest.mark.parametrize("preset", PRESETS)
def test_reproduction_presets_compose_validate_and_state_paper_and_cost(preset):
    cfg = _compose("train", [f"experiment={preset}"])
    validate_config(cfg)
    assert cfg.name == preset and cfg.trainer.accelerator == "gpu"
    header = (Path(CONFIG_DIR) / "experiment" / f"{preset}.yaml").read_text()
    assert "Paper number" in header and "Cost" in header and "hours" in header


def test_sampler_nfe_script_writes_one_run_per_combination(sweep_dir, tmp_path, capsys):
    out = tmp_path / "sampler_nfe"
    ckpt = sweep_dir / "1" / "checkpoints" / "last.ckpt"
    args = [str(ckpt), "--out", str(out), "--samplers", "ddim", "heun", "--steps", "2", "3", "--num-samples", "32"]
    args += ["--wandb-mode", "offline"]
    assert _script("sampler_nfe").main(args) == 0
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}
    assert set(summaries) == {"ddim_steps2", "ddim_steps3", "heun_steps2", "heun_steps3"}
    assert summaries["heun_steps3"]["metrics"]["nfe"] == 5 and summaries["heun_steps3"]["job_type"] == "sample"
    assert "val/energy_distance@32_nfe5" in summaries["heun_steps3"]["metrics"]
    from tests.test_tracking import read_finished_run

    wandb_run = read_finished_run(out / "heun_steps3" / "wandb")
    assert (wandb_run["group"], wandb_run["job_type"]) == ("sampler_nfe", "sample")
    assert wandb_run["summary"]["nfe"] == 5 and "sampler:heun" in wandb_run["tags"]
    assert wandb_run["config"]["train_run"]["group"] == "schedule_x_param"
    capsys.readouterr()
    _script("make_table").main([str(out), "--rows", "sampler", "--cols", "steps", "--metric", "nfe"])
    assert capsys.readouterr().out.strip().splitlines()[-2:] == ["| ddim | 2 | 3 |", "| heun | 3 | 5 |"]
    plots = _script("make_plots").plot_all(out, "sampler", tmp_path, "val/energy_distance@*", "train/loss", 1, 1)
    assert [p.name for p in plots] == ["metric_vs_nfe.png"]


def test_ddim_eta_table_script(tmp_path, capsys):
    out = tmp_path / "ddim_eta.json"
    args = ["--steps", "5", "--etas", "0", "1", "--seeds", "0", "--num-samples", "64", "--out", str(out)]
    assert _script("ddim_eta_table").main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["cells"]) == {"0/5", "1/5"} and len(result["floor"]["energy_x1e3"]) == 1
    assert "| η \\ S | 5 |" in capsys.readouterr().out
