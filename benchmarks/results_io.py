"""What the benchmark scripts share: the header of a result file, its tables, its versions, and writing it.

Every result file starts with the same lines (title, the command that made it, date, machine, versions);
the versions are those of the installed packages, and ``benchmarks/constraints.txt`` pins the ones the
committed results came from.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from onnx_arsvd import Report, compress
from onnx_arsvd.api import BudgetMissedError
from onnx_arsvd.io.output import save_model

__all__ = ["CONSTRAINTS", "MINILM_PACKAGES", "PACKAGES", "command", "compress_studied", "header", "markdown_table",
           "normalized", "package_versions", "pinned_versions", "write_result"]

PACKAGES = ("onnx-arsvd", "onnx", "onnxruntime", "onnx-ir", "numpy")
MINILM_PACKAGES = (*PACKAGES, "scikit-learn", "torch", "transformers", "gensim")
"""For results on the MiniLM export: torch and transformers built it, gensim's text and the probe score it."""
CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"


def package_versions(packages: Sequence[str] = PACKAGES) -> str:
    """'onnx-arsvd 0.1.0, onnx 1.23.2, ...' for a result's header."""
    parts = []
    for name in packages:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def normalized(name: str) -> str:
    """A distribution name as pip compares them: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """The ``name==version`` pins of a constraints file, by normalized name."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, separator, pinned = requirement.partition("==")
            if not separator:
                raise ValueError(f"{path}: {requirement!r} is not pinned with ==")
            pins[normalized(name)] = pinned.strip()
    return pins


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that regenerates a result: ``python -m benchmarks.NAME ARGS`` (``script`` is its ``__file__``).

    ``argv`` are the script's arguments; None means this process's own.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", f"benchmarks.{Path(script).stem}", *arguments])


def header(
    title: str,
    script: str,
    argv: Sequence[str] | None = None,
    *,
    packages: Sequence[str] = PACKAGES,
    machine: str = "",
    notes: Iterable[str] = (),
) -> list[str]:
    """The lines a result file starts with: title, command, date, machine, versions, then one line per note.

    ``machine`` is appended to the machine line (e.g. CPU flags); ``packages`` are the ones whose
    versions the result depends on.
    """
    described = f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    return [
        f"# {title}",
        "",
        f"- command: `{command(script, argv)}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {described}{'; ' + machine if machine else ''}",
        f"- versions: {package_versions(packages)}",
        *(f"- {note}" for note in notes),
    ]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: all left)."""
    align = align or "l" * len(columns)
    if len(align) != len(columns):
        raise ValueError(f"{len(columns)} columns but alignment {align!r}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"{len(columns)} columns but a row of {len(row)}: {row!r}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def write_result(text: str, out: Path) -> None:
    """Write a result file (creating its folder), then print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text, end="" if text.endswith("\n") else "\n")


def compress_studied(model: object, output: Path | None = None, **options: Any) -> tuple[Report, bool]:
    """``compress``'s report, and whether the run missed its budget on the held-out data.

    A miss is a failed run for the tool (it writes nothing); a study still measures what it got, so the
    model that missed is saved to ``output`` here.
    """
    try:
        return compress(model, output, **options)[1], False
    except BudgetMissedError as error:
        if output is not None:
            save_model(error.model, output)
        return error.report, True


def held_out_quality(report: Report) -> str:
    """The verification's worst mean output cosine, and the accuracy drop when labels were given."""
    verification = report.verification
    assert verification is not None
    cosine = min(o.mean_cosine for o in verification.outputs)
    drop = verification.accuracy_drop
    return f"cosine {cosine:.4f}" + (f", drop {drop:+.2f} pts" if drop is not None else "")
