"""Small real ONNX models built in the tests, and helpers to run them in onnxruntime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import EnergyPolicy, Report, compress
from onnx_arsvd.methods.lowrank.decision import DEFAULT_MAX_RANK_FRACTION

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
MINILM = MODELS / "build" / "minilm.onnx"

_DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def external_copy_elsewhere(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """``source`` saved in ``tmp_path/model`` with every weight in external data (``<stem>.data``), and the
    working folder moved to the empty ``tmp_path/elsewhere``: (the copy's path, that folder)."""
    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    copy = folder / source.name
    onnx.save_model(onnx.load(source), copy, save_as_external_data=True, location=f"{source.stem}.data",
                    size_threshold=0)
    monkeypatch.chdir(elsewhere)
    return copy, elsewhere


def random_weight(m: int, n: int, true_rank: int | None = None, seed: int = 0, decay: float = 0.0) -> np.ndarray:
    """A float64 m x n matrix: exactly of ``true_rank`` when given, else with spectrum s_i ~ exp(-decay * i)."""
    rng = np.random.default_rng(seed)
    if true_rank is not None:
        return rng.standard_normal((m, true_rank)) @ rng.standard_normal((true_rank, n)) / np.sqrt(m)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.exp(-decay * np.arange(min(m, n)))
    return (u * s) @ v.T


def make_linear_model(
    m: int = 32,
    n: int = 24,
    *,
    op: str = "Gemm",
    trans_b: bool = False,
    bias: str | None = "n",
    alpha: float = 1.0,
    beta: float = 1.0,
    true_rank: int | None = None,
    decay: float = 0.05,
    dtype: type = np.float32,
    x_shape: tuple[int | str, ...] | None = None,
    weight_as_constant_node: bool = False,
    opset: int = 17,
    ir_version: int = 8,
    seed: int = 0,
) -> onnx.ModelProto:
    """One dense layer Y = X @ W (+ bias), as ``Gemm`` (every attribute form) or ``MatMul``.

    ``bias`` is the shape of Gemm's C: "n" -> (n,), "1n" -> (1, n), "scalar" -> (), "bn" -> (4, n), None -> absent.
    """
    w = random_weight(m, n, true_rank, seed, decay).astype(dtype)
    stored = w.T.copy() if trans_b else w
    elem = _DTYPES[dtype]
    x_shape = x_shape or (("batch", m) if op == "Gemm" else ("batch", "seq", m))
    y_shape = (*x_shape[:-1], n)
    initializers = []
    nodes = []
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(stored, "W_value")))
    else:
        initializers.append(numpy_helper.from_array(stored, "W"))
    inputs = ["X", "W"]
    if op == "Gemm":
        attrs = {"transB": int(trans_b), "alpha": alpha, "beta": beta}
        if bias is not None:
            bias_shape = {"n": (n,), "1n": (1, n), "scalar": (), "bn": (4, n)}[bias]
            rng = np.random.default_rng(seed + 1)
            initializers.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(dtype), "C"))
            inputs.append("C")
        nodes.append(helper.make_node("Gemm", inputs, ["Y"], name="dense", **attrs))
    else:
        nodes.append(helper.make_node("MatMul", inputs, ["Y"], name="dense"))
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("X", elem, list(x_shape))],
        [helper.make_tensor_value_info("Y", elem, list(y_shape))],
        initializer=initializers,
    )
    if ir_version < 4:  # IR 3 lists every initializer among the graph inputs, as old exporters did
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def make_mlp(sizes: tuple[int, ...] = (48, 40, 32, 10), seed: int = 0, decay: float = 0.08) -> onnx.ModelProto:
    """A Gemm/Relu MLP with a dynamic batch, weights with a decaying spectrum."""
    nodes, initializers = [], []
    current = "X"
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        initializers += [
            numpy_helper.from_array(random_weight(m, n, seed=seed + i, decay=decay).astype(np.float32), f"W{i}"),
            numpy_helper.from_array(np.full(n, 0.1, np.float32), f"b{i}"),
        ]
        last = i == len(sizes) - 2
        gemm_out = "Y" if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [gemm_out], name=f"fc{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"h{i}"], name=f"relu{i}"))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in an onnxruntime CPU session."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def constant(name: str, array: object, dtype: type = np.float32) -> onnx.TensorProto:
    """An initializer named ``name`` holding ``array`` as ``dtype``."""
    return numpy_helper.from_array(np.asarray(array).astype(dtype), name)


def least_squares_error(x: np.ndarray, w: np.ndarray, kept: np.ndarray) -> float:
    """min over B, c of ||x_S B + c - x W||^2, by numpy's lstsq on the ``kept`` columns and a constant one."""
    design = np.hstack([x[:, kept], np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, x @ w, rcond=None)[0]
    return float(np.sum((design @ solution - x @ w) ** 2))


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), path)
    return path


def make_embedding_model(
    vocab: int = 50, hidden: int = 16, *, true_rank: int | None = None, ids_shape: tuple = ("batch", "seq"),
    axis: int = 0, seed: int = 0,
) -> onnx.ModelProto:
    """Y = Gather(table, ids): an embedding lookup, ids of any shape (() for a scalar)."""
    table = random_weight(vocab, hidden, true_rank, seed, decay=0.05).astype(np.float32)
    out_shape = [*ids_shape, hidden] if axis == 0 else [vocab, *ids_shape]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["Y"], name="embed", axis=axis)],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@dataclass(frozen=True)
class TextSet:
    """One labelled text set tokenized for MiniLM, and the original model's sentence embeddings of it."""

    feed: dict[str, np.ndarray]
    labels: np.ndarray
    original: np.ndarray


@dataclass
class CompressedMiniLM:
    """MiniLM compressed once per session (serialized), with its sentence embeddings computed once per text set."""

    model: bytes
    report: Report
    text: Callable[[str], TextSet]
    _embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    def embeddings(self, name: str) -> np.ndarray:
        """Sentence embeddings of the text set ``name`` by this compressed model."""
        from benchmarks.text_eval import sentence_embeddings

        if name not in self._embeddings:
            self._embeddings[name] = sentence_embeddings(self.model, self.text(name).feed)
        return self._embeddings[name]


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The MiniLM export (built by models/build_minilm.py); tests that need it skip without it."""
    if not MINILM.exists():
        pytest.skip("run models/build_minilm.py to build the MiniLM export")
    return MINILM


@pytest.fixture(scope="session")
def minilm_text(minilm: Path) -> Callable[[str], TextSet]:
    """``minilm_text(name)``: the polarity or newsgroups set, with the original's embeddings (once per session)."""
    from benchmarks.text_eval import load_text_set, sentence_embeddings

    sets: dict[str, TextSet] = {}

    def text_set(name: str) -> TextSet:
        if name not in sets:
            feed, labels = load_text_set(name)
            sets[name] = TextSet(feed, labels, sentence_embeddings(minilm, feed))
        return sets[name]

    return text_set


@pytest.fixture(scope="session")
def minilm_compressed(minilm: Path, minilm_text: Callable[[str], TextSet]) -> Callable[..., CompressedMiniLM]:
    """``minilm_compressed(tau, max_rank_fraction)``: MiniLM compressed at energy ``tau``, once per session."""
    models: dict[tuple[float, float], CompressedMiniLM] = {}

    def compressed(tau: float, max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION) -> CompressedMiniLM:
        key = (tau, max_rank_fraction)
        if key not in models:
            model, report = compress(minilm, policy=EnergyPolicy(tau), max_rank_fraction=max_rank_fraction,
                                     check=False)
            models[key] = CompressedMiniLM(ir.to_proto(model).SerializeToString(), report, minilm_text)
        return models[key]

    return compressed
