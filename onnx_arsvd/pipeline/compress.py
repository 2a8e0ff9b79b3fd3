"""``compress`` as stages over frozen values: decided options -> (budget search) -> model plan -> (latency guard)
-> rewrite -> (quantization) -> write -> checks (checker, whole-model timing, verification) -> placement.

Every stage returns a value; the report is built once from them. The model file is read once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack

import onnx
import onnx_ir as ir

from onnx_arsvd.config import CompressOptions
from onnx_arsvd.errors import InvalidInputError, OutputError
from onnx_arsvd.io.arrays import DataSource
from onnx_arsvd.io.calls import Calls, DataInput, as_arrays, is_per_call, load_calls
from onnx_arsvd.io.data import Feed, load_data
from onnx_arsvd.io.models import (
    DROPPED_FIELDS_KEY,
    check_written,
    external_data_files,
    model_file_bytes,
    to_model,
    weight_stats,
)
from onnx_arsvd.io.output import place_all, stage_model
from onnx_arsvd.io.paths import check_paths, listed
from onnx_arsvd.io.spill import spill_into
from onnx_arsvd.measure.calibration import output_errors
from onnx_arsvd.measure.guard import LatencyTable, check_model, guarded_plans, observed_rows, regressions
from onnx_arsvd.measure.inputs import check_dims, dims_from_data, generated_batches, unset_dims
from onnx_arsvd.measure.results import LatencyComparison, VerificationReport
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.measure.verification import ModelLike, check_files, model_source, verify
from onnx_arsvd.methods.lowrank.model_plan import ModelPlan, PlanMemo, plan_model
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.methods.quantize.quantizers import check_quantizable
from onnx_arsvd.methods.width.find import describe_units, find_width_units
from onnx_arsvd.methods.width.rewrite import NarrowPass
from onnx_arsvd.pipeline.checks import (
    BudgetMissedError,
    advice,
    check_result,
    checked_data,
    far_from_original,
    held_out_miss,
)
from onnx_arsvd.pipeline.reporting import Written, build_report
from onnx_arsvd.pipeline.staging import PendingOutput, scratch_folder
from onnx_arsvd.report.model_report import Report
from onnx_arsvd.rules import decide, settings_of
from onnx_arsvd.search.parts import Part, part_inputs
from onnx_arsvd.search.run import SearchResult, prepare_search, run_search

__all__ = ["inspect_run", "run_compress"]

logger = logging.getLogger("onnx_arsvd")


def inspect_run(model: ModelLike, options: CompressOptions) -> Report:
    """What :func:`run_compress` would do with ``options``: every candidate layer with its rank and saving."""
    loaded = to_model(model)
    options = decide(options, loaded)
    settings = settings_of(options.factor)
    planned = plan_model(loaded, settings, with_factors=False, progress=options.output.progress, allow_empty=True)
    dense = [layer for plan in planned.plans for layer in plan.layers if not layer.is_embedding]
    planned = dataclasses.replace(planned, notes=(*planned.notes, describe_units(*find_width_units(dense))))
    size = model_file_bytes(model, loaded) if isinstance(model, (str, os.PathLike)) else None
    weights = weight_stats(loaded)
    return build_report(model, settings, planned, weights, weights, written=Written(file_bytes_before=size),
                        dropped=loaded.meta.get(DROPPED_FIELDS_KEY, ()))


def _input_files(model: ModelLike, loaded: ir.Model, options: CompressOptions) -> dict:
    """Every file the run reads, by what it is: none may be written over."""
    def path(value: object) -> str | os.PathLike | None:
        return value if isinstance(value, (str, os.PathLike)) else None

    data = options.data.data
    return {"input model": path(model), "input model's external data": external_data_files(loaded),
            "`data`": data.files if isinstance(data, Calls) else path(data), "`labels`": path(options.data.labels),
            "`calibration`": path(options.factor.calibration)}


def run_compress(model: ModelLike, output: str | os.PathLike | None, options: CompressOptions, *,
                 before_placing: Callable[[PendingOutput], None] | None = None,
                 latency_table: LatencyTable | None = None) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """See :func:`onnx_arsvd.api.compress`."""
    check_files(data=options.data.data, labels=options.data.labels)
    loaded = to_model(model)
    size_before = model_file_bytes(model, loaded) if isinstance(model, (str, os.PathLike)) else None
    if options.data.data is not None and is_per_call(options.data.data):  # read once: a reader cannot be read again
        calls = load_calls(options.data.data, options.data.labels, loaded)  # warns of labels it leaves out
        options = options.replace(data=calls)
    options = decide(options, loaded)
    factor, data_options, out = options.factor, options.data, options.output
    inputs = _input_files(model, loaded, options)
    check_paths({"`output`": output}, inputs)
    if options.quantize is not None:
        check_quantizable(loaded)
    budget, quantize, progress = options.budget, options.quantize, out.progress
    data, dims = _arrays_or_calls(data_options.data), dict(data_options.dims)
    labels = checked_data(loaded, data, data_options.labels,
                          factor.calibration if factor.method == "whitened" else None,
                          verified_on_data=out.check and budget is None)
    source_files = external_data_files(loaded)
    external_data = True if out.external_data is None and source_files else out.external_data  # keeps external data
    check_dims({str(d) for v in loaded.graph.inputs if v.shape for d in v.shape if not isinstance(d, int)}, dims)
    guard = latency_table.guard if latency_table is not None else options.guard
    timing_dims = dims
    if guard is not None:  # time at the shapes the data has, where the user named none
        if data is not None:
            timing_dims = {**dims_from_data(loaded, _first_feed(data, loaded)), **dims}
        if unset := unset_dims(loaded, timing_dims):
            raise InvalidInputError(f"the latency guard times the model at its real shapes: dynamic dims "
                                    f"{', '.join(unset)} have no value (give `dims` ({unset[0]}=N), or `data` to take "
                                    "them from)")
    read = [path for paths in inputs.values() for path in listed(paths)]
    table = latency_table if latency_table is not None else LatencyTable(guard) if guard is not None else None
    assert factor.method is not None  # decided

    with ExitStack() as run:  # the run's scratch (spilled factors, the quantizer's copies) lives in a staging folder
        scratch = run.enter_context(scratch_folder(output, read))
        prepared = (prepare_search(budget, loaded, data, labels, factor.method, factor.calibration,
                                   guard if budget.prices_latency else None) if budget is not None else None)
        settings = settings_of(factor, prepared.parts.calibration if prepared is not None
                               and factor.method == "whitened" else None)
        provider = guard.provider() if guard is not None else None
        spills = (bool(source_files) and external_data is not False and prepared is None and quantize is None
                  and output is not None)  # a big model with external data: factors go to disk as they are made
        spill = run.enter_context(spill_into(scratch.path)) if spills else None
        memo: PlanMemo | None = None
        planned: ModelPlan | None = None
        search: SearchResult | None = None
        held_out = prepared.parts.held_out if prepared is not None else None
        if prepared is not None:
            outcome = run_search(prepared, model, loaded, settings, quantize=quantize,
                                 batch_size=data_options.batch_size,
                                 latency=table if prepared.budget.prices_latency else None, dims=timing_dims,
                                 scratch=scratch.path, progress=progress,
                                 score_threshold=data_options.score_threshold)
            settings, memo, planned, search = outcome.settings, outcome.memo, outcome.planned, outcome.result
            if held_out is not None:  # report on data the search never saw
                data, labels = held_out, None
        if planned is None:
            planned = plan_model(loaded, settings, with_factors=True, progress=progress, memo=memo, spill=spill)
        if table is not None and provider is not None:
            layers = [layer for plan in planned.plans if plan.factored for layer in plan.layers]
            rows = observed_rows(loaded, layers, _shape_feed(model, loaded, data, timing_dims))
            planned = planned.with_plans(guarded_plans(planned.plans, table, provider, timing_dims, progress, rows))
        if held_out is not None:
            planned = _with_held_out_errors(loaded, planned, held_out, progress)
        reference = model if isinstance(model, (str, os.PathLike)) or not out.check else to_model(model)
        weights_before = weight_stats(loaded)
        NarrowPass(planned.narrowed)(loaded)
        if apply_plans(loaded, planned.plans, spill) or planned.narrowed:
            loaded.metadata_props["onnx_arsvd.policy"] = settings.policy.describe()
        planned = planned.without_factors()  # they are in the graph now: the report reads the decisions only
        quantized_with = None  # what this run quantized with (an input written by this tool may carry the tag)
        if quantize is not None and (search is None or search.chosen.quantized):
            quantized_with = quantize.describe()
            quantized = ir.from_proto(quantize.apply(loaded, scratch.path))
            quantized.meta.update(loaded.meta)
            quantized.metadata_props["onnx_arsvd.quantize"] = quantized_with
            loaded = quantized
        factored = any(plan.factored for plan in planned.plans) or bool(planned.narrowed)
        latency_check: list[LatencyComparison] = []
        verification: VerificationReport | None = None

        def make_report(written: Written) -> Report:
            return build_report(model, settings, planned, weights_before, weight_stats(loaded), written=written,
                                search=search, latency_check=latency_check, verification=verification,
                                dropped=loaded.meta.get(DROPPED_FIELDS_KEY, ()), quantized_with=quantized_with)

        written_model = (run.enter_context(stage_model(loaded, output, external_data=external_data, keep=read))
                         if output is not None else None)
        if written_model is not None:  # every output passes the checker, verified or not
            check_written(written_model.path, model)
        compressed = written_model.path if written_model is not None else loaded
        timed = factored or (search is not None and search.budget.target_latency is not None)
        if guard is not None and provider is not None and timed:
            compressed_source = os.fspath(written_model.path) if written_model is not None else model_source(loaded)[0]
            latency_check = check_model(guard, model_source(model)[0], compressed_source, provider, timing_dims,
                                        loaded, progress)
        if out.check:
            verification = verify(reference, compressed, data=data, labels=labels, dims=dims,
                                  samples=data_options.samples, batch_size=data_options.batch_size, progress=progress,
                                  one_at_a_time=data_options.one_at_a_time,
                                  score_threshold=data_options.score_threshold)
        check_result(verification, search)
        if missed := held_out_miss(verification, search, held_out is not None, latency_check):
            raise BudgetMissedError(f"{missed}; nothing written", make_report(Written()), loaded)
        far = far_from_original(verification, budget, data is not None)
        if far and out.strict:
            raise OutputError(f"{far}; nothing written (`strict`)")
        written = Written()
        if written_model is not None:
            assert output is not None  # a model is staged only when there is an output path
            written = Written(os.fspath(output), size_before, model_file_bytes(written_model.path))
        report = make_report(written)
        pending = PendingOutput(written_model.path if written_model is not None else None, report, run)
        if before_placing is not None:
            before_placing(pending)
        place_all([*([written_model] if written_model is not None else []), *pending.staged])
    for warning in [*regressions(latency_check), *([far] if far else []),
                    *advice(report, search, quantize, quantized_with)]:
        logger.warning(warning)
    if verification is not None and data is None:
        logger.warning("verified on generated inputs only: that checks the rewrite, not accuracy on real data "
                       "(give `data` with real inputs)")
    if spill is not None and output is not None:  # the factors' scratch file is gone: return the model written
        loaded = to_model(output)
    result = ir.to_proto(loaded) if isinstance(model, onnx.ModelProto) else loaded
    return result, report


def _with_held_out_errors(loaded: ir.Model, planned: ModelPlan, held_out: Part, progress: bool) -> ModelPlan:
    """The plan with each factored layer's relative output error on the held-out part's activations."""
    factored = [plan for plan in planned.plans
                if plan.factored and plan.factors is not None and not plan.layers[0].is_embedding]
    if not factored:
        return planned
    inputs = part_inputs(held_out)
    factors = {plan.layers[0].weight_key: plan.factors for plan in factored if plan.factors is not None}
    errors = output_errors(loaded, [layer for plan in factored for layer in plan.layers], factors, inputs,
                           progress=progress)
    measured = {id(plan) for plan in factored}
    errors_of = [errors.get(plan.layers[0].weight_key) if id(plan) in measured else None for plan in planned.plans]
    # a weight used in a body the data never ran has no activations to measure on
    return planned.with_plans([plan if error is None else plan.revised(measured_error=error)
                               for plan, error in zip(planned.plans, errors_of, strict=True)])


def _arrays_or_calls(data: DataInput | None) -> DataSource | Calls | None:
    """The run's data as arrays or calls (per-call data was read into :class:`Calls` first)."""
    return data if data is None or isinstance(data, Calls) else as_arrays(data)


def _first_feed(data: DataSource | Part, model: ir.Model) -> Feed:
    """A few samples the model really sees: the data's first 8, or its first call."""
    if isinstance(data, Calls):
        return data.feeds[0]
    return {name: array[:8] for name, array in load_data(data, model)[0].items()}  # labels are not read


def _shape_feed(source: ModelLike, model: ir.Model, data: DataSource | Part | None, dims: Mapping[str, int]) -> Feed:
    """A few samples the model really sees (:func:`_first_feed`), or one generated one: to observe activation shapes."""
    if data is not None:
        return _first_feed(data, model)
    return generated_batches(make_session(model_source(source)[0]), model, dims, samples=1)[0]
