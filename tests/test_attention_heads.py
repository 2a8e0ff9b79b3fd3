"""Attention heads as width units: the grouped curve against brute force, the block found in an unfused export
(head counts written out or -1), the refusals (per-head inputs to the scores), and the narrowed graph equal to the
original with the removed heads' output rows zeroed and the refit in place, in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import input_moments
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.method import Width, unit_curves
from onnx_arsvd.methods.width.rewrite import WidthPlan
from onnx_arsvd.methods.width.units import WidthUnit
from onnx_arsvd.numerics.width import Moments, group_curve, refit
from tests.conftest import constant, least_squares_error, run

MODEL, HEADS, SIZE = 24, 4, 6


def _grouped(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 30)) @ rng.normal(size=(30, 30)) + rng.normal(size=30)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_group_curve_is_the_refit_error_of_its_kept_groups(count: int) -> None:
    x, w = _grouped(400, 0), np.random.default_rng(1).normal(size=(30, 7))
    moments = Moments(x.T @ x, x.sum(axis=0), len(x))
    curve = group_curve(w, moments, group=6, ridge=1e-12)
    kept = np.sort(np.concatenate([np.arange(g * 6, g * 6 + 6) for g in curve.order[:count]]))
    assert curve.losses[count] == pytest.approx(least_squares_error(x, w, kept), rel=1e-6)
    assert curve.losses[-1] == 0.0 and np.all(np.diff(curve.losses) <= 1e-9 * curve.losses[0])
    singles = [least_squares_error(x, w, np.arange(g * 6, g * 6 + 6)) for g in range(5)]
    assert curve.order[0] == int(np.argmin(singles))  # the first step is the best single head


def test_group_curve_out_of_sample_is_the_refit_error_on_the_check_rows() -> None:
    x, check = _grouped(300, 2), _grouped(500, 3)
    w, bias = np.random.default_rng(4).normal(size=(30, 7)), np.random.default_rng(5).normal(size=7)
    moments = Moments(x.T @ x, x.sum(axis=0), len(x))
    curve = group_curve(w, moments, group=6, check=Moments(check.T @ check, check.sum(axis=0), len(check)))
    kept = np.sort(np.concatenate([np.arange(g * 6, g * 6 + 6) for g in curve.order[:3]]))
    weight, refitted = refit(w, bias, moments, kept)
    expected = float(np.sum((check[:, kept] @ weight + refitted - check @ w - bias) ** 2))
    assert curve.losses[3] == pytest.approx(expected, rel=1e-8)


def _attention(kind: str = "written", seed: int = 0) -> onnx.ModelProto:
    """x [b, s, MODEL], mask [b, s] -> one unfused multi-head attention block -> y [b, s, MODEL].

    ``written``: every reshape target a constant with the head count written out; ``concat``: targets built by a
    Concat ending in constant pieces, the head count -1; ``alibi``: a per-head constant added to the scores;
    ``per_head_mask``: a computed score input with a head axis."""
    rng = np.random.default_rng(seed)
    width = HEADS * SIZE
    inits = [constant(f"w{p}", rng.normal(size=(MODEL, width)) / np.sqrt(MODEL)) for p in "qkv"]
    inits += [constant(f"b{p}", rng.normal(size=width) / 3) for p in "qkv"]
    inits += [constant("wo", rng.normal(size=(width, MODEL)) / np.sqrt(width)), constant("bo", rng.normal(size=MODEL)),
              constant("scale", np.array(1 / np.sqrt(SIZE))), constant("one", np.array(1.0)),
              constant("big", np.array(-1e4)), constant("axes1", [1], np.int64), constant("axes2", [2], np.int64)]
    nodes = [helper.make_node("Unsqueeze", ["mask", "axes1"], ["m1"]),
             helper.make_node("Unsqueeze", ["m1", "axes2"], ["m2"]),
             helper.make_node("Cast", ["m2"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["additive"])]
    if kind == "concat":
        inits += [constant("minus", [-1], np.int64), constant("size", [SIZE], np.int64),
                  constant("zeros", [0, 0], np.int64)]
        nodes += [helper.make_node("Concat", ["zeros", "minus", "size"], ["split"], axis=0),
                  helper.make_node("Concat", ["zeros", "minus"], ["merge"], axis=0)]
    else:
        inits += [constant("split", [0, 0, HEADS, SIZE], np.int64), constant("merge", [0, 0, width], np.int64)]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                  helper.make_node("Add", [f"b{p}", f"{p}0"], [f"{p}1"]),
                  helper.make_node("Reshape", [f"{p}1", "split"], [f"{p}2"]),
                  helper.make_node("Transpose", [f"{p}2"], [f"{p}h"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"])]
    scores = "s1"
    if kind == "alibi":
        inits.append(constant("slopes", rng.normal(size=(HEADS, 1, 1))))
        nodes.append(helper.make_node("Add", ["s1", "slopes"], ["s1b"]))
        scores = "s1b"
    if kind == "per_head_mask":
        nodes.append(helper.make_node("Add", ["s1", "bias4"], ["s1b"]))
        scores = "s1b"
    nodes += [helper.make_node("Add", [scores, "additive"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vh"], ["c0"]),
              helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["c1", "merge"], ["c2"]),
              helper.make_node("MatMul", ["c2", "wo"], ["y0"], name="o_proj"),
              helper.make_node("Add", ["y0", "bo"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", MODEL]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])]
    if kind == "per_head_mask":
        inputs.append(helper.make_tensor_value_info("bias4", TensorProto.FLOAT, ["b", HEADS, "s", "s"]))
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", MODEL])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(n: int = 64, length: int = 7, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), dtype=np.int64)
    mask[: n // 2, length - 2:] = 0
    return {"x": rng.normal(size=(n, length, MODEL)).astype(np.float32), "mask": mask}


def _zeroed(proto: onnx.ModelProto, unit: WidthUnit, plan: WidthPlan) -> onnx.ModelProto:
    """``proto`` with the unit's exit weight zero in the removed heads' rows, the refit in the kept ones, and the
    refit bias: the function narrowing must compute."""
    weight = np.zeros((unit.width, unit.exit.shape[1]))
    weight[plan.kept] = plan.exit_weight
    assert unit.exit_bias is not None and not unit.exit.transposed
    bias_name = unit.exit_bias[0].inputs[unit.exit_bias[1]].name
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(proto)
    for init in zeroed.graph.initializer:
        if init.name in (unit.exit.weight_name, bias_name):
            init.CopyFrom(constant(init.name, weight if init.name == unit.exit.weight_name else plan.exit_bias))
    return zeroed


@pytest.mark.parametrize("kind,written", [("written", 4), ("concat", 0)])
def test_heads_are_found_and_narrowed_like_zeroed_output_rows(kind: str, written: int) -> None:
    proto = _attention(kind)
    model = ir.from_proto(proto)
    units, _ = find_width_units(find_layers(model)[0])
    assert len(units) == 1
    unit = units[0]
    assert (unit.group, unit.units, unit.kind) == (SIZE, HEADS, "heads")
    assert sorted(e.name for e in unit.entries) == ["k_proj", "q_proj", "v_proj"] and len(unit.per_unit) == 3
    assert len(unit.shape_constants) == written  # three splits' head counts, the merged width
    data = _feed()
    curves = unit_curves(units, input_moments(model, [unit.exit], data))
    plans = Width().plan(model.clone(), {unit.key: 2}, curves)
    narrowed = model.clone()
    Width().rewrite(Width().plan(narrowed, {unit.key: 2}, curves))(narrowed)
    result = ir.to_proto(narrowed)
    onnx.checker.check_model(result, full_check=True)
    sizes = {i.name: tuple(i.dims) for i in result.graph.initializer}
    assert sorted(d for n, d in sizes.items() if len(d) == 2) == [(2 * SIZE, MODEL)] + [(MODEL, 2 * SIZE)] * 3
    got = run(result, data)[0]
    np.testing.assert_allclose(got, run(_zeroed(proto, unit, plans[0]), data)[0], rtol=1e-4, atol=1e-5)
    original = run(proto, data)[0]
    error = float(np.sum((original.astype(np.float64) - got) ** 2))
    assert error == pytest.approx(curves[0].curve.losses[2], rel=1e-2)  # the curve predicts the rewrite


@pytest.mark.parametrize("kind", ["alibi", "per_head_mask"])
def test_a_per_head_input_to_the_scores_is_refused_with_its_reason(kind: str) -> None:
    units, refused = find_width_units(find_layers(ir.from_proto(_attention(kind)))[0])
    assert not units
    assert any(r.name == "o_proj" and "broadcast over heads" in r.reason for r in refused)


@pytest.mark.transformer
def test_minilm_heads_narrow_to_a_checked_model(minilm) -> None:
    model = ir.load(minilm)
    units = [u for u in find_width_units(find_layers(model)[0])[0] if u.group > 1]
    assert len(units) == 6 and {(u.units, u.group) for u in units} == {(12, 32)}
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 5000, size=(16, 9)).astype(np.int64),
            "attention_mask": np.ones((16, 9), dtype=np.int64), "token_type_ids": np.zeros((16, 9), dtype=np.int64)}
    curves = unit_curves(units, input_moments(model, [u.exit for u in units], feed))
    narrowed = model.clone()
    plans = Width().plan(narrowed, {c.key: 8 for c in curves}, curves)
    Width().rewrite(plans)(narrowed)
    result = ir.to_proto(narrowed)
    onnx.checker.check_model(result, full_check=True)
    original = onnx.load(minilm)
    for unit, plan in zip(units, plans, strict=True):
        original = _zeroed(original, unit, plan)
    np.testing.assert_allclose(run(result, feed)[0], run(original, feed)[0], rtol=1e-4, atol=1e-4)
