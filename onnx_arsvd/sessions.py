"""The one place that makes onnxruntime sessions: threads, spinning, providers, and clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError

__all__ = ["ModelSource", "make_session", "model_session", "run_session", "session_options"]

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
    """A CPU session on an in-memory model, and the model's size as written (the serialized graph and
    in-memory tensors, plus the bytes of the external data it keeps). ``model`` is left as it was.

    Weights in external data are not read: they stay references to their file, and onnxruntime, told the
    file's folder (a model given as bytes has none: it would look in the working folder), maps them itself,
    as it does when it opens the file by path. When they lie in more than one folder they are read in.
    """
    options = session_options(threads)
    folder = _external_folder(model)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    with nullcontext() if folder is not None else _external_read_in(model):
        serialized = ir.to_proto(model).SerializeToString()
    external = sum(tensor.nbytes for tensor in _external_tensors(model)) if folder else 0
    return _open(serialized, options, ["CPUExecutionProvider"]), len(serialized) + external


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """The main graph's initializers whose data is in external files."""
    return [value.const_value for value in model.graph.initializers.values()
            if isinstance(value.const_value, ir.ExternalTensor)]


def _external_folder(model: ir.Model) -> str | None:
    """The one folder the main graph's external data lies in; None when there is none, or several."""
    folders = {os.fspath(tensor.base_dir) for tensor in _external_tensors(model)}
    return folders.pop() if len(folders) == 1 else None


@contextmanager
def _external_read_in(model: ir.Model) -> Iterator[None]:
    """Every main-graph initializer with external data read into memory until the block ends: a serialized
    graph alone does not say where its files are."""
    swapped: dict[ir.Value, ir.TensorProtocol] = {}
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                swapped[value] = tensor
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
        yield
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
