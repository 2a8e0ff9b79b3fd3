"""What the benchmark scripts share: the versions in their header, and writing their Markdown result."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

PACKAGES = ("onnx-arsvd", "onnx", "onnxruntime", "onnx-ir", "numpy")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> str:
    """'onnx-arsvd 0.1.0, onnx 1.23.2, ...' for a result's header."""
    return ", ".join(f"{name} {version(name)}" for name in packages)


def write_result(text: str, out: Path) -> None:
    """Write a result file (creating its folder), then print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text, end="" if text.endswith("\n") else "\n")
