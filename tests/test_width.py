"""Width reduction: the greedy curve and refit against brute force, the units found in every FFN spelling (and the
refusals), the narrowing pass in onnxruntime, and the search choosing widths beside ranks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnx_arsvd import compress, inspect_model
from onnx_arsvd.cli.main import main
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import input_moments
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.method import Width, unit_curves
from onnx_arsvd.numerics.width import Moments, refit, width_curve
from onnx_arsvd.search.budget import Budget
from tests.conftest import MODELS, constant, least_squares_error, run

D, H = 12, 40


def _hidden(n: int = 600, h: int = H, seed: int = 0) -> np.ndarray:
    """Correlated, positive-mean activations, as a ReLU layer's."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, h)) @ rng.normal(size=(h, h)) * 0.3 + rng.normal(size=h), 0.0)


@pytest.mark.parametrize("width", [1, 5, 20, 39])
def test_curve_and_refit_match_least_squares_with_an_intercept(width: int) -> None:
    x = _hidden()
    w = np.random.default_rng(1).normal(size=(H, D))
    moments = Moments(x.T @ x, x.sum(axis=0), len(x))
    curve = width_curve(w, moments, ridge=1e-12)
    kept = curve.kept(width)
    exact = least_squares_error(x, w, kept)
    assert curve.losses[width] == pytest.approx(exact, rel=1e-6)
    weight, bias = refit(w, np.zeros(D), moments, kept, ridge=1e-12)
    assert np.sum((x[:, kept] @ weight + bias - x @ w) ** 2) == pytest.approx(exact, rel=1e-6)
    assert curve.energy == pytest.approx(float(np.sum((x @ w) ** 2)))
    assert curve.losses[-1] == 0.0 and np.all(np.diff(curve.losses) <= 0)


@pytest.mark.parametrize("width", [1, 5, 20, 38, 39])
def test_out_of_sample_curve_is_the_refit_error_on_the_check_rows(width: int) -> None:
    x, check = _hidden(seed=7), _hidden(n=900, seed=8)
    x[:, 5] = 0.0  # dead on the fit rows, alive on the check rows: the greedy skips it
    w, bias = np.random.default_rng(9).normal(size=(H, D)), np.random.default_rng(10).normal(size=D)
    moments = Moments(x.T @ x, x.sum(axis=0), len(x))
    curve = width_curve(w, moments, check=Moments(check.T @ check, check.sum(axis=0), len(check)))
    kept = curve.kept(width)
    weight, refitted = refit(w, bias, moments, kept)
    assert curve.losses[width] == pytest.approx(float(np.sum((check[:, kept] @ weight + refitted
                                                                - check @ w - bias) ** 2)), rel=1e-8)
    assert curve.energy == pytest.approx(float(np.sum((check @ w) ** 2)))
    in_sample = width_curve(w, moments)
    assert np.array_equal(curve.order, in_sample.order)
    assert curve.losses[20] > in_sample.losses[20]  # a refit fits its own rows best


def test_greedy_choice_beats_random_and_norm_selection() -> None:
    x, w = _hidden(seed=2), np.random.default_rng(3).normal(size=(H, D))
    moments = Moments(x.T @ x, x.sum(axis=0), len(x))
    curve = width_curve(w, moments)
    rng = np.random.default_rng(4)
    for _ in range(5):
        random = np.sort(rng.choice(H, 10, replace=False))
        assert curve.losses[10] <= least_squares_error(x, w, random) * (1 + 1e-6)
    norms = np.argsort(-(np.linalg.norm(w, axis=1) * np.sqrt((x * x).mean(axis=0))))[:10]
    assert curve.losses[10] <= least_squares_error(x, w, np.sort(norms)) * (1 + 1e-6)


def test_dead_and_duplicate_units_are_chosen_last() -> None:
    x = _hidden(h=H - 2, seed=5)
    x = np.hstack([x, np.zeros((len(x), 1)), x[:, :1]])  # a dead unit and a copy of unit 0
    w = np.random.default_rng(6).normal(size=(H, D))
    curve = width_curve(w, Moments(x.T @ x, x.sum(axis=0), len(x)))
    assert set(curve.order[-2:].tolist()) & {H - 2, H - 1, 0}
    assert np.isfinite(curve.losses).all()


def _ffn_model(kind: str, seed: int = 0) -> onnx.ModelProto:
    """x [b, s, D] -> FFN -> y, in one of several spellings."""
    rng = np.random.default_rng(seed)
    inits = [constant("w1", rng.normal(size=(D, H)) / 3), constant("b1", rng.normal(size=H) / 3),
             constant("w2", rng.normal(size=(H, D)) / 6)]
    if kind != "swiglu":  # SwiGLU's down-projection has no bias: narrowing adds one
        inits.append(constant("b2", rng.normal(size=D) / 3))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["u"], name="up"), helper.make_node("Add", ["u", "b1"], ["a"])]
    if kind == "erf_gelu":
        inits += [constant("sqrt2", np.array(1.41421356)), constant("one", np.array(1.0)),
                  constant("half", np.array(0.5))]
        nodes += [helper.make_node("Div", ["a", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["hidden"])]
    elif kind == "swiglu":
        inits.append(constant("wg", rng.normal(size=(D, H)) / 3))
        nodes += [helper.make_node("MatMul", ["x", "wg"], ["g"], name="gate"),
                  helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
                  helper.make_node("Mul", ["silu", "a"], ["hidden"])]
    elif kind == "scaled_relu":  # a per-unit scale inside the region, and a consumer outside it
        inits.append(constant("scale", rng.uniform(0.5, 2.0, size=H)))
        nodes += [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Mul", ["r", "scale"], ["hidden"])]
    elif kind == "leaky":
        nodes += [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Identity", ["r"], ["hidden"])]
    exit_out = "y0" if kind != "swiglu" else "y"
    nodes.append(helper.make_node("MatMul", ["hidden", "w2"], [exit_out], name="down"))
    if kind != "swiglu":
        nodes.append(helper.make_node("Add", ["b2", "y0"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", D])]
    if kind == "leaky":
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 5, D)).astype(np.float32)}


@pytest.mark.parametrize("kind,entries", [("erf_gelu", 1), ("swiglu", 2), ("scaled_relu", 1)])
def test_units_found_in_every_spelling_and_narrowed_as_predicted(kind: str, entries: int) -> None:
    model = ir.from_proto(_ffn_model(kind))
    units, _ = find_width_units(find_layers(model)[0])
    assert len(units) == 1 and len(units[0].entries) == entries and units[0].width == H
    data = _data()
    curves = unit_curves(units, input_moments(model, [units[0].exit], data))
    width = 24
    narrowed = model.clone()
    plans = Width().plan(narrowed, {units[0].key: width}, curves)
    Width().rewrite(plans)(narrowed)
    proto = ir.to_proto(narrowed)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["y"]
    original, new = run(_ffn_model(kind), data)[0], run(proto, data)[0]
    error = float(np.sum((original - new) ** 2))
    # the curve predicts the rewrite up to its ridge (1e-4 of the mean variance: well under 1% here)
    assert error == pytest.approx(curves[0].curve.losses[width], rel=1e-2)
    sizes = {init.name: init.dims for init in proto.graph.initializer}
    assert all(width in dims for name, dims in sizes.items() if name.startswith(("w1", "wg", "w2")) and len(dims) == 2)


def test_keeping_every_unit_changes_nothing() -> None:
    model = ir.from_proto(_ffn_model("erf_gelu"))
    units, _ = find_width_units(find_layers(model)[0])
    curves = unit_curves(units, input_moments(model, [units[0].exit], _data()))
    assert Width().plan(model, {units[0].key: 0}, curves) == []


def test_a_hidden_value_used_elsewhere_is_refused_with_its_reason() -> None:
    model = ir.from_proto(_ffn_model("leaky"))
    units, refused = find_width_units(find_layers(model)[0])
    assert not units
    assert any(r.name == "down" and "used outside" in r.reason for r in refused)


def test_inspect_names_the_width_units_and_counts_the_refusals(tmp_path) -> None:
    source = tmp_path / "leaky.onnx"
    onnx.save(_ffn_model("leaky"), source)
    report = inspect_model(source)
    assert any("nothing can be narrowed" in n and "1 x a hidden value is used outside" in n
               for n in report.notes)
    report = inspect_model(MODELS / "fashion_mlp.onnx")
    assert any("2 unit(s) can be narrowed" in n and "/fc2/Gemm: 512 hidden units" in n for n in report.notes)


def test_chained_mlp_units_share_their_middle_weight() -> None:
    model = ir.load(MODELS / "fashion_mlp.onnx")
    units, _ = find_width_units(find_layers(model)[0])
    assert len(units) == 2  # Gemm -> Relu -> Gemm, twice (the middle Gemm is exit of one, entry of the next)
    assert units[0].claims & units[1].claims


def _half_dead_ffn(d: int = 32, h: int = 256, seed: int = 0) -> onnx.ModelProto:
    """x -> Relu(x W1 + b1) W2 + b2 with half the hidden units never active (their bias far below any input)."""
    rng = np.random.default_rng(seed)
    bias = np.where(np.arange(h) % 2 == 0, 0.1, -50.0)
    inits = [constant("w1", rng.normal(size=(d, h)) / np.sqrt(d)), constant("b1", bias),
             constant("w2", rng.normal(size=(h, d)) / np.sqrt(h)), constant("b2", rng.normal(size=d))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["u"]), helper.make_node("Add", ["u", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_search_narrows_where_width_is_cheaper_and_says_so(tmp_path) -> None:
    """Half the units are dead: narrowing to the live half is free, while factoring a 32 x 256 weight to half its
    parameters loses most of it. The search narrows, the output holds the narrowed weights, and it matches."""
    source = tmp_path / "ffn.onnx"
    onnx.save(_half_dead_ffn(), source)
    data = {"x": np.random.default_rng(1).normal(size=(600, 32)).astype(np.float32)}
    out = tmp_path / "narrow.onnx"
    _, report = compress(source, out, data=data, budget=Budget(target_params=0.55), width=True)
    assert report.narrowed == 2 and report.factored == 0
    assert report.budget is not None and "widths of 1 hidden layer" in report.budget["allocation"]
    assert report.verification is not None and report.verification.outputs[0].min_cosine > 0.99999
    proto = onnx.load(out)
    stored = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if len(i.dims) == 2)
    assert stored == report.dense_params_after <= 0.55 * report.dense_params_before
    _, plain = compress(source, tmp_path / "plain.onnx", data=data, budget=Budget(target_params=0.55))
    assert plain.narrowed == 0 and "widths" not in plain.budget["allocation"]  # off by default
    assert plain.verification.outputs[0].mean_cosine < report.verification.outputs[0].mean_cosine


def test_the_cli_narrows_with_width_and_says_so(tmp_path, capsys) -> None:
    source, data = tmp_path / "ffn.onnx", tmp_path / "data.npz"
    onnx.save(_half_dead_ffn(), source)
    np.savez(data, x=np.random.default_rng(1).normal(size=(600, 32)).astype(np.float32))
    out = tmp_path / "narrow.onnx"
    assert main(["compress", str(source), "-o", str(out), "--data", str(data), "--target-params", "0.55",
                 "--width"]) == 0
    printed = capsys.readouterr().out
    assert "narrowed: 128 of 256 hidden units kept" in printed and "layers factored: 0 of 2; narrowed: 2" in printed
    assert out.exists()


@pytest.mark.transformer
def test_minilm_has_an_ffn_and_an_attention_unit_per_block(minilm) -> None:
    units, refused = find_width_units(find_layers(ir.load(minilm))[0])
    ffn = [u for u in units if u.group == 1]
    assert len(ffn) == 6 and {u.width for u in ffn} == {1536}
    assert all(u.exit_bias is not None and len(u.region) == 6 for u in ffn)
    assert len(units) == 12 and len(refused) == 24  # the heads of every block are the other 6
