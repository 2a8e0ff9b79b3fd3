"""Calibration inputs, and the Gram matrix X^T X of each layer's input activations.

Inputs come from an ``.npz`` or a mapping (arrays keyed by graph input name, first axis = samples) or from any
object with onnxruntime's ``CalibrationDataReader`` protocol (``get_next()`` returns a feed dict, or
None when done), so a reader written for static quantization works here unchanged. The original
model runs in onnxruntime with every candidate layer's input exposed as an extra output, and each
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
from onnx_arsvd.data import ArrayReader, CalibrationDataReader, CheckedReader
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.sessions import make_session, run_session

__all__ = ["ArrayReader", "CalibrationDataReader", "capture_grams"]


def _with_layer_inputs(model: ir.Model, names: Sequence[str]) -> bytes:
    """The model serialized with the named values added as graph outputs."""
    exposed = model.clone()
    values = {v.name: v for v in exposed.graph.inputs}
    values.update({v.name: v for node in exposed.graph for v in node.outputs})
    present = {v.name for v in exposed.graph.outputs}
    exposed.graph.outputs.extend(values[name] for name in names if name not in present)
    return ir.to_proto(exposed).SerializeToString()


def capture_grams(
    model: ir.Model,
    layers: Sequence[Layer],
    data: str | os.PathLike | Mapping[str, np.ndarray] | CalibrationDataReader,
    *,
    progress: bool = False,
) -> dict[WeightKey, np.ndarray]:
    """X^T X of every layer's input over all calibration feeds, keyed by ``Layer.weight_key``.

    ``data`` is an ``.npz`` path, a mapping of arrays, or a ``CalibrationDataReader``. Layers
    sharing a weight (same key) add their activations into one Gram matrix.
    """
    names = list(dict.fromkeys(layer.node.inputs[0].name for layer in layers))
    if isinstance(data, (str, os.PathLike, Mapping)):
        reader: CalibrationDataReader = ArrayReader(data, model)
    else:
        reader = CheckedReader(data, model)
    session = make_session(_with_layer_inputs(model, names))
    grams: dict[WeightKey, np.ndarray] = {}
    batches = 0
    with tqdm(desc="calibration", unit="batch", disable=None if progress else True) as bar:
        while (feed := reader.get_next()) is not None:
            outputs = dict(zip(names, run_session(session, names, feed)))
            for layer in layers:
                x = outputs[layer.node.inputs[0].name].astype(np.float64).reshape(-1, layer.shape[0])
                grams[layer.weight_key] = grams.get(layer.weight_key, 0.0) + x.T @ x
            batches += 1
            bar.update()
    if not batches:
        raise InvalidInputError("the calibration data yielded no batch")
    return grams
