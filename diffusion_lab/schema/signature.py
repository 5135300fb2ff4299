"""Structured schemas derived from a class's typed constructor, read from its source (no import).

``schema_of("diffusion_lab.diffusion.schedules.LinearSchedule")`` is a dataclass with a ``_target_`` field and one
field per constructor parameter: its annotation as the type (an enum lists its values, ``Annotated[T, rule]``
carries a :class:`~diffusion_lab.schema.domains.Domain` as field metadata) and its default. A constructor that
ends in ``**kwargs`` also takes its base class's parameters, so an option shared by a family (the samplers' grid
options) is declared once, in the base class.

The source is parsed with :mod:`ast` instead of importing the class, so composing and validating a config never
imports torch or Lightning (a typo is reported in about a second). Names an annotation uses must come from
:mod:`typing`, the builtins, :mod:`diffusion_lab.schema.choices` or :mod:`diffusion_lab.schema.domains`. A
parameter of any other type (a tensor, a callable, a schedule object) is an object, not a setting: with a default it
is left out of the schema (the code that builds the class hands it over), without one it is an untyped node the
YAML fills (``ShiftedSchedule.base``). ``Enum | str`` (an enum that also takes its values as strings) is the enum,
and a parameter a subclass re-declares only to change its default keeps the base class's rule.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import enum
import functools
import importlib.util
import inspect
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from diffusion_lab.schema import choices, domains

# What an annotation or a default may name; anything else is not a config type.
_NAMESPACE: dict[str, Any] = {
    **vars(builtins),
    **{name: getattr(typing, name) for name in ("Any", "Annotated", "Literal", "Optional", "Union")},
    **{k: v for k, v in vars(choices).items() if not k.startswith("_")},
    **{k: v for k, v in vars(domains).items() if not k.startswith("_")},
    "math": math,
    "Sequence": list,
}


class SchemaError(TypeError):
    """A constructor the config layer cannot turn into a schema (a bug in the option's class, not in a config)."""


@functools.cache
def _module_source(module: str) -> tuple[ast.Module, bool]:
    """The parsed source of ``module`` and whether it is a package, found on disk without importing it."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # imports nothing below the top-level package
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if spec is not None and not spec.submodule_search_locations and not rest and origin and origin.suffix == ".py":
        return ast.parse(origin.read_text(encoding="utf-8"), str(origin)), False  # a top-level module's file
    if spec is None or not spec.submodule_search_locations:
        raise SchemaError(f"cannot find the source of {module!r}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    for file, is_package in ((path / "__init__.py", True), (path.with_suffix(".py"), False)):
        if file.is_file():
            return ast.parse(file.read_text(encoding="utf-8"), str(file)), is_package
    raise SchemaError(f"no source file for module {module!r} (looked for {path}.py and {path}/__init__.py)")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module an ``from … import`` inside ``module`` names (relative imports resolved)."""
    if not node.level:
        return str(node.module)
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, name: str) -> tuple[str, str] | None:
    """``(source module, name there)`` of the top-level ``from … import`` that binds ``name`` in ``module``."""
    tree, is_package = _module_source(module)
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    return _absolute(module, is_package, stmt), alias.name
    return None


def _find_class(module: str, name: str) -> tuple[str, ast.ClassDef]:
    """The class statement of ``module.name``, following ``from … import name`` re-exports."""
    for stmt in _module_source(module)[0].body:
        if isinstance(stmt, ast.ClassDef) and stmt.name == name:
            return module, stmt
    if (source := _imported(module, name)) is not None:
        return _find_class(*source)
    raise SchemaError(f"class {name!r} not found in {module}")


def _resolve_base(module: str, base: ast.expr) -> tuple[str, ast.ClassDef] | None:
    """A base class defined in this project or the option's own package (None for outside ones such as
    ``nn.Module`` or ``LightningDataModule``, whose parameters are not settings)."""
    if not isinstance(base, ast.Name):
        return None
    source = _imported(module, base.id)
    if source is not None and source[0].split(".")[0] not in {module.split(".")[0], __name__.split(".")[0]}:
        return None
    try:
        return _find_class(module, base.id)
    except SchemaError:
        return None


# The type of a parameter that is not a config value (a tensor, a schedule object, a callable).
_OBJECT = object()


def _free_names(node: ast.expr) -> set[str]:
    """The names an expression reads (a lambda's own arguments excluded)."""
    bound = {a.arg for n in ast.walk(node) if isinstance(n, ast.Lambda) for a in n.args.args}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - bound


def _evaluate(node: ast.expr | None, where: str) -> Any:
    """An annotation as a type; names outside :data:`_NAMESPACE` make it :data:`_OBJECT`. An enum that also admits
    its values as strings (``Grid | str``) is the enum."""
    if node is None:
        return Any
    if not _free_names(node) <= _NAMESPACE.keys():
        return _OBJECT
    try:
        annotation = eval(compile(ast.Expression(node), where, "eval"), dict(_NAMESPACE))
    except Exception as err:
        raise SchemaError(f"{where}: cannot read annotation {ast.unparse(node)!r}: {err}") from err
    members = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) else set()
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if len(enums) == 1 and str in members:
        return enums[0] | None if type(None) in members else enums[0]
    return annotation


def _constant(module: str, name: str) -> Any:
    """The literal value of the top-level constant ``name`` of ``module`` (followed through imports within the
    project); ``KeyError`` if there is none."""
    for stmt in _module_source(module)[0].body:
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ast.literal_eval(stmt.value)
    source = _imported(module, name)
    if source is not None and source[0].split(".")[0] == module.split(".")[0]:
        return _constant(*source)
    raise KeyError(name)


def _default(node: ast.expr | None, module: str, where: str) -> Any:
    """A default value (a literal, a module constant, an enum member, ``math.inf``); no default is ``MISSING``."""
    if node is None:
        return MISSING
    try:
        constants = {name: _constant(module, name) for name in _free_names(node) - _NAMESPACE.keys()}
        namespace = {**_NAMESPACE, **constants}
        return eval(compile(ast.Expression(node), where, "eval"), namespace)
    except Exception as err:
        raise SchemaError(f"{where}: the default {ast.unparse(node)!r} is not a config value: {err}") from err


def _field(annotation: Any, default: Any) -> tuple[Any, Any]:
    """The dataclass type and ``field`` of one parameter; ``Annotated`` metadata becomes the field's domain."""
    metadata: dict[str, Any] = {}
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        rules = [e for e in extras if isinstance(e, domains.Domain)]
        if rules:
            metadata["domain"] = rules[0]
    if typing.get_origin(annotation) in (tuple, list) or annotation is list:
        args = typing.get_args(annotation)
        annotation = list.__class_getitem__(args[0]) if args else list  # OmegaConf: a ListConfig
    if isinstance(default, (list, dict, tuple)):
        value = list(default) if isinstance(default, tuple) else default
        return annotation, dataclasses.field(default_factory=lambda: value.copy(), metadata=metadata)
    return annotation, dataclasses.field(default=default, metadata=metadata)


def _with_metadata(own: Any, metadata: Any) -> Any:
    """A copy of the field ``own`` with other metadata."""
    if own.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=own.default_factory, metadata=metadata)
    return dataclasses.field(default=own.default, metadata=metadata)


def _parameters(module: str, cls: ast.ClassDef) -> dict[str, tuple[Any, Any]]:
    """``name -> (type, field)`` of the constructor of ``cls``, in signature order, base parameters merged."""
    init = next((s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    bases = [b for b in (_resolve_base(module, base) for base in cls.bases) if b is not None]
    if init is None:  # inherits its constructor
        return _parameters(*bases[0]) if bases else {}
    where = f"{module}.{cls.name}.__init__"
    args = init.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params: dict[str, tuple[Any, Any]] = {}
    for arg, default in [*zip(positional, defaults, strict=True), *zip(args.kwonlyargs, args.kw_defaults, strict=True)]:
        annotation = _evaluate(arg.annotation, where)
        if arg.arg == "self" or (annotation is _OBJECT and default is not None):
            continue  # an object handed over by the code that builds the class (e.g. a metric's log_prob)
        params[arg.arg] = _field(Any if annotation is _OBJECT else annotation, _default(default, module, where))
    inherited = _parameters(*bases[0]) if bases else {}
    for name, (annotation, own) in params.items():  # a parameter re-declared in a subclass keeps the base's rule
        if name in inherited and "domain" not in own.metadata and "domain" in inherited[name][1].metadata:
            params[name] = (annotation, _with_metadata(own, inherited[name][1].metadata))
    if args.kwarg is not None:  # **kwargs: handed to the base class, whose parameters it takes
        params = {**{k: v for k, v in inherited.items() if k not in params}, **params}
    return params


@functools.cache
def schema_of(target: str) -> type:
    """The structured schema of the class at import path ``target`` (see the module doc)."""
    module, _, name = target.rpartition(".")
    found_in, cls = _find_class(module, name)
    fields = [(k, t, f) for k, (t, f) in _parameters(found_in, cls).items()]
    return dataclasses.make_dataclass(f"{name}Config", [("_target_", str, dataclasses.field(default=target)), *fields])


def enforce_domains(init: Callable[..., None]) -> Callable[..., None]:
    """Check a constructor's arguments against the domains its annotations declare (the rules the config layer
    checks before composing), so building the class from Python enforces the same ranges."""
    signature = inspect.signature(init)
    owner = f"{init.__module__}.{init.__qualname__.rsplit('.', 1)[0]}"

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        for name, rule in domain_rules(schema_of(owner)).items():
            value = bound.arguments.get(name)
            if (error := rule.argument_error(type(self).__name__, name, value)) is not None:
                raise ValueError(error)
        init(self, *args, **kwargs)

    return checked


@functools.cache
def domain_rules(schema: type) -> dict[str, domains.Domain]:
    """``field -> Domain`` of a schema: a derived one keeps them as field metadata, a written one in its
    ``Annotated`` field types."""
    hints = typing.get_type_hints(schema, include_extras=True)
    rules = {}
    for field in dataclasses.fields(schema):
        hint = hints[field.name]
        extras = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
        found = [e for e in (field.metadata.get("domain"), *extras) if isinstance(e, domains.Domain)]
        if found:
            rules[field.name] = found[0]
    return rules
