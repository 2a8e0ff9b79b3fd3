"""The one place that makes onnxruntime sessions: threads, spinning, providers, and clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.io.data import input_specs, one_call
from onnx_arsvd.io.models import load_model, utf8

__all__ = ["ModelSource", "make_session", "model_session", "run_session", "session_options"]

ModelSource = str | os.PathLike | bytes | ir.Model
"""What a session is made from: a path, a serialized model, or an in-memory model (see :func:`make_session`)."""


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
    """A session on ``provider`` (and the CPU for unsupported nodes with ``cpu_fallback``); one-line errors.

    An in-memory ``ir.Model`` is serialized without its external data, which onnxruntime then maps from its
    file as it does for a path (:func:`_serialized`); ``model`` is left as it was.
    """
    options = session_options(threads)
    if isinstance(source, (str, os.PathLike)) and not utf8(os.fspath(source)):
        source = load_model(source)  # onnxruntime takes UTF-8 paths only: open it as an in-memory model
    if isinstance(source, ir.Model):
        model: str | bytes = _serialized(source, options)[0]
    else:
        model = source if isinstance(source, bytes) else os.fspath(source)
    providers = ([provider, "CPUExecutionProvider"] if cpu_fallback and provider != "CPUExecutionProvider"
                 else [provider])
    return _open(model, options, providers)


def model_session(model: ir.Model, threads: int = 0) -> tuple[ort.InferenceSession, int]:
    """A CPU session on an in-memory model (as :func:`make_session`), and the model's size as written: the
    serialized graph and in-memory tensors, plus the bytes of the external data it keeps."""
    options = session_options(threads)
    serialized, external = _serialized(model, options)
    return _open(serialized, options, ["CPUExecutionProvider"]), len(serialized) + external


def _serialized(model: ir.Model, options: ort.SessionOptions) -> tuple[bytes, int]:
    """``model`` serialized for onnxruntime, and the bytes of external data it refers to.

    Weights in external data are not read: they stay references to their file, and ``options`` tell
    onnxruntime the file's folder (a model given as bytes has none: it would look in the working folder).
    When they lie in more than one folder they are read in.
    """
    folder = _external_folder(model)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    with nullcontext() if folder is not None else _external_read_in(model):
        serialized = ir.to_proto(model).SerializeToString()
    return serialized, sum(tensor.nbytes for tensor in _external_tensors(model)) if folder else 0


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
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {_said(error)}") from error


def _said(error: Exception) -> str:
    """onnxruntime's message on one line: its lines joined (a first line that ends in ':' is cut just before the part
    that explains it), at most 400 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines) if lines else type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def run_session(session: ort.InferenceSession, names: list[str] | None, feed: dict) -> list:
    """``session.run`` on a slice of a checked feed (an input given once per call passed once,
    :func:`~onnx_arsvd.io.data.one_call`), with onnxruntime's errors on the data (a shape, an index out of range)
    as one line."""
    try:
        return session.run(names, one_call(feed, input_specs(session)))
    except Exception as error:  # onnxruntime raises Fail, InvalidArgument, RuntimeException, ...
        raise InvalidInputError(f"onnxruntime failed on the data: {_said(error)}") from error
