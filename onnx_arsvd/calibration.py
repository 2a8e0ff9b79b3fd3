"""Calibration inputs, and the Gram matrix X^T X of each layer's input activations.

Inputs come from an ``.npz`` or a mapping (arrays keyed by graph input name, first axis = samples) or from any
object with onnxruntime's ``CalibrationDataReader`` protocol (``get_next()`` returns a feed dict, or
None when done), so a reader written for static quantization works here unchanged. The original
model runs in onnxruntime with every candidate layer's input exposed as an extra output (from inside
If/Loop/Scan bodies too), and each
layer's Gram matrix is accumulated batch by batch in float64: memory is bounded by the layer sizes
(m x m per weight), not by the amount of data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnx_arsvd.candidates import Layer, WeightKey
from onnx_arsvd.capture import exposed_model
from onnx_arsvd.data import ArrayReader, CalibrationDataReader, CheckedReader
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.sessions import model_session, run_session

__all__ = ["ArrayReader", "CalibrationDataReader", "capture_grams"]


def _rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input vectors, one per row: X's rows for ``X @ M``, its columns for ``W @ X`` or transA."""
    if layer.left != layer.trans_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    return x.astype(np.float64).reshape(-1, layer.shape[0])


class _Capture:
    """A session of the model with the layers' inputs exposed, and how to read each layer's rows from it."""

    def __init__(self, model: ir.Model, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        exposed, self.by_node = exposed_model(model, self.layers)
        self.names = list(dict.fromkeys(self.by_node.values()))
        self.session = model_session(exposed)[0]

    def rows(self, feed: dict[str, np.ndarray]) -> list[tuple[Layer, np.ndarray]]:
        outputs = dict(zip(self.names, run_session(self.session, self.names, feed), strict=True))
        return [(layer, _rows(layer, outputs[self.by_node[id(layer.node)]])) for layer in self.layers]


def capture_grams(
    model: ir.Model,
    layers: Sequence[Layer],
    data: str | os.PathLike | Mapping[str, np.ndarray] | CalibrationDataReader,
    *,
    progress: bool = False,
) -> dict[WeightKey, np.ndarray]:
    """X^T X of every layer's input over all calibration feeds, keyed by ``Layer.weight_key``.

    ``data`` is an ``.npz`` path, a mapping of arrays, or a ``CalibrationDataReader``. Layers
    sharing a weight (same key) add their activations into one Gram matrix, in whichever scopes they
    are. Layers inside If/Loop/Scan bodies are captured too (:mod:`onnx_arsvd.capture`). A weight
    gets no Gram matrix, hence plain factors, when the data never reached its layers (an If branch
    never taken), or when exposing body values made onnxruntime fail (a loop whose lifted activation
    changes shape between iterations): then every weight used in a body is left out, and the rest is
    captured on the same feeds.
    """
    if not layers:
        return {}
    if isinstance(data, (str, os.PathLike, Mapping)):
        reader: CalibrationDataReader = ArrayReader(data, model)
    else:
        reader = CheckedReader(data, model)
    capture = _Capture(model, layers)
    grams: dict[WeightKey, np.ndarray] = {}
    batches = 0
    with tqdm(desc="calibration", unit="batch", disable=None if progress else True) as bar:
        while (feed := reader.get_next()) is not None:
            try:
                rows = capture.rows(feed)
            except InvalidInputError:
                in_bodies = {layer.weight_key for layer in capture.layers if layer.in_subgraph}
                if not in_bodies:
                    raise
                grams = {key: gram for key, gram in grams.items() if key not in in_bodies}
                kept = [layer for layer in capture.layers if layer.weight_key not in in_bodies]
                if not kept:
                    return {}
                capture = _Capture(model, kept)
                rows = capture.rows(feed)  # the same feed, without the body values: fails again on bad data
            for layer, x in rows:
                grams[layer.weight_key] = grams.get(layer.weight_key, 0.0) + x.T @ x
            batches += 1
            bar.update()
    if not batches:
        raise InvalidInputError("the calibration data yielded no batch")
    return {key: gram for key, gram in grams.items() if np.trace(gram) > 0}
