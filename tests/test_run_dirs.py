"""A job owns its output directory: one writer at a time (SIGKILL-safe lock), run names that stay under the output
root, unwritable directories refused before any work, records written atomically and never left stale."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st

import diffusion_lab.checkpoint_loading as checkpoint_loading
import diffusion_lab.evaluate as evaluate
import diffusion_lab.sample as sample
import diffusion_lab.train as train_module
import diffusion_lab.tune_grid as tune_grid
from diffusion_lab.atomic import TMP_PREFIX, atomic_write, atomic_write_json
from diffusion_lab.config import check_domains, register_configs, validate_config
from diffusion_lab.metrics.digits import classifier_path
from diffusion_lab.run_dir import (
    LOCK_FILE,
    RANK_VARIABLES,
    RunDirBusy,
    RunDirError,
    RunLock,
    launched_as_rank_zero,
    read_holder,
)
from diffusion_lab.samplers.tuning import grid_dir
from diffusion_lab.schema.domains import RUN_NAME
from diffusion_lab.schema.errors import ConfigError

register_configs()
HOST = socket.gethostname()
TOY = ["experiment=toy2d", "logger.wandb=null", "eval.num_samples=0", "eval.bpd_examples=0"]


def _compose(config_dir: str, name: str, overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(name, overrides=overrides)


def _forbidden(what: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} ran before the job was refused")

    return call


def _no_checkpoint_load(monkeypatch: pytest.MonkeyPatch, entry: Any) -> None:
    """Any load of the job's checkpoint fails the test (wherever the entry point imports the loader from)."""
    for owner in (entry, checkpoint_loading):
        monkeypatch.setattr(owner, "load_module", _forbidden("the checkpoint load"), raising=False)


def _garbage_checkpoint(tmp_path: Path) -> Path:
    """A file that is not a checkpoint: any read of it raises, so an error other than the one expected shows that
    the checkpoint was read before it."""
    path = tmp_path / "ckpts" / "last.ckpt"
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    return path


def _unwritable(tmp_path: Path) -> Path:
    """A directory that cannot be created even as root: its parent is a regular file (ENOTDIR)."""
    (tmp_path / "file").write_text("not a directory\n")
    return tmp_path / "file" / "sub"


@pytest.fixture
def no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------------------ the lock


def test_a_second_lock_on_a_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path, "dlab-train") as first:
        assert first.held
        with pytest.raises(RunDirBusy) as err:
            RunLock(tmp_path, "dlab-sample").acquire()
        message = str(err.value)
        assert f"pid {os.getpid()} on host {HOST} (dlab-train, started " in message
        assert str(tmp_path / LOCK_FILE) in message and err.value.holder is not None
        assert err.value.holder.pid == os.getpid()
    # Released: the record is emptied and the next writer takes the lock without a stale-lock warning.
    assert read_holder(tmp_path / LOCK_FILE) is None
    with RunLock(tmp_path, "dlab-sample"):
        holder = read_holder(tmp_path / LOCK_FILE)
        assert holder is not None and holder.job == "dlab-sample"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from diffusion_lab.run_dir import RunLock
    RunLock(sys.argv[1], "dlab-train").acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_lock_held_by_another_process_refuses_with_its_pid_and_dies_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second writer is refused at once naming the holder's pid; after the holder is SIGKILLed (no clean-up ran)
    the lock is free, and its stale record is taken over with a warning naming the dead pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=rf"in use by pid {proc.pid} on host {HOST} \(dlab-train"):
            RunLock(tmp_path, "dlab-train").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="diffusion_lab.run_dir"), RunLock(tmp_path, "dlab-train"):
        assert read_holder(tmp_path / LOCK_FILE).pid == os.getpid()  # type: ignore[union-attr]
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of pid {proc.pid}" in caplog.text
    assert "no longer running" in caplog.text


@pytest.mark.parametrize(
    ("env", "rank_zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
        ({"RANK": "3"}, False),
        ({"SLURM_PROCID": "2"}, False),
    ],
)
def test_only_global_rank_zero_owns_the_run_dir(
    env: dict[str, str], rank_zero: bool, monkeypatch: pytest.MonkeyPatch, no_rank_env: None
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launched_as_rank_zero() is rank_zero


# ---------------------------------------------------------------------------------------------- run names


BAD_NAMES = sorted(
    {"", ".", "..", "/", "/abs", "/tmp/x", "~", "a b", "a\nb", "a:b", "a\\b", "x" * 129}
    | {f"{p}{s}" for p in ("../", "../../", "a/", "./", "/") for s in ("x", "..", "outputs")}
    | {f"{c}x" for c in ".-+"}
)


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_a_run_name_that_could_leave_the_output_root_is_refused_at_validation(config_dir: str, bad: str) -> None:
    cfg = _compose(config_dir, "train", TOY)
    cfg.name = bad
    with pytest.raises(
        ConfigError, match=r"(?s)^name=.* is out of range; valid: one folder name under the output root"
    ):
        validate_config(cfg)


@pytest.mark.parametrize("override", ["name=../x", "name=/abs", "name=", "name=a/b"])
@pytest.mark.parametrize("job", ["train", "sample", "evaluate"])
def test_a_bad_name_on_the_command_line_is_a_config_error_naming_it(config_dir: str, job: str, override: str) -> None:
    extra = [] if job == "train" else ["ckpt_path=x.ckpt"]
    cfg = _compose(config_dir, job, [*extra, override])
    with pytest.raises(ConfigError, match=rf"^{override} is out of range; valid: .*no '/'"):
        check_domains(cfg)


def test_every_shipped_run_name_is_accepted(config_dir: str) -> None:
    names = [yaml.safe_load(p.read_text()).get("name") for p in Path(config_dir).glob("*/*.yaml")]
    names = [n for n in names if isinstance(n, str) and "$" not in n]
    assert "digits" in names and all(RUN_NAME.test(n) for n in names)


@given(st.text(max_size=140))
def test_an_accepted_name_is_one_folder_directly_under_the_root(name: str) -> None:
    if RUN_NAME.test(name):
        root = Path("/outputs")
        assert (root / name).parent == root and os.path.normpath(root / name) == str(root / name)
        assert name not in (".", "..") and not set(name) & {"/", "\\", "\0"}


# ------------------------------------------------------------------------------------------------- training


def test_train_is_refused_while_another_run_holds_its_dir(
    config_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rank_env: None
) -> None:
    monkeypatch.setattr(train_module, "fit_and_evaluate", _forbidden("training"))
    cfg = _compose(config_dir, "train", TOY)
    with RunLock(tmp_path, "dlab-train"), pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} "):
        train_module.train(cfg, tmp_path)


def test_a_ddp_rank_above_zero_shares_rank_zeros_dir(
    config_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rank_env: None
) -> None:
    """Rank 0 holds the lock (here: this test); rank 1 of the same run is not refused and prepares nothing."""
    monkeypatch.setattr(train_module, "fit_and_evaluate", lambda cfg, run_dir: {"ran": run_dir})
    (tmp_path / "summary.json").write_text("{}")  # rank 0's to clear, never another rank's
    monkeypatch.setenv("LOCAL_RANK", "1")
    with RunLock(tmp_path, "dlab-train"):
        assert train_module.train(_compose(config_dir, "train", TOY), tmp_path) == {"ran": tmp_path}
    assert (tmp_path / "summary.json").is_file()


def test_train_into_an_unwritable_dir_fails_before_any_work(
    config_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rank_env: None
) -> None:
    monkeypatch.setattr(train_module, "fit_and_evaluate", _forbidden("training"))
    run_dir = _unwritable(tmp_path)
    with pytest.raises(RunDirError, match=rf"the output directory {run_dir} is not writable: Not a directory"):
        train_module.train(_compose(config_dir, "train", TOY), run_dir)


def test_train_probes_the_digits_cache_and_the_wandb_dir_before_any_work(
    config_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rank_env: None
) -> None:
    monkeypatch.setattr(train_module, "fit_and_evaluate", _forbidden("training"))
    cache = _unwritable(tmp_path)
    digits = ["metrics=digits_fd", f"metrics.cache_dir={cache}", "eval.num_samples=16", "logger.wandb=null"]
    cfg = _compose(config_dir, "train", digits)
    with pytest.raises(RunDirError, match=rf"^the digits classifier cache {cache} is not writable: Not a directory"):
        train_module.train(cfg, tmp_path / "run")
    wandb = _compose(config_dir, "train", [*TOY[:1], "logger.wandb.mode=offline"])
    run_dir = tmp_path / "run2"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where W&B's folder goes")
    with pytest.raises(RunDirError, match=rf"the W&B directory {run_dir / 'wandb'} is not writable"):
        train_module.train(wandb, run_dir)


def test_a_cached_digits_classifier_needs_no_writable_cache(config_dir: str, tmp_path: Path) -> None:
    cfg = _compose(config_dir, "train", ["metrics=digits_fd", f"metrics.cache_dir={tmp_path}", "logger.wandb=null"])
    assert "digits classifier cache" in train_module.dirs_to_write(cfg, tmp_path / "run")
    classifier_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    classifier_path(tmp_path).write_bytes(b"weights")
    assert list(train_module.dirs_to_write(cfg, tmp_path / "run")) == ["run directory"]


def test_a_rerun_into_a_train_dir_removes_the_old_record_first(
    config_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rank_env: None
) -> None:
    for name in ("summary.json", "metrics.json", "keep.txt"):
        (tmp_path / name).write_text("{}")

    def killed(cfg: Any, run_dir: Path) -> dict:
        raise KeyboardInterrupt  # as a kill midway: the new run's record is never written

    monkeypatch.setattr(train_module, "fit_and_evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(_compose(config_dir, "train", TOY), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LOCK_FILE) == ["keep.txt"]
    RunLock(tmp_path, "dlab-train").acquire().release()  # the lock went with the killed run


# ------------------------------------------------------------------------------ sample / evaluate / tune-grid jobs
# The checkpoint is a garbage file: reading it raises, so a RunDirError / RunDirBusy (rather than a checkpoint error)
# shows that the directory was checked before the checkpoint was touched.

OLD_RECORDS = {
    "sample": ("samples.npz", "grid.png", "sample_summary.json", "summary.json"),
    "evaluate": ("evaluation.json", "summary.json"),
}
ENTRIES = {"sample": sample, "evaluate": evaluate}


@pytest.mark.parametrize("job", ["sample", "evaluate"])
def test_a_second_job_into_a_directory_is_refused_before_loading(
    config_dir: str, job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_checkpoint_load(monkeypatch, ENTRIES[job])
    cfg = _compose(config_dir, job, [f"ckpt_path={_garbage_checkpoint(tmp_path)}"])
    out_dir = tmp_path / "out"
    (out_dir).mkdir()
    (out_dir / "summary.json").write_text("the first job's")
    with RunLock(out_dir, f"dlab-{job}"), pytest.raises(RunDirBusy, match=rf"pid {os.getpid()} on host {HOST} "):
        ENTRIES[job].run(cfg, out_dir)
    assert (out_dir / "summary.json").read_text() == "the first job's"  # the holder's files are untouched


@pytest.mark.parametrize("job", ["sample", "evaluate"])
def test_a_job_into_an_unwritable_dir_fails_before_the_checkpoint_is_loaded(
    config_dir: str, job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_checkpoint_load(monkeypatch, ENTRIES[job])
    out_dir = _unwritable(tmp_path)
    cfg = _compose(config_dir, job, [f"ckpt_path={_garbage_checkpoint(tmp_path)}"])
    with pytest.raises(RunDirError, match=rf"^the output directory {out_dir} is not writable: Not a directory"):
        ENTRIES[job].run(cfg, out_dir)


@pytest.mark.parametrize("job", ["sample", "evaluate"])
def test_a_rerun_that_dies_midway_leaves_no_old_record_beside_its_data(
    config_dir: str, job: str, tmp_path: Path
) -> None:
    """The previous job's records are removed before the new job reads its checkpoint: a job that fails (or is
    killed) after that leaves no summary of the old job beside whatever the new one wrote."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in OLD_RECORDS[job]:
        (out_dir / name).write_text("from the previous job")
    cfg = _compose(config_dir, job, [f"ckpt_path={_garbage_checkpoint(tmp_path)}"])
    with pytest.raises(Exception) as err:  # the garbage checkpoint: the job dies after preparing its directory
        ENTRIES[job].run(cfg, out_dir)
    assert not isinstance(err.value, RunDirError)
    assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_FILE]
    RunLock(out_dir, f"dlab-{job}").acquire().release()  # and the lock went with it


def test_tune_grid_locks_and_probes_the_checkpoints_grid_dir_before_loading(
    config_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_checkpoint_load(monkeypatch, tune_grid)
    ckpt = _garbage_checkpoint(tmp_path)
    cfg = _compose(config_dir, "tune_grid", [f"ckpt_path={ckpt}"])
    busy = rf"{ckpt.parent / 'grids' / 'last'} is in use by pid {os.getpid()}"
    with RunLock(grid_dir(ckpt), "dlab-tune-grid"), pytest.raises(RunDirBusy, match=busy):
        tune_grid.run(cfg)
    (ckpt.parent / "grids").rename(ckpt.parent / "old_grids")
    (ckpt.parent / "grids").write_text("a file where the grids folder goes")
    with pytest.raises(RunDirError, match=rf"^the grid directory {grid_dir(ckpt)} is not writable: Not a directory"):
        tune_grid.run(cfg)


# --------------------------------------------------------------------------------------------- atomic writes


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = atomic_write_json(tmp_path / "summary.json", {"old": 1})

    def partial(f: Any) -> None:
        f.write(b'{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, partial)
    assert target.read_text() == '{\n  "old": 1\n}\n'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    atomic_write_json(target, {"new": 2})
    assert target.read_text() == '{\n  "new": 2\n}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_run_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    """An entry point holds its directory across its steps (sample, then record), each step asking for it again;
    another process is still refused while the outer hold lasts, and the lock is free after it."""
    from diffusion_lab.run_dir import run_lock

    script = "import sys\nfrom diffusion_lab.run_dir import RunLock\nRunLock(sys.argv[1], 'dlab-sample').acquire()\n"
    with run_lock(tmp_path, "dlab-sample") as outer:
        with run_lock(tmp_path / ".", "dlab-sample") as inner:
            assert inner is outer and outer is not None and outer.held
        assert outer.held  # leaving the inner block does not release the outer hold
        other = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode != 0 and "RunDirBusy" in other.stderr and f"pid {os.getpid()}" in other.stderr
    assert not outer.held
    RunLock(tmp_path, "dlab-train").acquire().release()


def test_an_atomic_write_creates_missing_parent_directories(tmp_path: Path) -> None:
    """A record into a directory tree that does not exist yet (a fresh run's ``checkpoints/grids/<stem>/``) is
    written whole, with every missing parent created, and leaves no temp file."""
    target = tmp_path / "a" / "b" / "c" / "record.json"
    atomic_write_json(target, {"n": 3})
    assert json.loads(target.read_text()) == {"n": 3}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]
