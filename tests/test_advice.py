"""What a run tells the user on stderr: a run that changed nothing, a requested quantization dropped (and how to
ship it), a rank policy far from the original on real data (an error with --strict)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnx_arsvd.cli.main import main
from tests.conftest import MODELS

DIGITS, DATA = MODELS / "digits_mlp.onnx", MODELS / "digits_test.npz"


def _warnings(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("onnx-arsvd: warning: ")]


def test_a_run_that_changes_nothing_says_so_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress", str(MODELS / "fashion_mlp.onnx"), "-o", str(tmp_path / "o.onnx"), "--tau", "0.99",
                 "-q"]) == 0
    assert any("nothing was changed: no layer was factored and nothing quantized" in w for w in _warnings(capsys))


@pytest.mark.parametrize("allocation", ["global", "threshold"])
def test_a_parameter_target_applies_the_requested_quantization(allocation: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing judges a parameter target that could rule quantization out: it used to be dropped silently."""
    out = tmp_path / "o.onnx"
    assert main(["compress", str(DIGITS), "-o", str(out), "--data", str(DATA), "--target-params", "0.85",
                 "--allocation", allocation, "--quantize", "int8", "-q"]) == 0
    assert "DynamicQuantizeLinear" in {node.op_type for node in onnx.load(out).graph.node}
    assert not any("was not applied" in w for w in _warnings(capsys))


def test_a_dropped_quantization_is_said_with_how_to_ship_it(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    assert main(["compress", str(DIGITS), "-o", str(out), "--data", str(DATA), "--min-cosine", "0.99999",
                 "--quantize", "int8", "-q"]) == 0
    warnings = _warnings(capsys)
    assert any(w.endswith("the written model is float") and "--quantize (int8) was not applied" in w
               and "misses the budget on the calibration part (its 95% bound" in w for w in warnings), warnings
    assert any("alone measures mean output cosine" in w and "to ship it, give --quantize int8 with about "
               "--min-cosine" in w for w in warnings), warnings
    assert "DynamicQuantizeLinear" not in {node.op_type for node in onnx.load(out).graph.node}


def test_a_policy_far_from_the_original_on_real_data_warns_and_fails_with_strict(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    argv = ["compress", str(DIGITS), "-o", str(out), "--tau", "0.5", "--data", str(DATA), "-q"]
    assert main(argv) == 0 and out.exists()
    assert any("accuracy points on --data, more than the default budget allows (1): give --max-drop 1" in w
               for w in _warnings(capsys))
    out.unlink()
    assert main([*argv, "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnx-arsvd: error: the written model loses") and "nothing written (--strict)" in err
    assert not out.exists()


def test_each_phase_ends_with_a_line_when_stderr_is_not_a_terminal(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """tqdm switches itself off outside a terminal, which left a run in a log silent: now one line per phase."""
    argv = ["compress", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--data", str(DATA), "--max-drop", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    for phase in ("calibration: 1 batch in ", "loss curves: 3 weights in ", "budget search: ",
                  "verification: 216 samples in "):
        assert any(line.startswith(f"onnx-arsvd: {phase}") and line.endswith(" s") for line in lines), lines
    assert main([*argv[:3], str(tmp_path / "q.onnx"), *argv[4:], "-q"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if " in " in line and line.endswith(" s")]
