"""onnx-arsvd: factor the dense layers of an exported ONNX model with adaptive-rank SVD."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx_arsvd.api import METHODS, compress, inspect_model, verify
    from onnx_arsvd.budget import Budget
    from onnx_arsvd.data import CalibrationDataReader
    from onnx_arsvd.errors import (
        ArsvdError,
        InvalidInputError,
        OutputError,
        UnsupportedModelError,
    )
    from onnx_arsvd.guard import LatencyGuard
    from onnx_arsvd.rank import (
        POLICIES,
        EnergyPolicy,
        EntropyPolicy,
        FixedRankPolicy,
        RatioPolicy,
        make_policy,
    )
    from onnx_arsvd.report import Report, format_report, report_to_json
    from onnx_arsvd.verify import VerificationReport

# Imported on first use, so that ``import onnx_arsvd.cli`` (and ``--help``, and Ctrl-C at start-up) stays light.
_HOMES = {
    "onnx_arsvd.api": ("METHODS", "compress", "inspect_model", "verify"),
    "onnx_arsvd.budget": ("Budget",),
    "onnx_arsvd.data": ("CalibrationDataReader",),
    "onnx_arsvd.errors": ("ArsvdError", "InvalidInputError", "OutputError", "UnsupportedModelError"),
    "onnx_arsvd.guard": ("LatencyGuard",),
    "onnx_arsvd.rank": ("POLICIES", "EnergyPolicy", "EntropyPolicy", "FixedRankPolicy", "RatioPolicy", "make_policy"),
    "onnx_arsvd.report": ("Report", "format_report", "report_to_json"),
    "onnx_arsvd.verify": ("VerificationReport",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'onnx_arsvd' has no attribute {name!r}")
    value = getattr(import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "METHODS",
    "POLICIES",
    "ArsvdError",
    "Budget",
    "CalibrationDataReader",
    "EnergyPolicy",
    "EntropyPolicy",
    "FixedRankPolicy",
    "InvalidInputError",
    "LatencyGuard",
    "OutputError",
    "RatioPolicy",
    "Report",
    "UnsupportedModelError",
    "VerificationReport",
    "compress",
    "format_report",
    "inspect_model",
    "make_policy",
    "report_to_json",
    "verify",
]

__version__ = "0.1.0"
