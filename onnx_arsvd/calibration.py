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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnx_arsvd.candidates import Layer, WeightKey
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.sessions import make_session
from onnx_arsvd.verification import Feed, load_data, split_batches

__all__ = ["ArrayReader", "CalibrationDataReader", "capture_grams"]


class CalibrationDataReader(Protocol):
    """onnxruntime's calibration protocol: feeds until ``get_next()`` returns None."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


class ArrayReader:
    """A ``CalibrationDataReader`` over an ``.npz`` or a mapping of arrays, in batches of ``batch_size``."""

    def __init__(self, data: str | os.PathLike | Mapping[str, np.ndarray], session: ort.InferenceSession,
                 batch_size: int = 256) -> None:
        if isinstance(data, (str, os.PathLike)) and not Path(data).is_file():
            raise InvalidInputError(f"{os.fspath(data)}: no such calibration file")
        feed, _ = load_data(data, session)
        self._batches: Iterator[Feed] = split_batches(feed, session, batch_size)

    def get_next(self) -> Feed | None:
        return next(self._batches, None)


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
    session = make_session(_with_layer_inputs(model, names))
    if isinstance(data, (str, os.PathLike, Mapping)):
        reader: CalibrationDataReader = ArrayReader(data, session)
    elif callable(getattr(data, "get_next", None)):
        reader = data
    else:
        raise InvalidInputError(f"calibration data must be an .npz path or have get_next(), got {type(data).__name__}")
    grams: dict[WeightKey, np.ndarray] = {}
    batches = 0
    with tqdm(desc="calibration", unit="batch", disable=None if progress else True) as bar:
        while (feed := reader.get_next()) is not None:
            outputs = dict(zip(names, session.run(names, feed)))
            for layer in layers:
                x = outputs[layer.node.inputs[0].name].astype(np.float64).reshape(-1, layer.shape[0])
                grams[layer.weight_key] = grams.get(layer.weight_key, 0.0) + x.T @ x
            batches += 1
            bar.update()
    if not batches:
        raise InvalidInputError("the calibration data yielded no batch")
    return grams
