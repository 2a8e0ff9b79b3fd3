"""The package's shape: imports flow one way through the layers, nothing cycles, modules stay small, start-up light.

The import graph is read from the source (``ast``): module-level imports and type-only ones (under
``if TYPE_CHECKING:``) for the cycle test; every import, lazy ones inside functions included, for the layering
test. Importing ``onnx_arsvd.a.b`` also imports the package ``onnx_arsvd.a``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_arsvd"
HEAVY = ("onnxruntime", "scipy", "sympy", "torch")
MAX_MODULE_LINES, MAX_CLASS_LINES = 400, 250


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(module: str, names: list[str]) -> set[str]:
    """The package modules ``from module import names`` loads: submodules named, else the module itself."""
    found = {f"{module}.{name}" for name in names if f"{module}.{name}" in MODULES}
    return found or {module}


def _statements(tree: ast.Module, lazy: bool) -> list[ast.stmt]:
    """Top-level statements and those under ``if TYPE_CHECKING:``; with ``lazy``, every statement."""
    if lazy:
        return [node for node in ast.walk(tree) if isinstance(node, ast.stmt)]
    found: list[ast.stmt] = []
    for node in tree.body:
        found.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found += node.body
    return found


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """For each package module, the package modules it imports (with their parent packages)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets: set[str] = set()
        for node in _statements(ast.parse(path.read_text(encoding="utf-8")), lazy):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_arsvd"):
                targets |= _resolve(node.module, [alias.name for alias in node.names])
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("onnx_arsvd")}
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts))}  # parent packages, not onnx_arsvd itself
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules on it, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    reached, frontier = set(), [start]
    while frontier:
        current = frontier.pop()
        reached.add(current)
        frontier += [m for m in graph.get(current, ()) if m not in reached]
    return reached


def _third_party(module: str, lazy: bool = False) -> set[str]:
    """The top-level names of the non-package modules ``module`` imports."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    roots: set[str] = set()
    for node in _statements(tree, lazy):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots - {"onnx_arsvd"}


def test_the_package_has_no_import_cycle_type_only_imports_included() -> None:
    graph = import_graph()
    assert graph["onnx_arsvd.api"] and graph["onnx_arsvd.search.run"], "the import graph was not read"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("graph", ("measure", "search", "report", "api", "cli", "methods")),
    ("numerics", ("measure", "search", "report", "api", "cli", "methods", "graph", "io")),
])
def test_graph_and_numerics_never_import_what_runs_or_presents(layer: str, forbidden: tuple[str, ...]) -> None:
    """Lazy imports inside functions count too: a layer that runs nothing cannot reach what runs."""
    graph = import_graph(lazy=True)
    for module in (m for m in graph if m.startswith(f"onnx_arsvd.{layer}.")):
        bad = {t for t in graph[module] if t.split(".")[1] in forbidden}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_numerics_knows_no_onnx_and_graph_runs_nothing() -> None:
    for module in MODULES:
        if module.startswith("onnx_arsvd.numerics."):
            assert not _third_party(module, lazy=True) & {"onnx", "onnx_ir", "onnxruntime"}, module
        if module.startswith("onnx_arsvd.graph."):
            assert "onnxruntime" not in _third_party(module, lazy=True), module


def test_the_layering_test_sees_a_forbidden_import() -> None:
    graph = {"onnx_arsvd.numerics.x": {"onnx_arsvd.measure.sessions"}}
    assert {t for t in graph["onnx_arsvd.numerics.x"] if t.split(".")[1] in ("measure",)}


def test_presentation_reaches_neither_the_runtime_nor_scipy() -> None:
    graph = import_graph()
    for start in ("onnx_arsvd.report.model_report", "onnx_arsvd.report.bench_report", "onnx_arsvd.measure.results"):
        for module in _reached(graph, start):
            heavy = _third_party(module) & {"onnxruntime", "scipy"}
            assert not heavy, f"{start} reaches {module}, which imports {sorted(heavy)}"


def test_modules_and_classes_stay_small() -> None:
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        assert source.count("\n") <= MAX_MODULE_LINES, f"{module}: {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_CLASS_LINES, f"{module}.{node.name}: {lines} lines"


def test_import_and_help_load_no_heavy_dependency() -> None:
    code = ("import sys, onnx_arsvd, contextlib, io\n"
            "from onnx_arsvd.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: status = main(['--help'])\n"
            "assert status == 0 and 'compress' in out.getvalue(), out.getvalue()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"--help imported {result.stdout.strip()}"
