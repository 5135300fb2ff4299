"""The record never lies: checkpoint checksums, the write/fsync/rename order, the EMA update through real
training steps, and a non-finite stop that names the checkpoint on disk and never saves diverged weights."""

import itertools
import os
import re
import stat
import warnings

import pytest
import torch

from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO
from diffusion_lab.callbacks.nan_guard import NonFiniteError
from diffusion_lab.checkpoint_file import CHECKSUM_KEY, CheckpointError, atomic_torch_save
from diffusion_lab.checkpoint_loading import load_checkpoint, load_module
from diffusion_lab.module import DiffusionModule
from diffusion_lab.train import train
from tests.test_reliability import QUIET, _poison
from tests.test_train import TINY_TOY, compose_train

TINY = [*TINY_TOY, *QUIET, "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """last.ckpt of a 2-step toy run (read-only: tests copy it)."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_train([*TINY, "trainer.max_steps=2"]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _flip_one_bit_of(path, tensor):
    """Flip the lowest bit of the first byte of ``tensor``'s data inside the checkpoint file ``path``."""
    data = bytearray(path.read_bytes())
    pattern = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    offset = data.find(pattern)
    assert offset > 0 and data.find(pattern, offset + 1) == -1, "the tensor's bytes must occur once"
    data[offset] ^= 1
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ checksums
def test_a_flipped_bit_is_a_checksum_error_on_load_sample_and_resume(checkpoint_file, tmp_path):
    ckpt = torch.load(checkpoint_file, weights_only=True)  # still a plain weights-only checkpoint
    assert set(ckpt[CHECKSUM_KEY]["entries"]) >= {"state_dict", "optimizer_states", "diffusion_lab_rng"}
    bad = tmp_path / "checkpoints" / "last.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(checkpoint_file.read_bytes())
    _flip_one_bit_of(bad, ckpt["state_dict"]["ema.module.net.out.weight"])
    expected = f"{bad}: checksum mismatch in state_dict (file corrupted)"
    for read in (load_checkpoint, load_module, AtomicCheckpointIO().load_checkpoint):  # load, sample, fit(ckpt_path)
        with pytest.raises(CheckpointError) as err:
            read(bad)
        assert str(err.value) == expected
    with pytest.raises(CheckpointError, match="checksum mismatch in state_dict"):
        train(compose_train([*TINY, "trainer.max_steps=4", "resume=true"]), tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "empty file (0 bytes)"), (b"hello, I am not a checkpoint\n", "not a PyTorch checkpoint (")],
    ids=["empty", "text"],
)
def test_an_empty_or_text_file_is_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        train(compose_train([*TINY, "trainer.max_steps=2", f"ckpt_path={path}"]), tmp_path / "run")


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(checkpoint_file, tmp_path):
    old = {k: v for k, v in torch.load(checkpoint_file, weights_only=True).items() if k != CHECKSUM_KEY}
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match=r"old.ckpt: no checksum \(a checkpoint from an older version\)"):
        module = load_module(tmp_path / "old.ckpt")
    assert torch.equal(module.state_dict()["ema.module.net.out.weight"], old["state_dict"]["ema.module.net.out.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint with its checksum loads without one
        load_checkpoint(checkpoint_file)


# ------------------------------------------------------------------------------------------ write order
def test_atomic_save_writes_fsyncs_the_file_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    """The order that makes a checkpoint durable: data written and fsynced before the rename that publishes it,
    then the directory entry fsynced."""
    calls = []
    real_fsync, real_replace, real_save = os.fsync, os.replace, torch.save

    def fsync(fd):
        info = os.fstat(fd)
        calls.append(("fsync", "directory" if stat.S_ISDIR(info.st_mode) else f"file of {info.st_size} bytes"))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        calls.append(("write",))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(torch, "save", save)
    atomic_torch_save({"w": torch.arange(1000.0)}, tmp_path / "last.ckpt")
    size = (tmp_path / "last.ckpt").stat().st_size
    assert calls == [("write",), ("fsync", f"file of {size} bytes"), ("replace", "last.ckpt"), ("fsync", "directory")]


# ------------------------------------------------------------------------------------------ EMA
def test_ema_follows_the_weights_after_each_real_optimizer_step(tmp_path, monkeypatch):
    """Through the trainer: after step k, EMA_k = d·EMA_(k-1) + (1 − d)·W_k with W_k the weights *after* step k's
    optimizer step (updating the EMA before the step would use W_(k-1))."""
    snapshots = []
    original = DiffusionModule.on_train_batch_end

    def record(self, outputs, batch, batch_idx):
        raw = [p.detach().clone() for p in self.denoiser.parameters()]
        snapshots.append((raw, [p.detach().clone() for p in self.ema.module.parameters()]))
        original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "on_train_batch_end", record)
    train(compose_train([*TINY, "trainer.max_steps=4", "ema.decay=0.5", "ema.start_step=0", "optim.lr=0.01",
                         "optim.warmup_steps=0"]), tmp_path)  # fmt: skip
    assert len(snapshots) == 4
    for (w_prev, ema_prev), (w, ema) in itertools.pairwise(snapshots):
        assert max(float((a - b).abs().max()) for a, b in zip(w, w_prev, strict=True)) > 1e-3  # the step moved W
        for e, e_prev, p in zip(ema, ema_prev, w, strict=True):
            torch.testing.assert_close(e, 0.5 * e_prev + 0.5 * p, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ non-finite stop
def test_nonfinite_stop_names_the_checkpoint_on_disk_or_that_there_is_none(tmp_path, monkeypatch):
    _poison(monkeypatch, step=5, where="loss")
    with pytest.raises(NonFiniteError) as err:
        train(compose_train([*TINY, "trainer.max_steps=8", "callbacks.checkpoint_every_n_steps=2"]), tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert f"Last checkpoint on disk: {last} (step 4) (the weights this step started from" in str(err.value)
    assert "max |w| = " in str(err.value) and "intact" not in str(err.value)
    with pytest.raises(NonFiniteError) as err:
        train(compose_train([*TINY, "trainer.max_steps=8", "callbacks.checkpoint_every_n_steps=6"]), tmp_path / "b")
    assert f"Last checkpoint on disk: none ({tmp_path / 'b' / 'checkpoints' / 'last.ckpt'} has not been written)" in (
        str(err.value)
    )


def test_nonfinite_stop_never_checkpoints_weights_that_diverged(tmp_path):
    """lr=1e4 diverges within a few steps. Checkpointing every step, the step whose weights give a non-finite loss
    is refused when it would be written, so the checkpoint left on disk still gives a finite loss (on main it
    held the weights that produced the non-finite loss, |w| ~ 1e4)."""
    overrides = [*TINY, "trainer.max_steps=50", "callbacks.checkpoint_every_n_steps=1", "optim.lr=1e4",
                 "optim.warmup_steps=0"]  # fmt: skip
    with pytest.raises(NonFiniteError) as err:
        train(compose_train(overrides), tmp_path)
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    x0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = module.loss_fn(module.denoiser.eval(), x0, generator=torch.Generator().manual_seed(0)).loss
    assert torch.isfinite(loss)
    refused = re.search(r"not writing a checkpoint of step (\d+);", str(err.value))
    assert refused and load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == int(refused[1]) - 1


def test_a_nonfinite_loss_in_any_accumulated_micro_batch_counts(tmp_path, monkeypatch, caplog):
    """accumulate_grad_batches=2: a NaN loss in the first micro-batch of step 2 (added as a constant, so the
    gradients stay finite) is not forgotten when the second micro-batch's loss is finite."""
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss + float("nan") if batch_idx == 2 else loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    overrides = [*TINY, "trainer.max_steps=3", "trainer.accumulate_grad_batches=2", "callbacks.nonfinite=skip"]
    with caplog.at_level("WARNING"):
        train(compose_train(overrides), tmp_path)
    assert "non-finite loss at step 2: skipping" in caplog.text
