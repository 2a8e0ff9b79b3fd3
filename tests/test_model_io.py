"""Loading lazily, writing atomically, external data in and out."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.errors import InvalidInputError, OutputError
from onnx_arsvd.io import models as model_io
from onnx_arsvd.io import output
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
    _, report = compress(source, out_dir / "small.onnx", policy=FixedRankPolicy(4), min_params=0, samples=2,
                         factor_heads=True)
    names = _files(out_dir)
    assert names[0] == "small.onnx" and len(names) == 2 and re.fullmatch(r"small\.onnx\.[0-9a-f]{8}\.data", names[1])
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).hexdigest() == digest
    onnx.checker.check_model(str(out_dir / "small.onnx"), full_check=True)
    assert report.file_bytes_after == sum(p.stat().st_size for p in out_dir.iterdir())
    x = {"X": np.ones((2, 48), np.float32)}
    assert run(out_dir / "small.onnx", x)[0].shape == (2, 10)


def test_factors_of_an_external_data_model_go_through_scratch_and_match_the_in_memory_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with external data: factors are spilled to disk as made (memory maps, then tensors pointing into the
    scratch file), the output has the very weights an in-memory run gives, and no scratch file is left behind."""
    from onnx_arsvd.io import spill
    from onnx_arsvd.pipeline import compress as pipeline

    spills: list[spill.Spill] = []

    @contextlib.contextmanager
    def recording(folder: Path) -> Iterator[spill.Spill]:
        with spill.spill_into(folder) as scratch:
            spills.append(scratch)
            yield scratch

    monkeypatch.setattr(pipeline, "spill_into", recording)
    _save_external(make_mlp((96, 80, 64, 10)), tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()
    returned, _ = compress(tmp_path / "m.onnx", tmp_path / "out" / "a.onnx", policy=FixedRankPolicy(8), samples=2,
                           factor_heads=True)
    assert len(spills) == 1 and spills[0].bytes_written > 0 and not spills[0].folder.exists()
    assert spills[0].folder.parent == tmp_path / "out"  # the staging folder beside the output
    assert _files(tmp_path / "out")[0] == "a.onnx" and len(_files(tmp_path / "out")) == 2
    compress(make_mlp((96, 80, 64, 10)), tmp_path / "b.onnx", policy=FixedRankPolicy(8), samples=2, factor_heads=True)
    assert len(spills) == 1  # a model held in memory gets no scratch file
    spilled, in_memory = onnx.load(tmp_path / "out" / "a.onnx"), onnx.load(tmp_path / "b.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert weights and all(np.array_equal(onnx.numpy_helper.to_array(t), weights[t.name])
                           for t in spilled.graph.initializer)
    assert set(weights) == {t.name for t in spilled.graph.initializer}
    x = {"X": np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)}
    assert np.array_equal(run(tmp_path / "out" / "a.onnx", x)[0], run(tmp_path / "b.onnx", x)[0])
    returned_weights = {v.name: v.const_value for v in returned.graph.initializers.values()}
    assert all(np.array_equal(t.numpy(), weights[name]) for name, t in returned_weights.items())  # the output's


def test_spilled_factors_read_back_unchanged_and_the_rewrite_points_into_the_spill(tmp_path: Path) -> None:
    from onnx_arsvd.graph.layers import find_layers
    from onnx_arsvd.io.spill import spill_into
    from onnx_arsvd.methods.lowrank.plan import plan_layers
    from onnx_arsvd.methods.lowrank.rewrite import apply_plans
    from onnx_arsvd.numerics.rank import RatioPolicy

    model = ir.from_proto(make_mlp((96, 80, 64, 10)))
    expected = [plan.factors for plan in plan_layers(find_layers(model)[0], RatioPolicy(0.25), min_params=0)]
    with output.StagingFolder(tmp_path) as staging, spill_into(staging.path) as scratch:
        plans = plan_layers(find_layers(model)[0], RatioPolicy(0.25), min_params=0, spill=scratch)
        factored = [plan for plan in plans if plan.factors is not None]
        assert factored and all(isinstance(f, np.memmap) for plan in factored for f in plan.factors)
        for plan, pair in zip(plans, expected, strict=True):
            assert (plan.factors is None) == (pair is None)
            if pair is not None and plan.factors is not None:
                assert all(np.array_equal(a, b) for a, b in zip(plan.factors, pair, strict=True))
        apply_plans(model, plans, scratch)
        assert all(isinstance(f, np.memmap) for plan in factored for f in plan.factors)  # the plans are unchanged
        new = [v.const_value for v in model.graph.initializers.values() if ".arsvd_" in (v.name or "")]
        assert new and all(isinstance(t, ir.ExternalTensor) and Path(t.path) == scratch.path for t in new)
        output.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert not scratch.path.exists() and not staging.path.exists()
    x = {"X": np.ones((2, 96), np.float32)}
    assert run(tmp_path / "out.onnx", x)[0].shape == (2, 10)


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
