"""The benchmark harness: every script is registered and runs both ways, and the committed results match the pins."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from benchmarks.results_io import command, header, markdown_table, normalized, pinned_versions
from benchmarks.run_all import RESULTS, SCRIPTS
from tests.conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def _script_names() -> list[str]:
    """Modules of benchmarks/ that are scripts (they have a main), run_all itself aside."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.py")
                  if p.stem != "run_all" and re.search(r"^def main\(", p.read_text(encoding="utf-8"), re.MULTILINE))


def test_run_all_covers_every_script_and_every_result_file() -> None:
    assert sorted(s.name for s in SCRIPTS) == _script_names(), "register new scripts in benchmarks/run_all.py"
    claimed = [name for s in SCRIPTS for name in s.results]
    assert len(claimed) == len(set(claimed))
    unclaimed = {p.name for p in RESULTS.iterdir()} - set(claimed)
    assert not unclaimed, f"committed results that no script in run_all writes: {sorted(unclaimed)}"


@pytest.mark.parametrize("name", _script_names())
def test_script_imports_as_a_module_of_the_package(name: str) -> None:
    """What ``python -m benchmarks.NAME`` needs: no import that works only from inside benchmarks/."""
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)


def test_scripts_run_as_files_from_anywhere(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--list"], cwd=tmp_path,
                             env=environment, capture_output=True, text=True, check=False)
    assert listing.returncode == 0, listing.stderr
    assert all(f"python -m benchmarks.{s.name} |" in listing.stdout for s in SCRIPTS)
    script = subprocess.run([sys.executable, str(BENCHMARKS / "session_noise.py"), "--help"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, check=False)
    assert script.returncode == 0 and script.stdout.startswith("usage:"), script.stderr


def test_committed_results_record_the_pinned_versions() -> None:
    pins = pinned_versions()
    for result in sorted(RESULTS.glob("*.md")):
        head = "\n".join(result.read_text(encoding="utf-8").splitlines()[:12])
        recorded = {normalized(name): found for name, found in re.findall(r"([A-Za-z][\w.-]*) (\d+\.\d+[\w.+]*)", head)}
        assert set(recorded) & set(pins), f"{result.name} records no versions"
        for name, found in recorded.items():
            if name in pins:
                assert found.split("+")[0] == pins[name], f"{result.name}: {name} {found}, constraints say {pins[name]}"


def test_header_names_the_module_command_and_the_versions() -> None:
    lines = header("A title", "/anywhere/benchmarks/some_table.py", ["--seconds", "2", "--out", "a b.md"],
                   packages=("onnxruntime", "no-such-package"), notes=["one note"])
    assert lines[:3] == ["# A title", "", "- command: `python -m benchmarks.some_table --seconds 2 --out 'a b.md'`"]
    assert lines[5] == f"- versions: onnxruntime {version('onnxruntime')}, no-such-package (not installed)"
    assert lines[-1] == "- one note"
    assert command("benchmarks/x.py", []) == "python -m benchmarks.x"


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [(1, "x"), (22, "y")], "rl").splitlines() == [
        "| a | b |", "|---:|---|", "| 1 | x |", "| 22 | y |"]
    with pytest.raises(ValueError, match="2 columns but a row of 1"):
        markdown_table(["a", "b"], [(1,)])
