"""dlab-reproduce: run a paper preset over its seeds and write the paper's cells and ours side by side.

    dlab-reproduce c2ot_fig1                        # Hydra multiruns on this machine (one job at a time)
    dlab-reproduce c2ot_fig1 --launcher parallel    # joblib, 2 jobs at a time (conf/hydra/launcher/parallel.yaml)
    dlab-reproduce c2ot_fig1 --launcher slurm --seeds 0 1 2
    dlab-reproduce edm_cifar10                      # a preset not run yet: the paper's numbers and "not run"

A preset is a file ``conf/reproduce/<preset>.yaml`` (data: the paper's cells, the ``dlab-train`` overrides of each
row, the ``dlab-evaluate`` overrides and summary key of each column; it never names code). The driver trains every
row over the seeds as one ``dlab-train -m`` multirun per row, scores each column that needs it with one
``dlab-evaluate -m`` multirun over the checkpoints, reads the records back and writes ``reports/<preset>.md``: per
cell the paper's and our mean ± std (n), the difference in units of the combined standard error, a verdict, the
command and the wall time. Runs already finished (a ``summary.json`` / ``evaluation.json`` there) are not run again,
so an interrupted reproduction continues where it stopped.

Like the other entry points it checks everything before torch is imported: the preset's name and contents, the
seeds, the launcher, and each row's composed training config (every range rule and the prior's combinations).
This module itself never imports torch; the runs are subprocesses.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffusion_lab.schema.errors import ConfigError
from diffusion_lab.schema.registry import CONFIG_DIR

PRESET_DIR = Path(CONFIG_DIR) / "reproduce"
LAUNCHERS = {"local": [], "parallel": ["hydra/launcher=parallel"], "slurm": ["hydra/launcher=slurm"]}
SUMMARY_FILE, EVALUATION_FILE = "summary.json", "evaluation.json"
Z_LIMIT = 2.0  # a cell reproduces when |ours − paper| is within this many combined standard errors


@dataclass(frozen=True)
class Summary:
    """``mean ± std (n)`` of one cell; ``std`` with ddof = 0 (``np.std``, as the papers print)."""

    mean: float
    std: float
    n: int

    @property
    def sem(self) -> float:
        """Standard error of the mean: the unbiased std over √n, i.e. ``std·/√(n − 1)`` from the ddof = 0 std;
        nan for n < 2 (one run says nothing about its spread)."""
        return self.std / math.sqrt(self.n - 1) if self.n >= 2 else math.nan

    def text(self, digits: int = 3) -> str:
        """``0.120 ± 0.045 (10)``."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} ({self.n})"


def summarize(values: Sequence[float]) -> Summary:
    """Mean and ddof = 0 std of ``values`` (what ``np.mean`` / ``np.std`` print); ValueError on an empty list."""
    if not values:
        raise ValueError("no values to summarize")
    mean = math.fsum(values) / len(values)
    return Summary(mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)), len(values))


def z_score(paper: Summary, ours: Summary) -> float:
    """``(ours − paper) / √(se_paper² + se_ours²)``: the difference in combined s.e. (nan if either n < 2)."""
    se = math.sqrt(paper.sem**2 + ours.sem**2)
    return (ours.mean - paper.mean) / se if se > 0 else math.nan


def verdict(paper: Summary, ours: Summary | None) -> str:
    """``within 2 s.e.``, ``not within 2 s.e.``, or why no verdict can be given."""
    if ours is None:
        return "not run"
    z = z_score(paper, ours)
    if math.isnan(z):
        return f"no verdict (n = {ours.n}: a spread needs 2 runs)"
    return f"within {Z_LIMIT:g} s.e." if abs(z) <= Z_LIMIT else f"not within {Z_LIMIT:g} s.e."


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    train: list[str]


@dataclass(frozen=True)
class Column:
    name: str
    label: str
    key: str
    evaluate: list[str] | None


@dataclass(frozen=True)
class Preset:
    """One ``conf/reproduce/<name>.yaml``, checked (see the module doc)."""

    name: str
    title: str
    paper: str
    quantity: str
    runnable: bool
    seeds: list[int]
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[str, str], Summary]
    notes: list[str]


def preset_names() -> list[str]:
    """The presets of ``conf/reproduce/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def load_preset(name: str) -> Preset:
    """Read and check ``conf/reproduce/<name>.yaml``; an unknown name or a malformed file is a :class:`ConfigError`
    naming the preset, the key and what is valid."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; valid choices: {preset_names()}")
    where = str(PRESET_DIR / f"{name}.yaml")
    try:
        raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    _require(isinstance(raw, dict), where, "not a mapping")
    allowed = {"title", "paper", "quantity", "runnable", "seeds", "rows", "columns", "cells", "notes"}
    _require(not set(raw) - allowed, where, f"unknown keys {sorted(set(raw) - allowed)}; valid: {sorted(allowed)}")
    rows = [Row(k, str(v["label"]), [str(o) for o in v.get("train") or []]) for k, v in raw["rows"].items()]
    columns = [
        Column(
            k, str(v["label"]), str(v["key"]), None if v.get("evaluate") is None else [str(o) for o in v["evaluate"]]
        )
        for k, v in raw["columns"].items()
    ]
    cells = {}
    for key, cell in (raw.get("cells") or {}).items():
        row, _, col = str(key).partition(".")
        _require(row in {r.name for r in rows} and col in {c.name for c in columns}, where,
                 f"cells.{key}: not <row>.<column> of rows {[r.name for r in rows]} and columns "
                 f"{[c.name for c in columns]}")  # fmt: skip
        _require(set(cell) == {"mean", "std", "n"} and int(cell["n"]) >= 1, where,
                 f"cells.{key}: needs mean, std and n >= 1, got {cell}")  # fmt: skip
        cells[(row, col)] = Summary(float(cell["mean"]), float(cell["std"]), int(cell["n"]))
    seeds = [int(s) for s in raw.get("seeds") or []]
    _require(bool(seeds) and len(set(seeds)) == len(seeds) and min(seeds) >= 0, where,
             f"seeds: a non-empty list of distinct integers >= 0, got {seeds}")  # fmt: skip
    return Preset(
        name, str(raw["title"]), str(raw["paper"]), str(raw["quantity"]), bool(raw["runnable"]), seeds, rows, columns,
        cells, [str(n) for n in raw.get("notes") or []],
    )  # fmt: skip


def check_rows(preset: Preset) -> None:
    """Compose each row's training config and check every range rule and the prior's combinations (torch-free)."""
    from hydra import compose, initialize_config_dir

    from diffusion_lab.config import check_domains, register_configs
    from diffusion_lab.schema.sources import check_source

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for row in preset.rows:
            try:
                cfg = compose(config_name="train", overrides=row.train)
                check_domains(cfg)
                check_source(cfg)
            except ConfigError as err:
                raise ConfigError(f"preset {preset.name}, row {row.name} ({' '.join(row.train)}): {err}") from None


# ----------------------------------------------------------------------------------------- the runs
def run_dir(root: Path, row: Row, seed: int) -> Path:
    """Where the training run of ``row`` at ``seed`` lives: ``<root>/train/<row>_seed<seed>``."""
    return root / "train" / f"{row.name}_seed{seed}"


def last_checkpoint(root: Path, row: Row, seed: int) -> Path:
    """The last checkpoint of the training run of ``row`` at ``seed``."""
    return run_dir(root, row, seed) / "checkpoints" / "last.ckpt"


def checkpoint_key(path: str | Path) -> str:
    """A checkpoint's key among evaluation records: its resolved path (records may hold it relative or absolute)."""
    return str(Path(path).resolve())


def train_command(root: Path, row: Row, seeds: Sequence[int], launcher: str) -> list[str]:
    """The ``dlab-train -m`` multirun of ``row`` over ``seeds``."""
    return [
        sys.executable, "-m", "diffusion_lab.train", "-m", f"seed={','.join(map(str, seeds))}", *row.train,
        *LAUNCHERS[launcher], f"hydra.sweep.dir={root / 'train'}", f"hydra.sweep.subdir={row.name}_seed${{seed}}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip


def evaluate_command(root: Path, column: Column, row: Row, checkpoints: Sequence[Path], launcher: str) -> list[str]:
    """The ``dlab-evaluate -m`` multirun of ``column`` over ``row``'s ``checkpoints``, into
    ``<root>/evaluate/<column>/<row>/<time>/<job>``: a directory of its own per invocation (job numbers restart at 0
    in every multirun), so no invocation overwrites another's records."""
    assert column.evaluate is not None
    sweep = root / "evaluate" / column.name / row.name / time.strftime("%Y-%m-%d_%H-%M-%S")
    return [
        sys.executable, "-m", "diffusion_lab.evaluate", "-m", f"ckpt_path={','.join(map(str, checkpoints))}",
        *column.evaluate, *LAUNCHERS[launcher], f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
    ]  # fmt: skip


def evaluated(root: Path, column: Column) -> dict[str, dict[str, Any]]:
    """``checkpoint path -> evaluation.json`` of every finished evaluation of ``column`` (any depth below it)."""
    found = {}
    for path in sorted((root / "evaluate" / column.name).rglob(EVALUATION_FILE)):
        record = json.loads(path.read_text(encoding="utf-8"))
        found[checkpoint_key(record["checkpoint"])] = record
    return found


def run_all(preset: Preset, root: Path, seeds: Sequence[int], launcher: str) -> None:
    """Train every row over the seeds not finished yet, then score every column that needs an evaluation."""
    for row in preset.rows:
        todo = [s for s in seeds if not (run_dir(root, row, s) / SUMMARY_FILE).is_file()]
        if todo:
            subprocess.run(train_command(root, row, todo, launcher), check=True)
    for column in preset.columns:
        if column.evaluate is None:
            continue
        done = evaluated(root, column)
        for row in preset.rows:
            ckpts = [last_checkpoint(root, row, s) for s in seeds]
            pending = [c for c in ckpts if c.is_file() and checkpoint_key(c) not in done]
            if pending:
                subprocess.run(evaluate_command(root, column, row, pending, launcher), check=True)


def read_metric(record: dict[str, Any], pattern: str, where: Path | str) -> float:
    """The one value of ``record`` whose key matches ``pattern`` (``*`` allowed); ValueError naming the keys if none
    or several match."""
    hits = [k for k in record if fnmatch.fnmatchcase(k, pattern) and isinstance(record[k], int | float)]
    if len(hits) != 1:
        keys = sorted(k for k in record if isinstance(record[k], int | float))
        raise ValueError(f"{where}: {len(hits)} keys match {pattern!r} (need one); numeric keys: {keys}")
    return float(record[hits[0]])


def _summary_metrics(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text(encoding="utf-8"))
    return record.get("metrics", record)


def collect(preset: Preset, root: Path, seeds: Sequence[int]) -> dict[tuple[str, str], dict[int, float]]:
    """``(row, column) -> {seed: value}`` from the finished runs' records (missing runs are left out)."""
    values: dict[tuple[str, str], dict[int, float]] = {}
    for column in preset.columns:
        done = evaluated(root, column) if column.evaluate is not None else {}
        for row in preset.rows:
            cell = values.setdefault((row.name, column.name), {})
            for seed in seeds:
                rdir = run_dir(root, row, seed)
                if column.evaluate is None and (rdir / SUMMARY_FILE).is_file():
                    cell[seed] = read_metric(_summary_metrics(rdir / SUMMARY_FILE), column.key, rdir / SUMMARY_FILE)
                elif (record := done.get(checkpoint_key(last_checkpoint(root, row, seed)))) is not None:
                    cell[seed] = read_metric(record, column.key, f"evaluation of {rdir}")
    return values


# ----------------------------------------------------------------------------------------- the report
def prediction_z(paper: Summary, value: float) -> float:
    """One run against the paper's runs: ``(value − mean) / (s·√(1 + 1/n))`` with ``s`` the paper's unbiased std
    (the prediction interval of one new run); nan for a paper with n < 2."""
    if paper.n < 2:
        return math.nan
    s = paper.std * math.sqrt(paper.n / (paper.n - 1))
    return (value - paper.mean) / (s * math.sqrt(1 + 1 / paper.n)) if s > 0 else math.nan


def cell_line(paper: Summary, ours: Summary | None) -> tuple[str, str, str]:
    """``(ours as text, the difference in s.e., the verdict)`` of one cell."""
    if ours is None:
        return "not run", "", "not run"
    if ours.n == 1:  # no spread of ours: compare the one run with the paper's run-to-run spread
        z = prediction_z(paper, ours.mean)
        ok = abs(z) <= Z_LIMIT
        return ours.text(), f"{z:+.1f} (pred.)", ("within" if ok else "not within") + " 2 s.d. of one run (n = 1)"
    z = z_score(paper, ours)
    return ours.text(), f"{z:+.1f}", verdict(paper, ours)


def report(
    preset: Preset, values: dict[tuple[str, str], dict[int, float]], command: str, wall_s: float | None,
    train_wall_s: list[float],
) -> str:  # fmt: skip
    """The Markdown report: the paper's cells and ours side by side, the per-seed values, the notes."""
    lines = [f"# {preset.title}", "", f"Paper: {preset.paper}.", "", f"Quantity: {preset.quantity}.", ""]
    lines += ["| row | column | paper mean ± std (n) | ours mean ± std (n) | Δ / combined s.e. | verdict |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for row in preset.rows:
        for col in preset.columns:
            paper = preset.cells.get((row.name, col.name))
            if paper is None:
                continue
            got = values.get((row.name, col.name)) or {}
            ours = summarize(list(got.values())) if got and preset.runnable else None
            text, z, word = cell_line(paper, ours)
            lines.append(f"| {row.label} | {col.label} | {paper.text()} | {text} | {z} | {word} |")
    lines += ["", "std: ddof = 0 on both sides (np.std, as the paper); s.e. = std/√(n − 1).", ""]
    seeds = sorted({s for cell in values.values() for s in cell})
    if seeds and preset.runnable:
        lines += [
            "Per seed (" + ", ".join(f"{r.label} / {c.label}" for r in preset.rows for c in preset.columns) + "):"
        ]
        lines += [
            "",
            "| seed | " + " | ".join(f"{r.name}.{c.name}" for r in preset.rows for c in preset.columns) + " |",
        ]
        lines += ["| --- |" + " --- |" * (len(preset.rows) * len(preset.columns))]
        for seed in seeds:
            row_values = [values.get((r.name, c.name), {}).get(seed) for r in preset.rows for c in preset.columns]
            lines.append(f"| {seed} | " + " | ".join("" if v is None else f"{v:.4f}" for v in row_values) + " |")
        lines.append("")
    lines += ["## How it ran", "", "```bash", command, "```", ""]
    if wall_s is not None:
        lines.append(f"Wall time of this invocation: {wall_s / 60:.1f} min.")
    if train_wall_s:
        t = summarize(train_wall_s)
        lines.append(f"Training wall time per run: {t.mean / 60:.1f} ± {t.std / 60:.1f} min ({t.n} runs).")
    if not preset.runnable:
        lines.append("Not run: this preset needs GPUs (see docs/reproductions.md for its cost).")
    if preset.notes:
        lines += ["", "## Protocol notes", ""] + [f"- {n}" for n in preset.notes]
    return "\n".join(lines) + "\n"


def train_wall_times(preset: Preset, root: Path, seeds: Sequence[int]) -> list[float]:
    """``train/wall_s`` of every finished training run."""
    out = []
    for row in preset.rows:
        for seed in seeds:
            path = run_dir(root, row, seed) / SUMMARY_FILE
            if path.is_file():
                out.append(float(_summary_metrics(path)["train/wall_s"]))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; an unknown preset or launcher is refused by argparse with the valid choices."""
    parser = argparse.ArgumentParser(prog="dlab-reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("preset", choices=preset_names())
    parser.add_argument("--seeds", type=int, nargs="+", help="a subset of the preset's seeds (default: all)")
    parser.add_argument("--rows", nargs="+", help="run only these rows (default: all; the report shows every row)")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local")
    parser.add_argument("--root", type=Path, help="where the runs go (default multirun/reproduce/<preset>)")
    parser.add_argument("--report", type=Path, help="the report file (default reports/<preset>.md)")
    parser.add_argument("--no-run", action="store_true", help="only collect the finished runs and write the report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """``dlab-reproduce <preset>``: check, run what is missing, write ``reports/<preset>.md`` and print it."""
    args = parse_args(argv)
    start = time.perf_counter()
    preset = load_preset(args.preset)
    seeds = args.seeds or preset.seeds
    if not set(seeds) <= set(preset.seeds):
        raise ConfigError(f"--seeds {seeds}: valid: a subset of the preset's seeds {preset.seeds}")
    root = args.root or Path("multirun") / "reproduce" / preset.name
    command = "dlab-reproduce " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = args.rows or [r.name for r in preset.rows]
    if not set(rows) <= {r.name for r in preset.rows}:
        raise ConfigError(f"--rows {rows}: valid: rows of the preset {[r.name for r in preset.rows]}")
    if preset.runnable:
        check_rows(preset)  # every row's config before any run starts (torch is not imported)
        if not args.no_run:
            chosen = dataclasses.replace(preset, rows=[r for r in preset.rows if r.name in rows])
            run_all(chosen, root, seeds, args.launcher)
    values = collect(preset, root, seeds) if preset.runnable else {}
    text = report(preset, values, command, time.perf_counter() - start, train_wall_times(preset, root, seeds))
    out = args.report or Path("reports") / f"{preset.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":  # python -m diffusion_lab.reproduce …: the same entry point as dlab-reproduce
    main()
