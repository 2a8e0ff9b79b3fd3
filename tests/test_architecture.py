"""The package's shape: module-level imports flow one way, and start-up stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_arsvd"
HEAVY = ("onnxruntime", "scipy", "sympy", "torch")


def _module_imports() -> dict[str, set[str]]:
    """For each package module, the package modules it imports at module level (lazy imports excluded)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = f"onnx_arsvd.{path.stem}"
        targets: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # top-level statements only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_arsvd."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("onnx_arsvd.")}
        graph[name] = targets
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


def test_the_package_has_no_import_cycle() -> None:
    graph = _module_imports()
    assert "onnx_arsvd.api" in graph and graph["onnx_arsvd.api"], "the import graph was not read"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_presentation_does_not_import_the_runtime() -> None:
    graph = _module_imports()
    for module in ("onnx_arsvd.report", "onnx_arsvd.bench_report", "onnx_arsvd.results"):
        reached: set[str] = set()
        frontier = [module]
        while frontier:
            current = frontier.pop()
            reached.add(current)
            frontier += [m for m in graph.get(current, ()) if m not in reached]
        for name in reached:
            source = (PACKAGE / f"{name.split('.')[-1]}.py").read_text(encoding="utf-8")
            tree = ast.parse(source)
            top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
            top |= {node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)}
            roots = {t.split(".")[0] for t in top}
            assert "onnxruntime" not in roots, f"{module} reaches {name}, which imports onnxruntime"


def test_import_and_help_load_no_heavy_dependency() -> None:
    code = ("import sys, onnx_arsvd, contextlib, io\n"
            "from onnx_arsvd.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: status = main(['--help'])\n"
            "assert status == 0 and 'compress' in out.getvalue(), out.getvalue()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"--help imported {result.stdout.strip()}"
