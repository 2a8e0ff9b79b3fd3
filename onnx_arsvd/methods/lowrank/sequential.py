"""Sequential calibration: refit each layer on the inputs it sees in the partially compressed model.

One-shot factors minimise ||X W - X A B|| on the *original* model's activations X. Once earlier
layers are factored, a layer sees X' instead, and the model's error is ||X W - X' A B||. Going
through the layers in graph order, each one's factors are refitted to that: with C' = X'^T X' and
the cross Gram G = X'^T X (both accumulated batch by batch from the original and the partially
compressed model on the same feeds), the least-squares weight for the shifted inputs is
M = (C' + ridge)^-1 G W, and the best rank-k factors of
X' M come from M's loss curve under C'. So each layer also absorbs part of the error its
predecessors made. Layers reading the same tensor (attention's Q, K, V) are refitted together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import scipy.linalg

from onnx_arsvd.graph.layers import Layer, WeightKey, find_layers, node_label
from onnx_arsvd.io.models import to_model
from onnx_arsvd.measure.sessions import make_session, run_session
from onnx_arsvd.measure.verification import Feed
from onnx_arsvd.methods.lowrank.curves import WeightCurve, allocation_plans
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.numerics.allocate import DENSE, Allocation
from onnx_arsvd.numerics.losscurve import loss_curve
from onnx_arsvd.numerics.padding import drop_padding, real_positions
from onnx_arsvd.progress import progress_bar

__all__ = ["sequential_factors"]

Factors = tuple[np.ndarray, np.ndarray]

REFIT_RIDGE = 1e-3
"""Ridge of the refit's regression, times C's mean diagonal: the cross-Gram regression has m x n free
weights and overfits the calibration part; on the Fashion MLP (6,000 images) 1e-3 gave the lowest
held-out output error of 1e-6 .. 1e-1."""


def _input_name(layer: Layer) -> str:
    """The name of the tensor ``layer`` multiplies (its node's first input)."""
    value = layer.node.inputs[0]
    if value is None or value.name is None:  # a loaded model names every value; MatMul/Gemm need input 0
        raise ValueError(f"node {node_label(layer.node)!r} has no named first input")
    return value.name


def _exposing(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of the model (sharing its weights) with the named values as its only outputs."""
    exposed = model.clone()
    values = {v.name: v for v in exposed.graph.inputs}
    values.update({v.name: v for node in exposed.graph for v in node.outputs})
    exposed.graph.outputs.clear()
    exposed.graph.outputs.extend(values[name] for name in names)
    return exposed


def _cross_grams(original: ir.Model, working: ir.Model, layers: Sequence[Layer],
                 batches: Sequence[Feed]) -> dict[WeightKey, tuple[np.ndarray, np.ndarray]]:
    """(X'^T X', X'^T X) per weight of ``layers``, X from ``original`` and X' from ``working``."""
    names = list(dict.fromkeys(_input_name(layer) for layer in layers))
    before, after = make_session(_exposing(original, names)), make_session(_exposing(working, names))
    grams: dict[WeightKey, tuple[np.ndarray, np.ndarray]] = {}
    for feed in batches:
        xs = dict(zip(names, run_session(before, names, feed), strict=True))
        shifted = dict(zip(names, run_session(after, names, feed), strict=True))
        positions = real_positions(feed)
        for layer in layers:
            m = layer.shape[0]
            x = drop_padding(xs[_input_name(layer)], positions).astype(np.float64).reshape(-1, m)
            x2 = drop_padding(shifted[_input_name(layer)], positions).astype(np.float64).reshape(-1, m)
            own, cross = grams.get(layer.weight_key, (0.0, 0.0))
            grams[layer.weight_key] = (own + x2.T @ x2, cross + x2.T @ x)
    return grams


def _refit(weight: np.ndarray, own: np.ndarray, cross: np.ndarray, rank: int) -> Factors:
    """Rank-k factors minimising ||X W - X' A B|| (see the module docstring)."""
    shift = REFIT_RIDGE * max(float(np.mean(np.diag(own))), np.finfo(np.float64).tiny)
    target = scipy.linalg.solve(own + shift * np.eye(len(own)), cross @ weight, assume_a="pos")
    return loss_curve(target, own).factors(rank)


def sequential_factors(model: ir.Model, curves: Sequence[WeightCurve], allocation: Allocation,
                       batches: Sequence[Feed], *, progress: bool = False) -> dict[WeightKey, Factors]:
    """Factors of every factored weight of ``allocation``, refitted in graph order on the calibration ``batches``."""
    original = to_model(model)
    working = to_model(model)
    factored = {c.key for c in curves if allocation.ranks.get(c.key, DENSE) != DENSE}
    stages: dict[str, list[WeightKey]] = {}
    for layer in find_layers(original)[0]:  # graph order; one stage per input tensor of the main graph
        if layer.scope or layer.left or layer.trans_x:
            continue  # inside a subgraph, or a W @ X / transposed-input form: keeps its one-shot factors
        if layer.weight_key in factored and layer.weight_key not in {k for keys in stages.values() for k in keys}:
            stages.setdefault(_input_name(layer), []).append(layer.weight_key)
    refitted: dict[WeightKey, Factors] = {}
    for keys in progress_bar(list(stages.values()), desc="sequential calibration", unit="stage", progress=progress):
        layers = [layer for layer in find_layers(working)[0] if layer.weight_key in keys]
        grams = _cross_grams(original, working, layers, batches)
        for key in keys:
            first = next(layer for layer in layers if layer.weight_key == key)
            own, cross = grams[key]
            refitted[key] = _refit(first.matrix().astype(np.float64), own, cross, allocation.ranks[key])
        stage = Allocation({key: allocation.ranks[key] for key in keys}, 0.0, 0.0)
        apply_plans(working, allocation_plans(layers, [c for c in curves if c.key in keys], stage,
                                              min_params=0, factors=refitted))
    return refitted

