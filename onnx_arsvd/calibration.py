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
from onnx_arsvd.sessions import make_session, run_session

__all__ = ["ArrayReader", "CalibrationDataReader", "capture_grams"]


def _rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input vectors, one per row: X's rows for ``X @ M``, its columns for ``W @ X`` or transA."""
    if layer.left != layer.trans_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    return x.astype(np.float64).reshape(-1, layer.shape[0])


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
    are. Layers inside If/Loop/Scan bodies are captured too (:mod:`onnx_arsvd.capture`); a weight
    whose layers the data never reached (an If branch never taken) gets no Gram matrix, hence plain factors.
    """
    if not layers:
        return {}
    serialized, outputs_by_node = exposed_model(model, layers)
    names = list(dict.fromkeys(outputs_by_node.values()))
    if isinstance(data, (str, os.PathLike, Mapping)):
        reader: CalibrationDataReader = ArrayReader(data, model)
    else:
        reader = CheckedReader(data, model)
    session = make_session(serialized)
    grams: dict[WeightKey, np.ndarray] = {}
    batches = 0
    with tqdm(desc="calibration", unit="batch", disable=None if progress else True) as bar:
        while (feed := reader.get_next()) is not None:
            outputs = dict(zip(names, run_session(session, names, feed), strict=True))
            for layer in layers:
                x = _rows(layer, outputs[outputs_by_node[id(layer.node)]])
                grams[layer.weight_key] = grams.get(layer.weight_key, 0.0) + x.T @ x
            batches += 1
            bar.update()
    if not batches:
        raise InvalidInputError("the calibration data yielded no batch")
    return {key: gram for key, gram in grams.items() if np.trace(gram) > 0}
