"""The package's import graph: no circles (function-level imports included), and every name imported from a module
is defined there (no module re-exports a name it imports: callers import it from where it lives).

Read from the source with ``ast`` (nothing is imported), so a new circle or shim fails here, naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "diffusion_lab"


def _module_files() -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _module_files()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only, never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every executed import of a package module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target and target.startswith(PACKAGE):
                out += [(target, a.name, node.lineno) for a in node.names]
    return out


def import_graph() -> nx.DiGraph:
    """Module -> module it imports. ``from pkg import sub`` (a submodule) is an edge to ``pkg.sub``: importing a
    submodule runs its package's ``__init__`` first, which is no circle of the importer's making."""
    graph = nx.DiGraph()
    for module in MODULES:
        graph.add_node(module)
        for target, name, _ in imports(module):
            dest = f"{target}.{name}" if name and f"{target}.{name}" in MODULES else target
            if dest in MODULES and dest != module:
                graph.add_edge(module, dest)
    return graph


def test_the_graph_sees_the_package_and_its_edges():
    graph = import_graph()
    assert len(MODULES) > 80
    assert graph.has_edge("diffusion_lab.checkpoint_loading", "diffusion_lab.checkpoint_file")
    assert graph.has_edge("diffusion_lab.checkpoint_loading", "diffusion_lab.module")


def test_no_import_circles():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph()))
    assert cycles == [], "import circles (each a list of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def _defined_names(module: str) -> set[str]:
    """Names a module binds at top level other than by importing them: defs, classes, assignments."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.If | ast.Try):
            names.update(ast.unparse(node).split())  # conditional definitions: counted generously
    return names


def _importers() -> list[tuple[str, Path]]:
    """``(display name, file)`` of every Python file that imports from the package: the package, tests, scripts."""
    files = [*(ROOT / PACKAGE).rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    files += list((ROOT / "benchmarks").rglob("*.py"))
    return [(str(p.relative_to(ROOT)), p) for p in sorted(files)]


def re_exported_imports() -> list[str]:
    """``file:line imports name from module`` wherever ``module`` is a plain module (not a package ``__init__``,
    whose names are the package's public API) that does not itself define ``name``."""
    found = []
    defined = {m: _defined_names(m) for m in MODULES if MODULES[m].name != "__init__.py"}
    for where, path in _importers():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in defined):
                continue
            for alias in node.names:
                if alias.name != "*" and alias.name not in defined[node.module]:
                    found.append(f"{where}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def test_every_name_is_imported_from_the_module_that_defines_it():
    found = re_exported_imports()
    assert found == [], "names imported from a module that only re-exports them:\n" + "\n".join(found)


def test_a_planted_circle_is_found(tmp_path, monkeypatch):
    """A function-level import back up (module.py importing the loader that imports it) is a circle."""
    planted = tmp_path / "module.py"
    original = MODULES["diffusion_lab.module"].read_text(encoding="utf-8")
    planted.write_text(original + "\n\ndef _planted():\n    from diffusion_lab.checkpoint_loading import load_module\n")
    monkeypatch.setitem(MODULES, "diffusion_lab.module", planted)
    cycles = [sorted(c) for c in nx.simple_cycles(import_graph())]
    assert ["diffusion_lab.checkpoint_loading", "diffusion_lab.module"] in cycles


def test_a_planted_shim_is_found(monkeypatch):
    """A test importing a name from a module that only imports it is reported with file, line and module."""
    fake = ROOT / "tests" / "test_import_graph.py"
    planted = "from diffusion_lab.module import load_module\n"  # defined in checkpoint_loading, not module
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: planted if p == fake else real_read(p, *a, **k))
    assert "tests/test_import_graph.py:1 imports load_module from diffusion_lab.module" in re_exported_imports()
