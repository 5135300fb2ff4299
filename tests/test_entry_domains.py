"""Every range rule of every entry point's schema holds before any work: a value outside a field's domain is a
ConfigError naming the field's full dotted key, raised by the entry point's validation function with torch blocked.

The fields are read from the composed configs and the schemas' own rules (:func:`domain_rules`), not listed here, so
a rule added to any schema (an option's constructor included) is covered without editing this file.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.cli import validate_evaluate, validate_sample, validate_train, validate_tune_grid
from diffusion_lab.schema.domains import Domain
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR
from diffusion_lab.schema.signature import domain_rules

VALIDATORS: dict[str, Callable[[DictConfig], None]] = {
    "train": validate_train,
    "sample": validate_sample,
    "evaluate": validate_evaluate,
    "tune_grid": validate_tune_grid,
}
BASE = {
    "train": [],
    "sample": ["ckpt_path=x.ckpt"],
    "evaluate": ["ckpt_path=x.ckpt"],
    "tune_grid": ["ckpt_path=x.ckpt"],
}
HEAVY = ("torch", "lightning")


@functools.cache
def composed(entry: str) -> DictConfig:
    """The entry point's default config (composed once; each example mutates a copy)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(entry, overrides=BASE[entry])


def ruled_fields(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Domain, Any]]:
    """``(dotted key, rule, node)`` of every value whose schema declares a Domain (as check_domains walks them)."""
    schema = OmegaConf.get_type(cfg)
    rules = domain_rules(schema) if isinstance(schema, type) and hasattr(schema, "__dataclass_fields__") else {}
    for key in map(str, cfg):
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            yield from ruled_fields(node, f"{prefix}{key}.")
        elif key in rules:
            yield f"{prefix}{key}", rules[key], node


_TEXT = st.text(max_size=20).filter(lambda s: "$" not in s and "\\" not in s)  # no interpolations
_SCALARS: dict[type, st.SearchStrategy[Any]] = {
    int: st.one_of(st.integers(), st.sampled_from([-1, 0, 1, 2, 2**32, 2**63, 2**64 - 1, 2**64])),
    float: st.floats(allow_nan=True, allow_infinity=True),
    str: _TEXT,
}


def values_of(node: Any) -> st.SearchStrategy[Any]:
    """Values of the node's declared type (a list node: lists of its element type)."""
    if isinstance(node, ListConfig):
        return st.lists(_SCALARS[node._metadata.element_type], max_size=4)
    return _SCALARS[node._metadata.ref_type]


FIELDS = [(entry, key) for entry in VALIDATORS for key, _, _ in ruled_fields(composed(entry))]


@contextlib.contextmanager
def torch_blocked() -> Iterator[None]:
    """``import torch`` / ``import lightning`` raise ImportError inside the block (None in sys.modules)."""
    saved = {name: sys.modules.get(name) for name in HEAVY}
    sys.modules.update(dict.fromkeys(HEAVY))
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_every_entry_point_has_ruled_fields_of_its_own() -> None:
    keys = {entry: {k for e, k in FIELDS if e == entry} for entry in VALIDATORS}
    assert {"optim.lr", "eval.num_samples", "seed", "model.in_channels"} <= keys["train"]
    assert {"batch_size", "num_samples", "seed", "device", "class_labels", "guidance_scale"} <= keys["sample"]
    assert {"scores", "num_examples", "split", "ode_rtol", "num_samples", "seed", "device"} <= keys["evaluate"]
    assert {"num_draws", "reference_rtol", "seed", "device"} <= keys["tune_grid"]


@pytest.mark.parametrize(("entry", "key"), FIELDS, ids=[f"{e}:{k}" for e, k in FIELDS])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_value_outside_its_domain_is_refused_naming_the_key_before_torch(entry: str, key: str, data: Any) -> None:
    rule, node = next((r, n) for k, r, n in ruled_fields(composed(entry)) if k == key)
    value = data.draw(values_of(node).filter(lambda v: not rule.test(v)), label=key)
    cfg = composed(entry).copy()
    OmegaConf.update(cfg, key, value, merge=False)
    with torch_blocked(), pytest.raises(ConfigError) as err:
        VALIDATORS[entry](cfg)
    assert str(err.value).startswith(f"{key}="), str(err.value)
    assert f"valid: {rule.valid}" in str(err.value)


def test_the_default_configs_validate_without_importing_torch() -> None:
    """A fresh interpreter: the four validation functions pass the defaults (the jobs') without torch; train's
    torch-free checks (check_hardware, the domains) too."""
    probe = textwrap.dedent(
        """
        import sys
        from hydra import compose, initialize_config_dir
        from diffusion_lab.cli import check_hardware, validate_evaluate, validate_sample, validate_tune_grid
        from diffusion_lab.config import check_domains
        from diffusion_lab.schema.registry import CONFIG_DIR
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            for name, check in [("sample", validate_sample), ("evaluate", validate_evaluate),
                                ("tune_grid", validate_tune_grid)]:
                check(compose(name, overrides=["ckpt_path=x.ckpt"]))
            train = compose("train")
            check_hardware(train)
            check_domains(train)
        print("torch imported:", "torch" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch imported: False" in proc.stdout


def _cfg(entry: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(entry, overrides=[*BASE[entry], *overrides])


def test_the_null_label_is_not_a_class_to_ask_for_and_labels_are_checked_before_the_module_is_built(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusion_lab.checkpoint_jobs as checkpoint_jobs
    import diffusion_lab.checkpoint_loading as checkpoint_loading
    from diffusion_lab.sample import run

    monkeypatch.setattr(checkpoint_jobs, "checkpoint_conditioning", lambda path: (10, 0.1))  # a 10-class model
    monkeypatch.setattr(checkpoint_loading, "load_module", lambda *a, **k: pytest.fail("module built"))
    with pytest.raises(ConfigError, match=r"^class_labels=\[10\]: valid labels are 0\.\.9 \(this model's classes\)"):
        run(_cfg("sample", ["class_labels=[10]"]), tmp_path)
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.num_samples=1"], "eval.num_samples=1 is out of range; valid: 0 (no sample evaluation) or an integer"),
        (["metrics=fid", "eval.num_samples=4"], "eval.num_samples=4 is below metrics.isc_splits=10"),
        (["model.in_channels=3"], "model.in_channels=3, but dataset=DigitsDataModule gives samples of shape (1, 8, 8)"),
        (["model=mlp"], "model.dim=2, but dataset=DigitsDataModule gives samples of shape (1, 8, 8)"),
        (
            ["experiment=toy2d", "model=unet_digits"],
            "model=diffusion_lab.models.UNet takes images (C, H, W), but dataset=Toy2DDataModule",
        ),
        (["seed=4294967296"], "seed=4294967296 is out of range; valid: an integer in [0, 4294967295]"),
    ],
)
def test_training_refuses_what_would_fail_after_it_started(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_train(_cfg("train", overrides))
    assert str(err.value).startswith(message), str(err.value)


def test_an_rgb_image_folder_refuses_a_one_channel_network(tmp_path: Any) -> None:
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "0.png")  # grayscale files: the folder still serves RGB
    overrides = ["dataset=image_folder", f"dataset.root={tmp_path}", "dataset.resolution=8", "metrics=none",
                 "model.in_channels=1"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"^model\.in_channels=1, but dataset=\w+ gives samples of shape \(3, 8, 8\); "
                       r"valid: 3"):  # fmt: skip
        validate_train(_cfg("train", overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scores=[bpd]", "ref_stats_only=true"], "ref_stats_only=true needs fid in scores, got scores=['bpd']"),
        (["scores=[fid]", "num_samples=5"], "num_samples=5 is below metrics.isc_splits=10"),
        (["scores=[fid]", "num_samples=5", "metrics.isc=false"], None),
        (["split=test"], "split=test is out of range; valid: one of ['train', 'val']"),
    ],
)
def test_evaluate_refuses_impossible_score_requests_before_loading(overrides: list[str], message: str | None) -> None:
    cfg = _cfg("evaluate", overrides)
    if message is None:
        validate_evaluate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate_evaluate(cfg)
    assert str(err.value).startswith(message), str(err.value)
