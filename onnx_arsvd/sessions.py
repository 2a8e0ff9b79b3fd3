"""The one place that makes onnxruntime sessions: threads, spinning, providers, and clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError

__all__ = ["ModelSource", "make_session", "model_session", "run_session", "session_options"]

IN_MEMORY_MIN_BYTES = 1024
"""Initializers from this size on reach onnxruntime as arrays in :func:`model_session`; smaller ones stay inline."""
_ARRAY_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
                           ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32,
                           ir.DataType.UINT32, ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL})
"""Element types onnxruntime takes from numpy arrays (bfloat16, float8 and 4-bit types stay in the proto)."""
_NOWHERE = "onnx-arsvd-in-memory"
"""The external-data location the proto names for weights given as arrays: onnxruntime never reads it."""

ModelSource = str | os.PathLike | bytes
"""What onnxruntime loads: a path, or a serialized model."""


def session_options(threads: int = 0) -> ort.SessionOptions:
    """``threads`` intra-op threads (0: onnxruntime's default) with spinning off, quiet logs.

    Idle spinning threads of one live session slow every other one down, and the tool often has two
    (original and compressed) alive at once.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def make_session(
    source: ModelSource, provider: str = "CPUExecutionProvider", threads: int = 0, *, cpu_fallback: bool = False
) -> ort.InferenceSession:
    """A session on ``provider`` (and the CPU for unsupported nodes with ``cpu_fallback``); one-line errors."""
    model = source if isinstance(source, bytes) else os.fspath(source)
    providers = ([provider, "CPUExecutionProvider"] if cpu_fallback and provider != "CPUExecutionProvider"
                 else [provider])
    return _open(model, session_options(threads), providers)


def model_session(model: ir.Model, threads: int = 0) -> tuple[ort.InferenceSession, int]:
    """A CPU session on an in-memory model, and the model's size as written with external data (the
    graph's serialized bytes plus its weights' bytes).

    Serializing a model holds its weights twice more (the proto, then its bytes) before onnxruntime
    copies them once more. Here only the graph is serialized: weights in external data stay references
    to their file, which onnxruntime maps itself (it is told the folder, which a model loaded from bytes
    lacks), and the other initializers of at least ``IN_MEMORY_MIN_BYTES`` (factors, inline weights) reach
    onnxruntime as the arrays they are, through ``add_external_initializers``. ``model`` is left as it was.
    """
    options = session_options(threads)
    folder = _external_folder(model)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    with _weights_as_arrays(model, keep_external=folder is not None) as arrays:
        graph = ir.to_proto(model).SerializeToString()
        if arrays:
            options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a)
                                                             for a in arrays.values()])
        session = _open(graph, options, ["CPUExecutionProvider"])
    external = sum(t.nbytes for t in _used_tensors(model) if isinstance(t, ir.ExternalTensor)) if folder else 0
    return session, len(graph) + sum(array.nbytes for array in arrays.values()) + external


def _used_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """The main graph's initializers that a node or the graph's outputs use, and are not graph inputs."""
    inputs = {value.name for value in model.graph.inputs}
    outputs = set(model.graph.outputs)
    for name, value in model.graph.initializers.items():
        # onnxruntime drops unused initializers before it would take their replacements
        if value.const_value is not None and name not in inputs and (value.uses() or value in outputs):
            yield value.const_value


def _external_folder(model: ir.Model) -> str | None:
    """The one folder the main graph's used external data lies in; None when there is none, or several."""
    folders = {os.fspath(t.base_dir) for t in _used_tensors(model) if isinstance(t, ir.ExternalTensor)}
    return folders.pop() if len(folders) == 1 else None


@contextmanager
def _weights_as_arrays(model: ir.Model, *, keep_external: bool) -> Iterator[dict[str, np.ndarray]]:
    """The main graph's large in-memory initializers (and, unless ``keep_external``, those with external
    data) as arrays, their tensors swapped for references to a file that is never read, until the block
    ends; any other external data is read in, since a serialized graph does not know its folder."""
    inputs = {value.name for value in model.graph.inputs}
    used = {id(tensor) for tensor in _used_tensors(model)}
    swapped: dict[ir.Value, ir.TensorProtocol] = {}
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or name in inputs:
                continue
            external = isinstance(tensor, ir.ExternalTensor)
            if external and keep_external:
                continue
            if id(tensor) in used and tensor.dtype in _ARRAY_DTYPES and (external or
                                                                        tensor.nbytes >= IN_MEMORY_MIN_BYTES):
                array = arrays[name] = np.ascontiguousarray(tensor.numpy())
                swapped[value] = tensor
                value.const_value = ir.ExternalTensor(_NOWHERE, 0, array.nbytes, tensor.dtype,
                                                      shape=ir.Shape(array.shape), name=name)
            elif external:
                swapped[value] = tensor
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
        yield arrays
    finally:
        for value, tensor in swapped.items():
            value.const_value = tensor


def _open(model: str | bytes, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {first_line}") from error


def run_session(session: ort.InferenceSession, names: list[str] | None, feed: dict) -> list:
    """``session.run``, with onnxruntime's errors on the data (a shape, an index out of range) as one line."""
    try:
        return session.run(names, feed)
    except Exception as error:  # onnxruntime raises Fail, InvalidArgument, RuntimeException, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidInputError(f"onnxruntime failed on the data: {first_line}") from error
