"""A trained model back from its checkpoint: the verified weights-only read, the rebuild from the stored config,
and the check that a checkpoint's stored config matches the one a resume requests.

The stored config is data: it is checked against this version's schemas (an unknown key or argument is one line
naming the key, the checkpoint's format and this one's), and every option in it is built through the project's
registry (:func:`diffusion_lab.schema.registry.build_option`), so it selects among the project's options and never
names code of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from diffusion_lab.checkpoint_file import FORMAT_VERSION, CheckpointError, checkpoint_format, read_checkpoint
from diffusion_lab.module import DiffusionModule, build_module
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import OPTION_GROUPS, check_targets, option_schema, option_targets
from diffusion_lab.schema.run import TrainConfig


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


def stored_config(ckpt: dict[str, Any], path: str | Path) -> DictConfig:
    """The checkpoint's stored config, checked against this version's schemas: the run's settings against
    :class:`TrainConfig` (defaults fill keys an older version did not write), each option against its class's
    schema, after :func:`~diffusion_lab.schema.registry.check_targets`. Any mismatch is one
    :class:`CheckpointError` line naming the file, the key and both formats."""
    stored = ckpt["diffusion_lab_config"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: 'diffusion_lab_config' holds a {type(stored).__name__}, not a config mapping")
    try:
        options = {group: _checked_option(group, stored[group]) for group in OPTION_GROUPS if group in stored}
        cfg = _merge(TrainConfig, {**stored, **options}, "")
    except ConfigError as err:
        raise CheckpointError(f"{path}: {_format_note(ckpt)}: its stored config does not fit: {err}") from None
    return cfg


def _checked_option(group: str, node: Any) -> Any:
    """One option node: its targets registered (:func:`check_targets`), its keys and types its class's schema's."""
    if group == "metrics" and isinstance(node, dict) and node.get("_target_") is None:
        return node  # metrics=none builds nothing
    check_targets(group, node)
    return _merge(option_schema(group, option_targets(group)[node["_target_"]]), node, f"{group}.")


def _merge(schema: type, node: Any, prefix: str) -> DictConfig:
    """``node`` merged into ``schema`` (defaults fill what it lacks); an unknown key or a wrong type is a
    :class:`ConfigError` naming the dotted key and, for an unknown key, the valid ones."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, node)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "")
        line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        parent = OmegaConf.select(base, key.rpartition(".")[0]) if "." in key else base
        valid = f"; valid keys there: {sorted(map(str, parent))}" if isinstance(err, ConfigKeyError) else ""
        raise ConfigError(f"key '{prefix}{key}': {line}{valid if isinstance(parent, DictConfig) else ''}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _format_note(ckpt: dict[str, Any]) -> str:
    """``written by checkpoint format N; this version writes format M``."""
    return f"written by checkpoint format {checkpoint_format(ckpt)}; this version writes format {FORMAT_VERSION}"


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild a :class:`DiffusionModule` from a checkpoint's stored config and load its weights; a checkpoint this
    version cannot read (unknown key, no data shape, weights that do not fit the network) is one
    :class:`CheckpointError` line."""
    ckpt = load_checkpoint(path, map_location)
    cfg = stored_config(ckpt, path)
    shape = ckpt.get("data_shape")
    if not isinstance(shape, list | tuple) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise CheckpointError(f"{path}: {_format_note(ckpt)}: no valid 'data_shape' entry (got {shape!r})")
    try:
        module = build_module(cfg, shape)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {_format_note(ckpt)}: its stored config does not build: {err}") from None
    check_state_dict(module.state_dict(), ckpt.get("state_dict"), path)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module.to(map_location)


def check_state_dict(expected: dict[str, torch.Tensor], stored: Any, path: str | Path, most: int = 3) -> None:
    """The stored weights must have exactly the network's entries and shapes; else one line counting the missing,
    unexpected and mis-shaped entries, naming the first ``most`` of each."""
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: no 'state_dict' mapping of weights (got {type(stored).__name__})")
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    shapes = [
        f"{k} {tuple(stored[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in stored and isinstance(stored[k], torch.Tensor) and stored[k].shape != v.shape
    ]
    parts = [
        f"{len(names)} {what} ({', '.join(names[:most])}{', …' if len(names) > most else ''})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if names
    ]
    if parts:
        raise CheckpointError(
            f"{path}: its weights do not fit the network its stored config builds: entries {'; '.join(parts)}"
        )


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
