"""No code from data: a config node selects code only through the project's registries (diffusion_lab/schema/
registry.py), whether it comes from the command line or from a checkpoint's stored config; and a checkpoint this
version cannot read is one line naming the key and both formats.

A planted module (``planted_target``, on ``sys.path`` for these tests) leaves a marker file when it is imported or
when its function is called: a crafted ``_target_`` naming it must be refused and the marker must never appear.
"""

from __future__ import annotations

import ast
import builtins
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from diffusion_lab.checkpoint_file import FORMAT_KEY, FORMAT_VERSION, CheckpointError, with_checksum
from diffusion_lab.checkpoint_loading import load_module, stored_config
from diffusion_lab.config import register_configs
from diffusion_lab.module import build_module
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import (
    CONFIG_DIR,
    OPTION_GROUPS,
    build_option,
    check_targets,
    option_class,
    option_config,
    option_names,
    option_targets,
)

register_configs()
ROOT = Path(__file__).resolve().parent.parent

PLANTED = """
import pathlib, os
MARKER = pathlib.Path(os.environ["DLAB_PLANTED_MARKER"])
MARKER.write_text("imported")
def boom(*args, **kwargs):
    MARKER.write_text("called")
class Boom:
    def __init__(self, *args, **kwargs):
        MARKER.write_text("constructed")
"""


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``planted_target`` importable from ``tmp_path``; importing it or calling into it writes the marker."""
    (tmp_path / "planted_target.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DLAB_PLANTED_MARKER", str(tmp_path / "MARKER"))
    monkeypatch.delitem(sys.modules, "planted_target", raising=False)
    return tmp_path / "MARKER"


# Callables that would do harm if a stored config could name them, and project code that is not an option.
DANGEROUS = [
    "builtins.open",
    "builtins.exec",
    "builtins.eval",
    "os.system",
    "os.remove",
    "shutil.copyfile",
    "shutil.rmtree",
    "subprocess.run",
    "numpy.savetxt",
    "pathlib.Path.touch",
    "torch.save",
    "pickle.loads",
    "diffusion_lab.checkpoint_file.atomic_torch_save",  # project code, but no option of any group
    "diffusion_lab.samplers.DDIMSampler",  # an option, but of another group than the one it is placed in
    "planted_target.boom",
    "planted_target.Boom",
]


def _options() -> list[tuple[str, str]]:
    return [
        (g, n) for g in OPTION_GROUPS for n in option_names(g) if option_targets(g) and n in option_targets(g).values()
    ]


@pytest.mark.parametrize(("group", "name"), _options())
def test_every_option_passes_the_registry_check(group, name):
    node = option_config(group, name)
    check_targets(group, node)
    assert option_targets(group)[node._target_] in option_names(group)


def test_the_registry_holds_every_option_class_of_each_group():
    assert option_targets("sampler")["diffusion_lab.samplers.DDIMSampler"] == "ddim"
    assert option_targets("schedule")["diffusion_lab.diffusion.schedules.ShiftedSchedule"] == "shifted_cosine"
    assert "none" not in option_targets("metrics").values()  # metrics=none builds nothing
    for group in OPTION_GROUPS:  # options may share a class (unet, unet_small, unet_digits): one entry each class
        classes = {option_config(group, n)._target_ for n in option_names(group)} - {None}
        assert set(option_targets(group)) == classes


def _placements(group: str, target: str) -> list[tuple[dict[str, Any], str]]:
    """A valid option node of ``group`` with ``target`` placed at the root, one level down and inside a list;
    each with the dotted key the error must name."""
    name = sorted(option_targets(group).values())[0]
    base = OmegaConf.to_container(option_config(group, name))
    assert isinstance(base, dict)
    root = {**base, "_target_": target}
    nested = {**base, "base": {"_target_": target}}
    listed = {**base, "extra": [1, {"_target_": target}]}
    return [(root, f"{group}._target_"), (nested, f"{group}.base._target_"), (listed, f"{group}.extra[1]._target_")]


@pytest.mark.parametrize("group", OPTION_GROUPS)
@pytest.mark.parametrize("target", DANGEROUS)
def test_a_crafted_target_is_refused_before_anything_is_imported_or_called(group, target, marker):
    for node, key in _placements(group, target):
        if target in option_targets(group):
            continue  # a registered class of this very group is what the registry allows
        with pytest.raises(ConfigError) as err:
            build_option(group, node)
        assert str(err.value).startswith(f"{key}={target!r} is not the class of a {group} option")
        assert f"{group}=" in str(err.value)  # the valid options are listed
        with pytest.raises(ConfigError):
            option_class(group, node)
    assert not marker.exists()
    assert "planted_target" not in sys.modules


@pytest.mark.parametrize("special", ["_partial_", "_args_", "_recursive_", "_convert_", "_anything_"])
def test_hydras_other_special_keys_are_refused(special):
    node = {**OmegaConf.to_container(option_config("sampler", "ddim")), special: True}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=rf"^sampler\.{special}: Hydra's special key"):
        build_option("sampler", node)


def test_a_node_without_a_target_or_not_a_node_is_refused():
    with pytest.raises(ConfigError, match=r"^sampler: no _target_; valid: one of the sampler options"):
        build_option("sampler", {"steps": 10})
    with pytest.raises(ConfigError, match=r"^sampler='ddim' is not a sampler config node"):
        build_option("sampler", "ddim")
    with pytest.raises(ConfigError, match=r"unknown option group 'samplers'; valid groups"):
        build_option("samplers", {"_target_": "diffusion_lab.samplers.DDIMSampler"})


def test_a_registered_option_builds_and_a_constructor_error_names_the_key():
    sampler = build_option("sampler", {**OmegaConf.to_container(option_config("sampler", "ddim")), "steps": 7})
    assert type(sampler).__name__ == "DDIMSampler" and sampler.steps == 7
    shifted = build_option("schedule", option_config("schedule", "shifted_cosine"))  # a nested registered target
    assert type(shifted.base).__name__ == "CosineSchedule"
    with pytest.raises(ConfigError, match=r"^sampler: DDIMSampler: steps=0 is not a positive integer"):
        build_option("sampler", {**OmegaConf.to_container(option_config("sampler", "ddim")), "steps": 0})


def _importable_callables() -> list[str]:
    """Dotted paths of callables in modules that a crafted config could reach for."""
    found = []
    for module in (builtins, os, shutil, subprocess, pathlib, np, torch):
        for attr in sorted(dir(module)):
            if not attr.startswith("_") and callable(getattr(module, attr, None)):
                found.append(f"{module.__name__}.{attr}")
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    group=st.sampled_from(OPTION_GROUPS),
    target=st.one_of(
        st.sampled_from(_importable_callables()),
        st.from_regex(r"[a-z_]{1,8}(\.[A-Za-z_]{1,8}){0,3}", fullmatch=True),
        st.integers(),
        st.none(),
    ),
    depth=st.integers(min_value=0, max_value=3),
)
def test_property_no_random_target_outside_the_registry_is_ever_imported(group, target, depth, monkeypatch):
    """Random importable callables (and random dotted names, numbers, null) at a random depth: refused, and the
    registry check never imports or locates anything."""
    calls: list[str] = []
    import hydra._internal.utils as hydra_utils

    monkeypatch.setattr(hydra_utils, "_locate", lambda path: calls.append(path))
    node: dict[str, Any] = {"_target_": target}
    for _ in range(depth):
        node = {"_target_": next(iter(option_targets(group))), "inner": node}
    if target in option_targets(group) or (depth > 0 and target is None):
        return  # a registered class of the group (or a null inner target) is not a crafted one
    with pytest.raises(ConfigError, match=r"_target_"):
        build_option(group, node)
    assert calls == []


def test_only_the_registry_turns_a_config_into_code():
    """No module but the registry calls Hydra's instantiate / get_class / get_method / _locate or importlib: a new
    call site would bypass the check."""
    banned = {"instantiate", "get_class", "get_method", "get_object", "_locate", "import_module", "__import__"}
    offenders = []
    for path in sorted((ROOT / "diffusion_lab").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py")):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = None
            if isinstance(node, ast.Call):
                func = node.func
                own_method = isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "self"
                name = (
                    None if own_method else func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                )
            elif isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names} & banned
                name = next(iter(names), None)
            if name in banned:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------- checkpoints


def _toy_checkpoint(path: Path, edit: Any = None) -> Path:
    """A real toy 2-D checkpoint (tiny MLP) as the trainer writes it; ``edit(ckpt)`` crafts it, and the checksum is
    recomputed afterwards (a crafter can do that too)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy2d", "model.hidden=16", "model.num_layers=2"])
    module = build_module(cfg, (2,))
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    if edit is not None:
        edit(ckpt)
    torch.save(with_checksum(ckpt), path)
    return path


def test_a_checkpoint_round_trips_and_declares_its_format(tmp_path):
    path = _toy_checkpoint(tmp_path / "ok.ckpt")
    module = load_module(path)
    assert module.data_shape == (2,)
    assert torch.load(path, weights_only=True)[FORMAT_KEY] == FORMAT_VERSION


@pytest.mark.parametrize("group", OPTION_GROUPS)
@pytest.mark.parametrize("target", ["numpy.savetxt", "builtins.open", "shutil.copyfile", "planted_target.Boom"])
def test_a_crafted_checkpoint_config_never_runs_its_target(group, target, tmp_path, marker):
    def craft(ckpt):
        ckpt["diffusion_lab_config"][group] = {"_target_": target, "fname": str(tmp_path / "WRITTEN"), "X": [1]}

    path = _toy_checkpoint(tmp_path / "evil.ckpt", craft)
    with pytest.raises(CheckpointError) as err:
        load_module(path)
    message = str(err.value)
    assert message.startswith(f"{path}: written by checkpoint format {FORMAT_VERSION}")
    assert f"{group}._target_={target!r} is not the class of a {group} option" in message
    assert not (tmp_path / "WRITTEN").exists() and not marker.exists()
    assert "planted_target" not in sys.modules


def _set(key: str, value: Any):
    def craft(ckpt):
        node = ckpt["diffusion_lab_config"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value

    return craft


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set("new_top_level_key", 1), "key 'new_top_level_key': Key 'new_top_level_key' not in 'TrainConfig'"),
        (
            _set("optim.lookahead", 0.5),
            "key 'optim.lookahead': Key 'lookahead' not in 'OptimConfig'; valid keys there: "
            "['betas', 'eps', 'lr', 'warmup_steps', 'weight_decay']",
        ),
        (_set("model.attention_heads", 4), "key 'model.attention_heads': Key 'attention_heads' not in 'MLPConfig'"),
        (_set("sampler.order", 3), "key 'sampler.order': Key 'order' not in 'DDIMSamplerConfig'; valid keys there: ["),
        (_set("optim.lr", "fast"), "key 'optim.lr': Value 'fast' of type 'str' could not be converted to Float"),
    ],
)
def test_a_checkpoint_from_another_version_is_one_line_naming_the_key(edit, expected, tmp_path):
    def craft(ckpt):
        edit(ckpt)
        ckpt[FORMAT_KEY] = 3

    path = _toy_checkpoint(tmp_path / "newer.ckpt", craft)
    with pytest.raises(CheckpointError) as err:
        load_module(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: written by checkpoint format 3; this version writes format {FORMAT_VERSION}")
    assert expected in message


def test_an_older_checkpoint_without_a_format_entry_is_format_1_and_loads(tmp_path):
    path = _toy_checkpoint(tmp_path / "old.ckpt", lambda ckpt: ckpt.pop(FORMAT_KEY))
    assert load_module(path).data_shape == (2,)
    bad = _toy_checkpoint(tmp_path / "old_bad.ckpt", lambda ckpt: (ckpt.pop(FORMAT_KEY), _set("zz", 1)(ckpt)))
    with pytest.raises(CheckpointError, match=r"written by checkpoint format 1; "):
        load_module(bad)


@pytest.mark.parametrize("shape", [None, [], [0], ["2"], "2", [2.0]])
def test_a_missing_or_invalid_data_shape_is_named(shape, tmp_path):
    def craft(ckpt):
        if shape is None:
            del ckpt["data_shape"]
        else:
            ckpt["data_shape"] = shape

    path = _toy_checkpoint(tmp_path / "shape.ckpt", craft)
    with pytest.raises(CheckpointError, match=rf"no valid 'data_shape' entry \(got {shape!r}\)".replace("[", r"\[")):
        load_module(path)


def test_weights_that_do_not_fit_the_network_are_counted_and_named(tmp_path):
    def craft(ckpt):
        sd = ckpt["state_dict"]
        first = next(k for k in sd if k.endswith("weight"))
        sd[first] = torch.zeros(3, 3)
        sd["net.extra.weight"] = torch.zeros(1)
        del sd[next(k for k in reversed(list(sd)) if k.endswith("bias"))]

    path = _toy_checkpoint(tmp_path / "weights.ckpt", craft)
    with pytest.raises(CheckpointError) as err:
        load_module(path)
    message = str(err.value)
    assert "its weights do not fit the network its stored config builds" in message
    assert "1 missing (" in message and "1 unexpected (net.extra.weight)" in message
    assert "1 of another shape (" in message and "(3, 3) vs" in message
    assert "\n" not in message


def test_stored_config_fills_defaults_an_older_version_did_not_write(tmp_path):
    path = _toy_checkpoint(tmp_path / "older.ckpt", lambda ckpt: ckpt["diffusion_lab_config"]["ema"].pop("start_step"))
    cfg = stored_config(torch.load(path, weights_only=True), path)
    assert cfg.ema.start_step == 0
