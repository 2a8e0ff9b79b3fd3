"""Verification metrics and inputs, on real onnxruntime sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import EnergyPolicy, compress, verify
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.io.data import load_data, split_batches
from onnx_arsvd.measure.agreement import OutputAgreement, macro_f1
from onnx_arsvd.measure.inputs import generated_batches
from onnx_arsvd.measure.results import OutputComparison, TaskScores, VerificationReport
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.measure.verification import compare_models, compare_with_reference, reference_outputs
from tests.conftest import MODELS, make_mlp


def test_macro_f1_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2: tp 1, fn 1 -> 2/3
    assert macro_f1(labels, predictions) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(labels, labels) == 1.0


def _compare(name: str, expected: list[np.ndarray], actual: list[np.ndarray]) -> OutputComparison:
    """One output compared batch by batch, as verification does."""
    agreement = OutputAgreement(name)
    for e, a in zip(expected, actual, strict=True):
        agreement.add(e, a)
    return agreement.result()


def test_comparison_metrics() -> None:
    expected = [np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])]  # two batches, compared as one set of rows
    actual = [np.array([[3.0, 4.0]]), np.array([[0.0, 1.0]])]
    agreement = OutputAgreement("y")
    for e, a in zip(expected, actual, strict=True):
        agreement.add(e, a)
    result = agreement.result()
    assert result.max_abs_error == 1.0
    assert result.relative_error == pytest.approx(np.sqrt(2) / np.sqrt(26))
    assert result.mean_cosine == pytest.approx(0.5) and result.min_cosine == pytest.approx(0.0)
    assert result.cosine_stderr == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))


def test_cosine_bound_covers_the_true_mean_95_percent_of_the_time() -> None:
    """2000 simulated verifications of 100 samples, each at a random angle in [0, 0.6] rad from the original."""
    rng = np.random.default_rng(0)
    true_mean = np.sin(0.6) / 0.6  # E[cos(theta)] for theta uniform on [0, 0.6]
    expected = np.tile([1.0, 0.0], (100, 1))
    holds = []
    for _ in range(2000):
        theta = rng.uniform(0.0, 0.6, 100)
        result = _compare("y", [expected], [np.stack([np.cos(theta), np.sin(theta)], axis=1)])
        holds.append(result.cosine_bound() <= true_mean)
        assert result.cosine_bound(z=0.0) == result.mean_cosine > result.cosine_bound() > result.cosine_bound(z=3.0)
    assert 0.92 <= np.mean(holds) <= 0.98  # the normal approximation of a one-sided 95% bound


def test_identical_outputs_have_a_bound_of_one() -> None:
    expected = np.random.default_rng(0).standard_normal((20, 5))
    assert _compare("y", [expected], [expected.copy()]).cosine_bound() == pytest.approx(1.0)


def _embedding_model(vocab: int = 7) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"]),
         helper.make_node("MatMul", ["emb", "W"], ["Y"])],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", 3])],
        initializer=[numpy_helper.from_array(np.ones((vocab, 4), np.float32), "table"),
                     numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_generated_token_ids_index_the_embedding_table() -> None:
    model = _embedding_model(vocab=7)
    session = make_session(model.SerializeToString())
    batches = generated_batches(session, ir.from_proto(model), {"batch": 3, "seq": 50}, samples=4)
    ids = np.stack([b["ids"] for b in batches])
    assert ids.shape == (4, 3, 50) and ids.min() >= 0 and ids.max() == 6


def test_fixed_batch_dim_sets_the_slice_size(tmp_path: Path) -> None:
    model = make_mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    session = make_session(model.SerializeToString())
    feed = {"X": np.zeros((10, 48), np.float32)}
    assert [b["X"].shape[0] for b in split_batches(feed, session, batch_size=256)] == [4, 4]


def test_verify_detects_a_changed_model() -> None:
    original = make_mlp()
    changed = make_mlp()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(changed.graph.initializer[0]) * 1.5, changed.graph.initializer[0].name))
    identical = verify(original, make_mlp(), samples=3, dims={"batch": 5})
    different = verify(original, changed, samples=3, dims={"batch": 5})
    assert identical.samples == 15 and identical.outputs[0].max_abs_error == 0.0
    assert different.outputs[0].max_abs_error > 0.01 and different.outputs[0].mean_cosine < 1.0


def test_unknown_dim_name_is_an_error() -> None:
    model = _embedding_model()
    session = make_session(model.SerializeToString())
    with pytest.raises(InvalidInputError,
                       match=r"dimension sequence: no dynamic dimension of that name; the model's are: batch, seq"):
        generated_batches(session, ir.from_proto(model), {"sequence": 16}, samples=1)


def test_generated_masks_are_all_ones() -> None:
    model = _embedding_model()
    model.graph.input.append(onnx.helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
    model.graph.node.append(onnx.helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT))
    model.graph.output.append(onnx.helper.make_tensor_value_info("mask_f", TensorProto.FLOAT, ["batch", "seq"]))
    session = make_session(model.SerializeToString())
    (feed,) = generated_batches(session, ir.from_proto(model), {"batch": 2, "seq": 9}, samples=1)
    assert np.all(feed["attention_mask"] == 1) and feed["attention_mask"].dtype == np.int64


def _paired_report(counts: np.ndarray) -> VerificationReport:
    """Two classifiers scored on the same samples, from the counts (both right, only original right,
    only compressed right, neither)."""
    n = int(counts.sum())
    original, compressed = TaskScores((counts[0] + counts[1]) / n, 0.0), TaskScores((counts[0] + counts[2]) / n, 0.0)
    return VerificationReport("CPUExecutionProvider", "", n, original=original, compressed=compressed,
                              flipped=int(counts[1] + counts[2]))


def test_accuracy_drop_bound_covers_the_true_drop_95_percent_of_the_time() -> None:
    """2000 simulated test sets of 1000 samples; the compressed model loses 3% and gains 1%: a true drop of 2 points."""
    rng = np.random.default_rng(0)
    probabilities = [0.85, 0.03, 0.01, 0.11]
    reports = [_paired_report(rng.multinomial(1000, probabilities)) for _ in range(2000)]
    assert 0.92 <= np.mean([r.accuracy_drop_bound() >= 2.0 for r in reports]) <= 0.98
    # the spread comes from the discordant pairs alone: the same drop with more flips has a wider bound
    few, many = _paired_report(np.array([880, 20, 0, 100])), _paired_report(np.array([800, 60, 40, 100]))
    assert few.accuracy_drop == pytest.approx(many.accuracy_drop) == pytest.approx(2.0)
    assert few.accuracy_drop < few.accuracy_drop_bound() < many.accuracy_drop_bound()
    agree = _paired_report(np.array([900, 0, 0, 100]))  # the models agree on every sample: the drop is known exactly
    assert agree.accuracy_drop_bound() == agree.accuracy_drop == 0.0


def test_one_model_at_a_time_gives_the_same_report_with_one_session_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """For models too big to hold twice: the original runs on every batch and is closed before the compressed
    model is opened; the numbers are those of the side-by-side run. Chosen by itself when memory is short."""
    import gc
    import weakref

    from onnx_arsvd.measure import verification

    original, changed = make_mlp(), make_mlp()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(changed.graph.initializer[0]) * np.float32(0.9), changed.graph.initializer[0].name))
    rng = np.random.default_rng(1)
    data = {"X": rng.standard_normal((50, 48)).astype(np.float32)}
    labels = rng.integers(0, 10, 50)
    alive_at_open: list[int] = []
    sessions: list[weakref.ref] = []
    real = verification.make_session

    def counting(source, provider="CPUExecutionProvider"):  # type: ignore[no-untyped-def]
        gc.collect()
        alive_at_open.append(sum(ref() is not None for ref in sessions))
        session = real(source, provider)
        sessions.append(weakref.ref(session))
        return session

    monkeypatch.setattr(verification, "make_session", counting)
    side_by_side = verify(original, changed, data=data, labels=labels, batch_size=7, one_at_a_time=False)
    assert alive_at_open == [0, 1]
    monkeypatch.setattr(verification, "available_memory", lambda: 1000)  # less than twice the weights
    one_by_one = verify(original, changed, data=data, labels=labels, batch_size=7)
    assert alive_at_open[2:] == [0, 0] and one_by_one.inputs.endswith("one model at a time")
    assert one_by_one.samples == side_by_side.samples == 50
    assert one_by_one.outputs == side_by_side.outputs and one_by_one.outputs[0].mean_cosine < 0.9999
    assert one_by_one.original == side_by_side.original and one_by_one.compressed == side_by_side.compressed
    assert one_by_one.flipped == side_by_side.flipped


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_models_with_different_inputs_are_refused_either_way(one_at_a_time: bool) -> None:
    other = make_mlp()
    other.graph.input[0].name = "Z"
    for node in other.graph.node:
        node.input[:] = ["Z" if name == "X" else name for name in node.input]
    with pytest.raises(InvalidInputError, match=r"the models take different inputs: X: tensor\(float\)\S* vs Z"):
        verify(make_mlp(), other, samples=1, one_at_a_time=one_at_a_time)


def test_comparing_with_reference_outputs_computed_once_gives_the_same_report(tmp_path: Path) -> None:
    """The budget search compares every candidate with the original's outputs computed once, instead of running
    a session of the original each time: the reports must be the same, labels included."""
    compress(MODELS / "fashion_mlp.onnx", tmp_path / "small.onnx", policy=EnergyPolicy(0.6), check=False)
    original, small = make_session(str(MODELS / "fashion_mlp.onnx")), make_session(str(tmp_path / "small.onnx"))
    with np.load(MODELS / "fashion_test.npz") as archive:
        feed, labels = {"input": archive["input"][:300]}, archive["labels"][:300]
    batches = list(split_batches(load_data(feed, original)[0], original, 64))
    reference = reference_outputs(original, batches)
    assert len(reference.outputs) == 5 and reference.nbytes == 300 * 10 * 4
    once = compare_with_reference(reference, small, batches, labels=labels)
    each_time = compare_models(original, small, batches, labels=labels)
    assert once == each_time and once.accuracy_drop is not None and once.outputs[0].mean_cosine < 0.9999
    with pytest.raises(ValueError, match="4 batches for reference outputs of 5"):
        compare_with_reference(reference, small, batches[:4])


def _flagged(weight: np.ndarray, flag_shape: list[int]) -> onnx.ModelProto:
    """Y = (X @ W) * flag, ``flag`` one value per call of a fixed shape ([1], or [] for a scalar)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Mul", ["H", "flag"], ["Y"])], "flagged",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", weight.shape[0]]),
         helper.make_tensor_value_info("flag", TensorProto.FLOAT, flag_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("flag_shape", [[1], []])
def test_an_input_of_one_value_per_call_is_given_once_beside_the_samples(tmp_path: Path, flag_shape: list[int]) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4))
    onnx.save(_flagged(w, flag_shape), tmp_path / "a.onnx")
    onnx.save(_flagged(2 * w, flag_shape), tmp_path / "b.onnx")  # twice the output: cosine 1, relative error 1
    x = rng.standard_normal((10, 6)).astype(np.float32)
    flag = np.full(flag_shape, 3.0, np.float32)
    feed, _ = load_data({"X": x, "flag": flag}, ir.from_proto(_flagged(w, flag_shape)))
    assert feed["flag"].shape == (10, *flag_shape)  # repeated for each sample, so a slice of samples carries it
    for given in (flag, np.repeat(flag[None], 10, axis=0)):  # once, or the one value per sample
        report = verify(tmp_path / "a.onnx", tmp_path / "b.onnx", data={"X": x, "flag": given}, batch_size=3)
        assert report.samples == 10 and report.outputs[0].relative_error == pytest.approx(1.0, rel=1e-5)
    differing = np.repeat(flag[None], 10, axis=0)
    differing[4] = 1.0
    with pytest.raises(InvalidInputError, match="'flag' takes one value per call.*different values per sample"):
        verify(tmp_path / "a.onnx", tmp_path / "b.onnx", data={"X": x, "flag": differing})
