"""Loading lazily, writing atomically, external data in and out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_arsvd import FixedRankPolicy, compress, model_io
from onnx_arsvd.errors import InvalidInputError
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
    assert _files(out_dir) == ["small.onnx", "small.onnx.data"]
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).hexdigest() == digest
    onnx.checker.check_model(str(out_dir / "small.onnx"), full_check=True)
    assert report.file_bytes_after == sum(p.stat().st_size for p in out_dir.iterdir())
    x = {"X": np.ones((2, 48), np.float32)}
    assert run(out_dir / "small.onnx", x)[0].shape == (2, 10)


def test_weights_over_threshold_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # stands in for 2 GB
    model = ir.from_proto(make_mlp())
    model_io.save_model(model, tmp_path / "big.onnx")
    assert _files(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert run(tmp_path / "big.onnx", {"X": np.ones((1, 48), np.float32)})[0].shape == (1, 10)


def test_failed_write_leaves_previous_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def crash(model: ir.Model, path: Path, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a mod")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        model_io.save_model(ir.from_proto(make_mlp()), target)
    assert target.read_bytes() == b"previous" and _files(tmp_path) == ["out.onnx"]


def test_output_data_file_may_not_overwrite_input_data(tmp_path: Path) -> None:
    # the input keeps its weights in "out.onnx.data": the very name the output's data would get
    onnx.save(make_mlp(), tmp_path / "src.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="out.onnx.data", size_threshold=0)
    model = model_io.load_model(tmp_path / "src.onnx")
    with pytest.raises(InvalidInputError, match="would overwrite the input's"):
        model_io.save_model(model, tmp_path / "out.onnx")
    assert _files(tmp_path) == ["out.onnx.data", "src.onnx"]


def test_missing_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="output folder does not exist"):
        model_io.save_model(ir.from_proto(make_mlp()), tmp_path / "nowhere" / "m.onnx")
