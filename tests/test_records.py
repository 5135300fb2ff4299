"""diffusion_lab.records.read_record: every way a JSON record can be wrong is one RecordError naming the file and the
problem (generated over every key of a schema × {missing, wrong type}, and over every byte offset of truncation)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_lab.records import RecordError, check_record, read_record, short_repr, type_name

SCHEMA = {
    "name": str,
    "steps": int,
    "lr": float,
    "ema": bool,
    "grid": list,
    "sampler": dict,
    "checkpoint.sha256": str,
    "checkpoint.global_step": (int, type(None)),
}
VALID: dict[str, Any] = {
    "format": "example/1",
    "name": "run",
    "steps": 5,
    "lr": 1,  # an integer is a JSON number
    "ema": False,
    "grid": [1.0, 0.0],
    "sampler": {"order": 2},
    "checkpoint": {"sha256": "ab" * 32, "global_step": None},
    "extra": "kept as is",
}
# One value of each JSON type; a key's wrong value is the first one its type(s) do not accept.
SAMPLES: list[Any] = [True, 3, 2.5, "text", [1], {"a": 1}, None]


def _write(tmp_path: Path, record: Any) -> Path:
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def _without(record: dict[str, Any], dotted: str) -> dict[str, Any]:
    out = json.loads(json.dumps(record))
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[last]
    return out


def _with(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(record))
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def _wrong_value(spec: Any) -> Any:
    specs = spec if isinstance(spec, tuple) else (spec,)
    accepted = [v for v in SAMPLES if not check_record({"k": v}, {"k": spec})]
    wrong = next(v for v in SAMPLES if v not in accepted or type(v) not in (*specs, int, float))
    assert check_record({"k": wrong}, {"k": spec}), (spec, wrong)
    return wrong


def test_a_valid_record_reads_back_whole(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID)
    assert read_record(path, SCHEMA, "example", version=("format", "example/1")) == VALID


@pytest.mark.parametrize("key", list(SCHEMA))
def test_each_missing_key_is_named_with_its_type(tmp_path: Path, key: str) -> None:
    path = _write(tmp_path, _without(VALID, key))
    with pytest.raises(RecordError) as err:
        read_record(path, SCHEMA, "example record")
    assert err.value.problems == [f"missing key {key!r} ({type_name(SCHEMA[key])})"]
    assert str(err.value).startswith(f"example record {path}: missing key {key!r}")


@pytest.mark.parametrize("key", list(SCHEMA))
def test_each_key_of_the_wrong_type_is_named_with_both_types(tmp_path: Path, key: str) -> None:
    wrong = _wrong_value(SCHEMA[key])
    path = _write(tmp_path, _with(VALID, key, wrong))
    with pytest.raises(RecordError) as err:
        read_record(path, SCHEMA, "example record", fix="write it again")
    (problem,) = err.value.problems
    assert problem == f"key {key!r} is {type_name(type(wrong))} ({wrong!r}), expected {type_name(SCHEMA[key])}"
    assert str(err.value) == f"example record {path}: {problem}; write it again"


def test_a_bool_is_not_an_integer_and_an_integer_is_a_number() -> None:
    assert check_record({"n": True}, {"n": int}) == ["key 'n' is boolean (True), expected integer"]
    assert check_record({"x": 3}, {"x": float}) == []
    assert check_record({"x": None}, {"x": (int, type(None))}) == []


def test_a_parent_that_is_not_an_object_is_named_once(tmp_path: Path) -> None:
    path = _write(tmp_path, _with(VALID, "checkpoint", [1, 2]))
    with pytest.raises(RecordError) as err:
        read_record(path, SCHEMA, "example")
    assert err.value.problems == ["key 'checkpoint' is array, expected object"]


def test_optional_keys_are_checked_only_when_present(tmp_path: Path) -> None:
    path = _write(tmp_path, {"metrics": {}, "tags": "a,b"})
    assert read_record(path, {"metrics": dict}, "summary", optional={"name": str})["tags"] == "a,b"
    with pytest.raises(RecordError, match=r"key 'tags' is string \('a,b'\), expected array"):
        read_record(path, {"metrics": dict}, "summary", optional={"tags": list})


def test_another_format_version_is_reported_instead_of_its_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, {"format": "example/0"})
    with pytest.raises(RecordError) as err:
        read_record(path, SCHEMA, "example", version=("format", "example/1"))
    assert err.value.problems == ["format 'example/0', expected format 'example/1'"]
    with pytest.raises(RecordError, match="no 'format' key, expected format 'example/1'"):
        read_record(_write(tmp_path, {}), SCHEMA, "example", version=("format", "example/1"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_record_cut_at_any_byte_is_truncated_at_that_byte(tmp_path: Path, data: st.DataObject) -> None:
    text = json.dumps(VALID | {"note": "café ☕ \"quoted\" \\ 1e-5"}, indent=data.draw(st.sampled_from([None, 2])),
                      ensure_ascii=data.draw(st.booleans()))  # fmt: skip
    raw = text.encode()
    cut = data.draw(st.integers(min_value=1, max_value=len(raw) - 1))
    path = tmp_path / "cut.json"
    path.write_bytes(raw[:cut])
    cut_short = rf"^example {re.escape(str(path))}: not valid JSON: truncated at byte {cut} "
    with pytest.raises(RecordError, match=cut_short):
        read_record(path, SCHEMA, "example")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", r"empty \(0 bytes\), not JSON"),
        (b"  \n", r"empty \(3 bytes\), not JSON"),
        (b'{"a": 1} trailing', r"not valid JSON at byte 9 \(line 1, column 10\): Extra data"),
        (b'{"a": 1,, "b": 2}', r"not valid JSON at byte 8 \(line 1, column 9\)"),
        (b'{"a": "\xff"}', r"not UTF-8 text \(byte 7\), not JSON"),
        (b"[1, 2]", "holds a JSON array, expected an object"),
        (b"null", "holds a JSON null, expected an object"),
    ],
)
def test_what_is_not_a_json_object_says_where(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=rf"^summary {re.escape(str(path))}: {problem}"):
        read_record(path, {}, "summary")


def test_a_missing_or_unreadable_file_is_a_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"summary .*absent\.json: cannot be read \(No such file or directory\)"):
        read_record(tmp_path / "absent.json", {}, "summary")
    with pytest.raises(RecordError, match=r"cannot be read \(Is a directory\)"):
        read_record(tmp_path, {}, "summary")


def test_a_record_error_is_a_value_error_listing_every_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, {"steps": "5", "checkpoint": {}})
    with pytest.raises(ValueError) as err:
        read_record(path, {"steps": int, "name": str, "checkpoint.sha256": str}, "grid")
    assert isinstance(err.value, RecordError) and err.value.path == path
    assert err.value.problems == [
        "key 'steps' is string ('5'), expected integer",
        "missing key 'name' (string)",
        "missing key 'checkpoint.sha256' (string)",
    ]


def test_a_job_on_a_checkpoint_reads_its_training_runs_summary_through_the_reader(tmp_path: Path) -> None:
    from diffusion_lab.tracking.filing import training_run

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    summary = tmp_path / "run" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"name": "digits", "group": "g", "tags": ["a"], "metrics": {}}))
    assert training_run(ckpt, {}, None) == {"name": "digits", "group": "g", "tags": ["a"],
                                            "run_dir": str(summary.parent), "wandb_id": None}  # fmt: skip
    summary.write_text('{"name": "digits", "tags": ["a"')
    with pytest.raises(RecordError, match=rf"^training run summary {re.escape(str(summary))}: not valid JSON: trunc"):
        training_run(ckpt, {}, None)
    summary.write_text(json.dumps({"name": "digits", "tags": "a"}))
    with pytest.raises(RecordError, match=r"key 'tags' is string \('a'\), expected array"):
        training_run(ckpt, {}, None)


def test_a_long_bad_value_is_quoted_cut_to_its_width():
    """A wrong-typed value too long to quote whole is cut to 60 characters ending in '...', a short one is whole."""
    assert short_repr("x" * 10) == repr("x" * 10)
    long = short_repr(list(range(100)))
    assert len(long) == 60 and long.endswith("...") and long.startswith("[0, 1, 2")
    assert short_repr("y" * 58) == repr("y" * 58)  # exactly 60 characters with its quotes: whole
    assert short_repr("y" * 59) == repr("y" * 59)[:57] + "..."
