"""Schemas derived from constructor signatures (diffusion_lab/schema/signature.py): read from the source without
importing, they must agree with the imported class's own signature, carry enums and domain rules, and merge a base
class's parameters through ``**options``."""

import dataclasses
import enum
import inspect
import math

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from diffusion_lab import config
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, EDMSampler
from diffusion_lab.schema import registry
from diffusion_lab.schema.choices import Grid
from diffusion_lab.schema.domains import POSITIVE_INT
from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.signature import SchemaError, domain_rules, schema_of

# Constructor parameters that are objects handed over by the code (not settings), left out of every schema.
OBJECT_PARAMETERS = {"log_prob"}


def _runtime_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The constructor parameters of the imported ``cls``, following ``**kwargs`` into the next base's."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if not klass.__module__.startswith("diffusion_lab"):
            return params  # nn.Module, LightningDataModule, object: not options
        if init is None:
            continue
        own = list(inspect.signature(init).parameters.values())[1:]
        params = {**{p.name: p for p in own if p.kind is not p.VAR_KEYWORD}, **params}
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            return params
    return params


OPTIONS = [(g, n) for g in registry.OPTION_GROUPS for n in registry.option_names(g) if g != "metrics" or n != "none"]


@pytest.mark.parametrize(("group", "name"), OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_the_schema_read_from_source_matches_the_imported_signature(group, name):
    schema = registry.option_schema(group, name)
    target = OmegaConf.structured(schema)._target_
    runtime = _runtime_parameters(get_class(target))
    derived = {f.name: f for f in dataclasses.fields(schema) if f.name != "_target_"}
    assert set(runtime) - set(derived) <= OBJECT_PARAMETERS
    assert set(derived) <= set(runtime)
    for field_name, f in derived.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        expected = runtime[field_name].default
        if expected is inspect.Parameter.empty:
            assert default == "???", field_name  # required: the YAML must give it
        elif isinstance(expected, tuple):
            assert default == list(expected), field_name
        elif isinstance(expected, float) and math.isinf(expected):
            assert default == expected
        else:
            assert default == expected and type(default) is type(expected), field_name


def test_grid_options_are_declared_once_and_reach_every_stepping_sampler():
    base = {f.name for f in dataclasses.fields(schema_of("diffusion_lab.samplers.base.Sampler"))} - {"_target_"}
    assert base == {"steps", "grid", "clip_x0", "rho", "sigma_min", "sigma_max"}
    for cls in (DDIMSampler, DDPMSampler, EDMSampler):
        fields = {f.name: f for f in dataclasses.fields(schema_of(f"diffusion_lab.samplers.{cls.__name__}"))}
        assert base <= set(fields)
        assert domain_rules(schema_of(f"diffusion_lab.samplers.{cls.__name__}"))["steps"] is POSITIVE_INT  # kept
    edm = schema_of("diffusion_lab.samplers.EDMSampler")
    assert OmegaConf.structured(edm).grid == Grid.karras and OmegaConf.structured(edm).steps == 256


def test_an_enum_parameter_lists_its_values_and_a_str_union_is_the_enum():
    node = OmegaConf.structured(schema_of("diffusion_lab.samplers.DDIMSampler"))
    node.grid = "karras"
    assert node.grid is Grid.karras
    with pytest.raises(ValidationError, match="uniform, leading, trailing, karras"):
        node.grid = "karas"
    assert issubclass(dataclasses.fields(schema_of("diffusion_lab.samplers.DDPMSampler"))[-1].type, enum.Enum)


def test_a_domain_rule_fires_at_construction_with_the_class_and_parameter():
    with pytest.raises(ValueError, match=r"DDIMSampler: steps=0 is not a positive integer; valid: an integer >= 1"):
        DDIMSampler(0)
    with pytest.raises(ValueError, match=r"DDIMSampler: eta=-1 is not non-negative"):
        DDIMSampler(eta=-1)
    assert DDIMSampler(3, eta=0.5, grid="karras", rho=5.0).grid_options.rho == 5.0


def test_a_config_node_with_an_out_of_range_value_names_the_full_key():
    cfg = OmegaConf.create({"sampler": OmegaConf.structured(schema_of("diffusion_lab.samplers.DDIMSampler"))})
    cfg.sampler.steps = 0
    with pytest.raises(ConfigError, match=r"^sampler.steps=0 is out of range; valid: an integer >= 1$"):
        config.check_domains(cfg)


def test_a_base_class_outside_the_project_adds_no_fields():
    fields = [f.name for f in dataclasses.fields(schema_of("tests.example_schedule.EncoderOptions"))]
    assert fields == ["_target_", "depth"]  # not json.JSONEncoder's skipkeys, indent, …


def test_a_target_without_python_source_is_a_schema_error():
    with pytest.raises(SchemaError, match="cannot find the source of 'abc'"):  # a frozen standard-library module
        schema_of("abc.ABC")
