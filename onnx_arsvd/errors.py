"""One exception hierarchy: the CLI turns any of these into a one-line error."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx_arsvd.report import Report

__all__ = ["ArsvdError", "BudgetMissedError", "InvalidInputError", "OutputError", "UnsupportedModelError"]


class ArsvdError(Exception):
    """Base class of every error onnx-arsvd raises on purpose."""


class InvalidInputError(ArsvdError):
    """A user-supplied argument, path or data file is wrong."""


class UnsupportedModelError(ArsvdError):
    """The model cannot be read, or has nothing this tool can compress."""


class OutputError(ArsvdError):
    """The output could not be written, or the written model failed its checks: nothing was placed."""


class BudgetMissedError(OutputError):
    """The compressed model misses its budget on the held-out data: nothing was placed.

    ``report`` (an :class:`onnx_arsvd.report.Report`) shows the search and the held-out verification;
    ``model`` is the compressed model that missed, for a caller who wants to study it.
    """

    def __init__(self, message: str, report: Report, model: object = None) -> None:
        super().__init__(message)
        self.report = report
        self.model = model
