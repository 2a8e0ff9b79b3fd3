"""onnx-arsvd: factor the dense layers of an exported ONNX model with adaptive-rank SVD."""

from __future__ import annotations

from onnx_arsvd.api import METHODS, compress, inspect_model, verify
from onnx_arsvd.budget import Budget
from onnx_arsvd.calibration import CalibrationDataReader
from onnx_arsvd.errors import ArsvdError, InvalidInputError, UnsupportedModelError
from onnx_arsvd.guard import LatencyGuard
from onnx_arsvd.rank import POLICIES, EnergyPolicy, EntropyPolicy, FixedRankPolicy, RatioPolicy, make_policy
from onnx_arsvd.report import Report, format_report, report_to_json
from onnx_arsvd.verify import VerificationReport

__all__ = [
    "METHODS",
    "POLICIES",
    "CalibrationDataReader",
    "ArsvdError",
    "Budget",
    "EnergyPolicy",
    "EntropyPolicy",
    "FixedRankPolicy",
    "InvalidInputError",
    "LatencyGuard",
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
