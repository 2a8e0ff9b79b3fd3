"""Hostile models, clashing paths and failed runs: one-line errors, inputs byte-identical, no output.

Every case runs the CLI on files built here with the onnx API. Each checks the exit code, that
stderr is one line, that every file under the test folder (the inputs) hashes as before, that
nothing appears at the output paths, and, for models that point outside their folder, that the
secret's bytes appear in no file written (no file may appear at all: the check guards the check).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.cli.main import main
from tests.conftest import REPO, make_linear_model, make_mlp, run

SECRET = np.random.default_rng(7).standard_normal((32, 24)).astype(np.float32).tobytes()
"""As many bytes as the test model's weight: a file the model must never be able to pull in."""


def _snapshot(root: Path) -> dict[str, str]:
    return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _external(tensor: TensorProto, location: str, offset: int = 0, length: int | None = None) -> TensorProto:
    """``tensor`` with its data moved to ``location`` (the caller writes the file)."""
    moved = TensorProto()
    moved.CopyFrom(tensor)
    set_external_data(moved, location, offset if offset else None, length)
    moved.ClearField("raw_data")
    moved.data_location = TensorProto.EXTERNAL
    return moved


def _point_weight_at(model: onnx.ModelProto, location: str, **kwargs: int) -> onnx.ModelProto:
    model.graph.initializer[0].CopyFrom(_external(model.graph.initializer[0], location, **kwargs))
    return model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """tmp_path/model/ holds the model; tmp_path/outside/secret.bin must stay unread."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(SECRET)
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def _refused(argv: list[str], root: Path, code: int, message: str, capsys: pytest.CaptureFixture[str],
             outputs: tuple[Path, ...] = ()) -> None:
    """Run the CLI; assert the error, that no file changed or appeared, and no secret leaked."""
    before = _snapshot(root)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("onnx-arsvd: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _snapshot(root) == before
    for path in outputs:
        assert not path.exists()


def _leaked(root: Path, setup: dict[str, str]) -> list[str]:
    """Files not made by the test's setup that hold the secret's bytes."""
    new = [p for p in root.rglob("*")
           if p.is_file() and not p.is_symlink() and os.fspath(p.relative_to(root)) not in setup]
    return [os.fspath(p) for p in new if SECRET in p.read_bytes()]


# --- reading: nothing outside the model's folder, every tensor what it claims ---------------------------------

def _relative_escape(folder: Path) -> onnx.ModelProto:
    return _point_weight_at(make_linear_model(), "../outside/secret.bin")


def _absolute(folder: Path) -> onnx.ModelProto:
    return _point_weight_at(make_linear_model(), os.fspath(folder.parent / "outside" / "secret.bin"))


def _symlink_out(folder: Path) -> onnx.ModelProto:
    (folder / "weights.bin").symlink_to(folder.parent / "outside" / "secret.bin")
    return _point_weight_at(make_linear_model(), "weights.bin")


def _hard_link_out(folder: Path) -> onnx.ModelProto:
    os.link(folder.parent / "outside" / "secret.bin", folder / "weights.bin")
    return _point_weight_at(make_linear_model(), "weights.bin")


def _range_past_end(folder: Path) -> onnx.ModelProto:
    (folder / "weights.bin").write_bytes(SECRET[:1000])
    return _point_weight_at(make_linear_model(), "weights.bin", offset=0, length=len(SECRET))


def _length_not_dims(folder: Path) -> onnx.ModelProto:
    (folder / "weights.bin").write_bytes(SECRET + SECRET)
    return _point_weight_at(make_linear_model(), "weights.bin", offset=0, length=2 * len(SECRET))


def _constant_node_escape(folder: Path) -> onnx.ModelProto:
    model = make_linear_model(weight_as_constant_node=True)
    attribute = model.graph.node[0].attribute[0]
    attribute.t.CopyFrom(_external(attribute.t, "../outside/secret.bin"))
    return model


def _subgraph_escape(folder: Path) -> onnx.ModelProto:
    """An If whose then-branch holds an initializer pointing outside."""
    inner = numpy_helper.from_array(np.zeros((32, 24), np.float32), "inner_w")
    branch = helper.make_graph([helper.make_node("Identity", ["inner_w"], ["w_out"])], "then", [],
                               [helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [32, 24])],
                               initializer=[_external(inner, "../outside/secret.bin")])
    other = helper.make_graph([helper.make_node("Identity", ["W"], ["w_else"])], "else", [],
                              [helper.make_tensor_value_info("w_else", TensorProto.FLOAT, [32, 24])])
    model = make_linear_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["picked"], then_branch=branch, else_branch=other))
    model.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, [32, 24]))
    return model


def _huge_dims(folder: Path) -> onnx.ModelProto:
    model = make_linear_model()
    bias = model.graph.initializer[1]
    bias.ClearField("dims")
    bias.dims.extend([1_000_000, 1_000_000])
    bias.raw_data = b"\0" * 16
    return model


def _negative_dims(folder: Path) -> onnx.ModelProto:
    model = make_linear_model()
    weight = model.graph.initializer[0]
    weight.ClearField("dims")
    weight.dims.extend([-32, -24])
    return model


def _sparse_initializer(folder: Path) -> onnx.ModelProto:
    model = make_linear_model()
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "S_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [24]))
    model.graph.node.append(helper.make_node("Add", ["Y", "S"], ["Z"]))
    model.graph.output[0].name = "Z"
    model.graph.node[0].output[0] = "Y"
    model.graph.value_info.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 24]))
    return model


def _sparse_constant(folder: Path) -> onnx.ModelProto:
    model = _sparse_initializer(folder)
    sparse = model.graph.sparse_initializer.pop()
    model.graph.node.insert(0, helper.make_node("Constant", [], ["S"], name="sparse_bias", sparse_value=sparse))
    return model


def _missing_bias_file(folder: Path) -> onnx.ModelProto:
    model = make_linear_model()
    model.graph.initializer[1].CopyFrom(_external(model.graph.initializer[1], "bias.bin"))
    return model


HOSTILE_MODELS: dict[str, tuple[Callable[[Path], onnx.ModelProto], str]] = {
    "relative-escape": (_relative_escape, "leaves the model's folder"),
    "absolute-location": (_absolute, "is absolute"),
    "symlink-out": (_symlink_out, "leaves the model's folder"),
    "hard-link-out": (_hard_link_out, "hard links"),
    "range-past-end": (_range_past_end, "lies outside 'weights.bin'"),
    "length-not-dims": (_length_not_dims, "bytes of external data for dims [32, 24]"),
    "constant-node-escape": (_constant_node_escape, "leaves the model's folder"),
    "subgraph-escape": (_subgraph_escape, "leaves the model's folder"),
    "huge-dims": (_huge_dims, "declares dims [1000000, 1000000]"),
    "negative-dims": (_negative_dims, "negative dims [-32, -24]"),
    "sparse-initializer": (_sparse_initializer, "sparse initializers ('S') are not supported"),
    "sparse-constant": (_sparse_constant, "node 'sparse_bias' has a sparse tensor attribute"),
    "missing-external-file": (_missing_bias_file, "external data file 'bias.bin' cannot be read"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MODELS))
@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_hostile_model_is_refused_without_reading_outside(case: str, command: str, folder: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    build, message = HOSTILE_MODELS[case]
    onnx.save(build(folder), folder / "m.onnx")
    monkeypatch.chdir(folder)  # 'm.onnx' with no folder in the path, as the README's examples run it
    argv = [command, "m.onnx", "-q", "--policy", "rank", "--rank", "24", "--max-rank-fraction", "1e9",
            "--min-params", "0"] + (["-o", "out.onnx", "--no-verify"] if command == "compress" else [])
    setup = _snapshot(folder.parent)
    _refused(argv, folder.parent, 1, message, capsys, outputs=(folder / "out.onnx",))
    assert _leaked(folder.parent, setup) == []


def test_training_info_dropped_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_mlp()
    model.training_info.append(onnx.TrainingInfoProto(algorithm=helper.make_graph([], "step", [], [])))
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--no-verify",
                 "--json", "-q"]) == 0
    assert any("training_info" in note for note in json.loads(capsys.readouterr().out)["notes"])


def test_constant_node_external_data_is_inlined_in_the_output(tmp_path: Path) -> None:
    """The output's Constant no longer points at the input's data file: it loads after that file is gone."""
    model = make_linear_model(weight_as_constant_node=True)
    attribute = model.graph.node[0].attribute[0]
    (tmp_path / "w.bin").write_bytes(numpy_helper.to_array(attribute.t).tobytes())
    attribute.t.CopyFrom(_external(attribute.t, "w.bin"))
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()
    x = {"X": np.ones((2, 32), np.float32)}
    expected = run(tmp_path / "m.onnx", x)[0]
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out" / "c.onnx"), "--policy", "rank",
                 "--rank", "4", "--exclude", "*", "-q"]) == 0  # nothing factored: the Constant is written as it was
    (tmp_path / "w.bin").unlink()
    np.testing.assert_array_equal(run(tmp_path / "out" / "c.onnx", x)[0], expected)


# --- writing: never over an input, never over another output --------------------------------------------------

@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """tmp_path/m.onnx with its weights in tmp_path/weights.bin, and tmp_path/data.npz for it."""
    onnx.save(make_mlp(), tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    np.savez(tmp_path / "data.npz", X=np.ones((4, 48), np.float32))
    return tmp_path / "m.onnx"


CLASHES: dict[str, tuple[list[str], str]] = {
    "report-over-model": (["-o", "out.onnx", "--report", "m.onnx"], "--report would overwrite the input model file"),
    "report-over-weights": (["-o", "out.onnx", "--report", "weights.bin"],
                            "--report would overwrite the input model's external data"),
    "output-over-weights": (["-o", "weights.bin"], "-o would overwrite the input model's external data"),
    "output-over-data": (["-o", "data.npz", "--data", "data.npz"], "-o would overwrite the --data file"),
    "report-over-output": (["-o", "out.onnx", "--report", "out.onnx"], "--report and -o name the same file"),
    "plot-over-report": (["-o", "out.onnx", "--report", "r.json", "--bench", "--plot", "r.json"],
                         "--plot and --report name the same file"),
    "output-empty": (["-o", ""], "-o path '' is not a file name"),
    "output-dot": (["-o", "."], "-o path '.' is not a file name"),
    "output-folder": (["-o", "sub"], "the -o path is a folder"),
    "output-root": (["-o", "/"], "the -o path is a folder"),
    "output-fifo": (["-o", "pipe"], "is not a regular file"),
    "output-hard-link": (["-o", "alias.onnx"], "-o would overwrite the input model file"),
    "output-symlink": (["-o", "link.onnx"], "-o would overwrite the input model file"),
}


@pytest.mark.parametrize("case", sorted(CLASHES))
def test_clashing_or_unwritable_paths_fail_before_any_work(case: str, external_model: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = external_model.parent
    (root / "sub").mkdir()
    os.mkfifo(root / "pipe")
    os.link(external_model, root / "alias.onnx")
    (root / "link.onnx").symlink_to(external_model)
    monkeypatch.chdir(root)
    options, message = CLASHES[case]
    _refused(["compress", "m.onnx", "-q", *options], root, 2, message, capsys,
             outputs=(root / "out.onnx", root / "r.json"))
    assert [p.name for p in root.iterdir() if p.name.startswith(".onnx-arsvd")] == []


def test_write_into_proc_is_one_line(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compress", str(mlp_path), "-o", "/proc/onnx-arsvd-test.onnx", "--no-verify", "-q"])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith("onnx-arsvd: error: ") and err.count("\n") == 1, err
    assert not Path("/proc/onnx-arsvd-test.onnx").exists()


def test_bench_plot_into_missing_folder_fails_before_benchmarking(mlp_path: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["bench", str(mlp_path), str(mlp_path), "--plot", str(tmp_path / "nowhere" / "p.png"), "--seconds", "30",
              "-q"], tmp_path, 2, "nowhere: --plot folder does not exist", capsys)


# --- staging, cleanup and modes ---------------------------------------------------------------------------------

def test_report_keeps_the_users_umask(mlp_path: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert main(["inspect", str(mlp_path), "--report", str(tmp_path / "r.json"), "-q"]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_failed_report_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    from onnx_arsvd.errors import OutputError
    from onnx_arsvd.io.output import write_file

    def half_then_fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        write_file(tmp_path / "r.json", half_then_fail)
    assert list(tmp_path.iterdir()) == []


# --- errors: one line, always -------------------------------------------------------------------------------------

def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("onnx-arsvd: error: ")
    assert "The above exception was the direct cause of the following exception" in err  # the cause is chained


def test_ctrl_c_during_start_up_exits_130(mlp_path: Path) -> None:
    """SIGINT while main() is still importing numpy, onnx and onnxruntime: one line, exit 130."""
    import signal
    import time

    code = ("import sys, onnx_arsvd.cli.main\nprint('ready', flush=True)\n"
            f"sys.exit(onnx_arsvd.cli.main.main(['inspect', {os.fspath(mlp_path)!r}, '-q']))")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    time.sleep(0.2)  # past print(), well inside main()'s imports (about a second)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert child.returncode == 130 and err.strip() == "onnx-arsvd: interrupted", err


def test_a_zero_size_weight_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_linear_model(op="MatMul", x_shape=("batch", 32))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((32, 0), np.float32), "W"))
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 0
    onnx.save(model, tmp_path / "m.onnx")
    before = _snapshot(tmp_path)
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--min-params", "0",
                 "-q"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("onnx-arsvd: error: ") and err.count("\n") == 1, err
    assert "weight is empty (shape [32, 0])" in err  # the skip reason, not an internal error
    assert _snapshot(tmp_path) == before


def test_a_calibration_reader_feeding_nan_fails_before_any_output(tmp_path: Path) -> None:
    from onnx_arsvd import EnergyPolicy, InvalidInputError, compress

    class NanReader:
        def __init__(self) -> None:
            self.left = 2

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.left -= 1
            return {"X": np.full((4, 48), np.nan, np.float32)} if self.left >= 0 else None

    onnx.save(make_mlp(), tmp_path / "m.onnx")
    with pytest.raises(InvalidInputError, match="calibration reader feed 1: array 'X' holds NaN or Inf values"):
        compress(tmp_path / "m.onnx", tmp_path / "out.onnx", policy=EnergyPolicy(0.9), method="whitened",
                 calibration=NanReader(), min_params=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_write_that_runs_out_of_space_is_one_line_and_leaves_nothing(mlp_path: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource
    import signal

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.run([sys.executable, "-m", "onnx_arsvd", "compress", str(mlp_path), "-o", str(out / "c.onnx"),
                            "--no-verify", "-q"], cwd=REPO, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                           capture_output=True, text=True, preexec_fn=limit_file_size, timeout=120, check=False)
    assert child.returncode == 1 and child.stderr.count("\n") == 1, child.stderr
    assert child.stderr.startswith("onnx-arsvd: error: ") and "cannot write the output" in child.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("stage", ["rewrite", "verification"])
def test_ctrl_c_with_factors_spilled_to_disk_leaves_nothing(stage: str, external_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An external-data model spills its factors beside the output: Ctrl-C in the rewrite or in verification
    removes the scratch folder and writes no output, and the inputs are unchanged."""
    from onnx_arsvd.pipeline import compress as pipeline

    folder = external_model.parent
    before = _snapshot(folder)

    def interrupt(*args: object, **kwargs: object) -> None:
        assert any(p.name.startswith(".onnx-arsvd-") for p in folder.iterdir())  # the spill is live
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "apply_plans" if stage == "rewrite" else "verify", interrupt)
    with pytest.raises(KeyboardInterrupt):
        compress(external_model, folder / "out.onnx", policy=FixedRankPolicy(4), min_params=0, samples=1,
                 factor_heads=True)
    assert _snapshot(folder) == before
