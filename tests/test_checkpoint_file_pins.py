"""Pins of diffusion_lab.checkpoint_file: the checksum covers the set of top-level entries, so a checkpoint with an
entry added or removed after its checksum was taken is refused, naming that entry (and only that one)."""

from __future__ import annotations

import re

import pytest
import torch

from diffusion_lab.checkpoint_file import (
    CHECKSUM_KEY,
    CheckpointError,
    atomic_torch_save,
    read_checkpoint,
    with_checksum,
)


def checkpoint() -> dict:
    return {
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3), "ema.w": torch.ones(2, 3)},
        "global_step": 7,
        "diffusion_lab_config": {"optim": {"lr": 1e-3}},
    }


def saved_with_checksum(tmp_path, edit) -> str:
    """Write ``checkpoint()`` with its checksum, after ``edit`` changed the dict that carries it."""
    ckpt = with_checksum(checkpoint())
    edit(ckpt)
    path = tmp_path / "last.ckpt"
    atomic_torch_save(ckpt, path)
    return str(path)


def test_the_untouched_checkpoint_reads_back(tmp_path):
    """The control: every entry but the checksum is digested, and the same write without an edit verifies (so the
    refusals below are the edits')."""
    assert set(with_checksum(checkpoint())[CHECKSUM_KEY]["entries"]) == {"state_dict", "global_step",
                                                                         "diffusion_lab_config"}  # fmt: skip
    path = saved_with_checksum(tmp_path, lambda c: None)
    assert read_checkpoint(path)["global_step"] == 7


def test_an_entry_added_after_the_checksum_is_refused_naming_it(tmp_path):
    path = saved_with_checksum(tmp_path, lambda c: c.update(injected={"lr": 10.0}))
    message = rf"^{re.escape(path)}: checksum mismatch in injected \(file corrupted\)$"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_an_entry_removed_after_the_checksum_is_refused_naming_it(tmp_path):
    path = saved_with_checksum(tmp_path, lambda c: c.pop("diffusion_lab_config"))
    message = rf"^{re.escape(path)}: checksum mismatch in diffusion_lab_config \(file corrupted\)$"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_an_added_and_a_removed_entry_are_both_named(tmp_path):
    def edit(c):
        c["global_steps"] = c.pop("global_step")  # a rename is one removal and one addition

    path = saved_with_checksum(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in global_step, global_steps \(file corrupted\)$"):
        read_checkpoint(path)
