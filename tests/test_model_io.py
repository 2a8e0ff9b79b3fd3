"""Loading lazily, writing atomically, external data in and out."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_arsvd import FixedRankPolicy, compress, model_io, output
from onnx_arsvd.errors import InvalidInputError, OutputError
from tests.conftest import make_mlp, run


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_external_data_is_loaded_lazily(tmp_path: Path) -> None:
    _save_external(make_mlp(), tmp_path / "m.onnx")
    model = model_io.load_model(tmp_path / "m.onnx")
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)


def test_external_data_model_is_written_with_external_data(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    _save_external(make_mlp(), source)
    digest = hashlib.sha256((tmp_path / "weights.bin").read_bytes()).hexdigest()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _, report = compress(source, out_dir / "small.onnx", policy=FixedRankPolicy(4), min_params=0, samples=2)
    names = _files(out_dir)
    assert names[0] == "small.onnx" and len(names) == 2 and re.fullmatch(r"small\.onnx\.[0-9a-f]{8}\.data", names[1])
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).hexdigest() == digest
    onnx.checker.check_model(str(out_dir / "small.onnx"), full_check=True)
    assert report.file_bytes_after == sum(p.stat().st_size for p in out_dir.iterdir())
    x = {"X": np.ones((2, 48), np.float32)}
    assert run(out_dir / "small.onnx", x)[0].shape == (2, 10)


def test_weights_over_threshold_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "EXTERNAL_DATA_THRESHOLD", 1000)  # stands in for 2 GB
    model = ir.from_proto(make_mlp())
    output.save_model(model, tmp_path / "big.onnx")
    assert _files(tmp_path)[0] == "big.onnx" and _files(tmp_path)[1].endswith(".data")
    assert run(tmp_path / "big.onnx", {"X": np.ones((1, 48), np.float32)})[0].shape == (1, 10)


def test_failed_write_leaves_previous_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def crash(model: ir.Model, path: Path, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a mod")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", crash)
    with pytest.raises(OutputError, match="disk full"):
        output.save_model(ir.from_proto(make_mlp()), target)
    assert target.read_bytes() == b"previous" and _files(tmp_path) == ["out.onnx"]


def test_each_write_gets_a_fresh_data_file_and_drops_the_previous_one(tmp_path: Path) -> None:
    # the input keeps its weights in a file named like the output's data: it must survive
    onnx.save(make_mlp(), tmp_path / "src.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="out.onnx.data", size_threshold=0)
    model = model_io.load_model(tmp_path / "src.onnx")
    output.save_model(model, tmp_path / "out.onnx")
    first = set(_files(tmp_path)) - {"out.onnx", "out.onnx.data", "src.onnx"}
    output.save_model(model_io.load_model(tmp_path / "src.onnx"), tmp_path / "out.onnx")
    second = set(_files(tmp_path)) - {"out.onnx", "out.onnx.data", "src.onnx"}
    assert len(first) == len(second) == 1 and first != second
    assert "out.onnx.data" in _files(tmp_path)
    assert run(tmp_path / "out.onnx", {"X": np.ones((1, 48), np.float32)})[0].shape == (1, 10)


def test_missing_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="output folder does not exist"):
        output.save_model(ir.from_proto(make_mlp()), tmp_path / "nowhere" / "m.onnx")


def test_an_interrupted_placement_leaves_the_old_model_with_its_old_data(tmp_path: Path) -> None:
    """The new data arrives under a fresh name before the model: the old model still reads its own data."""
    target, x = tmp_path / "out.onnx", {"X": np.ones((1, 48), np.float32)}
    output.save_model(ir.from_proto(make_mlp(seed=1)), target, external_data=True)
    old = run(target, x)[0]
    with output.stage_model(ir.from_proto(make_mlp(seed=2)), target, external_data=True) as staged:
        assert staged.data_name is not None and not (tmp_path / staged.data_name).exists()
        os.replace(staged.path.parent / staged.data_name, tmp_path / staged.data_name)  # place()'s first step
    # killed here: the model rename never happened
    np.testing.assert_array_equal(run(target, x)[0], old)
