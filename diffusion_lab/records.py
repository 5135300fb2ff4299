"""The one reader of the JSON records the project reads back (grid records, ``summary.json``, ``metrics.json``, …).

:func:`read_record` returns the file's top-level object after checking it against a schema of required (and
optional) keys with their types; every failure is one :class:`RecordError` whose message names the file and says
what is wrong: not readable, not UTF-8, not JSON (truncated at byte N, or the byte where parsing stopped), not a JSON
object, another format version, a missing key, or a key of the wrong type. Nested keys are written with dots
(``"checkpoint.sha256"``). Nothing in a record chooses code: it is plain data, checked before it is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RecordError", "Schema", "TypeSpec", "check_record", "is_number", "read_record", "short_repr", "type_name"]

TypeSpec = type | tuple[type, ...]  # what a key may hold: one type or a tuple of them (``type(None)`` for null)
Schema = Mapping[str, TypeSpec]  # dotted key -> its type(s)

_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


class RecordError(ValueError):
    """A JSON record that cannot be used; the message names the file, what it is, and what is wrong.

    Attributes:
        path: the file.
        problems: one line per problem (``"missing key 'steps'"``, ``"truncated at byte 120 of 120"``, …).
    """

    def __init__(self, path: str | Path, what: str, problems: list[str], fix: str | None = None) -> None:
        self.path, self.what, self.problems, self.fix = Path(path), what, list(problems), fix
        tail = f"; {fix}" if fix else ""
        super().__init__(f"{what} {path}: {'; '.join(self.problems)}{tail}")


def type_name(spec: TypeSpec | None) -> str:
    """JSON's name of a type or of each type of a tuple: ``(int, type(None))`` -> ``"integer or null"``."""
    if spec is None or spec is type(None):
        return "null"
    if isinstance(spec, tuple):
        return " or ".join(type_name(t) for t in spec)
    return _JSON_NAMES.get(spec, spec.__name__)


def is_number(value: Any) -> bool:
    """A JSON number: an int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _matches(value: Any, spec: TypeSpec) -> bool:
    """``isinstance`` as JSON means it: a bool is no integer or number, an integer is a number."""
    specs = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool):
        return bool in specs
    if isinstance(value, int) and float in specs:
        return True
    return isinstance(value, specs)


def _decode(data: bytes) -> tuple[Any, str | None]:
    """The parsed JSON of ``data``, or None and what is wrong (byte offsets, not character offsets)."""
    if not data.strip():
        return None, f"empty ({len(data)} bytes), not JSON"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data":
            return None, f"not valid JSON: truncated at byte {len(data)} (inside a UTF-8 character)"
        return None, f"not UTF-8 text (byte {err.start}), not JSON"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        if _cut_short(text, err):
            return None, f"not valid JSON: truncated at byte {len(data)} ({err.msg})"
        at = len(text[: err.pos].encode())
        return None, f"not valid JSON at byte {at} (line {err.lineno}, column {err.colno}): {err.msg}"


def _cut_short(text: str, err: json.JSONDecodeError) -> bool:
    """Whether the parse failed because the text stops early: at the end, in an unterminated string, or in the
    last token (``tr``, ``1.``, ``\\u00``: nothing but that token follows the error)."""
    if err.msg == "Extra data":  # a complete value with more after it
        return False
    rest = text[err.pos :]
    return err.msg.startswith("Unterminated string") or not any(c.isspace() or c in '{}[],:"' for c in rest)


def _lookup(record: Mapping[str, Any], dotted: str) -> tuple[bool, Any, str | None]:
    """``(found, value, bad parent)`` of a dotted key: the value when every part is there; else the first parent
    that is not an object (it is returned as the value), or None when a part is simply absent."""
    node: Any = record
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            return False, node, ".".join(parts[:depth])
        if part not in node:
            return False, None, None
        node = node[part]
    return True, node, None


def check_record(record: Mapping[str, Any], required: Schema, optional: Schema | None = None) -> list[str]:
    """Every missing required key and every key (required, or optional and present) of the wrong type, one line
    each (empty: the record fits); a key is reported once, and not again for the keys below it. Writers call it on
    what they are about to write; :func:`read_record` on what it read."""
    problems: list[str] = []
    reported: set[str] = set()
    for schema, needed in ((required, True), (optional or {}, False)):
        for key, spec in schema.items():
            found, value, bad_parent = _lookup(record, key)
            if bad_parent is not None:
                if bad_parent not in reported:
                    problems.append(f"key {bad_parent!r} is {type_name(type(value))}, expected object")
                reported.add(bad_parent)
            elif not found and needed:
                problems.append(f"missing key {key!r} ({type_name(spec)})")
            elif found and not _matches(value, spec):
                got = f"{type_name(type(value))} ({short_repr(value)})"
                problems.append(f"key {key!r} is {got}, expected {type_name(spec)}")
                reported.add(key)
    return problems


def short_repr(value: Any, width: int = 60) -> str:
    """``repr`` of a value cut to ``width`` characters (a record's bad value, quoted in a message)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def read_record(
    path: str | Path,
    required: Schema,
    what: str,
    *,
    optional: Schema | None = None,
    version: tuple[str, str] | None = None,
    fix: str | None = None,
) -> dict[str, Any]:
    """Read the JSON object in ``path`` and check it.

    Args:
        path: the file.
        required: ``{dotted key: type or tuple of types}`` every record must hold (``float`` accepts integers;
            ``bool`` is never an integer).
        what: what the file is, for messages (``"tuned grid record"``, ``"run summary"``).
        optional: keys that may be absent but, when present, must have these types.
        version: ``(key, expected)``: the record's format key and value, checked first (another format's keys
            are not reported one by one).
        fix: what to do about a bad file (appended to the message, e.g. the command that writes it again).

    Returns:
        The record (a dict).

    Raises:
        RecordError: the file cannot be read, is not a JSON object, is another format, lacks a required key or
            holds a key of the wrong type; every problem is listed, with the file's path.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecordError(path, what, [f"cannot be read ({err.strerror or err})"], fix) from err
    record, problem = _decode(data)
    if problem is not None:
        raise RecordError(path, what, [problem], fix)
    if not isinstance(record, dict):
        raise RecordError(path, what, [f"holds a JSON {type_name(type(record))}, expected an object"], fix)
    if version is not None:
        key, expected = version
        if record.get(key) != expected:
            found = f"{key} {record[key]!r}" if key in record else f"no {key!r} key"
            raise RecordError(path, what, [f"{found}, expected {key} {expected!r}"], fix)
    problems = check_record(record, required, optional)
    if problems:
        raise RecordError(path, what, problems, fix)
    return record
