"""The Python API, the same as the CLI: ``inspect_model``, ``compress`` and ``verify``.

Each takes the model and an options object (:mod:`onnx_arsvd.config`), or any of its fields by name::

    compress("model.onnx", "small.onnx", policy=EnergyPolicy(0.9), data="test.npz")
    compress("model.onnx", "small.onnx", CompressOptions(budget=Budget(max_drop=0.5)), data="labelled.npz")

What the options leave open is decided by :mod:`onnx_arsvd.rules`, as the CLI decides it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

from onnx_arsvd.config import CompressOptions
from onnx_arsvd.measure.guard import LatencyTable
from onnx_arsvd.measure.verification import ModelLike, verify
from onnx_arsvd.methods.lowrank.settings import METHODS
from onnx_arsvd.pipeline.checks import BudgetMissedError
from onnx_arsvd.pipeline.compress import inspect_run, run_compress
from onnx_arsvd.pipeline.staging import PendingOutput
from onnx_arsvd.report.model_report import Report

__all__ = ["METHODS", "BudgetMissedError", "CompressOptions", "PendingOutput", "compress", "inspect_model", "verify"]


def inspect_model(model: ModelLike, options: CompressOptions | None = None, **overrides: Any) -> Report:
    """What ``compress`` would do: every candidate layer with its rank, energy kept and saving (the factor options
    and ``progress`` apply)."""
    return inspect_run(model, (options or CompressOptions()).replace(**overrides))


def compress(model: ModelLike, output: str | os.PathLike | None = None, options: CompressOptions | None = None, *,
             before_placing: Callable[[PendingOutput], None] | None = None,
             latency_table: LatencyTable | None = None, **overrides: Any) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Factor the dense layers of ``model``; write ``output`` when given; verify unless ``check=False``.

    ``options`` (default :class:`~onnx_arsvd.config.CompressOptions`), with any field changed by name in
    ``overrides`` (``policy=``, ``data=``, ``budget=``, ``quantize="int8"``, ...), say what to do; see the fields' help.
    Returns the compressed model, of the kind given (``onnx.ModelProto`` for a ModelProto, else an ``onnx_ir.Model``,
    whose external weights stay memory-mapped), and the report. The input is never modified.

    - ``method="whitened"`` factors each layer to minimise its output error on the ``calibration`` inputs (an
      ``.npz``, arrays, or a ``CalibrationDataReader``); ``method="lp"`` fits each weight's rows with the robust l_p
      subspace. Embedding tables (``Gather`` on a constant) are factored only with an ``embedding_policy``.
    - ``data`` is an ``.npz`` path or arrays keyed by input name (samples on the first axis), or one feed per call
      (a folder of ``.npz`` files, a ``CalibrationDataReader``, a list of feed dicts; :mod:`onnx_arsvd.io.calls`)
      for a model whose batch axis is not the first or that has none: each call then counts as one sample.
    - With a ``budget`` (or with ``data`` and no ``policy``: a default budget), ``data`` is split into a calibration
      part that chooses the ranks (:mod:`onnx_arsvd.search`) and a held-out part that the final verification
      reports on.
    - With a ``guard``, each layer is kept dense where factoring it is not faster on the guard's provider, and the
      whole model is timed against the original at the end (``report.latency_check``); a latency target is missed
      when that final timing exceeds it. Layers are timed once per shape, rank and rows in a run; a
      ``latency_table`` reuses the timings of earlier runs (and brings its guard).
    - With ``quantize`` (a mode name or a :class:`~onnx_arsvd.methods.quantize.quantizers.Quantization`) the
      factored model is quantized by onnxruntime's quantizers; under a budget every candidate is, so the budget
      judges the model that ships.
    - A model with external data written to ``output`` (no budget, no ``quantize``) has each weight's factors moved
      to a scratch file beside the output as soon as they are made, so memory holds the factors of the weights in
      progress only. ``jobs`` weights are factored at once; the output is the same whatever ``jobs`` is.

    The output is written into a staging folder beside ``output``, checked (``onnx.checker`` with ``full_check``, and
    the verification) and only then moved into place. ``before_placing``, when given, is called with a
    :class:`PendingOutput` once the written model passed its checks and before anything is placed: it may run the
    staged model and stage more files (a report, a plot) that are placed with it; if it raises, nothing is placed.
    """
    return run_compress(model, output, (options or CompressOptions()).replace(**overrides),
                        before_placing=before_placing, latency_table=latency_table)
