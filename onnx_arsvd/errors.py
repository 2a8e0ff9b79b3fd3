"""One exception hierarchy: the CLI turns any of these into a one-line error."""

from __future__ import annotations

__all__ = ["ArsvdError", "InvalidInputError", "OutputError", "UnsupportedModelError"]


class ArsvdError(Exception):
    """Base class of every error onnx-arsvd raises on purpose."""


class InvalidInputError(ArsvdError):
    """A user-supplied argument, path or data file is wrong."""


class UnsupportedModelError(ArsvdError):
    """The model cannot be read, or has nothing this tool can compress."""


class OutputError(ArsvdError):
    """The output could not be written, or the written model failed its checks: nothing was placed."""
