"""The package's import layers, read from the source with ast (nothing is imported, so no import side effect can
hide or cause a failure).

- No import circle among the package's modules, counting imports inside functions: a deferred import that closes
  a circle is still one (issue 16: export/exporter.py -> edge_runtime/__init__ -> model -> model_store ->
  bundled.py -> the exporter). Imports under `if TYPE_CHECKING:` are annotations only and never run, so they do
  not count; nor does the package `__init__` that Python runs before any submodule, which the next rule covers.
- No module imports the package's `__init__` (`import edge_runtime`, `from edge_runtime import load`): it gathers
  the whole SDK, so a module taking one name from it imports everything; modules import from the module that
  defines the name (the version is in edge_runtime/version.py).
- The runtime imports the exporter (edge_runtime.export) only inside the functions that export: the runtime must
  load without the [export] extra, and the exporter is built on runtime modules. A family's graph builders
  (edge_runtime/families/<name>/graphs.py) are export's half of the family's home, loaded by the exporter alone
  (tests/test_families.py checks that running never imports them), so they count as exporter.
- Only model.py reaches into a model's engine; the rest use Model's public API.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator, Mapping
from graphlib import CycleError, TopologicalSorter
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "edge_runtime"
EXPORTER = "edge_runtime.export"
FAMILY_GRAPHS = re.compile(r"edge_runtime\.families\.\w+\.graphs")
ENGINE_OWNER = "edge_runtime.model"


class Import(NamedTuple):
    target: str  # the package module imported
    line: int
    deferred: bool  # inside a function: runs when the function is called, not when the module is imported


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Each package the wheel installs and the directory it comes from, as pyproject.toml says."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / setuptools.get("package-dir", {}).get(name, name.replace(".", "/"))
            for name in setuptools["packages"]}


def modules(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Module name -> source file, packages under their own name (their __init__.py)."""
    found = {}
    for package, folder in packages.items():
        for file in folder.glob("*.py"):
            found[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """Dotted names an import statement may load: the module, and for `from M import n` also M.n (n may be a
    submodule)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    source = ".".join(part for part in (base if node.level else "", node.module or "") if part)
    yield source
    yield from (f"{source}.{alias.name}" for alias in node.names)


def imports_of(module: str, file: Path, known: Mapping[str, Path]) -> list[Import]:
    """The package modules `module` imports, each with where and whether it is deferred."""
    found: list[Import] = []
    is_package = file.stem == "__init__"

    def visit(node: ast.AST, deferred: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, deferred)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            targets = {name for name in _imported_names(node, module, is_package) if name in known}
            # `from M import n` imports M, and M.n too when n is a submodule: keep the most specific.
            specific = {t for t in targets if not any(o.startswith(f"{t}.") for o in targets)}
            found.extend(Import(t, node.lineno, deferred) for t in sorted(specific) if t != module)
            return
        inside = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(file.read_text(), str(file)), False)
    return found


def import_graph(packages: Mapping[str, Path]) -> dict[str, list[Import]]:
    known = modules(packages)
    return {module: imports_of(module, file, known) for module, file in known.items()}


def circle(graph: Mapping[str, list[Import]]) -> str | None:
    """One import circle, as `a -> b (line N) -> ... -> a`, each line that of the import in the module before the
    arrow, starting at the circle's first module by name; None when there is none."""
    try:
        TopologicalSorter({m: {i.target for i in imports} for m, imports in graph.items()}).prepare()
    except CycleError as exc:
        cycle = list(reversed(exc.args[1][1:]))  # graphlib lists it against the arrows, its first module twice
        start = cycle.index(min(cycle))
        cycle = [*cycle[start:], *cycle[:start], cycle[start]]
        steps = [cycle[0]]
        for a, b in pairwise(cycle):
            where = next(i for i in graph[a] if i.target == b)
            steps.append(f"{b} (line {where.line}{', inside a function' if where.deferred else ''})")
        return " -> ".join(steps)
    return None


def facade_imports(graph: Mapping[str, list[Import]]) -> list[str]:
    return [f"{module} line {i.line}" for module, imports in graph.items() for i in imports if i.target == PACKAGE]


def exporter_imports_at_module_level(graph: Mapping[str, list[Import]]) -> list[str]:
    def is_exporter(name: str) -> bool:
        return name == EXPORTER or name.startswith(f"{EXPORTER}.") or FAMILY_GRAPHS.fullmatch(name) is not None

    return [f"{module} line {i.line}" for module, imports in graph.items() if not is_exporter(module)
            for i in imports if is_exporter(i.target) and not i.deferred]


def engine_reach(packages: Mapping[str, Path]) -> list[str]:
    """Places outside model.py that read an attribute named `engine` (a model's engine)."""
    return [f"{module} line {node.lineno}" for module, file in modules(packages).items()
            if module != ENGINE_OWNER for node in ast.walk(ast.parse(file.read_text()))
            if isinstance(node, ast.Attribute) and node.attr == "engine"]


def test_no_import_circle():
    assert circle(import_graph(package_dirs())) is None


def test_no_module_imports_the_package_init():
    assert facade_imports(import_graph(package_dirs())) == []


def test_the_runtime_imports_the_exporter_only_where_it_exports():
    assert exporter_imports_at_module_level(import_graph(package_dirs())) == []


def test_only_the_model_reaches_into_its_engine():
    assert engine_reach(package_dirs()) == []


def test_the_package_is_all_read():
    """The rules above see every module the wheel installs, the exporter's and the profiles' included."""
    known = modules(package_dirs())
    assert {"edge_runtime", "edge_runtime.model", "edge_runtime.version", "edge_runtime.export.exporter",
            "edge_runtime.quant.turboquant", "edge_runtime.server.app", "edge_runtime.device_profiles"} <= set(known)
    assert len(known) == sum(1 for folder in package_dirs().values() for _ in folder.glob("*.py"))


def _write(folder: Path, files: Mapping[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return {"edge_runtime": folder / "edge_runtime", "edge_runtime.export": folder / "export"}


def test_the_checks_see_what_the_issue_describes(tmp_path):
    """On a small tree shaped as issue 16 found the package: the circle closed inside a function, the package
    __init__ imported for one name, the exporter imported at the top of a runtime module, an engine reached into."""
    packages = _write(tmp_path, {
        "edge_runtime/__init__.py": "__version__ = '1'\nfrom edge_runtime.model import load\n",
        "edge_runtime/model.py": "from edge_runtime import bundled\n\ndef load():\n    return bundled.path()\n",
        "edge_runtime/bundled.py": "def path():\n    from edge_runtime.export import export\n    return export()\n",
        "edge_runtime/bench.py": ("from typing import TYPE_CHECKING\n\nfrom edge_runtime.export.exporter import export\n"
                                  "if TYPE_CHECKING:\n    from edge_runtime.cli import app\n\n"
                                  "def run(model):\n    return model.engine.forward()\n"),
        "edge_runtime/cli.py": "from edge_runtime.bench import run\n",
        "export/__init__.py": "from .exporter import export\n",
        "export/exporter.py": "from edge_runtime import __version__\n\ndef export():\n    return __version__\n",
    })
    graph = import_graph(packages)
    assert circle(graph) == ("edge_runtime -> edge_runtime.model (line 2) -> edge_runtime.bundled (line 1) -> "
                             "edge_runtime.export (line 2, inside a function) -> edge_runtime.export.exporter (line 1) "
                             "-> edge_runtime (line 1)")
    assert facade_imports(graph) == ["edge_runtime.export.exporter line 1"]
    assert exporter_imports_at_module_level(graph) == ["edge_runtime.bench line 3"]
    assert engine_reach(packages) == ["edge_runtime.bench line 8"]
    (packages["edge_runtime.export"] / "exporter.py").write_text("def export():\n    return '1'\n")
    assert circle(import_graph(packages)) is None  # the TYPE_CHECKING import of cli (which imports bench) is no arrow
