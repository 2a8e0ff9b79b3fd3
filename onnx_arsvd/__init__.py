"""onnx-arsvd: factor the dense layers of an exported ONNX model with adaptive-rank SVD.

The public names are imported lazily, on first use, so ``import onnx_arsvd`` and ``onnx-arsvd --help``
load neither onnxruntime nor scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnx_arsvd.api import compress, inspect_model
    from onnx_arsvd.calibration import CalibrationDataReader
    from onnx_arsvd.errors import ArsvdError, InvalidInputError, UnsupportedModelError
    from onnx_arsvd.guard import LatencyGuard
    from onnx_arsvd.rank import POLICIES, EnergyPolicy, EntropyPolicy, FixedRankPolicy, RatioPolicy, make_policy
    from onnx_arsvd.report import Report, format_report, report_to_json
    from onnx_arsvd.results import VerificationReport
    from onnx_arsvd.search import Budget
    from onnx_arsvd.settings import METHODS
    from onnx_arsvd.verification import verify

_HOMES = {
    "METHODS": "settings",
    "POLICIES": "rank",
    "CalibrationDataReader": "calibration",
    "ArsvdError": "errors",
    "Budget": "search",
    "EnergyPolicy": "rank",
    "EntropyPolicy": "rank",
    "FixedRankPolicy": "rank",
    "InvalidInputError": "errors",
    "LatencyGuard": "guard",
    "RatioPolicy": "rank",
    "Report": "report",
    "UnsupportedModelError": "errors",
    "VerificationReport": "results",
    "compress": "api",
    "format_report": "report",
    "inspect_model": "api",
    "make_policy": "rank",
    "report_to_json": "report",
    "verify": "verification",
}

__all__ = [
    "ArsvdError",
    "Budget",
    "CalibrationDataReader",
    "EnergyPolicy",
    "EntropyPolicy",
    "FixedRankPolicy",
    "InvalidInputError",
    "LatencyGuard",
    "METHODS",
    "POLICIES",
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


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'onnx_arsvd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"onnx_arsvd.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
