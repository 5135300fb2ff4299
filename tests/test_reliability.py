"""Scale and reliability: atomic checkpoints, bit-exact resume after SIGKILL, the non-finite guard,
incompatible-checkpoint refusal, config domain checks, EMA/loss precision under bf16-mixed."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.atomic import TMP_PREFIX
from diffusion_lab.callbacks.exact_resume import WANDB_KEY, EpochSeededSampler
from diffusion_lab.callbacks.nan_guard import NonFiniteError
from diffusion_lab.checkpoint_file import atomic_torch_save
from diffusion_lab.checkpoint_loading import IncompatibleCheckpointError, load_checkpoint
from diffusion_lab.config import validate_config
from diffusion_lab.module import DiffusionModule
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.train import train
from tests.test_train import TINY_DIGITS, TINY_TOY, compose_train

QUIET = ["eval.num_samples=0", "eval.bpd_examples=0", "callbacks.grid_samples=0", "logger.wandb=null"]


# ------------------------------------------------------------------------------------------ atomic writes
def test_a_write_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def half_then_die(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed during write")

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file, no temp left


def test_trainer_writes_through_the_atomic_io_and_keeps_last_k(tmp_path, monkeypatch):
    overrides = [*TINY_TOY, *QUIET, "trainer.max_steps=6", "callbacks.checkpoint_every_n_steps=2"]
    train(compose_train([*overrides, "callbacks.keep_last_k=2"]), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"]
    # A crash inside the trainer's save leaves last.ckpt of step 6 loadable.
    real_save = torch.save

    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        train(compose_train([*overrides, "trainer.max_steps=8", "resume=true"]), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]


# ------------------------------------------------------------------------------------------ exact resume
RESUME_ARGS = [
    *TINY_TOY,
    *QUIET,
    "trainer.max_steps=40",
    "callbacks.checkpoint_every_n_steps=3",
    "trainer.deterministic=true",
    "dataset.batch_size=256",  # 8 batches per epoch: the run crosses epoch boundaries
    "model.dropout=0.1",  # dropout draws from the global RNG too
    "trainer.enable_progress_bar=false",
    "resume=true",
]


def _train_cmd(run_dir: Path, extra=()):
    return [sys.executable, "-m", "diffusion_lab.train", *RESUME_ARGS, *extra, f"hydra.run.dir={run_dir}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _two_process_cmd(trainer: str, run_dir: Path, steps: int) -> list[str]:
    """dlab-train on RESUME_ARGS's data and model with ``trainer=<trainer>`` on 2 CPU processes, batch 64 each and a
    checkpoint every 4 steps, for ``steps`` steps into ``run_dir``."""
    args = [a for a in RESUME_ARGS if not a.startswith(("trainer.max_steps", "dataset.batch_size", "callbacks."))]
    two = [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2", "dataset.batch_size=64",
           "callbacks.checkpoint_every_n_steps=4", f"trainer.max_steps={steps}", *QUIET[2:3]]  # fmt: skip
    return [sys.executable, "-m", "diffusion_lab.train", *args, *two, f"hydra.run.dir={run_dir}"]


def _after_first_checkpoint(victim: subprocess.Popen, last: Path, signal_it, timeout: float) -> None:
    """Wait until ``last`` exists (or the run ends, or ``timeout`` s pass), then a moment more (somewhere after the
    first checkpoint, usually mid-epoch), then call ``signal_it()``."""
    deadline = time.monotonic() + timeout
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    signal_it()


def test_stop_and_resume_in_process_is_bit_identical(tmp_path):
    """Fast variant: stop after 7 steps (mid-epoch, 8 batches per epoch), resume to 20 across the epoch
    boundary; every raw/EMA tensor equals an uninterrupted 20-step run's."""
    args = [a for a in RESUME_ARGS if not a.startswith("trainer.max_steps")] + ["callbacks.checkpoint_every_n_steps=7"]
    train(compose_train([*args, "trainer.max_steps=20"]), tmp_path / "ref")
    train(compose_train([*args, "trainer.max_steps=7"]), tmp_path / "run")
    train(compose_train([*args, "trainer.max_steps=20"]), tmp_path / "run")
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "ref", tmp_path / "run"))
    assert a["global_step"] == b["global_step"] == 20
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []


def test_extending_a_finished_run_is_bit_identical(tmp_path):
    """A run that ended at max_steps between two periodic saves (7, saving every 5) and is then extended to 20
    (the README's ``ckpt_path=… trainer.max_steps=…``) equals an uninterrupted 20-step run: the final
    checkpoint is written where the last step ends, mid-epoch, not after Lightning closed the epoch."""
    args = [a for a in RESUME_ARGS if not a.startswith("trainer.max_steps")] + ["callbacks.checkpoint_every_n_steps=5"]
    train(compose_train([*args, "trainer.max_steps=20"]), tmp_path / "ref")
    train(compose_train([*args, "trainer.max_steps=7"]), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 7
    train(compose_train([*args, "trainer.max_steps=20"]), tmp_path / "run")
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "ref", tmp_path / "run"))
    assert a["global_step"] == b["global_step"] == 20
    assert a["epoch"] == b["epoch"]
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []


@pytest.mark.parametrize(
    "signum",
    [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],  # ~2 min each on a loaded 2-core box
    ids=["SIGKILL", "SIGTERM"],
)
def test_sigkill_and_resume_is_bit_identical(tmp_path, signum):
    """A run SIGKILLed after its first checkpoint and resumed with the same command ends with exactly the
    raw and EMA parameters (and optimizer state) of an uninterrupted run (computed in-process meanwhile).
    SIGTERM instead: the run writes last.ckpt of the step it reached (named in its log) and exits with 143."""
    run_dir = tmp_path / "run"
    output = open(tmp_path / "victim.log", "w")  # noqa: SIM115 - a file, not a pipe: a full pipe blocks the run
    victim = subprocess.Popen(_train_cmd(run_dir), env=_env(), stdout=output, stderr=subprocess.STDOUT)
    last = run_dir / "checkpoints" / "last.ckpt"

    killer = threading.Thread(
        target=_after_first_checkpoint, args=(victim, last, lambda: victim.send_signal(signum), 240)
    )
    killer.start()
    train(compose_train(RESUME_ARGS), tmp_path / "ref")  # the uninterrupted reference
    killer.join()
    victim.wait()
    output.close()
    stderr = (tmp_path / "victim.log").read_text()
    expected_status = -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    assert victim.returncode == expected_status, f"exit status {victim.returncode} (finished first?): {stderr[-2000:]}"
    killed_at = load_checkpoint(last)["global_step"]
    assert 3 <= killed_at < 40
    if signum == signal.SIGTERM:  # the checkpoint is of the step the run had reached, not the last periodic one
        assert f"received SIGTERM: wrote {last} (step {killed_at}); exiting with status 143" in stderr
    resumed = subprocess.run(_train_cmd(run_dir), env=_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "ref", run_dir))
    assert a["global_step"] == b["global_step"] == 40
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema.module.") for k in a["state_dict"])
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"killed at step {killed_at}; differing tensors: {different}"
    opt_a, opt_b = (c["optimizer_states"][0]["state"] for c in (a, b))
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


@pytest.mark.slow  # ~70 s on 2 cores: three 2-process CPU DDP launches
def test_ddp_stop_and_resume_is_bit_identical_with_a_random_stream_per_rank(tmp_path):
    """2-process CPU DDP (gloo): stopped after step 5 (mid-epoch) and resumed to 12, the raw and EMA weights equal
    an uninterrupted run's. Each rank draws from its own stream (seed·W + rank) and gets it back on resume."""
    from diffusion_lab.callbacks.exact_resume import RNG_PER_RANK_KEY

    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "dataset.batch_size=64",
           "callbacks.checkpoint_every_n_steps=5"]  # fmt: skip
    args = [a for a in RESUME_ARGS if not a.startswith(("trainer.max_steps", "dataset.batch_size", "callbacks."))]

    def launch(run_dir, steps):
        cmd = [sys.executable, "-m", "diffusion_lab.train", *args, *ddp, *QUIET[2:3], f"trainer.max_steps={steps}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")

    ref = launch(tmp_path / "ref", 12)
    stopped = launch(tmp_path / "run", 5)
    resumed = launch(tmp_path / "run", 12)
    assert stopped["global_step"] == 5 and ref["global_step"] == resumed["global_step"] == 12
    different = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], resumed["state_dict"][k])]
    assert not different and any(k.startswith("ema.module.") for k in ref["state_dict"])
    rank0, rank1 = stopped[RNG_PER_RANK_KEY]
    assert not torch.equal(rank0["torch"], rank1["torch"])  # the ranks' noise streams differ


@pytest.mark.slow  # three 2-process CPU DDP launches
def test_ddp_sigterm_to_rank_zero_checkpoints_on_every_rank_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 0 only of a 2-process DDP run: both ranks agree on the step (all-reduce), write last.ckpt
    of it together (no deadlock), exit 143, and resuming equals an uninterrupted run."""
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    with open(tmp_path / "victim.log", "w") as output:
        cmd = _two_process_cmd("ddp", run_dir, 40)
        victim = subprocess.Popen(cmd, env=_env(), stdout=output, stderr=subprocess.STDOUT)
        _after_first_checkpoint(victim, last, lambda: victim.send_signal(signal.SIGTERM), 300)
        assert victim.wait(timeout=300) == 143, (tmp_path / "victim.log").read_text()[-3000:]
    stopped_at = load_checkpoint(last)["global_step"]
    assert f"wrote {last} (step {stopped_at}); exiting with status 143" in (tmp_path / "victim.log").read_text()
    for run in (run_dir, tmp_path / "ref"):
        cmd = _two_process_cmd("ddp", run, 40)
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "ref", run_dir))
    assert a["global_step"] == b["global_step"] == 40 and 4 <= stopped_at < 40
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []


@pytest.mark.slow  # three 2-process FSDP2 launches (~1 min each on 2 idle cores)
def test_fsdp_run_sigkilled_with_its_process_group_resumes_bit_identical(tmp_path):
    """trainer=fsdp on 2 CPU processes (gloo), the whole job SIGKILLed (both ranks, as a scheduler or a node loss
    does) after its first checkpoint: the same command resumes from the consolidated last.ckpt and ends with exactly
    the raw and EMA weights and optimizer moments of an uninterrupted FSDP2 run. No lock or temp file is left."""
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    with open(tmp_path / "victim.log", "w") as output:
        cmd = _two_process_cmd("fsdp", run_dir, 24)
        victim = subprocess.Popen(cmd, env=_env(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        # SIGKILL to rank 0 and the rank-1 process it launched
        _after_first_checkpoint(victim, last, lambda: os.killpg(victim.pid, signal.SIGKILL), 300)
        assert victim.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    killed_at = load_checkpoint(last)["global_step"]
    assert 4 <= killed_at < 24 and killed_at % 4 == 0
    for run in (run_dir, tmp_path / "ref"):
        cmd = _two_process_cmd("fsdp", run, 24)
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "ref", run_dir))
    assert a["global_step"] == b["global_step"] == 24
    assert any(k.startswith("ema.module.") for k in a["state_dict"])
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"killed at step {killed_at}; differing tensors: {different}"
    opt_a, opt_b = (c["optimizer_states"][0]["state"] for c in (a, b))
    assert opt_a.keys() == opt_b.keys() and opt_a
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_fewer_examples_per_rank_than_a_batch_is_a_clear_error(tmp_path):
    """Instead of a run of zero steps: 512 examples over 2 ranks cannot fill a 300-example batch."""
    from diffusion_lab.callbacks.exact_resume import check_batches_per_rank

    check_batches_per_rank(512, 256, 2, drop_last=True)
    check_batches_per_rank(512, 300, 2, drop_last=False)  # a partial batch still trains
    with pytest.raises(ConfigError, match="0 per rank on 4"):
        check_batches_per_rank(3, 2, 4, drop_last=False)
    with pytest.raises(ConfigError, match=r"512 examples, 256 per rank on 2 process\(es\): fewer than "):
        check_batches_per_rank(512, 300, 2, drop_last=True)
    with pytest.raises(ConfigError, match=r"1617 examples, 1617 per rank on 1 process\(es\): fewer than dataset"):
        train(compose_train([*TINY_DIGITS, *QUIET, "dataset.batch_size=2000", "trainer.max_steps=2"]), tmp_path)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_data_order_depends_on_seed_and_epoch_and_skips_consumed_batches():
    pos = [0, 0, 0, 1]
    sampler = EpochSeededSampler(10, batch_size=3, seed=1, position=lambda: tuple(pos))
    epoch0, again = list(sampler), list(sampler)
    assert epoch0 == again and sorted(epoch0) == list(range(10))
    pos[0] = 1
    assert list(sampler) != epoch0
    pos[:2] = [0, 2]  # resumed after 2 batches of epoch 0
    assert list(sampler) == epoch0[6:]
    pos[:] = [0, 0, 1, 2]  # rank 1 of 2
    assert list(sampler) == epoch0[:10][1::2]


def test_resume_continues_the_wandb_run(tmp_path):
    overrides = [*TINY_TOY, *QUIET[:-1], "trainer.max_steps=2", "callbacks.checkpoint_every_n_steps=2"]
    train(compose_train([*overrides, "logger.wandb.mode=offline"]), tmp_path)
    run_id = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")[WANDB_KEY]
    train(compose_train([*overrides, "logger.wandb.mode=offline", "trainer.max_steps=4", "resume=true"]), tmp_path)
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), (run_id, runs)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")[WANDB_KEY] == run_id
    # A table from W&B's record counts the resumed run once, with the second segment's final metrics.
    from tests.test_sweeps import _script
    from tests.test_tracking import read_finished_run

    read_finished_run(tmp_path / "wandb" / runs[1])
    (run,) = _script("make_table").load_wandb_offline_runs(tmp_path)
    assert run["metrics"]["trainer/global_step"] == 4 and run["job_type"] == "train"  # the resumed segment


# ------------------------------------------------------------------------------------------ incompatible
def test_resuming_with_a_different_model_or_schedule_is_refused_with_a_diff(tmp_path):
    overrides = [*TINY_TOY, *QUIET, "trainer.max_steps=2", "callbacks.checkpoint_every_n_steps=2"]
    train(compose_train(overrides), tmp_path)
    changed = [*overrides, "trainer.max_steps=4", "resume=true", "model.hidden=64", "schedule=cosine"]
    with pytest.raises(IncompatibleCheckpointError) as err:
        train(compose_train(changed), tmp_path)
    message = str(err.value)
    assert "model.hidden: checkpoint=32 requested=64" in message
    assert "schedule._target_: checkpoint='diffusion_lab.diffusion.schedules.LinearSchedule'" in message
    assert "optim" not in message


def test_checkpoint_loading_refuses_pickled_code_even_in_a_resume(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "checkpoints").mkdir()
    torch.save({"diffusion_lab_config": {}, "payload": Evil()}, tmp_path / "checkpoints" / "last.ckpt")
    overrides = [*TINY_TOY, *QUIET, "trainer.max_steps=2", "resume=true"]
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported"):
        train(compose_train(overrides), tmp_path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ NaN guard
def _poison(monkeypatch, step: int, where: str):
    """Make training step ``step`` (1-based) produce a NaN loss, or a NaN gradient in one parameter."""
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_step + 1 != step:
            return loss
        if where == "loss":
            return loss * float("nan")
        param = self.denoiser.net.get_parameter(where)

        def nan_grad(grad):
            handle.remove()
            return torch.full_like(grad, float("nan"))

        handle = param.register_hook(nan_grad)
        return loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)


def test_nonfinite_skip_skips_the_step_and_names_the_tensor(tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, step=3, where="loss")
    overrides = [*TINY_TOY, *QUIET, "trainer.max_steps=5", "callbacks.nonfinite=skip"]
    with caplog.at_level("WARNING"):
        train(compose_train(overrides), tmp_path)
    assert "non-finite loss at step 3" in caplog.text
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(tmp_path, monkeypatch, caplog):
    """The skipped step changes no parameter and no Adam moment (a true skip, not a zero-gradient step)."""
    from diffusion_lab.callbacks.nan_guard import NonFiniteGuard

    snapshots = {}
    original = NonFiniteGuard.on_before_optimizer_step

    def spy(self, trainer, pl_module, optimizer):
        original(self, trainer, pl_module, optimizer)
        snapshots[trainer.global_step + 1] = [p.detach().clone() for p in pl_module.denoiser.parameters()]

    monkeypatch.setattr(NonFiniteGuard, "on_before_optimizer_step", spy)
    name = "inp.weight"
    _poison(monkeypatch, step=2, where=name)
    with caplog.at_level("WARNING"):
        train(compose_train([*TINY_TOY, *QUIET, "trainer.max_steps=2", "callbacks.nonfinite=skip"]), tmp_path)
    assert f"non-finite grad of denoiser.net.{name} at step 2" in caplog.text
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    after = [v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.")]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], after, strict=True))


def test_nonfinite_stop_raises_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, step=5, where="loss")
    overrides = [*TINY_TOY, *QUIET, "trainer.max_steps=8", "callbacks.checkpoint_every_n_steps=2"]
    with pytest.raises(NonFiniteError, match="non-finite loss at step 5"):
        train(compose_train([*overrides, "callbacks.nonfinite=stop"]), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(("bad", "finite"), [(float("nan"), False), (float("inf"), False), (3e30, True)])
def test_gradient_check_flags_nan_and_inf_but_not_a_huge_finite_gradient(bad, finite):
    """The fast 2-norm test overflows on a finite 3e30 entry; the entry-wise confirmation keeps it a finite step."""
    from diffusion_lab.callbacks.nan_guard import first_nonfinite_grad, grads_finite

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    net[1].weight.grad[1, 2] = bad
    assert grads_finite(net) is finite
    assert first_nonfinite_grad(net) == (None if finite else "1.weight")


def test_nonfinite_option_is_validated():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["callbacks.nonfinite=ignore"])
    assert "expected one of [skip, stop, off]" in str(err.value.__cause__)


# ------------------------------------------------------------------------------------------ config domains
BAD_VALUES = [
    ([], "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is out of range; valid: an integer"),
    ([], "dataset.batch_size=0", "dataset.batch_size=0 is out of range; valid: an integer >= 1"),
    ([], "optim.lr=0", "optim.lr=0.0 is out of range; valid: a finite number > 0"),
    ([], "optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] is out of range; valid: two numbers in [0, 1)"),
    ([], "ema.decay=1.5", "ema.decay=1.5 is out of range; valid: a number in (0, 1)"),
    ([], "cond.p_uncond=1.2", "cond.p_uncond=1.2 is out of range; valid: a probability in [0, 1]"),
    ([], "callbacks.checkpoint_every_n_steps=0", "callbacks.checkpoint_every_n_steps=0 is out of range"),
    ([], "callbacks.keep_last_k=-1", "callbacks.keep_last_k=-1 is out of range; valid: an integer >= 0"),
    ([], "eval.batch_size=0", "eval.batch_size=0 is out of range"),
    ([], "sampler.steps=0", "sampler.steps=0 is out of range; valid: an integer >= 1"),
    ([], "schedule.num_timesteps=0", "schedule.num_timesteps=0 is out of range"),
    (["time_sampler=importance"], "time_sampler.uniform_prob=2", "time_sampler.uniform_prob=2.0 is out of range"),
    ([], "model.base_channels=0", "model.base_channels=0 is out of range; valid: an integer >= 1"),
    ([], "model.dropout=1.0", "model.dropout=1.0 is out of range; valid: a number in [0, 1)"),
    ([], "model.channel_mult=[]", "model.channel_mult=[] is out of range; valid: a non-empty list"),
    ([], "model.num_groups=5", "model.num_groups=5 must divide model.base_channels=32"),
    ([], "model.resolution=10", "model.resolution=10 must be divisible by 2**(len(model.channel_mult)-1)=4"),
    (["experiment=toy2d"], "model.hidden=0", "model.hidden=0 is out of range; valid: an integer >= 1"),
    (["experiment=toy2d"], "dataset.num_train=0", "dataset.num_train=0 is out of range"),
]


@pytest.mark.parametrize(("base", "override", "message"), BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_each_domain_rejects_a_bad_value_naming_key_and_range(base, override, message):
    cfg = compose_train([*(base or ["model=unet_small"]), override])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_the_shipped_experiments_pass_the_domain_checks():
    for experiment in ("digits", "toy2d", "digits_cfg"):
        validate_config(compose_train([f"experiment={experiment}"]))


# ------------------------------------------------------------------------------------------ precision / scale
def test_ema_stays_float32_under_bf16_mixed(tmp_path):
    train(compose_train([*TINY_TOY, *QUIET, "trainer.max_steps=3", "precision=bf16-mixed"]), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    ema = {k: v for k, v in state.items() if k.startswith("ema.module.") and v.is_floating_point()}
    assert ema and all(v.dtype == torch.float32 for v in ema.values())


def test_loss_weighting_and_log_snr_are_fp32_under_autocast():
    """bf16 autocast changes the network's output, never the schedule/log-SNR/weighting math (a learned
    schedule is a small network, so it would otherwise run in bf16)."""
    from hydra.utils import instantiate

    from diffusion_lab.diffusion import Denoiser, DiffusionLoss
    from diffusion_lab.models import MLP

    schedule = instantiate(compose_train(["schedule=learned"]).schedule)
    param = instantiate(compose_train(["parameterization=v"]).parameterization)
    denoiser = Denoiser(MLP(hidden=16, num_layers=1), schedule, param)
    weighting = instantiate(compose_train(["weighting=min_snr"]).weighting)
    loss_fn = DiffusionLoss(weighting, instantiate(compose_train([]).time_sampler))
    x0 = torch.randn(64, 2)

    ref = loss_fn(denoiser, x0, generator=torch.Generator().manual_seed(0))
    coefs = denoiser.coefficients(ref.t, x0)
    ref_w = loss_fn._output_weight(denoiser, ref.t, ref.log_snr, coefs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn(denoiser, x0, generator=torch.Generator().manual_seed(0))
        mixed_w = loss_fn._output_weight(denoiser, ref.t, ref.log_snr, coefs)
    assert mixed.log_snr.dtype == torch.float32 and torch.equal(mixed.log_snr, ref.log_snr)
    assert mixed_w.dtype == torch.float32 and torch.equal(mixed_w, ref_w)
    assert mixed.unweighted.dtype == torch.float32


def test_accumulate_compile_and_channels_last_switches(tmp_path):
    digits = ["model.base_channels=16", "model.num_groups=4", "dataset.batch_size=8", *QUIET]
    over = ["trainer.max_steps=2", "trainer.accumulate_grad_batches=2", "channels_last=true", "compile=false"]
    metrics = train(compose_train([*digits, *over]), tmp_path)
    assert metrics["train/steps"] == 2
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    # 2 batches per step (the last step is saved where it ends: its batch is processed, not yet "completed")
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4


@pytest.mark.slow
def test_compile_trains_and_keeps_state_dict_keys(tmp_path):
    metrics = train(compose_train([*TINY_TOY, *QUIET, "trainer.max_steps=3", "compile=true"]), tmp_path)
    assert metrics["train/steps"] == 3
    keys = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"].keys()
    assert not [k for k in keys if "_orig_mod" in k]


# ------------------------------------------------------------------------------------------ stop signals
def _signal_at(monkeypatch, step: int, signum: int):
    """Deliver ``signum`` to this process while training step ``step`` (1-based) computes its loss."""
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)


SIGNAL_ARGS = [a for a in RESUME_ARGS if not a.startswith(("trainer.max_steps", "callbacks."))]


def test_sigterm_mid_interval_checkpoints_the_step_reached_and_resume_is_bit_identical(tmp_path, monkeypatch):
    """SIGTERM during step 9 of a run checkpointing every 5 (8 batches per epoch): the step finishes, last.ckpt
    holds step 9 (not the periodic step 5), the run exits with status 143, and resuming it to 12 equals an
    uninterrupted run (raw, EMA, Adam moments)."""
    args = [*SIGNAL_ARGS, "callbacks.checkpoint_every_n_steps=5", "trainer.max_steps=12"]
    train(compose_train(args), tmp_path / "ref")
    _signal_at(monkeypatch, 9, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        train(compose_train(args), tmp_path / "run")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "received SIGTERM: wrote " in str(stopped.value) and "(step 9)" in str(stopped.value)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 9
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after fit
    monkeypatch.undo()
    train(compose_train(args), tmp_path / "run")
    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "ref", tmp_path / "run"))
    assert a["global_step"] == b["global_step"] == 12
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    opt_a, opt_b = (c["optimizer_states"][0]["state"] for c in (a, b))
    assert all(torch.equal(opt_a[i][m], opt_b[i][m]) for i in opt_a for m in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_sigint_and_slurm_sigusr1_checkpoint_the_step_reached(tmp_path, monkeypatch, signum):
    """Ctrl-C and SLURM's pre-timeout signal also finish the step, write last.ckpt of it and exit 128 + signum."""
    _signal_at(monkeypatch, 5, signum)
    with pytest.raises(SystemExit) as stopped:
        train(compose_train([*SIGNAL_ARGS, "trainer.max_steps=20", "callbacks.checkpoint_every_n_steps=3"]), tmp_path)
    assert stopped.value.code == 128 + signum
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_sigusr1_requeues_a_slurm_job_with_auto_requeue_and_nothing_else(tmp_path, monkeypatch):
    """SLURM's pre-timeout SIGUSR1 runs ``scontrol requeue <job>`` (array jobs: ``<array job>_<task>``), as
    Lightning's own handler does; SIGTERM (preemption: SLURM requeues itself) and non-SLURM runs do not."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from diffusion_lab.callbacks.stop_signals import requeue_slurm_job

    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    def trainer(env):
        return SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=env))

    assert requeue_slurm_job(trainer(SLURMEnvironment()), signal.SIGUSR1)
    assert not requeue_slurm_job(trainer(SLURMEnvironment()), signal.SIGTERM)
    assert not requeue_slurm_job(trainer(SLURMEnvironment(auto_requeue=False)), signal.SIGUSR1)
    assert not requeue_slurm_job(trainer(LightningEnvironment()), signal.SIGUSR1)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job(trainer(SLURMEnvironment()), signal.SIGUSR1)
    assert (tmp_path / "calls").read_text().splitlines() == ["requeue 4242", "requeue 77_3"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no scontrol: a warning, not a crash after the save
    assert not requeue_slurm_job(trainer(SLURMEnvironment()), signal.SIGUSR1)
