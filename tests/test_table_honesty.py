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
    assert "warning: val/fd@* is missing from 1 of 2 runs (not in their cells' n; a cell with none" in err
    assert f"of it reads —): {lacking}" in err
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


def test_runs_repeating_a_seed_in_a_cell_are_not_called_seeds(tmp_path, make_table, capsys):
    first = run_dir(tmp_path, "a", {"schedule": "linear"}, 0, {"val/fd@1k": 3.0})
    again = run_dir(tmp_path, "b", {"schedule": "linear"}, 0, {"val/fd@1k": 3.0})
    assert make_table.main([str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "(mean ± standard error over n = 2 runs (seeds, some repeated) per cell)"
    assert f"{first}, {again} share one cell and seed=0: repeats, not independent seeds" in err


def test_one_pattern_matching_two_protocols_in_a_cell_is_refused(tmp_path, make_table):
    run_dir(tmp_path, "a", {"schedule": "linear"}, 0, {"val/fd@1k": 3.0})
    run_dir(tmp_path, "b", {"schedule": "linear"}, 1, {"val/fd@50k": 2.0})
    with pytest.raises(SystemExit, match=r"val/fd@\* matches \['val/fd@1k', 'val/fd@50k'\] in the cell"):
        make_table.main([str(tmp_path), "--rows", "schedule", "--metric", "val/fd@*"])


# ------------------------------------------------------------------------------------------------ plots


@pytest.fixture(scope="module")
def make_plots():
    return _load("make_plots")


def write_csv(job: Path, rows: list[dict]) -> None:
    """A Lightning CSVLogger ``csv/metrics.csv`` with the union of the rows' columns."""
    columns = sorted({c for r in rows for c in r})
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    (job / "csv").mkdir()
    (job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def seeded_curves(tmp_path):
    """linear/cosine × seeds 0, 1, each with a CSV of train/loss and two log-SNR buckets; linear/0 also has
    val/fd@1k at nfe 10 and 20 (sampler runs record ``nfe``)."""
    i = 0
    for schedule, base in (("linear", 1.0), ("cosine", 2.0)):
        for seed in (0, 1):
            job = run_dir(tmp_path, str(i), {"schedule": schedule}, seed, {"val/fd@1k": base + seed, "nfe": 10})
            loss = base + seed
            write_csv(job, [{"step": s, "train/loss": loss, "train/loss_by_logsnr/<-10": loss,
                             "train/loss_by_logsnr/>=10": 2 * loss} for s in range(0, 20, 5)])  # fmt: skip
            i += 1
    return tmp_path


@pytest.fixture
def figures(monkeypatch, make_plots):
    """The figures the plots are drawn on, kept (by file name) as they are saved."""
    import diffusion_lab.plots

    kept = {}

    def save(fig, path):
        kept[path.name] = fig
        return original(fig, path)

    original = diffusion_lab.plots.save
    monkeypatch.setattr(make_plots, "save", save)
    monkeypatch.setattr(diffusion_lab.plots, "save", save)
    return kept


def test_make_plots_refuses_a_mistyped_axis_and_writes_nothing(seeded_curves, make_plots, tmp_path):
    out = tmp_path / "plots"
    with pytest.raises(SystemExit) as err:
        make_plots.main([str(seeded_curves), "--by", "schedul", "--out", str(out)])
    assert "unknown axis 'schedul' (did you mean schedule?)" in str(err.value.code)
    assert "config groups: schedule" in str(err.value.code) and not out.exists()
    with pytest.raises(SystemExit, match="unknown axis 'sed'"):
        make_plots.plot_all(seeded_curves, "schedule,sed", out, None, "train/loss", 1, 1)


def test_make_plots_refuses_a_metric_no_run_has(seeded_curves, make_plots, tmp_path):
    out = tmp_path / "plots"
    with pytest.raises(SystemExit, match=r"no run records metric 'val/fd_digits@\*'.*: nfe, val/fd@1k"):
        make_plots.plot_all(seeded_curves, "schedule", out, "val/fd_digits@*", "train/loss", 1, 1)
    with pytest.raises(SystemExit, match=r"no run's csv/metrics.csv has 'val/los'; its columns: step, train/loss"):
        make_plots.plot_all(seeded_curves, "schedule", out, None, "val/los", 1, 1)


def test_make_plots_warns_naming_the_runs_without_the_step_metric(seeded_curves, make_plots, tmp_path, capsys):
    (seeded_curves / "0" / "csv" / "metrics.csv").write_text("step,val/other\n0,1.0\n")
    make_plots.step_curves(make_plots.make_table.load_runs(seeded_curves), "schedule", "train/loss", 1)
    err = capsys.readouterr().err
    assert f"train/loss (csv/metrics.csv) is missing from 1 of 4 runs (no line from them): {seeded_curves / '0'}" in err


def test_a_plotted_line_pooling_more_than_seeds_is_refused(seeded_curves, make_plots, tmp_path, figures):
    run_dir(seeded_curves, "9", {"schedule": "linear", "parameterization": "v"}, 0, {"val/fd@1k": 9.0, "nfe": 10})
    write_csv(seeded_curves / "9", [{"step": 0, "train/loss": 9.0}])
    with pytest.raises(SystemExit, match=r"a line of metric_vs_step.png would .* differ in parameterization"):
        make_plots.plot_all(seeded_curves, "schedule", tmp_path / "p", None, "train/loss", 1, 1)
    with pytest.raises(SystemExit, match=r"a point of metric_vs_nfe.png would .* differ in parameterization"):
        make_plots.nfe_curves(make_plots.make_table.load_runs(seeded_curves), "schedule", "val/fd@*")
    make_plots.plot_all(seeded_curves, "schedule", tmp_path / "p", None, "train/loss", 1, 1, ["parameterization"])
    assert "averaged over parameterization" in figures["metric_vs_step.png"].axes[0].get_title()


def test_lines_over_seeds_carry_a_standard_error_band_and_n(seeded_curves, make_plots, tmp_path, figures):
    written = make_plots.plot_all(seeded_curves, "schedule", tmp_path / "p", "val/fd@*", "train/loss", 1, 1)
    assert sorted(p.name for p in written) == ["loss_vs_logsnr.png", "metric_vs_nfe.png", "metric_vs_step.png"]
    for name, fig in figures.items():
        (ax,) = fig.axes
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "schedule=linear (n = 2)",
            "schedule=cosine (n = 2)",
        ], name
        assert len(ax.collections) == 2, name  # one ± s.e. band per line
        assert "mean ± s.e. over seeds" in ax.get_title(), name
    band = figures["metric_vs_step.png"].axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert (band.min(), band.max()) == pytest.approx((1.0, 2.0))  # losses 1 and 2: mean 1.5 ± s.e. 0.5
    curves = make_plots.step_curves(make_plots.make_table.load_runs(seeded_curves), "schedule", "train/loss", 1)
    assert curves["linear"][5.0] == make_plots.make_table.summarize([1.0, 2.0])


def sample_job(root: Path, name: str, ckpt: str, train: dict, steps: int, fd: float) -> Path:
    """A fake sample job (scripts/sampler_nfe.py, dlab-sample) on one checkpoint: the sampler and steps are its
    overrides; the checkpoint and the training run's config are in its config only."""
    job = root / name
    job.mkdir(parents=True)
    summary = {"choices": {"sampler": "dpm_solver"}, "overrides": [f"steps={steps}"], "job_type": "sample",
               "config": {"seed": 0, "ckpt_path": ckpt, "train": train}, "metrics": {"val/fd@500": fd}}  # fmt: skip
    (job / "summary.json").write_text(json.dumps(summary))
    return job


def test_sample_jobs_on_checkpoints_of_different_training_runs_are_not_pooled(tmp_path, make_table):
    """Jobs on two checkpoints whose training runs differ in more than seed (here: the schedule) are refused,
    naming ckpt_path; before, a cell silently averaged the two models."""
    for i, schedule in enumerate(("linear", "cosine")):
        sample_job(tmp_path, f"job{i}", f"runs/{schedule}/last.ckpt", {"seed": 0, "schedule": schedule}, 5, 10.0 + i)
    with pytest.raises(SystemExit) as err:
        make_table.main([str(tmp_path), "--rows", "sampler", "--cols", "steps", "--metric", "val/fd@*"])
    assert "ckpt_path (runs/cosine/last.ckpt, runs/linear/last.ckpt)" in str(err.value.code)


def test_sample_jobs_on_checkpoints_of_seed_only_training_runs_pool_as_seeds(tmp_path, make_table, capsys):
    """Jobs on checkpoints of training runs that differ in seed alone are a spread over seeds (n = 3, no
    "repeats" warning, although every job used sampling seed 0)."""
    for seed in range(3):
        sample_job(tmp_path, f"job{seed}", f"runs/s{seed}/last.ckpt", {"seed": seed, "schedule": "linear"}, 5, seed)
    assert make_table.main([str(tmp_path), "--rows", "sampler", "--cols", "steps", "--metric", "val/fd@*"]) == 0
    out, err = capsys.readouterr()
    assert "mean ± standard error over n = 3 seeds per cell" in out
    assert "| dpm_solver | 1 ± 0.58 |" in out  # mean of 0, 1, 2; s.e. = 1/√3
    assert "repeats" not in err


# ------------------------------------------------------------------ damaged records, nan seeds, crashed runs, flags


def test_a_truncated_summary_is_an_error_naming_the_file(schedule_x_param, make_table, make_plots, tmp_path):
    path = schedule_x_param / "2" / "summary.json"
    text = path.read_text()
    path.write_text(text[:40])
    with pytest.raises(SystemExit) as err:
        make_table.main([str(schedule_x_param), "--rows", "schedule", "--metric", "val/fd@*"])
    assert str(err.value.code).startswith(f"error: run summary {path}: not valid JSON: truncated at byte 40 (")
    with pytest.raises(SystemExit, match=rf"run summary {path}: not valid JSON: truncated at byte 40"):
        make_plots.plot_all(schedule_x_param, "schedule", tmp_path / "p", None, "train/loss", 1, 1)
    path.write_text(text.replace('"metrics": {', '"metrics": [{', 1).replace('}, "job_type"', '}], "job_type"', 1))
    with pytest.raises(SystemExit, match=rf"run summary {path}: key 'metrics' is array \(.*\), expected object"):
        make_table.main([str(schedule_x_param)])


def _three_seeds(root: Path, values: list[float]) -> Path:
    for seed, value in enumerate(values):
        run_dir(root, str(seed), {"schedule": "linear"}, seed, {"val/fd@1k": value, "train/loss": 0.5})
    return root


@pytest.mark.parametrize(
    ("values", "cell"),
    [([1.0, float("nan"), 2.0], "nan (1 of 3 not finite)"), ([1.0, float("inf"), 3.0], "inf (1 of 3 not finite)"),
     ([float("inf"), float("-inf"), 3.0], "nan (2 of 3 not finite)")],
)  # fmt: skip
def test_a_nan_among_seeds_is_shown_with_its_count_never_averaged_away(tmp_path, make_table, capsys, values, cell):
    root = _three_seeds(tmp_path, values)
    assert make_table.main([str(root), "--rows", "schedule", "--metric", "val/fd@*"]) == 0
    out, err = capsys.readouterr()
    assert f"| linear | {cell} |" in out.splitlines()
    assert "1 cell(s) hold a nan or inf run: shown as nan/inf with the count, no mean over it" in out
    bad = [str(root / str(i)) for i, v in enumerate(values) if v != v or abs(v) == float("inf")]
    assert all(f"warning: {d} recorded val/fd@1k = " in err for d in bad)
    make_table.main([str(root), "--rows", "schedule", "--metric", "val/fd@*", "--format", "csv"])
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert row[:2] == ["linear", "val/fd@1k"] and row[2] == cell.split()[0] and row[3:] == ["", "", "3"]


def test_finite_seeds_still_give_mean_and_standard_error(make_table):
    stat = make_table.summarize([1.0, 2.0, 3.0])
    assert stat == (2.0, pytest.approx(1 / 3**0.5), 1.0, 3, 0)


def test_runs_that_started_without_a_summary_are_named_and_counted(schedule_x_param, make_table, capsys):
    (schedule_x_param / "crashed" / ".hydra").mkdir(parents=True)
    (schedule_x_param / "killed" / "csv").mkdir(parents=True)
    (schedule_x_param / "killed" / "csv" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    (schedule_x_param / "notes").mkdir()  # not a run: no .hydra, no csv
    make_table.main([str(schedule_x_param), "--rows", "schedule", "--cols", "parameterization", "--metric", "val/fd@*"])
    out, err = capsys.readouterr()
    named = f"{schedule_x_param / 'crashed'}, {schedule_x_param / 'killed'}"
    assert f"warning: 2 run(s) started but have no summary.json (crashed, killed or still running) and are left " \
           f"out: {named}\n" in err  # fmt: skip
    note = "2 started run(s) without summary.json (crashed, killed or running) are not in the table"
    assert out.splitlines()[0].endswith(f"; {note})")  # the pivot table's caption
    make_table.main([str(schedule_x_param), "--metric", "val/fd@*"])
    assert capsys.readouterr().out.splitlines()[-1] == note  # below the one-row-per-run table
    make_table.main([str(schedule_x_param), "--metric", "val/fd@*", "--format", "latex"])
    assert capsys.readouterr().out.splitlines()[-1] == f"% {note}"


def test_a_plot_says_it_leaves_out_started_runs(seeded_curves, make_plots, tmp_path, figures, capsys):
    (seeded_curves / "crashed" / ".hydra").mkdir(parents=True)
    make_plots.plot_all(seeded_curves, "schedule", tmp_path / "p", "val/fd@*", "train/loss", 1, 1)
    for name, fig in figures.items():
        assert "1 started run(s) without summary.json (crashed, killed or running) are not in the plot" in \
            fig.axes[0].get_title(), name  # fmt: skip
    assert f"are left out: {seeded_curves / 'crashed'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("make_table", ["--digits", "-3"], "argument --digits: --digits must be an integer from 1 to 17, got '-3'"),
        ("make_table", ["--digits", "0"], "--digits must be an integer from 1 to 17, got '0'"),
        ("make_table", ["--digits", "18"], "--digits must be an integer from 1 to 17, got '18'"),
        ("make_table", ["--digits", "4.5"], "--digits must be an integer from 1 to 17, got '4.5'"),
        ("make_plots", ["--smooth", "-5"], "argument --smooth: --smooth must be an integer >= 1, got '-5'"),
        ("make_plots", ["--tail", "0"], "argument --tail: --tail must be an integer >= 1, got '0'"),
        ("make_plots", ["--tail", "-2"], "--tail must be an integer >= 1, got '-2'"),
    ],
)  # fmt: skip
def test_a_numeric_flag_out_of_range_is_a_usage_error_naming_the_flag_and_range(
    schedule_x_param, make_table, make_plots, capsys, script, argv, message
):
    module = {"make_table": make_table, "make_plots": make_plots}[script]
    plots = ["--by", "schedule", "--out", str(schedule_x_param / "p")] if script == "make_plots" else []
    with pytest.raises(SystemExit) as err:
        module.main([str(schedule_x_param), *plots, *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (schedule_x_param / "p").exists()


def test_the_digits_flag_sets_the_significant_digits(schedule_x_param, make_table, capsys):
    make_table.main([str(schedule_x_param), "--rows", "schedule", "--cols", "parameterization", "--digits", "1",
                     "--metric", "val/fd@*"])  # fmt: skip
    assert "| linear | 2 ± 0.5 | 1e+01 ± 0.5 |" in capsys.readouterr().out.splitlines()  # 1.5 ± 0.5, 11.5 ± 0.5
