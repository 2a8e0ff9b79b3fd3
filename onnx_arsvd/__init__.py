"""onnx-arsvd: factor the dense layers of an exported ONNX model with adaptive-rank SVD.

The public names are imported lazily, on first use, so ``import onnx_arsvd`` and ``onnx-arsvd --help``
load neither onnxruntime nor scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnx_arsvd.api import BudgetMissedError, compress, inspect_model
    from onnx_arsvd.config import CompressOptions, DataOptions, FactorOptions, LatencyGuard, OutputOptions
    from onnx_arsvd.errors import ArsvdError, InvalidInputError, UnsupportedModelError
    from onnx_arsvd.io.data import CalibrationDataReader
    from onnx_arsvd.measure.results import VerificationReport
    from onnx_arsvd.measure.verification import verify
    from onnx_arsvd.methods.lowrank.settings import METHODS
    from onnx_arsvd.numerics.rank import (
        POLICIES,
        EnergyPolicy,
        EntropyPolicy,
        FixedRankPolicy,
        RatioPolicy,
        make_policy,
    )
    from onnx_arsvd.report.model_report import Report, format_report, report_to_json
    from onnx_arsvd.search.budget import Budget

_HOMES = {
    "ArsvdError": "errors",
    "Budget": "search.budget",
    "BudgetMissedError": "api",
    "CalibrationDataReader": "io.data",
    "CompressOptions": "config",
    "DataOptions": "config",
    "EnergyPolicy": "numerics.rank",
    "EntropyPolicy": "numerics.rank",
    "FactorOptions": "config",
    "FixedRankPolicy": "numerics.rank",
    "InvalidInputError": "errors",
    "LatencyGuard": "config",
    "METHODS": "methods.lowrank.settings",
    "OutputOptions": "config",
    "POLICIES": "numerics.rank",
    "RatioPolicy": "numerics.rank",
    "Report": "report.model_report",
    "UnsupportedModelError": "errors",
    "VerificationReport": "measure.results",
    "compress": "api",
    "format_report": "report.model_report",
    "inspect_model": "api",
    "make_policy": "numerics.rank",
    "report_to_json": "report.model_report",
    "verify": "measure.verification",
}

__all__ = [
    "ArsvdError",
    "Budget",
    "BudgetMissedError",
    "CalibrationDataReader",
    "CompressOptions",
    "DataOptions",
    "EnergyPolicy",
    "EntropyPolicy",
    "FactorOptions",
    "FixedRankPolicy",
    "InvalidInputError",
    "LatencyGuard",
    "METHODS",
    "OutputOptions",
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
