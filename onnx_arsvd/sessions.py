"""The one place that makes onnxruntime sessions: threads, spinning, providers, and clear errors."""

from __future__ import annotations

import os

import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError

__all__ = ["ModelSource", "make_session", "run_session", "session_options"]

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
    try:
        return ort.InferenceSession(model, session_options(threads), providers=providers)
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
