"""Message edges: one line that says what to do, in the CLI's words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_arsvd.cli.main import main


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnx-arsvd: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("kind", "message"), [
    ("npy", "is one .npy array, not an .npz archive of arrays keyed by input name; save the inputs as an .npz"),
    ("text", "is not an .npz archive; save the inputs as an .npz of arrays keyed by the model's input names, "
             "e.g. np.savez(path, input_ids=..., attention_mask=...)"),
    ("ragged", "array 'X' holds Python objects (samples of different lengths?): pad every sample to one length"),
])
def test_data_that_is_not_an_npz_of_arrays_says_what_to_do(kind: str, message: str, mlp_path: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.npz"
    if kind == "npy":
        with open(data, "wb") as file:
            np.save(file, np.ones((4, 48), np.float32))
    elif kind == "text":
        data.write_text("input_ids\n1 2 3\n")
    else:
        np.savez(data, X=np.array([np.ones(48), np.ones(40)], dtype=object))
    assert message in _error(["verify", str(mlp_path), str(mlp_path), "--data", str(data), "-q"], capsys)


def test_two_policy_settings_are_named_not_a_policy_never_written(mlp_path: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["compress", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--tau", "0.9", "-q"],
                 capsys)
    assert "--tau, --ratio set different rank policies: give one" in err and "--policy energy" not in err


def test_a_cosine_budget_without_data_asks_for_data_not_labels(mlp_path: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["compress", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--min-cosine", "0.99", "-q"], capsys)
    assert "this budget needs --data: inputs to split and measure candidates on" in err and "labels" not in err
