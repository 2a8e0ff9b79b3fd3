"""onnxsim 0.8.1's structured FFN pruning on all-MiniLM-L6-v2, scored as benchmarks/width_table.py scores ours.

onnxsim (PyPI) prunes whole FFN units by ``||W_row|| x ||X||`` over calibration data
(``apply_structured_wanda_pruning``) and can refit the surviving weights by closed-form ridge regression
against the original model's activations (``finetune.apply_pruning_finetune``); its matchers want fused
graphs, so the export is first fused by onnxruntime's transformer optimizer (``optimize_model(model_type=
"bert")``, which makes ``BiasGelu`` and ``SkipLayerNormalization``). For each share of FFN units kept
(``sparsity`` = 1 - share, the same share in every layer) the pruned model, with and without the refit, is
scored on the 200 newsgroups posts against the ORIGINAL unfused export: the mean cosine of each real token's
``last_hidden_state`` with the original's, and the cosine of the attention-mask mean-pooled sentence
embeddings. Calibration is the 200 polarity sentences, fed to onnxsim as padding-free batches (the sentences
of one real length together, trimmed to it), since it takes plain input batches and no attention mask for
its statistics. Its attention-head pruning is tried on the fused and the plain graph and reported as
matched or not; the 50% pruned + refitted model is also quantized with onnxruntime's ``quantize_dynamic``
(INT8, per-channel, reduce_range off, the op types benchmarks/width_table.py's ``int8`` config quantizes).

This script runs in its OWN virtual environment, with onnxsim, and imports nothing from onnx_arsvd:

    python3 -m venv /tmp/onnxsim-venv
    /tmp/onnxsim-venv/bin/pip install onnxsim==0.8.1 onnxruntime==1.32.0 numpy==2.4.6 sympy
    /tmp/onnxsim-venv/bin/python benchmarks/onnxsim_table.py [--shares 0.75 0.5 0.25]
        [--out benchmarks/results/onnxsim_table.md]

(onnxruntime and numpy pinned to the project's benchmarks/constraints.txt; sympy is what onnxruntime's
transformer optimizer needs for its shape inference.) Needs the export: python models/build_minilm.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "models" / "build"
MINILM = BUILD / "minilm.onnx"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "onnxsim_table.md"
PACKAGES = ("onnxsim", "onnxruntime", "onnx", "numpy")
WEIGHT_OPS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul"}
FLOATS_AND_INT8 = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

Feed = dict[str, np.ndarray]


def package_versions() -> str:
    """'onnxsim 0.8.1, onnxruntime 1.32.0, ...' for the header."""
    parts = []
    for name in PACKAGES:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def load_tokens(name: str) -> Feed:
    """The token arrays of ``models/build/<name>.npz``, trimmed to the longest real sequence."""
    with np.load(BUILD / f"{name}.npz") as archive:
        length = int(archive["attention_mask"].sum(axis=1).max())
        return {k: archive[k][:, :length] for k in INPUTS}


def by_length(feed: Feed) -> list[Feed]:
    """The sentences as padding-free batches: those of one real length together, trimmed to that length."""
    lengths = feed["attention_mask"].sum(axis=1)
    return [{k: v[lengths == n, :n] for k, v in feed.items()} for n in np.unique(lengths)]


def session(model: str | os.PathLike) -> ort.InferenceSession:
    """A CPU session with onnxruntime's default threads, spinning off (the machine is shared), quiet logs."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])


def outputs(model: str | os.PathLike, feed: Feed, batch: int = 25) -> np.ndarray:
    """``last_hidden_state`` of every row of ``feed``."""
    runner = session(model)
    return np.concatenate([runner.run(["last_hidden_state"], {k: v[i:i + batch] for k, v in feed.items()})[0]
                           for i in range(0, len(feed["input_ids"]), batch)])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Scorer:
    """Token and sentence cosines of a model's outputs with the original unfused export's, on the unseen posts."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.mask = feed["attention_mask"].astype(bool)
        self.reference = outputs(MINILM, feed).astype(np.float64)

    def __call__(self, model: str | os.PathLike) -> tuple[float, float]:
        out = outputs(model, self.feed).astype(np.float64)
        tokens = cosine_rows(self.reference[self.mask], out[self.mask])
        weights = self.mask[..., None].astype(np.float64)
        pooled = [(x * weights).sum(axis=1) / weights.sum(axis=1) for x in (self.reference, out)]
        return float(tokens.mean()), float(cosine_rows(*pooled).mean())


def dense_params(model: onnx.ModelProto) -> int:
    """Entries of the 2-D float (or INT8) initializers that MatMul/Gemm-like nodes take: the dense weights."""
    initializers = {t.name: t for t in model.graph.initializer}
    names = {name for node in model.graph.node if node.op_type in WEIGHT_OPS for name in node.input}
    return sum(int(np.prod(t.dims)) for name, t in initializers.items()
               if name in names and len(t.dims) == 2 and t.data_type in FLOATS_AND_INT8)


def resized(before: onnx.ModelProto, after: onnx.ModelProto) -> int:
    """How many of ``before``'s initializers ``after`` changed the shape of (or removed)."""
    shapes = {t.name: tuple(t.dims) for t in after.graph.initializer}
    return sum(shapes.get(t.name) != tuple(t.dims) for t in before.graph.initializer)


def fuse(target: Path) -> str:
    """onnxruntime's BERT fusion of the export, saved to ``target``; returns the fused ops it counted.

    ``opt_level=0``: the Python fusions alone. The default for ``model_type="bert"`` (1) first runs
    onnxruntime's basic graph optimizations and, in onnxruntime 1.32, imports torch for that, which this
    environment does not have; run by hand, that pass fuses no attention here either.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(os.fspath(MINILM), model_type="bert", opt_level=0)
    fused.save_model_to_file(os.fspath(target))  # sorted, with the com.microsoft opset its fused ops need
    counted = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    return ", ".join(f"{n} {op}" for op, n in counted.items()) or "nothing"


def timed(call: Callable[..., onnx.ModelProto], *args: object, **kwargs: object
          ) -> tuple[onnx.ModelProto | None, float, str]:
    """The model ``call(*args, **kwargs)`` returns, its seconds, and '' or the error it raised (one line)."""
    started = time.perf_counter()
    try:
        model, error = call(*args, **kwargs), ""
    except Exception as exc:  # noqa: BLE001 - an onnxsim refusal is a result to report
        model, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return model, time.perf_counter() - started, error


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic INT8, signed per-channel weights, no reduce_range, on every op type onnxruntime's dynamic
    quantizer supports but Conv (the embedding Gathers included). ONNX shape inference cannot type what the
    fused contrib ops feed, so float is named as the default tensor type."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    quantize_dynamic(source, target, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                     op_types_to_quantize=sorted(set(IntegerOpsRegistry) - {"Conv"}),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


class Table:
    """The rows of the main table, each scored model saved under ``folder`` to measure its file."""

    def __init__(self, folder: Path, score: Scorer, original: onnx.ModelProto) -> None:
        self.folder, self.score = folder, score
        self.params, self.bytes = dense_params(original), MINILM.stat().st_size
        self.lines = ["| FFN units kept | onnxsim | tensors resized | dense params kept | file x original |"
                      " token cosine | sentence cosine | s (prune / refit) |",
                      "|---:|---|---:|---:|---:|---:|---:|---:|"]

    def add(self, share: str, label: str, path: Path, model: onnx.ModelProto, changed: int | str,
            seconds: str) -> None:
        token, sentence = self.score(path)
        self.lines.append(f"| {share} | {label} | {changed} | {dense_params(model) / self.params:.1%} |"
                          f" {path.stat().st_size / self.bytes:.3f} | {token:.4f} | {sentence:.4f} | {seconds} |")
        print(self.lines[-1], file=sys.stderr, flush=True)

    def save(self, model: onnx.ModelProto, name: str) -> Path:
        path = self.folder / f"{name}.onnx"
        onnx.save(model, path)
        return path


def pruning_rows(table: Table, fused_path: Path, calibration: list[Feed], shares: Sequence[float]) -> list[str]:
    """Every FFN pruned to each share by onnxsim, then refitted; the 50% refit also in INT8. Returns notes."""
    from onnxsim import finetune, pruning

    fused = onnx.load(fused_path)
    notes = []
    table.add("100%", "fused graph, nothing pruned", fused_path, fused, 0, "-")
    quantized = table.folder / "fused_int8.onnx"
    quantize_int8(fused_path, quantized)
    table.add("100%", "fused graph, INT8 (quantize_dynamic)", quantized, onnx.load(quantized), "-", "-")
    for share in shares:
        pruned, prune_s, error = timed(pruning.apply_structured_wanda_pruning, fused, calibration_data=calibration,
                                       sparsity=1.0 - share)
        if pruned is None:
            notes.append(f"apply_structured_wanda_pruning(sparsity={1 - share:.2f}) refused: {error}")
            continue
        changed = resized(fused, pruned)
        table.add(f"{share:.0%}", "apply_structured_wanda_pruning", table.save(pruned, f"wanda_{share}"), pruned,
                  changed, f"{prune_s:.0f} / -")
        refitted, refit_s, error = timed(finetune.apply_pruning_finetune, fused, pruned, calibration_data=calibration)
        if refitted is None:
            notes.append(f"apply_pruning_finetune after sparsity={1 - share:.2f} refused: {error}")
            continue
        path = table.save(refitted, f"refit_{share}")
        table.add(f"{share:.0%}", "+ apply_pruning_finetune (ridge refit)", path, refitted, changed,
                  f"{prune_s:.0f} / {refit_s:.0f}")
        if abs(share - 0.5) < 1e-9:
            quantized = table.folder / f"refit_{share}_int8.onnx"
            quantize_int8(path, quantized)
            table.add(f"{share:.0%}", "+ refit + INT8 (quantize_dynamic)", quantized, onnx.load(quantized), changed,
                      f"{prune_s:.0f} / {refit_s:.0f}")
    return notes


def matching_rows(table: Table, fused_path: Path, calibration: list[Feed]) -> list[str]:
    """What onnxsim's head pruning (and its FFN pruning on the unfused export) matched on MiniLM."""
    from onnxsim import pruning

    graphs = {"fused (BiasGelu, SkipLayerNormalization)": onnx.load(fused_path), "plain export": onnx.load(MINILM)}
    calls: list[tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]]] = [
        ("apply_attention_head_pruning(sparsity=0.5)",
         lambda m: pruning.apply_attention_head_pruning(m, sparsity=0.5)),
        ("apply_attention_head_wanda_pruning(sparsity=0.5, calibrated)",
         lambda m: pruning.apply_attention_head_wanda_pruning(m, calibration_data=calibration, sparsity=0.5)),
        ("apply_structured_wanda_pruning(sparsity=0.5, calibrated)",
         lambda m: pruning.apply_structured_wanda_pruning(m, calibration_data=calibration, sparsity=0.5)),
    ]
    lines = ["| onnxsim call | graph | tensors resized | token cosine | sentence cosine | s |",
             "|---|---|---:|---:|---:|---:|"]
    for label, call in calls:
        for graph, model in graphs.items():
            if graph == "fused (BiasGelu, SkipLayerNormalization)" and label.startswith("apply_structured"):
                continue  # the main table
            result, seconds, error = timed(call, model)
            if result is None:
                lines.append(f"| {label} | {graph} | refused: {error} | - | - | {seconds:.0f} |")
            elif (changed := resized(model, result)) == 0:
                lines.append(f"| {label} | {graph} | 0 (matched nothing) | - | - | {seconds:.0f} |")
            else:
                token, sentence = table.score(table.save(result, f"match_{len(lines)}"))
                lines.append(f"| {label} | {graph} | {changed} | {token:.4f} | {sentence:.4f} | {seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.75, 0.5, 0.25],
                        help="share of each FFN's units kept (onnxsim's sparsity is 1 - share)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        print("onnxsim is not installed: run this script in its own venv (see its docstring)", file=sys.stderr)
        return 1
    if not MINILM.exists():
        print(f"{MINILM} missing: run python models/build_minilm.py first", file=sys.stderr)
        return 1
    started, load = time.perf_counter(), os.getloadavg()[0]
    calibration, unseen = by_length(load_tokens("polarity")), load_tokens("newsgroups")
    score = Scorer(unseen)
    argv_used = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="onnxsim_table_") as folder:
        fused_path = Path(folder) / "fused.onnx"
        fused_ops = fuse(fused_path)
        table = Table(Path(folder), score, onnx.load(MINILM))
        notes = pruning_rows(table, fused_path, calibration, args.shares)
        matched = matching_rows(table, fused_path, calibration)
    parts = [
        "# onnxsim's structured FFN pruning on all-MiniLM-L6-v2 (the closest peer on ONNX)",
        "",
        f"- command: `{shlex.join(['/tmp/onnxsim-venv/bin/python', 'benchmarks/onnxsim_table.py', *argv_used])}`"
        " (its own venv, see the script's docstring)",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()};"
        f" load average at start {load:.1f}",
        f"- versions: {package_versions()}",
        f"- fusion: `onnxruntime.transformers.optimizer.optimize_model(model_type=\"bert\", opt_level=0)` fused"
        f" {fused_ops}; no attention block",
        f"- calibration: the 200 polarity sentences as {len(calibration)} padding-free batches (one per real"
        " length); quality: the 200 newsgroups posts, which no run saw, against the ORIGINAL unfused export",
        "- token cosine = mean over real tokens of the cosine of `last_hidden_state` with the original's;"
        " sentence cosine = the same for attention-mask mean pooling (as benchmarks/width_table.py)",
        "- dense params = entries of the 2-D weights of MatMul/Gemm(-like) nodes, against the original's;"
        " tensors resized = initializers whose shape the pruning changed; s = wall seconds of onnxsim's calls",
        "",
        "## Every FFN pruned to the same share (`apply_structured_wanda_pruning`, `sparsity` = 1 - share)",
        "",
        *table.lines,
        *([""] + [f"- {note}" for note in notes] if notes else []),
        "",
        "## What else onnxsim matched on this export",
        "",
        *matched,
        "",
        f"Wall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}.",
    ]
    text = "\n".join(parts) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
