"""Latency guard: time each layer dense and factored on the target provider, keep the faster.

Each candidate layer is timed as a one-node model with its real weights (the original node form
against MatMul -> MatMul [-> Add]) at every batch size asked for, interleaved in rounds of fresh
sessions like ``bench``. A layer is factored only where the factored form is faster at every batch
size (by ``margin``, 0 by default): two thin MatMuls near break-even are slower and stay dense.
With a positive margin, layers a few percent faster each stay dense although together they would
make the model faster; the rounds of fresh sessions already keep noise from deciding.

Timings form a latency table keyed by what they depend on (:func:`timing_key`: provider, node form,
weight shape and dtype, rank, rows per call at each batch size), measured once and shared by every
layer with the same key: MiniLM's 36 dense layers have 3 weight shapes, so under ``--ratio`` or
``--rank`` they need 3 timings, not 36; ranks chosen per layer repeat less.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_arsvd.config import LatencyGuard
from onnx_arsvd.graph.capture import exposed_model
from onnx_arsvd.graph.layers import Layer, find_layers, read_array
from onnx_arsvd.io.data import Feed, sample_count
from onnx_arsvd.measure.benchmark import batch_feed, compare_latency, timed_rounds
from onnx_arsvd.measure.results import LatencyComparison, LayerTiming
from onnx_arsvd.measure.sessions import ModelSource, make_session, run_session
from onnx_arsvd.methods.lowrank.decision import dense_decision
from onnx_arsvd.methods.lowrank.plan import WeightPlan
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.progress import progress_bar

__all__ = ["LatencyTable", "activation_rows", "check_model", "guard_verdict", "guarded_plans",
           "observed_rows", "regressions", "time_layer", "timing_key"]

def guard_verdict(timings: Sequence[LayerTiming], provider: str, margin: float) -> str:
    """"" when factoring is faster (by ``margin``) at every batch size, else why the layer stays dense."""
    slow = [t for t in timings if t.factored_ms >= (1.0 - margin) * t.dense_ms]
    if not slow:
        return ""
    worst = max(slow, key=lambda t: t.ratio)
    verdict = "slower" if worst.ratio > 1.0 else f"not {margin:.0%} faster"
    return (f"latency guard: factored {verdict} at batch {worst.batch} on {provider.removesuffix('ExecutionProvider')} "
            f"({worst.factored_ms:.3g} vs {worst.dense_ms:.3g} ms)")


def observed_rows(model: ir.Model, layers: Sequence[Layer], feed: Feed) -> dict[int, float]:
    """Rows of X each main-graph layer multiplies per sample, seen in one onnxruntime run on ``feed``.

    Keyed by ``id(layer.node)``. Graph shapes are often symbolic or missing (a sequence length named
    ``Reshape_470_o0__d2``, 197 patches of a ViT): the real activation is the only reliable count.
    """
    layers = [layer for layer in layers if layer.node.graph is model.graph]
    if not layers or not feed:
        return {}
    exposed, names = exposed_model(model, layers)
    wanted = list(dict.fromkeys(names.values()))
    outputs = dict(zip(wanted, run_session(make_session(exposed), wanted, feed), strict=True))
    samples = sample_count(feed)
    return {id(layer.node): outputs[names[id(layer.node)]].size / layer.shape[0] / samples for layer in layers}


def activation_rows(layer: Layer, batch: int, dims: Mapping[str, int]) -> int:
    """Rows of X the layer multiplies per call, from the graph's shapes: batch times the activation's inner dims."""
    x = layer.node.inputs[0]
    shape = x.shape if x is not None else None
    if shape is None or len(shape) < 2:
        return batch
    inner = [d if isinstance(d, int) else dims.get(str(d), 1) for d in shape[1:-1]]
    return batch * int(np.prod(inner, dtype=np.int64))


def _layer_models(layer: Layer, a: np.ndarray, b: np.ndarray) -> tuple[bytes, bytes]:
    """The layer alone as it is (its own op and attributes), and that model after the rewrite itself.

    The factored form comes from :func:`onnx_arsvd.methods.lowrank.rewrite.apply_plans`, the very code that rewrites the
    whole model, so what is timed cannot drift from what is written.
    """
    m, n = layer.shape
    x = ir.Value(name="x", type=ir.TensorType(layer.dtype), shape=ir.Shape(["rows", m]))
    y = ir.Value(name="y", type=ir.TensorType(layer.dtype), shape=ir.Shape(["rows", n]))
    weight = ir.Value(name="w", const_value=ir.tensor(read_array(layer.weight), name="w"))
    inputs, initializers = [x, weight], [weight]
    if layer.op_type == "Gemm" and layer.bias is not None:
        bias = ir.Value(name="c", const_value=ir.tensor(read_array(layer.bias), name="c"))
        inputs.append(bias)
        initializers.append(bias)
    node = ir.Node("", layer.op_type, inputs, list(layer.node.attributes.values()), outputs=[y])
    graph = ir.Graph([x], [y], nodes=[node], initializers=initializers, opset_imports={"": 17})
    model = ir.Model(graph, ir_version=8)
    dense = ir.to_proto(model).SerializeToString()
    (twin,), _ = find_layers(model)
    decision = dataclasses.replace(dense_decision(twin, ""), rank=a.shape[1], factored=True)
    apply_plans(model, [WeightPlan(layers=(twin,), rank=a.shape[1], decisions=(decision,), factors=(a, b))])
    return dense, ir.to_proto(model).SerializeToString()


def _rows_per_call(layer: Layer, batch: int, dims: Mapping[str, int], rows_per_sample: float | None) -> int:
    return (max(1, round(batch * rows_per_sample)) if rows_per_sample is not None
            else activation_rows(layer, batch, dims))


def timing_key(layer: Layer, rank: int, provider: str, batches: Sequence[int], dims: Mapping[str, int],
               rows_per_sample: float | None = None) -> tuple:
    """What a layer's timings depend on: provider, op and attributes, weight shape and dtype, a bias, the rank,
    and the rows per call at each batch size (not the weights' values)."""
    attributes = tuple(sorted((name, str(attribute.value)) for name, attribute in layer.node.attributes.items()))
    rows = tuple(_rows_per_call(layer, batch, dims, rows_per_sample) for batch in batches)
    return (provider, layer.op_type, attributes, layer.shape, layer.dtype, layer.bias is not None, rank,
            tuple(batches), rows)


def time_layer(
    layer: Layer,
    factors: tuple[np.ndarray, np.ndarray],
    *,
    provider: str,
    batches: Sequence[int],
    dims: Mapping[str, int],
    threads: int = 0,
    min_seconds: float = 0.3,
    rows_per_sample: float | None = None,
) -> list[LayerTiming]:
    """Median latency of the layer dense and factored, at each batch size, on ``provider``.

    Each call multiplies ``batch x rows_per_sample`` rows when that was observed, else the rows the
    graph's shapes give.
    """
    dense_model, factored_model = _layer_models(layer, *factors)
    rng = np.random.default_rng(0)
    timings = []
    for batch in batches:
        rows = _rows_per_call(layer, batch, dims, rows_per_sample)
        feed = {"x": rng.standard_normal((rows, layer.shape[0])).astype(layer.dtype.numpy())}
        rounds = timed_rounds(dense_model, factored_model, feed, provider=provider, threads=threads,
                              min_seconds=min_seconds, min_runs=10)
        dense_s, factored_s = (np.concatenate([r[i] for r in rounds]) for i in (0, 1))
        timings.append(LayerTiming(batch, rows, 1e3 * float(np.median(dense_s)), 1e3 * float(np.median(factored_s))))
    return timings


class LatencyTable:
    """The latency table of one run: each plain layer's timings by :func:`timing_key`, measured once and shared
    by the search's pricing (:mod:`onnx_arsvd.measure.latency_cost`) and the guard (:func:`guarded_plans`)."""

    def __init__(self, guard: LatencyGuard) -> None:
        self.guard = guard
        self._timings: dict[tuple, tuple[LayerTiming, ...]] = {}

    def __len__(self) -> int:
        return len(self._timings)

    def record(self, key: tuple, timings: Sequence[LayerTiming]) -> None:
        """Enter timings measured elsewhere (a table kept from an earlier run)."""
        self._timings[key] = tuple(timings)

    def timings(self, layer: Layer, rank: int, provider: str, dims: Mapping[str, int],
                rows_per_sample: float | None = None,
                factors: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[LayerTiming, ...]:
        """The plain layer's timings at ``rank``, from the table or timed once for it.

        Latency does not depend on the factors' values: without ``factors``, seeded random ones of the
        rank are timed (a search prices ranks it has not factored).
        """
        guard = self.guard
        key = timing_key(layer, rank, provider, guard.batches, dims, rows_per_sample)
        if key not in self._timings:
            if factors is None:
                rng = np.random.default_rng(rank)
                dtype = layer.dtype.numpy()
                m, n = layer.shape
                factors = (rng.standard_normal((m, rank)).astype(dtype), rng.standard_normal((rank, n)).astype(dtype))
            self._timings[key] = tuple(time_layer(layer, factors, provider=provider, batches=guard.batches, dims=dims,
                                                  threads=guard.threads, min_seconds=guard.layer_seconds,
                                                  rows_per_sample=rows_per_sample))
        return self._timings[key]


def guarded_plans(plans: Sequence[WeightPlan], table: LatencyTable, provider: str, dims: Mapping[str, int],
                  progress: bool = False, rows: Mapping[int, float] | None = None) -> list[WeightPlan]:
    """The plans with every factored layer timed (or looked up in ``table``) and kept dense where factoring is not
    faster; ``rows`` (from :func:`observed_rows`) gives each layer's real activation rows per sample.

    Only plain X @ W layers are timed: a lookup costs no multiply-adds, and W @ X, transposed activations and
    weights behind a Transpose/Cast chain have no one-node model here (the whole-model check sees them all).
    """
    timed = [plan for plan in plans if plan.factored and plan.factors is not None
             and all(layer.is_plain for layer in plan.layers)]
    verdicts: dict[int, WeightPlan] = {}
    for plan in progress_bar(timed, desc="latency guard", unit="layer", progress=progress):
        layer = plan.layers[0]
        timings = table.timings(layer, plan.rank, provider, dims, (rows or {}).get(id(layer.node)), plan.factors)
        reason = guard_verdict(timings, provider, table.guard.margin)
        verdicts[id(plan)] = plan.kept_dense(reason, timings=timings) if reason else plan.revised(timings=timings)
    return [verdicts.get(id(plan), plan) for plan in plans]


def check_model(
    guard: LatencyGuard, original: ModelSource, compressed: ModelSource, provider: str, dims: Mapping[str, int],
    model: ir.Model, progress: bool = False,
) -> list[LatencyComparison]:
    """The whole models timed against each other at the guard's batch sizes, in bounded time.

    Each batch size takes at least ``model_seconds`` and about 10x that at most: a slow model gets
    fewer pairs (never under 3 per round) instead of minutes per batch size.
    """
    comparisons = []
    for batch in progress_bar(guard.batches, desc="whole-model timing", unit="batch", progress=progress):
        feed = batch_feed(make_session(original, provider, guard.threads), model, batch, dims)
        rounds = timed_rounds(original, compressed, feed, provider=provider, threads=guard.threads,
                              min_seconds=guard.model_seconds, min_runs=10, max_seconds=10 * guard.model_seconds)
        comparisons.append(compare_latency(provider, batch, rounds))
    return comparisons


def regressions(comparisons: Sequence[LatencyComparison]) -> list[str]:
    """A loud warning for each batch size where the compressed model is slower in every round.

    Fresh sessions of one unchanged file already differ by a few percent, so a single round (or a
    test that treats its pairs as independent) would raise the alarm on noise.
    """
    return [f"the compressed model is SLOWER than the original at batch {c.batch} on "
            f"{c.provider.removesuffix('ExecutionProvider')}: median {c.compressed.median_ms:.4g} ms vs "
            f"{c.original.median_ms:.4g} ms (ratio {c.ratio:.3f}; per round "
            f"{', '.join(f'{r:.3f}' for r in c.round_ratios)}); the layers' gains did not survive in the "
            "whole graph: do not ship it for this target"
            for c in comparisons if c.consistently_slower]
