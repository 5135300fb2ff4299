"""A trained model back from its checkpoint: the verified weights-only read, the rebuild from the stored config,
and the check that a checkpoint's stored config matches the one a resume requests.

Split out of :mod:`diffusion_lab.module`, which re-exports every name here (callers import them from there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.checkpoint_file import CheckpointError, read_checkpoint

if TYPE_CHECKING:
    from diffusion_lab.module import DiffusionModule


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary pickle execution) and verify its checksum.

    An empty, foreign or corrupted file raises one :class:`~diffusion_lab.checkpoint_file.CheckpointError`
    line naming the file and what is wrong. ``mmap``: map the tensors instead of reading them (for callers that
    only need the config and bookkeeping entries; the checksum is then not checked, as it would read them all).
    """
    ckpt = read_checkpoint(path, map_location=map_location, mmap=mmap)
    if "diffusion_lab_config" not in ckpt:
        raise CheckpointError(f"{path}: not a diffusion_lab checkpoint (no 'diffusion_lab_config' entry)")
    return ckpt


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild a :class:`DiffusionModule` from a checkpoint's stored config and load its weights."""
    from diffusion_lab.module import build_module  # module.py imports (and re-exports) this module
    from diffusion_lab.schema.run import TrainConfig

    ckpt = load_checkpoint(path, map_location)
    # Defaults for keys a checkpoint from an older version does not have.
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["diffusion_lab_config"])
    assert isinstance(cfg, DictConfig)
    module = build_module(cfg, ckpt["data_shape"])
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module.to(map_location)


# Config keys that define what the stored weights mean; resuming with any of them changed is refused.
RESUME_KEYS = ("model", "schedule", "parameterization", "loss.learned_variance", "cond.enabled")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint whose stored config differs from the requested one in a key that defines the weights."""


def config_diff(stored: Any, requested: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Leaf-by-leaf differences ``(key, stored, requested)`` between two plain config trees."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        diffs: list[tuple[str, Any, Any]] = []
        for key in sorted(set(stored) | set(requested), key=str):
            sub = f"{prefix}.{key}" if prefix else str(key)
            diffs += config_diff(stored.get(key, "<missing>"), requested.get(key, "<missing>"), sub)
        return diffs
    return [] if stored == requested else [(prefix, stored, requested)]


def check_resume_compatible(stored: dict[str, Any], cfg: DictConfig, keys: Sequence[str] = RESUME_KEYS) -> None:
    """Refuse to resume a checkpoint whose stored config differs from ``cfg`` in ``keys``; the error lists
    every differing key with its stored and requested value."""
    requested = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(requested, dict)
    diffs: list[tuple[str, Any, Any]] = []
    for key in keys:
        a, b = OmegaConf.select(OmegaConf.create(stored), key), OmegaConf.select(OmegaConf.create(requested), key)
        a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
        diffs += config_diff(a, b, key)
    if diffs:
        lines = "\n".join(f"  {k}: checkpoint={a!r} requested={b!r}" for k, a, b in diffs)
        raise IncompatibleCheckpointError(
            f"the checkpoint was trained with a different config in keys that define its weights:\n{lines}\n"
            "resume with the checkpoint's values (or start a new run without ckpt_path/resume)"
        )
