"""Calibration inputs, and the Gram matrix X^T X of each layer's input activations.

Inputs come from an ``.npz`` or a mapping (arrays keyed by graph input name, first axis = samples) or from any
object with onnxruntime's ``CalibrationDataReader`` protocol (``get_next()`` returns a feed dict, or
None when done), so a reader written for static quantization works here unchanged. The original
model runs in onnxruntime with every candidate layer's input exposed as an extra output (from inside
If/Loop/Scan bodies too), and each
layer's Gram matrix is accumulated batch by batch in float64, over real token positions only when the
feed carries an attention mask (:mod:`onnx_arsvd.numerics.padding`): memory is bounded by the layer sizes
(m x m per weight), not by the amount of data. For loss curves (:func:`curve_grams`) a weight with
m > n gets the n x n :class:`~onnx_arsvd.numerics.losscurve.OutputGram` instead, all its curve needs: a search
over a transformer's down-projections (4h x h) then holds 16x less.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar, cast

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.graph.capture import exposed_model
from onnx_arsvd.graph.layers import Layer, WeightKey
from onnx_arsvd.io.calls import Calls, DataInput, is_per_call, read_calls
from onnx_arsvd.io.data import ArrayReader, CalibrationDataReader, CheckedReader, input_specs
from onnx_arsvd.measure.sessions import make_session, run_session
from onnx_arsvd.numerics.losscurve import OutputGram
from onnx_arsvd.numerics.padding import drop_padding, real_positions
from onnx_arsvd.numerics.width import Moments
from onnx_arsvd.progress import progress_bar

__all__ = ["ArrayReader", "CalibrationDataReader", "Gram", "capture_grams", "curve_grams", "input_moments",
           "output_errors"]

Gram = np.ndarray | OutputGram
"""A weight's input Gram matrix X^T X (m x m), or its output Gram (m > n, from :func:`curve_grams`)."""


def _rows(layer: Layer, x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """The layer's input vectors, one per row: X's rows for ``X @ M`` (those at real token ``positions`` only,
    see :mod:`onnx_arsvd.numerics.padding`), its columns for ``W @ X`` or transA."""
    if layer.left != layer.trans_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    else:
        x = drop_padding(x, positions)
    return x.astype(np.float64).reshape(-1, layer.shape[0])


class _Capture:
    """A session of the model with the layers' inputs exposed, and how to read each layer's rows from it."""

    def __init__(self, model: ir.Model, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        exposed, self.by_node = exposed_model(model, self.layers)
        self.names = list(dict.fromkeys(self.by_node.values()))
        self.session = make_session(exposed)

    def rows(self, feed: dict[str, np.ndarray]) -> list[tuple[Layer, np.ndarray]]:
        outputs = dict(zip(self.names, run_session(self.session, self.names, feed), strict=True))
        positions = real_positions(feed)
        return [(layer, _rows(layer, outputs[self.by_node[id(layer.node)]], positions)) for layer in self.layers]


Source = DataInput
"""Calibration inputs: an ``.npz`` path, a mapping of arrays, or one feed per call (:mod:`onnx_arsvd.io.calls`)."""


def curve_grams(model: ir.Model, layers: Sequence[Layer], data: Source, *,
                progress: bool = False) -> dict[WeightKey, Gram]:
    """What each weight's loss curve needs, the smaller side: X^T X when m <= n, an :class:`OutputGram`
    when m > n; otherwise as :func:`capture_grams`."""

    def term(layer: Layer, x: np.ndarray) -> Gram:
        if layer.shape[0] <= layer.shape[1]:
            return x.T @ x
        y = x @ layer.matrix().astype(np.float64)
        return OutputGram(y.T @ y, float(np.einsum("ij,ij->", x, x)), layer.shape[0])

    grams = _accumulate(model, _dense_only(layers), data, term, progress=progress)
    return {key: gram for key, gram in grams.items()
            if (gram.input_trace if isinstance(gram, OutputGram) else np.trace(gram)) > 0}


def capture_grams(model: ir.Model, layers: Sequence[Layer], data: Source, *,
                  progress: bool = False) -> dict[WeightKey, np.ndarray]:
    """X^T X of every layer's input over all calibration feeds, keyed by ``Layer.weight_key``.

    ``data`` is an ``.npz`` path, a mapping of arrays, or a ``CalibrationDataReader``. Layers
    sharing a weight (same key) add their activations into one Gram matrix, in whichever scopes they
    are. Layers inside If/Loop/Scan bodies are captured too (:mod:`onnx_arsvd.graph.capture`). A weight
    gets no Gram matrix, hence plain factors, when the data never reached its layers (an If branch
    never taken), or when exposing body values made onnxruntime fail (a loop whose lifted activation
    changes shape between iterations): then every weight used in a body is left out, and the rest is
    captured on the same feeds.
    """
    grams = _accumulate(model, _dense_only(layers), data, lambda _, x: x.T @ x, progress=progress)
    return {key: gram for key, gram in grams.items() if np.trace(gram) > 0}


def input_moments(model: ir.Model, layers: Sequence[Layer], data: Source, *,
                  progress: bool = False) -> dict[WeightKey, Moments]:
    """sum(x x^T), sum(x) and the row count of every layer's input rows (what a width unit's exit needs), keyed
    and captured as :func:`capture_grams` does."""
    moments = _accumulate(model, _dense_only(layers), data,
                          lambda _, x: Moments(x.T @ x, x.sum(axis=0), float(len(x))), progress=progress)
    return {key: value for key, value in moments.items() if value.rows > 0 and np.trace(value.gram) > 0}


def _dense_only(layers: Sequence[Layer]) -> Sequence[Layer]:
    """The layers, refused if one is an embedding table: a lookup has no input activations to take a Gram of
    (MiniLM's word table would ask for a 30522 x 30522 one)."""
    tables = [layer.name for layer in layers if layer.is_embedding]
    if tables:
        raise ValueError(f"embedding tables have no input Gram matrix: {', '.join(tables)}")
    return layers


def output_errors(model: ir.Model, layers: Sequence[Layer], factors: Mapping[WeightKey, tuple[np.ndarray, np.ndarray]],
                  data: Source, *, progress: bool = False) -> dict[WeightKey, float]:
    """||X (W - A B)||_F / ||X W||_F of each factored weight on the inputs ``data`` gives its layers, summed
    batch by batch: no Gram matrix, so memory is one batch of activations (otherwise as :func:`capture_grams`:
    a weight its layers never saw output from is left out)."""

    def term(layer: Layer, x: np.ndarray) -> np.ndarray:
        a, b = factors[layer.weight_key]
        y = x @ layer.matrix().astype(np.float64)
        return np.array([np.sum((y - (x @ a) @ b) ** 2), np.sum(y * y)])

    sums = _accumulate(model, [layer for layer in layers if layer.weight_key in factors], data, term,
                       progress=progress)
    return {key: float(np.sqrt(max(error, 0.0) / energy)) for key, (error, energy) in sums.items() if energy > 0}


Term = TypeVar("Term", np.ndarray, Gram, Moments)


def _accumulate(model: ir.Model, layers: Sequence[Layer], data: Source, term: Callable[[Layer, np.ndarray], Term],
                *, progress: bool) -> dict[WeightKey, Term]:
    """The sum over all feeds of ``term(layer, rows of its input)``, per weight (see :func:`capture_grams`)."""
    if not layers:
        return {}
    reader: CalibrationDataReader
    if isinstance(data, (str, os.PathLike, list, tuple, Calls)) and is_per_call(data):  # a folder, a list of feeds
        reader = read_calls(data, input_specs(model)).reader()
    elif isinstance(data, (str, os.PathLike, Mapping)):
        reader = ArrayReader(data, model)
    else:  # a reader: checked feed by feed as it streams
        reader = CheckedReader(cast(CalibrationDataReader, data), model)
    capture = _Capture(model, layers)
    sums: dict[WeightKey, Term] = {}
    batches = 0
    with progress_bar(desc="calibration", unit="batch", progress=progress) as bar:
        while (feed := reader.get_next()) is not None:
            try:
                rows = capture.rows(feed)
            except InvalidInputError:
                in_bodies = {layer.weight_key for layer in capture.layers if layer.in_subgraph}
                if not in_bodies:
                    raise
                sums = {key: total for key, total in sums.items() if key not in in_bodies}
                kept = [layer for layer in capture.layers if layer.weight_key not in in_bodies]
                if not kept:
                    return {}
                capture = _Capture(model, kept)
                rows = capture.rows(feed)  # the same feed, without the body values: fails again on bad data
            for layer, x in rows:
                value = term(layer, x)
                known = sums.get(layer.weight_key)
                sums[layer.weight_key] = value if known is None else known + value  # type: ignore[operator]
            batches += 1
            bar.update()
    if not batches:
        raise InvalidInputError("the calibration data yielded no batch")
    return sums
