"""scripts/make_table.py: a multirun directory becomes a Markdown table of swept values and metrics."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_table.py"


@pytest.fixture(scope="module")
def make_table():
    spec = importlib.util.spec_from_file_location("make_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(root: Path, index: int, overrides: list[str], metrics: dict) -> None:
    job = root / str(index)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))


def test_table_has_varying_axes_as_columns_and_shared_overrides_once(tmp_path, make_table, capsys):
    _job(tmp_path, 0, ["schedule=linear", "trainer.max_steps=10"], {"train/loss": 0.123456, "val/bpd@180": 5.0})
    _job(tmp_path, 1, ["schedule=cosine", "trainer.max_steps=10"], {"train/loss": 0.2, "val/bpd@180": 4.5})
    (tmp_path / "2").mkdir()  # an unfinished job (no metrics.json) is left out
    assert make_table.main([str(tmp_path), "--metrics", "val/bpd@*", "train/loss"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Every run: `trainer.max_steps=10`"
    assert lines[2] == "| schedule | val/bpd@180 | train/loss |"  # metric columns in pattern order
    assert lines[4:] == ["| linear | 5 | 0.1235 |", "| cosine | 4.5 | 0.2 |"]


def test_empty_directory_is_a_clear_error(tmp_path, make_table):
    with pytest.raises(SystemExit, match=r"no \*/metrics\.json"):
        make_table.main([str(tmp_path)])
