"""What users expect of any CLI: --version, helpful --help, provider choice, bounded-memory verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnx_arsvd import __version__
from onnx_arsvd.cli.main import main

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onnx-arsvd {__version__}"


@pytest.mark.parametrize("command, positional",
                         [("compress", "model"), ("verify", "compressed"), ("bench", "original")])
def test_positional_arguments_have_help(command: str, positional: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    section = text.split("positional arguments:")[1].split("options:")[0]
    line = next(line for line in section.splitlines() if line.strip().startswith(positional))
    assert len(line.split()) > 1, f"{positional} has no help text: {line!r}"


def test_verify_batch_size_does_not_change_the_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compressed = tmp_path / "small.onnx"
    assert main(["compress", str(MODELS / "digits_mlp.onnx"), "-o", str(compressed), "--ratio", "0.25",
                 "--no-verify", "-q"]) == 0
    capsys.readouterr()
    results = []
    for batch_size in ("1", "7", "540"):
        assert main(["verify", str(MODELS / "digits_mlp.onnx"), str(compressed), "--data",
                     str(MODELS / "digits_test.npz"), "--batch-size", batch_size, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    first = results[0]
    assert first["samples"] == 540 and first["original"] is not None
    for other in results[1:]:
        assert other["original"] == first["original"] and other["compressed"] == first["compressed"]
        assert other["outputs"][0]["mean_cosine"] == pytest.approx(first["outputs"][0]["mean_cosine"], rel=1e-9)
        assert other["outputs"][0]["relative_error"] == pytest.approx(first["outputs"][0]["relative_error"], rel=1e-9)


def test_verify_on_an_unknown_provider_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(MODELS / "digits_mlp.onnx")
    assert main(["verify", model, model, "--providers", "warp-drive", "--dim", "batch=2"]) == 2
    assert "unknown provider" in capsys.readouterr().err


def test_cli_choices_are_the_librarys() -> None:
    """The CLI spells its --quantize and --method choices out (it imports nothing heavy at start-up): they must
    stay those the library accepts."""
    import argparse

    from onnx_arsvd.cli.main import build_parser
    from onnx_arsvd.methods.lowrank.settings import METHODS
    from onnx_arsvd.methods.quantize.configs import QUANTIZERS

    compress = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["compress"]
    choices = {a.dest: a.choices for a in compress._actions}
    assert list(choices["quantize"]) == list(QUANTIZERS) and set(choices["method"]) == set(METHODS)
