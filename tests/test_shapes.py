"""Shapes from the data, or said: generated inputs say which dynamic dims they set to 1; the guard and bench refuse to
time at a symbolic dim of 1 unless asked, and take the shapes to time from the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_arsvd.cli.main import main
from tests.conftest import make_linear_model


@pytest.fixture
def sequence_model(tmp_path: Path) -> Path:
    """Y = X @ W with X of shape (batch, seq, 64)."""
    path = tmp_path / "seq.onnx"
    onnx.save(make_linear_model(64, 64, op="MatMul"), path)
    return path


def test_generated_inputs_say_which_dims_they_set(sequence_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(sequence_model), str(sequence_model), "-q"]) == 0
    assert ("warning: generated inputs set the dynamic dims seq=1: give --dim (seq=N) for the shapes the model "
            "really sees, or --data") in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "compress"])
def test_timing_at_a_symbolic_dim_of_one_is_refused_unless_asked(command: str, sequence_model: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ([command, str(sequence_model), str(sequence_model)] if command == "bench" else
            [command, str(sequence_model), "-o", str(tmp_path / "o.onnx"), "--rank", "8", "--min-params", "0",
             "--guard", "latency", "--guard-seconds", "0.01"])
    argv += ["--batch", "1", "--seconds", "0.02", "--no-memory", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seq have no value" in err and "give --dim (seq=N), or --data" in err
    assert main([*argv, "--dim", "seq=1"]) == 0  # asked for


def test_bench_times_at_the_shapes_of_the_data(sequence_model: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(0).standard_normal((4, 12, 64)).astype(np.float32))
    assert main(["bench", str(sequence_model), str(sequence_model), "--data", str(tmp_path / "d.npz"), "--batch", "2",
                 "--seconds", "0.02", "--no-memory", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input_shapes"] == {"2": {"X": [2, 12, 64]}}
