"""The project's registries: the options of each config group, and the one way a config node becomes an object.

An option is a YAML file ``conf/<group>/<name>.yaml`` naming its class (``_target_``). Those files are the registry:
:func:`build_option` builds a node only when every ``_target_`` in it (the node's own and any nested one, such as a
shifted schedule's ``base``) is the class of an option of that group, and the node carries none of Hydra's other
special keys (``_args_``, ``_partial_``, ``_convert_``, ``_recursive_``). A config read from a file (a checkpoint's
stored config, a grid record, a summary) therefore chooses among the project's options and never names code of its
own: a crafted ``sampler._target_: builtins.open`` is refused before anything is imported or called.

Torch-free: Hydra's ``instantiate`` (which imports the option's class) is imported inside :func:`build_option`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.signature import schema_of

# The repository's conf/ (editable install), or the copy a wheel carries inside the package.
_PACKAGED_CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parents[2] / "conf")
# The groups whose options are classes (one ``_target_`` each); the other groups set fields of TrainConfig.
OPTION_GROUPS = (
    "schedule", "parameterization", "weighting", "time_sampler", "sampler", "model", "dataset", "metrics", "prior",
    "coupling",
)  # fmt: skip
TARGET = "_target_"


@functools.cache
def option_files(group: str) -> dict[str, dict[str, Any]]:
    """``name -> YAML contents`` of every option of ``group`` (the files are small; reading them takes ms)."""
    files = sorted(Path(CONFIG_DIR, group).glob("*.yaml"))
    return {f.stem: yaml.safe_load(f.read_text(encoding="utf-8")) or {} for f in files}


def option_names(group: str) -> list[str]:
    """The options of ``group`` (``conf/<group>/*.yaml``)."""
    return list(option_files(group))


@dataclasses.dataclass
class NoTarget:
    """The schema of an option that builds nothing (``metrics=none``: ``_target_: null``)."""

    _target_: Any = None


def option_schema(group: str, name: str) -> type:
    """The schema of option ``name`` of ``group``: derived from the class its YAML names."""
    if name not in option_files(group):
        raise ConfigError(f"unknown {group} option {name!r}; valid choices: {option_names(group)}")
    target = option_files(group)[name].get("_target_")
    return schema_of(target) if target else NoTarget


def option_config(group: str, name: str) -> DictConfig:
    """Option ``name`` of ``group`` as composing ``<group>=<name>`` gives it (schema + the YAML's values)."""
    values = {k: v for k, v in option_files(group)[name].items() if k != "defaults"}
    return OmegaConf.merge(OmegaConf.structured(option_schema(group, name)), values)  # type: ignore[return-value]


@functools.cache
def option_targets(group: str) -> dict[str, str]:
    """``class path -> option name`` of every option of ``group`` that builds something (``metrics=none`` does not)."""
    if group not in OPTION_GROUPS:
        raise ConfigError(f"unknown option group {group!r}; valid groups: {list(OPTION_GROUPS)}")
    return {str(spec[TARGET]): name for name, spec in option_files(group).items() if spec.get(TARGET)}


def check_targets(group: str, node: Any, key: str | None = None) -> None:
    """Refuse a node of ``group`` (set at ``key``, default the group's name) unless each ``_target_`` in it is the
    class of one of the group's options and it carries no other Hydra special key; raise :class:`ConfigError` naming
    the key, the value and the valid options."""
    key = key or group
    if isinstance(node, Mapping | DictConfig):
        if TARGET not in node or node[TARGET] is None:
            raise ConfigError(f"{key}: no {TARGET}; valid: one of the {group} options {_valid(group)}")
        _walk(group, node, key)
        return
    raise ConfigError(f"{key}={node!r} is not a {group} config node; valid: one of the {group} options {_valid(group)}")


def _walk(group: str, node: Any, key: str) -> None:
    """Check every mapping below ``node`` (itself included): targets registered, no other special keys."""
    if isinstance(node, Mapping | DictConfig):
        for sub in node:
            sub_key, value = f"{key}.{sub}", node[sub]
            if sub == TARGET:
                if not isinstance(value, str) or value not in option_targets(group):
                    raise ConfigError(
                        f"{sub_key}={value!r} is not the class of a {group} option of this project (a config read "
                        f"from a file selects code only through the project's registries); valid: {_valid(group)}"
                    )
            elif isinstance(sub, str) and sub.startswith("_") and sub.endswith("_"):
                raise ConfigError(f"{sub_key}: Hydra's special key {sub!r} is not accepted here; valid: {TARGET}")
            else:
                _walk(group, value, sub_key)
    elif isinstance(node, list | tuple | ListConfig):
        for i, item in enumerate(node):
            _walk(group, item, f"{key}[{i}]")


def _valid(group: str) -> str:
    """``name (class), …`` of the group's buildable options, for error messages."""
    return ", ".join(f"{group}={name} ({target})" for target, name in sorted(option_targets(group).items()))


def build_option(group: str, node: Any, key: str | None = None, extra: Mapping[str, Any] | None = None) -> Any:
    """Build ``node`` (a config of ``group``'s option, set at ``key``) after :func:`check_targets`; ``extra`` are
    constructor arguments given by the caller (e.g. a metric's ``log_prob``). A constructor's error becomes a
    :class:`ConfigError` naming the key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    check_targets(group, node, key)
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(dict(node))
    try:
        return instantiate(node, **(extra or {}))
    except InstantiationException as err:
        raise ConfigError(f"{key or group}: {err.__cause__ or err}") from err


def option_class(group: str, node: Any, key: str | None = None) -> type:
    """The class a checked node of ``group`` names (imported through the registry's own class path)."""
    from hydra.utils import get_class

    check_targets(group, node, key)
    return get_class(str(node[TARGET]))
