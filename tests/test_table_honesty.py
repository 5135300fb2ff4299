"""Tables and plots never silently lie: an unknown axis or metric is an error with the valid list, a metric some
runs lack reads — with a warning naming them, and a cell pools only runs that differ in ``seed`` (mean ± s.e., n)
unless the user names another axis with ``--average-over``."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_table():
    return _load("make_table")


def run_dir(root: Path, name: str, choices: dict, seed: int, metrics: dict) -> Path:
    """A fake finished run: ``<root>/<name>/summary.json`` as dlab-train writes it."""
    job = root / name
    job.mkdir(parents=True)
    overrides = [f"{k}={v}" for k, v in choices.items()] + [f"seed={seed}"]
    summary = {"choices": choices, "overrides": overrides, "config": {"seed": seed, "optim": {"lr": 1e-3}},
               "metrics": metrics, "job_type": "train"}  # fmt: skip
    (job / "summary.json").write_text(json.dumps(summary))
    return job


@pytest.fixture
def schedule_x_param(tmp_path):
    """linear/cosine × eps/v × seeds 0, 1 (in that order); val/fd@1k = schedule + parameterization offsets + seed."""
    i = 0
    for schedule, base in (("linear", 1.0), ("cosine", 2.0)):
        for param, offset in (("eps", 0.0), ("v", 10.0)):
            for seed in (0, 1):
                run_dir(tmp_path, str(i), {"schedule": schedule, "parameterization": param}, seed,
                        {"val/fd@1k": base + offset + seed, "train/loss": 0.5})  # fmt: skip
                i += 1
    return tmp_path


# ------------------------------------------------------------------------------ unknown axes and metrics


def test_a_mistyped_axis_is_an_error_listing_the_valid_axes(schedule_x_param, make_table, capsys):
    with pytest.raises(SystemExit) as err:
        make_table.main([str(schedule_x_param), "--rows", "schedul", "--metric", "val/fd@*"])
    message = str(err.value.code)
    assert "unknown axis 'schedul' (did you mean schedule?)" in message
    assert "config groups: parameterization, schedule" in message
    assert "overrides: parameterization, schedule, seed" in message
    assert "config paths: optim.lr, seed" in message
    assert capsys.readouterr().out == ""  # no table


def test_a_mistyped_column_axis_and_average_over_axis_are_errors_too(schedule_x_param, make_table):
    base = [str(schedule_x_param), "--rows", "schedule", "--metric", "val/fd@*"]
    with pytest.raises(SystemExit, match="unknown axis 'parametrization'"):
        make_table.main([*base, "--cols", "parametrization"])
    with pytest.raises(SystemExit, match=r"unknown axis 'optim\.lrr'"):
        make_table.main([*base, "--average-over", "optim.lrr"])


@pytest.mark.parametrize("rows", [[], ["--rows", "schedule", "--cols", "parameterization"]])
def test_a_metric_no_run_has_is_an_error_listing_the_metrics(schedule_x_param, make_table, rows):
    with pytest.raises(SystemExit) as err:
        make_table.main([str(schedule_x_param), *rows, "--metric", "val/fd_digits@*"])
    message = str(err.value.code)
    assert "no run records metric 'val/fd_digits@*'" in message
    assert message.endswith("the metrics of these runs: train/loss, val/fd@1k")


def test_the_command_line_exits_non_zero_with_the_message_on_stderr(schedule_x_param):
    cmd = [sys.executable, str(SCRIPTS / "make_table.py"), str(schedule_x_param), "--rows", "schedul"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "unknown axis 'schedul'" in proc.stderr


def test_a_metric_some_runs_lack_reads_a_dash_with_a_warning_naming_them(tmp_path, make_table, capsys):
    run_dir(tmp_path, "a", {"schedule": "linear"}, 0, {"val/fd@1k": 3.0, "train/loss": 0.1})
    lacking = run_dir(tmp_path, "b", {"schedule": "cosine"}, 0, {"train/loss": 0.2})
    args = [str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*"]
    assert make_table.main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-2:] == ["| linear | 3 |", "| cosine | — |"]
    assert f"warning: val/fd@* is missing from 1 of 2 runs (shown as —): {lacking}" in err
    assert make_table.main([*args, "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "cosine,val/fd@1k,,,,0"
    assert make_table.main([str(tmp_path), "--metrics", "train/loss", "val/fd@*"]) == 0  # one row per run
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "| cosine | 0.2 | — |" and str(lacking) in err


# --------------------------------------------------------------------------------- what a cell averages


def test_a_cell_pooling_runs_that_differ_in_more_than_seed_is_refused(schedule_x_param, make_table, capsys):
    with pytest.raises(SystemExit) as err:
        make_table.main([str(schedule_x_param), "--rows", "schedule", "--metric", "val/fd@*"])
    message = str(err.value.code)
    assert "differ in parameterization (eps, v), not only in seed" in message
    assert "--rows/--cols" in message and "--where" in message and "--average-over" in message
    assert capsys.readouterr().out == ""


def test_average_over_pools_an_axis_and_says_so(schedule_x_param, make_table, capsys):
    args = [str(schedule_x_param), "--rows", "schedule", "--metric", "val/fd@*", "--average-over", "parameterization"]
    assert make_table.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "(mean ± standard error over n = 4 runs (seeds, averaged over parameterization ∈ {eps, v}) per cell)"
    )
    assert lines[-2] == "| linear | 6.5 ± 2.9 |"  # 1, 2, 11, 12


def test_where_keeps_one_value_of_an_axis(schedule_x_param, make_table, capsys):
    args = [str(schedule_x_param), "--rows", "schedule", "--metric", "val/fd@*", "--where", "parameterization=v"]
    assert make_table.main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == ["| linear | 11.5 ± 0.5 |", "| cosine | 12.5 ± 0.5 |"]
    with pytest.raises(SystemExit, match="no run has parameterization=x; its values: eps, v"):
        make_table.main([*args[:-1], "parameterization=x"])


def test_n_is_given_per_cell_when_it_differs_and_one_run_has_no_error_bar(tmp_path, make_table, capsys):
    for seed in (0, 1, 2):
        run_dir(tmp_path, f"a{seed}", {"schedule": "linear"}, seed, {"val/fd@1k": 1.0 + seed})
    run_dir(tmp_path, "b", {"schedule": "cosine"}, 0, {"val/fd@1k": 5.0})
    assert make_table.main([str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "(mean ± standard error over seeds, n in each cell)"
    assert lines[-2:] == ["| linear | 2 ± 0.58 (n = 3) |", "| cosine | 5 (n = 1) |"]  # s.e. = 1 / √3
    make_table.main([str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*", "--format", "latex"])
    assert r"cosine & $5$ (n = 1) \\" in capsys.readouterr().out


def test_single_runs_say_n_is_1(tmp_path, make_table, capsys):
    run_dir(tmp_path, "a", {"schedule": "linear"}, 0, {"val/fd@1k": 3.0})
    assert make_table.main([str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "(n = 1 per cell: a single run, no standard error)" and lines[-1] == "| linear | 3 |"


def test_one_pattern_matching_two_protocols_in_a_cell_is_refused(tmp_path, make_table):
    run_dir(tmp_path, "a", {"schedule": "linear"}, 0, {"val/fd@1k": 3.0})
    run_dir(tmp_path, "b", {"schedule": "linear"}, 1, {"val/fd@50k": 2.0})
    with pytest.raises(SystemExit, match=r"val/fd@\* matches \['val/fd@1k', 'val/fd@50k'\] in the cell"):
        make_table.main([str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*"])
