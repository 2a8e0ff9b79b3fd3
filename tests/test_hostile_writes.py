"""What a run removes, places and refuses: only files it provably wrote, everything placed together or not at all.

Names are something anyone can choose, so every case here gives a file a name this tool uses (an old output's
data file, a staging folder) without the tool having written it, and checks that the file survives. Killed runs
are real processes killed with SIGKILL; a live run in another PID namespace is started with ``unshare`` where
the machine allows it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.cli.main import main
from onnx_arsvd.errors import OutputError
from onnx_arsvd.io.output import DATA_KEY, STAGING_PREFIX, save_model
from tests.conftest import REPO, make_linear_model, make_mlp, run

ENV = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
RANK4 = ["--policy", "rank", "--rank", "4", "--min-params", "0", "-q"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("onnx-arsvd: error: ") and err.count("\n") == 1, err
    return err


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)]


# --- an old output's data file: removed only when this tool provably wrote it ----------------------------------

def _user_saved_output(folder: Path, data_name: str = "out.onnx.0badc0de.data", record: str | None = None) -> Path:
    """``folder/out.onnx`` saved by the user (onnx.save), its weights at ``data_name``; ``record`` forges this
    tool's metadata record."""
    model = make_mlp(seed=3)
    if record is not None:
        helper.set_model_props(model, {DATA_KEY: record})
    onnx.save(model, folder / "out.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_name, size_threshold=0)
    return folder / data_name


def test_a_symlink_named_like_an_old_outputs_data_does_not_delete_its_target(mlp_path: Path, tmp_path: Path) -> None:
    """The issue's reproduction, with this tool's metadata record forged too: the symlink's target survives."""
    home, out = tmp_path / "home", tmp_path / "d"
    home.mkdir()
    out.mkdir()
    precious = home / "precious.txt"
    precious.write_text("mine")
    data = _user_saved_output(out, record=f"out.onnx.0badc0de.data {'0' * 32}")
    data.unlink()
    data.symlink_to(Path("..") / "home" / "precious.txt")
    assert main(["compress", str(mlp_path), "-o", str(out / "out.onnx"), *RANK4]) == 0
    assert precious.read_text() == "mine" and data.is_symlink()


def test_a_data_file_this_tool_did_not_write_is_kept(mlp_path: Path, tmp_path: Path) -> None:
    data = _user_saved_output(tmp_path)
    before = _digest(data)
    assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--external-data", *RANK4]) == 0
    assert _digest(data) == before


def test_the_runs_own_data_file_is_kept_whatever_its_name(tmp_path: Path) -> None:
    """--data named like the old output's data file, and the old output pointing at it."""
    onnx.save(make_mlp(), tmp_path / "m.onnx")
    data = _user_saved_output(tmp_path, "out.onnx.00000000.data")
    data.unlink()
    np.savez(tmp_path / "d.npz", X=np.ones((4, 48), np.float32))
    os.replace(tmp_path / "d.npz", data)
    before = _digest(data)
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--data", str(data),
                 *RANK4]) == 0
    assert _digest(data) == before


def test_an_old_output_written_by_this_tool_loses_its_data_file_only(tmp_path: Path) -> None:
    save_model(ir.from_proto(make_mlp(seed=1)), tmp_path / "out.onnx", external_data=True)
    first = [p.name for p in tmp_path.glob("out.onnx.*.data")]
    save_model(ir.from_proto(make_mlp(seed=2)), tmp_path / "out.onnx", external_data=True)
    second = [p.name for p in tmp_path.glob("out.onnx.*.data")]
    assert len(first) == len(second) == 1 and first != second
    assert run(tmp_path / "out.onnx", {"X": np.ones((1, 48), np.float32)})[0].shape == (1, 10)


def test_placement_moves_the_data_before_the_model_and_removes_the_old_data_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order that keeps a reader safe: the new data under a fresh name, then the model, then the old data."""
    from onnx_arsvd.io import output

    save_model(ir.from_proto(make_mlp(seed=1)), tmp_path / "out.onnx", external_data=True)
    old = next(tmp_path.glob("out.onnx.*.data"))
    steps: list[str] = []
    real_replace, real_unlink = os.replace, Path.unlink

    def replace(source: object, destination: object) -> None:
        steps.append(f"place {Path(os.fspath(destination)).name}")  # type: ignore[arg-type]
        real_replace(source, destination)  # type: ignore[arg-type]

    def unlink(path: Path, missing_ok: bool = False) -> None:
        steps.append(f"remove {path.name}")
        real_unlink(path, missing_ok=missing_ok)

    with output.stage_model(ir.from_proto(make_mlp(seed=2)), tmp_path / "out.onnx", external_data=True) as staged:
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(Path, "unlink", unlink)
        staged.place()
        monkeypatch.undo()
    assert steps == [f"place {staged.data_name}", "place out.onnx", f"remove {old.name}"]


def test_a_placement_killed_between_its_renames_leaves_an_orphan_that_the_next_run_removes(tmp_path: Path) -> None:
    code = ("import os, sys, onnx_ir as ir\nfrom pathlib import Path\nfrom onnx_arsvd.io import output\n"
            "from tests.conftest import make_mlp\n"
            "real = os.replace\n"
            "def replace(a, b):\n"
            "    real(a, b)\n"
            f"    if Path(b).parent == Path({os.fspath(tmp_path)!r}): os.kill(os.getpid(), 9)\n"
            "os.replace = replace\n"
            f"output.save_model(ir.from_proto(make_mlp()), Path({os.fspath(tmp_path / 'out.onnx')!r}), "
            "external_data=True)\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob("out.onnx.*.data"))) == 1 and not (tmp_path / "out.onnx").exists()
    onnx.save(make_mlp(), tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--external-data",
                 *RANK4]) == 0
    assert len(list(tmp_path.glob("out.onnx.*.data"))) == 1  # the new output's only
    assert _staging(tmp_path) == []


# --- staging folders: removed only when abandoned by a run of this tool ----------------------------------------

_HOLD = ("import sys\nfrom pathlib import Path\nfrom onnx_arsvd.io.output import StagingFolder\n"
         "folder = StagingFolder(Path(sys.argv[1]))\nprint(folder.path, flush=True)\n")


def _abandoned(folder: Path) -> Path:
    """A staging folder whose run was killed (SIGKILL) while it held it."""
    child = subprocess.run([sys.executable, "-c", _HOLD + "import os; os.kill(os.getpid(), 9)\n", str(folder)],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL
    return Path(child.stdout.strip())


def _live(folder: Path, prefix: list[str] = ()) -> tuple[subprocess.Popen, Path]:  # type: ignore[assignment]
    """A staging folder held by a run that lives until its stdin closes."""
    child = subprocess.Popen([*prefix, sys.executable, "-c", _HOLD + "sys.stdin.read()\nfolder.close()\n", str(folder)],
                             cwd=REPO, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def test_an_abandoned_staging_folder_is_removed_and_a_live_ones_kept(mlp_path: Path, tmp_path: Path) -> None:
    abandoned = _abandoned(tmp_path)
    (abandoned / "out.onnx").write_bytes(b"half")
    child, live = _live(tmp_path)
    try:
        assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), *RANK4]) == 0
        assert not abandoned.exists() and live.is_dir()
    finally:
        child.communicate("", timeout=60)
    assert not live.exists()  # a run removes its own


def test_a_live_run_in_another_pid_namespace_keeps_its_staging(mlp_path: Path, tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--map-root-user", "true"],
                                                         capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare cannot make a PID namespace here")
    child, live = _live(tmp_path, ["unshare", "--pid", "--fork", "--map-root-user"])
    try:
        assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), *RANK4]) == 0
        assert live.is_dir() and (live / "lock").is_file()
    finally:
        child.communicate("", timeout=60)


def test_staging_like_names_that_this_tool_did_not_make_are_kept(mlp_path: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Old-style and huge-pid names, a folder without the lock's marker, another user's abandoned folder."""
    names = [".onnx-arsvd-4000000-x", ".onnx-arsvd-99999999999999999999-x", f"{STAGING_PREFIX}nolock",
             f"{STAGING_PREFIX}unmarked"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f"{STAGING_PREFIX}unmarked" / "lock").write_text("someone else's\n")
    (tmp_path / ".onnx-arsvd-4000000-file").write_text("a file")
    foreign = _abandoned(tmp_path)
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
        os.chown(foreign / "lock", 65534, 65534)
    assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), *RANK4]) == 0
    assert all((tmp_path / name).is_dir() for name in names) and (tmp_path / ".onnx-arsvd-4000000-file").exists()
    assert foreign.exists() == (os.geteuid() == 0)


@pytest.mark.parametrize("where", ["named like staging", "inside abandoned staging"])
def test_inputs_with_staging_names_are_never_removed(where: str, tmp_path: Path) -> None:
    """The input model, its external data (in a sub-folder) and --data, all named like staging, of a dead pid, or
    inside a staging folder whose run was killed: compress, inspect --report and verify --report keep them."""
    holder = tmp_path if where == "named like staging" else _abandoned(tmp_path)
    model = holder / ".onnx-arsvd-4000000-model.onnx"
    (holder / ".onnx-arsvd-4000000-data").mkdir()
    onnx.save(make_mlp(), model, save_as_external_data=True, location=".onnx-arsvd-4000000-data/w.bin",
              size_threshold=0)
    data = holder / ".onnx-arsvd-4000000-x.npz"
    np.savez(data, X=np.ones((4, 48), np.float32))
    inputs = (model, holder / ".onnx-arsvd-4000000-data" / "w.bin", data)
    before = {p: _digest(p) for p in inputs}
    assert main(["compress", str(model), "-o", str(tmp_path / "out.onnx"), "--data", str(data), *RANK4]) == 0
    assert main(["inspect", str(model), "--report", str(holder / "r.json"), "-q"]) == 0
    assert main(["verify", str(model), str(tmp_path / "out.onnx"), "--data", str(data), "--report",
                 str(holder / "v.json"), "-q"]) == 0
    assert {p: _digest(p) for p in inputs} == before


def test_read_only_commands_remove_nothing(mlp_path: Path, tmp_path: Path) -> None:
    abandoned = _abandoned(tmp_path)
    assert main(["inspect", str(mlp_path), "--report", str(tmp_path / "r.json"), "-q"]) == 0
    assert abandoned.is_dir()


# --- every output passes its checks, or nothing is written ------------------------------------------------------

def test_duplicate_initializer_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_linear_model(64, 48, op="MatMul")
    model.graph.initializer.append(numpy_helper.from_array(np.eye(64, 48, dtype=np.float32), "W"))
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--tau", "1.0",
                 "--min-params", "0", "-q"]) == 1
    assert "'W' is defined twice in the main graph" in _one_line_error(capsys)
    assert not (tmp_path / "out.onnx").exists()


def test_a_compressed_model_unrelated_to_the_original_fails_the_run_whatever_the_policy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite gone wrong (here: one factor negated after the pass) must not pass because no budget was asked."""
    from onnx_arsvd.pipeline import compress as pipeline

    real = pipeline.apply_plans

    def wrong(model, plans, spill=None):  # type: ignore[no-untyped-def]
        changed = real(model, plans, spill)
        value = next(v for name, v in model.graph.initializers.items() if name.endswith(".arsvd_b"))
        value.const_value = ir.tensor(-value.const_value.numpy(), name=value.name)
        return changed

    monkeypatch.setattr(pipeline, "apply_plans", wrong)
    onnx.save(make_linear_model(64, 48, op="MatMul"), tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="unrelated to the original's"):
        compress(tmp_path / "m.onnx", tmp_path / "out.onnx", policy=FixedRankPolicy(8), min_params=0, factor_heads=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _ir3_if_model() -> onnx.ModelProto:
    """IR 3: an If whose then-branch holds a Gemm on a Constant weight with a bias to fold (alpha, beta), and whose
    else-branch a MatMul on a Constant weight."""
    rng = np.random.default_rng(0)
    w_then, w_else = (rng.standard_normal((64, 48)).astype(np.float32) for _ in range(2))
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["Wt"], value=numpy_helper.from_array(w_then, "Wt_value")),
         helper.make_node("Constant", [], ["bt"], value=numpy_helper.from_array(np.ones(48, np.float32), "bt_value")),
         helper.make_node("Gemm", ["X", "Wt", "bt"], ["yt"], name="gemm_then", alpha=0.5, beta=2.0)],
        "then", [], [helper.make_tensor_value_info("yt", TensorProto.FLOAT, ["batch", 48])])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["We"], value=numpy_helper.from_array(w_else, "We_value")),
         helper.make_node("MatMul", ["X", "We"], ["ye"], name="matmul_else")],
        "else", [], [helper.make_tensor_value_info("ye", TensorProto.FLOAT, ["batch", 48])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        "ir3", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 48])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


def test_ir3_layers_in_bodies_give_a_model_that_passes_the_checker(tmp_path: Path) -> None:
    onnx.save(_ir3_if_model(), tmp_path / "m.onnx")
    onnx.checker.check_model(os.fspath(tmp_path / "m.onnx"), full_check=True)
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--policy", "rank",
                 "--rank", "48", "--min-params", "0", "--max-rank-fraction", "2", "--factor-heads", "--no-verify",
                 "-q"]) == 0
    written = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(written, full_check=True)
    bodies = [attribute.g for attribute in written.graph.node[0].attribute]
    assert written.ir_version == 3 and [[n.op_type for n in body.node].count("MatMul") for body in bodies] == [2, 2]
    assert all(not body.initializer for body in bodies)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    for cond in (True, False):  # at full rank the factored model is the original
        feed = {"cond": np.array(cond), "X": x}
        np.testing.assert_allclose(run(tmp_path / "out.onnx", feed)[0], run(tmp_path / "m.onnx", feed)[0],
                                   rtol=1e-4, atol=1e-3)


def test_a_written_model_that_fails_the_checker_is_not_placed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Verified or not: here the pass leaves a second definition of a value, which the checker rejects."""
    from onnx_arsvd.pipeline import compress as pipeline

    real = pipeline.apply_plans

    def invalid(model, plans, spill=None):  # type: ignore[no-untyped-def]
        changed = real(model, plans, spill)
        first = model.graph[0]
        model.graph.append(ir.Node("", "Identity", [first.inputs[0]], outputs=[ir.Value(name=first.outputs[0].name)]))
        return changed

    monkeypatch.setattr(pipeline, "apply_plans", invalid)
    onnx.save(make_mlp(), tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), *RANK4, "--no-verify"]) == 1
    assert "the written model fails onnx.checker" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# --- data: read only what the model needs, refuse what cannot be measured ---------------------------------------

def _npz_with(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(f"{name}.npy", content)


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _lying_npy(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring ``shape`` of float32, followed by 16 bytes."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 16


def test_an_unused_npz_member_is_never_read(mlp_path: Path, tmp_path: Path) -> None:
    """A member the model does not use, whose header claims 4 TB: the run never opens it."""
    _npz_with(tmp_path / "d.npz", {"X": _npy(np.ones((8, 48), np.float32)), "junk": _lying_npy((10**12,))})
    assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--data", str(tmp_path / "d.npz"),
                 *RANK4]) == 0


@pytest.mark.parametrize(("shape", "message"), [((10**12, 48), "declares shape (1000000000000, 48)"),
                                                 ((4, 48), "declares shape (4, 48) of float32 (768 bytes) but holds")])
def test_a_member_whose_header_lies_is_refused_before_it_is_allocated(
        shape: tuple[int, ...], message: str, mlp_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _npz_with(tmp_path / "d.npz", {"X": _lying_npy(shape)})
    assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--data", str(tmp_path / "d.npz"),
                 *RANK4]) == 2
    assert message in _one_line_error(capsys)


def test_an_attention_mask_of_all_zeros_is_an_error_not_a_perfect_score(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_padding import _data, _masked_model

    onnx.save(_masked_model(np.random.default_rng(0).standard_normal((16, 12))), tmp_path / "m.onnx")
    data = _data()
    data["attention_mask"][3] = 0
    np.savez(tmp_path / "d.npz", **data)
    assert main(["verify", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                 "-q"]) == 2
    assert "sample 3 has an attention mask of all zeros" in _one_line_error(capsys)


def test_verification_says_how_many_positions_each_sample_compared(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_padding import _data, _masked_model

    onnx.save(_masked_model(np.random.default_rng(0).standard_normal((16, 12))), tmp_path / "m.onnx")
    data = _data()
    np.savez(tmp_path / "d.npz", **data)
    assert main(["verify", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                 "-q"]) == 0
    lengths = data["attention_mask"].sum(axis=1)
    assert (f"compared at {lengths.sum()} real token positions ({lengths.min()} to {lengths.max()} per sample)"
            in capsys.readouterr().out)


# --- leftovers: a kill leaves nothing outside the staging folder; everything is placed together -----------------

def test_sigkill_during_quantization_leaves_nothing_in_tmpdir_and_the_next_run_cleans_up(mlp_path: Path,
                                                                                        tmp_path: Path) -> None:
    """onnxruntime's quantizer copies the whole model to disk: in the staging folder, not in $TMPDIR."""
    temporary, out = tmp_path / "tmpdir", tmp_path / "out"
    temporary.mkdir()
    out.mkdir()
    code = ("import os, sys\nimport onnxruntime.quantization as q\nreal = q.quantize_dynamic\n"
            "def killed(*args, **kwargs):\n    real(*args, **kwargs)\n    os.kill(os.getpid(), 9)\n"
            "q.quantize_dynamic = killed\nfrom onnx_arsvd.cli.main import main\n"
            f"main(['compress', {os.fspath(mlp_path)!r}, '-o', {os.fspath(out / 'c.onnx')!r}, '--quantize', 'int8', "
            "'--no-verify', '-q'])\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**ENV, "TMPDIR": os.fspath(temporary)},
                           timeout=300, check=False)
    assert child.returncode == -signal.SIGKILL
    assert [p.name for p in temporary.iterdir()] in ([], [".ses"])  # onnxruntime's own 51-byte session id file
    left = _staging(out)
    assert len(left) == 1 and any(p.suffix == ".onnx" for p in left[0].rglob("*"))  # the quantizer's copies
    assert main(["compress", str(mlp_path), "-o", str(out / "c.onnx"), *RANK4]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c.onnx"]


def test_a_report_that_cannot_be_written_leaves_no_model(mlp_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = Path.write_text

    def full_disk(path: Path, text: str, *args: object, **kwargs: object) -> int:
        if path.name == "r.json":
            raise OSError(28, "No space left on device")
        return real(path, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
                 *RANK4]) == 1
    assert "cannot write the report (No space left on device)" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_the_report_and_the_model_are_placed_together(mlp_path: Path, tmp_path: Path) -> None:
    assert main(["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.md"),
                 *RANK4]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.onnx", "r.md"]
    assert "out.onnx" in (tmp_path / "r.md").read_text()


# --- edges: one line that names the cause --------------------------------------------------------------------------

def test_a_tensor_of_data_type_0_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_mlp()
    model.graph.initializer[1].data_type = TensorProto.UNDEFINED
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "-q"]) == 1
    assert "'b0' has no data type (0)" in _one_line_error(capsys)


def test_a_file_name_that_is_not_utf8_is_one_line(mlp_path: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    name = os.fsencode(tmp_path) + b"/m\xff.onnx"
    try:
        shutil.copy(mlp_path, name)
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses the name")
    assert main(["compress", os.fsdecode(name), "-o", str(tmp_path / "out.onnx"), *RANK4, "--report",
                 str(tmp_path / "r.md")]) == 0
    assert main(["compress", str(mlp_path), "-o", os.fsdecode(os.fsencode(tmp_path) + b"/o\xff.onnx"), *RANK4]) == 0
    assert "m\ufffd.onnx" in capsys.readouterr().out and "m\ufffd.onnx" in (tmp_path / "r.md").read_text()


def test_int8_quantization_of_an_fp16_model_is_refused_before_any_work(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(make_linear_model(64, 64, dtype=np.float16), tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--quantize", "int8",
                 *RANK4]) == 1
    err = _one_line_error(capsys)
    assert "quantization takes layers that compute in float32; 'dense' computes in float16" in err
    assert STAGING_PREFIX not in err and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_full_temporary_folder_is_one_line_that_names_it(mlp_path: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 4 KiB fail, as a full disk does: bench writes only its memory probe's
    feed, into the temporary folder."""
    import resource

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    child = subprocess.run([sys.executable, "-m", "onnx_arsvd", "bench", str(mlp_path), str(mlp_path), "--batch", "64",
                            "--seconds", "0.01", "-q"], cwd=REPO, env={**ENV, "TMPDIR": os.fspath(tmp_path)},
                           capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300, check=False)
    assert child.returncode == 1 and child.stderr.count("\n") == 1, child.stderr
    assert "cannot write the memory probe's input in the temporary folder" in child.stderr


@pytest.mark.parametrize("options", [[], ["--max-drop", "1", "--allocation", "threshold"]])
def test_sequential_where_it_cannot_apply_is_refused(options: list[str], mlp_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "d.npz", X=np.ones((8, 48), np.float32), labels=np.arange(8) % 10)
    argv = ["compress", str(mlp_path), "-o", str(tmp_path / "out.onnx"), "--sequential", "-q", *options]
    if not options:
        argv += ["--tau", "0.9"]
    assert main(argv + ["--data", str(tmp_path / "d.npz")]) == 2
    assert "sequential refits" in _one_line_error(capsys)
