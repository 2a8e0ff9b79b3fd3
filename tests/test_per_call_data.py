"""Data that fits every model: one feed per call (a folder of .npz files, a reader, a list of feeds) for inputs whose
batch axis is not the first (a recurrent state) or models with no sample axis at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import EnergyPolicy, compress, verify
from onnx_arsvd.cli.main import main
from onnx_arsvd.errors import InvalidInputError
from tests.conftest import random_weight

STATE, HIDDEN, INPUT, CLASSES = 32, 96, 64, 5


def _recurrent() -> onnx.ModelProto:
    """logits = Relu(x @ W1 + mean over its first axis of state @ W2) @ W3: state is [2, N, 32], its batch axis the
    second."""
    weights = {"W1": random_weight(INPUT, HIDDEN, seed=1, decay=0.1), "W2": random_weight(STATE, HIDDEN, seed=2),
               "W3": random_weight(HIDDEN, CLASSES, seed=3)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="input_proj"),
             helper.make_node("ReduceMean", ["state"], ["s"], axes=[0], keepdims=0),
             helper.make_node("MatMul", ["s", "W2"], ["b"], name="state_proj"),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("MatMul", ["d", "W3"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "recurrent",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", STATE]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _no_sample_axis() -> onnx.ModelProto:
    """scores[10] = Relu(x[64] @ W1) @ W2: one call is one sample, and no axis counts samples."""
    w1, w2 = random_weight(INPUT, 128, seed=4, decay=0.1), random_weight(128, 10, seed=5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["scores"], name="fc2")], "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [INPUT])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [10])],
        [numpy_helper.from_array(w1.astype(np.float32), "W1"), numpy_helper.from_array(w2.astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _recurrent_calls(count: int, seed: int = 0, labels: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(count):
        rows = int(rng.integers(3, 9))
        call = {"state": rng.standard_normal((2, rows, STATE)).astype(np.float32),
                "x": rng.standard_normal((rows, INPUT)).astype(np.float32)}
        if labels:
            call["labels"] = rng.integers(0, CLASSES, rows)
        calls.append(call)
    return calls


def _folder(tmp_path: Path, calls: list[dict[str, np.ndarray]], name: str = "calls") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, call in enumerate(calls):
        np.savez(folder / f"{i:04d}.npz", **call)
    return folder


@pytest.fixture
def recurrent(tmp_path: Path) -> Path:
    path = tmp_path / "recurrent.onnx"
    onnx.save(_recurrent(), path)
    return path


class _Reader:
    """A ``CalibrationDataReader``: feeds until ``get_next()`` returns None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.given = iter(feeds), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self.feeds, None)
        self.given += feed is not None
        return feed


def test_arrays_cannot_hold_a_state_whose_batch_axis_is_second(recurrent: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    call = _recurrent_calls(1)[0]
    np.savez(tmp_path / "arrays.npz", **call)
    assert main(["verify", str(recurrent), str(recurrent), "--data", str(tmp_path / "arrays.npz"), "-q"]) == 2
    assert "different sample counts" in capsys.readouterr().err


def test_a_folder_of_calls_chooses_ranks_under_a_budget_and_verifies_per_call(
        recurrent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path, _recurrent_calls(400))
    out = tmp_path / "out.onnx"
    assert main(["compress", str(recurrent), "-o", str(out), "--data", str(folder), "--max-flips", "5%",
                 "--min-params", "0", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    budget = report["budget"]
    assert budget["unit"] == "calls" and budget["met"]
    assert budget["samples"]["held_out"] == 160 and budget["samples"]["calibration"] + budget["samples"]["fit"] == 240
    verification = report["verification"]
    assert verification["samples"] == 160 and verification["per_call"]
    assert report["params_after"] < report["params_before"]  # something was factored, within the budget
    (logits,) = verification["outputs"]
    assert logits["kind"] == "decisions" and logits["decisions"] > 160  # one per row of every held-out call
    assert logits["flips"] / logits["decisions"] <= 0.05
    assert sorted(os.listdir(folder)) == [f"{i:04d}.npz" for i in range(400)]  # the data is only read


def test_verify_reads_a_folder_of_calls_from_the_cli(recurrent: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path, _recurrent_calls(5))
    assert main(["verify", str(recurrent), str(recurrent), "--data", str(folder), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"5 calls ({folder}, one feed per call)" in out


def test_the_api_takes_a_reader_as_data_and_reads_it_once(recurrent: Path, tmp_path: Path) -> None:
    reader = _Reader(_recurrent_calls(6))
    _, report = compress(recurrent, tmp_path / "out.onnx", policy=EnergyPolicy(0.999), data=reader,
                         min_params=0)
    assert reader.given == 6
    assert report.verification is not None and report.verification.samples == 6
    assert report.verification.outputs[0].mean_cosine > 0.99


def test_a_model_without_a_sample_axis_counts_one_sample_per_call(tmp_path: Path) -> None:
    path = tmp_path / "single.onnx"
    onnx.save(_no_sample_axis(), path)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(INPUT).astype(np.float32)} for _ in range(7)]
    result = verify(path, path, data=feeds)
    assert result.samples == 7 and result.per_call
    (scores,) = result.outputs
    assert scores.decisions == 7 and scores.flips == 0 and scores.mean_cosine == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="array 'x' has shape"):  # arrays: a batch axis the model lacks
        verify(path, path, data={"x": np.stack([feed["x"] for feed in feeds])})


def test_labels_come_from_each_call(recurrent: Path, tmp_path: Path) -> None:
    calls = _recurrent_calls(4, labels=True)
    result = verify(recurrent, recurrent, data=_folder(tmp_path, calls))
    assert result.labelled == sum(len(call["labels"]) for call in calls)
    assert result.original is not None and result.accuracy_drop == 0.0
    del calls[1]["labels"]
    with pytest.raises(InvalidInputError, match="3 of 4 calls have labels"):
        verify(recurrent, recurrent, data=calls)
    with pytest.raises(InvalidInputError, match="labels given apart cannot be split by call"):
        verify(recurrent, recurrent, data=_recurrent_calls(2), labels=np.zeros(8, np.int64))


def test_a_folder_of_calls_reads_only_its_own_regular_npz_files(recurrent: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path, _recurrent_calls(2))
    (folder / "README.txt").write_text("not a call")
    assert verify(recurrent, recurrent, data=folder).samples == 2
    outside = tmp_path / "outside.npz"
    np.savez(outside, **_recurrent_calls(1)[0])
    (folder / "9999.npz").symlink_to(outside)
    assert main(["verify", str(recurrent), str(recurrent), "--data", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'9999.npz' is not a regular file (links are not followed)" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verify", str(recurrent), str(recurrent), "--data", str(empty), "-q"]) == 2
    assert "one .npz file per call" in capsys.readouterr().err


def test_a_call_is_checked_like_one_session_call(recurrent: Path) -> None:
    bad = _recurrent_calls(3)
    bad[2]["state"] = bad[2]["state"][:, :, :8]
    with pytest.raises(InvalidInputError, match="call 3: array 'state' has shape"):
        verify(recurrent, recurrent, data=bad)
    with pytest.raises(InvalidInputError, match="data reader: feed 1 is list, not a dict"):
        verify(recurrent, recurrent, data=_Reader([[1, 2]]))  # type: ignore[list-item]


def test_whitened_factors_calibrate_on_a_folder_of_calls(recurrent: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, _recurrent_calls(20))
    _, report = compress(recurrent, tmp_path / "out.onnx", policy=EnergyPolicy(0.99), method="whitened",
                         calibration=folder, data=folder, min_params=0)
    assert "calibration: " + str(folder) in report.method
    assert report.verification is not None and report.verification.samples == 20


def test_a_flip_budget_too_tight_for_the_data_says_how_much_data_it_needs(recurrent: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """With no flip at all the bound on the share of flips is about 3 / (decisions judged): 20 calls of a few rows
    cannot show 0.5%, and the run says so instead of blaming the layers."""
    folder = _folder(tmp_path, _recurrent_calls(20))
    assert main(["compress", str(recurrent), "-o", str(tmp_path / "o.onnx"), "--data", str(folder), "-q"]) == 1
    err = capsys.readouterr().err
    assert "0.50% needs some 600 decisions on the calibration part" in err and "--max-flips" in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_policy_run_scores_each_call_against_its_own_labels(recurrent: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    calls = _recurrent_calls(10, labels=True)
    assert main(["compress", str(recurrent), "-o", str(tmp_path / "o.onnx"), "--data", str(_folder(tmp_path, calls)),
                 "--tau", "0.99", "--min-params", "0", "--json", "-q"]) == 0
    verification = json.loads(capsys.readouterr().out)["verification"]
    assert verification["samples"] == 10 and verification["labelled"] == sum(len(c["labels"]) for c in calls)
    assert verification["original"] is not None and verification["compressed"] is not None
