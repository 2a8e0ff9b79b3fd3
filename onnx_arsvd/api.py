"""The Python API, mirroring the CLI: ``inspect_model``, ``compress`` and ``verify``.

``compress`` is a short pipeline over stage results: settings -> (budget search) -> model plan ->
(latency guard) -> rewrite -> write -> (whole-model timing) -> verification, and the report is
built once at the end from what the stages returned.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, OutputError
from onnx_arsvd.io.data import ArrayReader, Feed, load_data, load_labelled, load_labels
from onnx_arsvd.io.models import (
    DROPPED_FIELDS_KEY,
    check_written,
    external_data_files,
    model_file_bytes,
    to_model,
    weight_stats,
)
from onnx_arsvd.io.output import StagedFile, StagingFolder, clean_stale, place_all, stage_file, stage_model
from onnx_arsvd.io.paths import check_paths, listed, output_path
from onnx_arsvd.io.spill import spill_into
from onnx_arsvd.measure.benchmark import LatencyComparison
from onnx_arsvd.measure.calibration import output_errors
from onnx_arsvd.measure.guard import LatencyGuard, LatencyTable, guarded_plans, observed_rows
from onnx_arsvd.measure.inputs import check_dims, generated_batches
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.measure.verification import (
    DEFAULT_BATCH_SIZE,
    ModelLike,
    VerificationReport,
    check_files,
    model_source,
    verify,
)
from onnx_arsvd.methods.lowrank.decision import DEFAULT_MAX_RANK_FRACTION, DEFAULT_MIN_PARAMS
from onnx_arsvd.methods.lowrank.model_plan import ModelPlan, PlanMemo, plan_model
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.methods.lowrank.settings import METHODS, CalibrationSource, Settings
from onnx_arsvd.methods.quantize.quantizers import Quantization, check_quantizable
from onnx_arsvd.numerics.rank import EnergyPolicy, RankPolicy
from onnx_arsvd.report.model_report import Report, nothing_factored_note
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.run import SearchResult, prepare_search, run_search

__all__ = ["METHODS", "BudgetMissedError", "PendingOutput", "compress", "inspect_model", "verify"]

DataSource = str | os.PathLike | Mapping[str, np.ndarray]

logger = logging.getLogger("onnx_arsvd")


class BudgetMissedError(OutputError):
    """The compressed model misses its budget on the held-out data (or in the final timing): nothing was placed.

    ``report`` shows the search and the held-out verification; ``model`` is the compressed model that missed, for a
    caller who wants to study it.
    """

    def __init__(self, message: str, report: Report, model: ir.Model) -> None:
        super().__init__(message)
        self.report = report
        self.model = model


class PendingOutput:
    """The compressed model written and checked in its staging folder, not yet placed (see ``before_placing`` in
    :func:`compress`): :attr:`path` is the staged model file (None without an output path), :attr:`report` the
    run's report; :meth:`stage` adds a file to place with the model."""

    def __init__(self, path: Path | None, report: Report, run: ExitStack) -> None:
        self.path, self.report = path, report
        self._run = run
        self.staged: list[StagedFile] = []

    def stage(self, path: str | os.PathLike, write: Callable[[Path], object], what: str = "output") -> None:
        """Call ``write(temporary)`` in a staging folder beside ``path``; the file is placed with the model."""
        self.staged.append(self._run.enter_context(stage_file(path, write, what)))


@contextmanager
def _scratch_folder(output: str | os.PathLike | None, inputs: Sequence[Path]) -> Iterator[StagingFolder]:
    """A staging folder for the run's scratch files: beside the output, else in the system's temporary folder
    (after removing, there, the staging that killed runs left)."""
    if output is not None:
        parent, doing = output_path(output).parent, "write the output"
    else:
        parent, doing = Path(tempfile.gettempdir()), "write scratch files in the temporary folder"
    clean_stale(parent, inputs)
    with StagingFolder(parent, doing) as folder:
        yield folder


def _describe(model: ModelLike) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"<in-memory {type(model).__name__}>"


@dataclass(frozen=True)
class _Written:
    """Where the compressed model went and how large the files are."""

    output: str | None = None
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None


def _build_report(
    source: ModelLike,
    settings: Settings,
    planned: ModelPlan,
    weights_before: tuple[int, int],
    weights_after: tuple[int, int],
    *,
    written: _Written = _Written(),
    search: SearchResult | None = None,
    latency_check: Sequence[LatencyComparison] = (),
    verification: VerificationReport | None = None,
    dropped: Sequence[str] = (),
    quantized_with: str | None = None,
) -> Report:
    """The report, from every stage's result."""
    layers = planned.decisions()
    global_search = search is not None and search.allocation != "threshold"  # ranks from the search, not a policy
    return Report(
        model=_describe(source),
        policy=f"budget search: {search.allocation}" if search is not None and global_search
        else settings.describe_policy(),
        method=settings.describe(),
        max_rank_fraction=settings.max_rank_fraction,
        min_params=settings.min_params,
        layers=layers,
        skipped=planned.skipped,
        params_before=weights_before[0],
        params_after=weights_after[0],
        weight_bytes_before=weights_before[1],
        weight_bytes_after=weights_after[1],
        output=written.output,
        file_bytes_before=written.file_bytes_before,
        file_bytes_after=written.file_bytes_after,
        verification=verification,
        latency_check=list(latency_check),
        budget=search.summary() if search is not None else None,
        notes=[*([] if any(layer.factored for layer in layers) else [nothing_factored_note(layers)]), *planned.notes,
               *(f"WARNING: {text}" for text in LatencyGuard.regressions(latency_check)),
               *(f"dropped from the output: {field} (onnx_ir does not carry it)" for field in dropped),
               *([f"note: quantized with onnxruntime: {quantized_with}"] if quantized_with is not None else [])],
    )


def inspect_model(
    model: ModelLike,
    *,
    policy: RankPolicy | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION,
    min_params: int = DEFAULT_MIN_PARAMS,
    method: str = "svd",
    calibration: CalibrationSource | None = None,
    lp_power: float = 1.0,
    embedding_policy: RankPolicy | None = None,
    factor_heads: bool = True,
    progress: bool = False,
    jobs: int = 1,
) -> Report:
    """What ``compress`` would do: every candidate layer with its rank, energy kept and saving."""
    settings = _settings(policy, include, exclude, max_rank_fraction, min_params, method, calibration, lp_power,
                         embedding_policy, factor_heads, jobs)
    loaded = to_model(model)
    planned = plan_model(loaded, settings, with_factors=False, progress=progress, allow_empty=True)
    size = model_file_bytes(model) if isinstance(model, (str, os.PathLike)) else None
    weights = weight_stats(loaded)
    return _build_report(model, settings, planned, weights, weights, written=_Written(file_bytes_before=size),
                         dropped=loaded.meta.get(DROPPED_FIELDS_KEY, ()))


def _settings(policy: RankPolicy | None, include: Sequence[str], exclude: Sequence[str], max_rank_fraction: float,
              min_params: int, method: str, calibration: CalibrationSource | None, lp_power: float,
              embedding_policy: RankPolicy | None, factor_heads: bool, jobs: int) -> Settings:
    return Settings(policy or EnergyPolicy(), include, exclude, max_rank_fraction, min_params, method, calibration,
                    lp_power, embedding_policy, factor_heads, jobs)


def _input_files(model: ModelLike, loaded: ir.Model, data: object, labels: object, calibration: object) -> dict:
    """Every file the run reads, by what it is: none may be written over."""
    return {"input model": model if isinstance(model, (str, os.PathLike)) else None,
            "input model's external data": external_data_files(loaded),
            "--data": data if isinstance(data, (str, os.PathLike)) else None,
            "--labels": labels if isinstance(labels, (str, os.PathLike)) else None,
            "--calibration": calibration if isinstance(calibration, (str, os.PathLike)) else None}


def _checked_data(loaded: ir.Model, data: DataSource | None, labels: np.ndarray | str | os.PathLike | None,
                  calibration: CalibrationSource | None, *, verified_on_data: bool) -> np.ndarray | None:
    """Check the data, labels and calibration arrays against the model before any work; the labels array
    (those given, else the data's own). Labels the model cannot take are warned about here unless
    ``verified_on_data``: the verification reads the same data again and says it then."""
    if data is not None:
        labels = load_labelled(data, labels, loaded, warn=not verified_on_data)[1]
    elif labels is not None:
        labels = load_labels(labels)
    if isinstance(calibration, (str, os.PathLike, Mapping)):
        ArrayReader(calibration, loaded)
    return labels


def _check_result(verification: VerificationReport | None, search: SearchResult | None) -> None:
    """A compressed model whose outputs turn NaN/Inf, or a budget the search could not meet, is a failed run."""
    if search is not None and not search.met:
        if search.latency_bound is not None:
            raise OutputError(f"the budget ({search.budget.describe()}) is not met: the fastest model within the "
                              f"accuracy budget times at up to {search.latency_bound:.3f}x (95% bound); "
                              "nothing written")
        if search.budget.target_latency is not None and not search.budget.judges_outputs:
            raise OutputError(f"the budget ({search.budget.describe()}) is not met even by the fastest allocation "
                              "searched; nothing written")
        raise OutputError(f"the budget ({search.budget.describe()}) is not met even with every layer's full output "
                          "energy kept; nothing written")
    for output in verification.outputs if verification is not None else ():
        if output.newly_nonfinite:
            raise OutputError(f"output {output.name!r} of the compressed model is NaN or Inf on "
                              f"{output.newly_nonfinite} samples where the original's is finite; nothing written")
        if output.unrelated:
            raise OutputError(f"output {output.name!r} of the compressed model is unrelated to the original's "
                              f"(relative error {output.relative_error:.3g}, mean cosine {output.mean_cosine:.3f}: "
                              "no closer than an all-zero output); nothing written")


def _held_out_miss(verification: VerificationReport | None, search: SearchResult | None, held_out: bool,
                   latency_check: Sequence[LatencyComparison] = ()) -> str:
    """How the verified model misses its budget on the held-out part (or, for a latency target, in the final
    whole-model timing), or "" when it meets it (or none applies)."""
    if search is not None and search.budget.target_latency is not None and latency_check:
        slowest = max(latency_check, key=lambda c: c.ratio)
        if slowest.ratio > search.budget.target_latency:
            return (f"the budget ({search.budget.describe()}) is missed in the final timing: {slowest.ratio:.3f}x "
                    f"at batch {slowest.batch}")
    if search is None or not held_out or verification is None:
        return ""
    budget = search.budget
    drop = verification.accuracy_drop
    if budget.max_drop is not None and drop is not None and drop > budget.max_drop:
        return f"the budget ({budget.describe()}) is missed on the held-out data: {drop:.2f} points lost"
    worst = min((o.mean_cosine for o in verification.outputs), default=1.0)
    if budget.min_cosine is not None and worst < budget.min_cosine:
        return f"the budget ({budget.describe()}) is missed on the held-out data: mean output cosine {worst:.4f}"
    return ""


def compress(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    policy: RankPolicy | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION,
    min_params: int = DEFAULT_MIN_PARAMS,
    method: str | None = None,
    calibration: CalibrationSource | None = None,
    lp_power: float = 1.0,
    embedding_policy: RankPolicy | None = None,
    factor_heads: bool = True,
    external_data: bool | None = None,
    check: bool = True,
    progress: bool = False,
    data: DataSource | None = None,
    labels: np.ndarray | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    samples: int = 16,
    batch_size: int = DEFAULT_BATCH_SIZE,
    guard: LatencyGuard | LatencyTable | None = None,
    budget: Budget | None = None,
    jobs: int = 1,
    quantize: Quantization | str | None = None,
    one_at_a_time: bool | None = None,
    before_placing: Callable[[PendingOutput], None] | None = None,
) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Factor the dense layers of ``model``; write ``output`` when given; verify unless ``check=False``.

    Returns the compressed model, of the kind given (``onnx.ModelProto`` for a ModelProto, else an
    ``onnx_ir.Model``, whose external weights stay memory-mapped), and the report. The input is
    never modified. ``method="whitened"`` factors each layer to minimise its output error on the
    ``calibration`` inputs (an ``.npz``, arrays, or a ``CalibrationDataReader``) instead of the weight
    error; ``method="lp"`` fits each weight's rows with the robust l_p subspace (``lp_power`` p in [1, 2]).
    With ``factor_heads=False`` layers that feed a graph output (classifier heads) stay dense: the
    CLI's default when no real data checks the result.
    Embedding tables (``Gather`` on a constant) are factored only with an ``embedding_policy``;
    the default is ``"whitened"`` under an accuracy budget (its data calibrates) and ``"svd"`` otherwise.
    ``data``, ``labels``, ``dims``, ``samples``, ``batch_size`` and ``one_at_a_time`` are as in :func:`verify`. With
    a ``budget``, ``data`` is split into a calibration part (Gram matrices, and the end-to-end checks that choose
    one global output-energy threshold, see :mod:`onnx_arsvd.search`) and a held-out part that the final
    verification reports on; ``policy`` must then be left out. With a ``guard``, each layer is kept dense where
    factoring it is not faster on the guard's provider, and the whole model is timed against the original at the end
    (``report.latency_check``); a budget with ``minimize="latency"`` or a ``target_latency`` prices every rank on the
    guard's provider and batch sizes, and needs it; a latency target is missed when that final timing exceeds it.
    Layers are timed once per shape, rank and rows in a run; pass a :class:`~onnx_arsvd.measure.guard.LatencyTable` as
    ``guard`` to reuse its timings across runs.
    ``jobs`` weights are factored at once (threads, one BLAS thread each); the output is
    the same whatever ``jobs`` is. A model with external data written to ``output`` (no budget, no ``quantize``)
    has each weight's factors moved to a scratch file beside the output as soon as they are made, so memory holds
    the factors of the weights in progress only. With ``quantize`` ("int8", "int4" or a
    :class:`~onnx_arsvd.methods.quantize.quantizers.Quantization`) the factored model is quantized by
    onnxruntime's quantizers; under a budget every candidate is, so the budget judges the model that ships.

    The output is written into a staging folder beside ``output``, checked (``onnx.checker`` with ``full_check``,
    and the verification) and only then moved into place. ``before_placing``, when given, is called with a
    :class:`PendingOutput` once the written model passed its checks and before anything is placed: it may run the
    staged model and stage more files (a report, a plot) that are placed with it; if it raises, nothing is placed.
    """
    if budget is not None and policy is not None:
        raise InvalidInputError("a budget chooses the ranks itself: leave out the policy")
    table = guard if isinstance(guard, LatencyTable) else LatencyTable(guard) if guard is not None else None
    guard = table.guard if table is not None else None  # the timings are shared by the search and the guard
    if method is None:  # data-driven factors when the data is there for a budget anyway
        method = "whitened" if budget is not None and data is not None else "svd"
    check_files(data=data, labels=labels)
    loaded = to_model(model)
    inputs = _input_files(model, loaded, data, labels, calibration)
    check_paths({"-o": output}, inputs)
    if isinstance(quantize, str):
        quantize = Quantization(quantize)
    if quantize is not None:
        check_quantizable(loaded)
    labels = _checked_data(loaded, data, labels, calibration if method == "whitened" else None,
                           verified_on_data=check and budget is None)
    source_files = external_data_files(loaded)
    if external_data is None and source_files:  # a model that had external data keeps it, whatever is factored
        external_data = True
    check_dims({str(d) for v in loaded.graph.inputs if v.shape for d in v.shape if not isinstance(d, int)}, dims or {})
    read = [path for paths in inputs.values() for path in listed(paths)]

    with ExitStack() as run:  # the run's scratch (spilled factors, the quantizer's copies) lives in a staging folder
        scratch = run.enter_context(_scratch_folder(output, read))
        prepared = (prepare_search(budget, loaded, data, labels, method, calibration,
                                   guard if budget.prices_latency else None) if budget is not None else None)
        if prepared is not None and method == "whitened":
            calibration = prepared.parts.calibration
        settings = _settings(policy, include, exclude, max_rank_fraction, min_params, method, calibration, lp_power,
                             embedding_policy, factor_heads, jobs)
        provider = guard.provider() if guard is not None else None
        spills = (bool(source_files) and external_data is not False and prepared is None and quantize is None
                  and output is not None)  # a big model with external data: factors go to disk as they are made
        spill = run.enter_context(spill_into(scratch.path)) if spills else None
        memo: PlanMemo | None = None
        planned: ModelPlan | None = None
        search: SearchResult | None = None
        held_out = prepared is not None and prepared.parts.held_out is not None
        if prepared is not None:
            outcome = run_search(prepared, model, loaded, settings, quantize=quantize, batch_size=batch_size,
                                 latency=table if prepared.budget.prices_latency else None, dims=dims,
                                 scratch=scratch.path, progress=progress)
            settings, memo, planned, search = outcome.settings, outcome.memo, outcome.planned, outcome.result
            if prepared.parts.held_out is not None:  # report on data the search never saw
                data, labels = prepared.parts.held_out, None
        if planned is None:
            planned = plan_model(loaded, settings, with_factors=True, progress=progress, memo=memo, spill=spill)
        if guard is not None and provider is not None:
            layers = [layer for plan in planned.plans if plan.factored for layer in plan.layers]
            rows = observed_rows(loaded, layers, _shape_feed(model, loaded, data, dims or {}))
            assert table is not None  # made with the guard
            planned = planned.with_plans(guarded_plans(planned.plans, table, provider, dims or {}, progress, rows))
        if prepared is not None and prepared.parts.held_out is not None:
            planned = _with_held_out_errors(loaded, planned, prepared.parts.held_out, progress)
        reference = model if isinstance(model, (str, os.PathLike)) or not check else to_model(model)
        weights_before = weight_stats(loaded)
        if apply_plans(loaded, planned.plans, spill):
            loaded.metadata_props["onnx_arsvd.policy"] = settings.policy.describe()
        planned = planned.without_factors()  # they are in the graph now: the report reads the decisions only
        quantized_with = None  # what this run quantized with (an input written by this tool may carry the tag)
        if quantize is not None and (search is None or search.chosen.quantized):
            quantized_with = quantize.describe()
            quantized = ir.from_proto(quantize.apply(loaded, scratch.path))
            quantized.meta.update(loaded.meta)
            quantized.metadata_props["onnx_arsvd.quantize"] = quantized_with
            loaded = quantized
        factored = any(plan.factored for plan in planned.plans)
        latency_check: list[LatencyComparison] = []
        verification: VerificationReport | None = None

        def make_report(written: _Written) -> Report:
            return _build_report(model, settings, planned, weights_before, weight_stats(loaded), written=written,
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
            latency_check = guard.check_model(model_source(model)[0], compressed_source, provider, dims or {},
                                              loaded, progress)
        if check:
            verification = verify(reference, compressed, data=data, labels=labels, dims=dims, samples=samples,
                                  batch_size=batch_size, progress=progress, one_at_a_time=one_at_a_time)
        _check_result(verification, search)
        if missed := _held_out_miss(verification, search, held_out, latency_check):
            raise BudgetMissedError(f"{missed}; nothing written", make_report(_Written()), loaded)
        written = _Written()
        if written_model is not None:
            assert output is not None  # a model is staged only when there is an output path
            before = model_file_bytes(model) if isinstance(model, (str, os.PathLike)) else None
            written = _Written(os.fspath(output), before, model_file_bytes(written_model.path))
        report = make_report(written)
        pending = PendingOutput(written_model.path if written_model is not None else None, report, run)
        if before_placing is not None:
            before_placing(pending)
        place_all([*([written_model] if written_model is not None else []), *pending.staged])
    for warning in LatencyGuard.regressions(latency_check):
        logger.warning(warning)
    if verification is not None and data is None:
        logger.warning("verified on generated inputs only: that checks the rewrite, not accuracy on real data "
                       "(pass --data with real inputs)")
    if spill is not None and output is not None:  # the factors' scratch file is gone: return the model written
        loaded = to_model(output)
    result = ir.to_proto(loaded) if isinstance(model, onnx.ModelProto) else loaded
    return result, report


def _with_held_out_errors(loaded: ir.Model, planned: ModelPlan, held_out: Mapping[str, np.ndarray],
                          progress: bool) -> ModelPlan:
    """The plan with each factored layer's relative output error on the held-out part's activations."""
    factored = [plan for plan in planned.plans
                if plan.factored and plan.factors is not None and not plan.layers[0].is_embedding]
    if not factored:
        return planned
    inputs = {k: v for k, v in held_out.items() if k != "labels"}
    factors = {plan.layers[0].weight_key: plan.factors for plan in factored if plan.factors is not None}
    errors = output_errors(loaded, [layer for plan in factored for layer in plan.layers], factors, inputs,
                           progress=progress)
    measured = {id(plan) for plan in factored}
    errors_of = [errors.get(plan.layers[0].weight_key) if id(plan) in measured else None for plan in planned.plans]
    # a weight used in a body the data never ran has no activations to measure on
    return planned.with_plans([plan if error is None else plan.revised(measured_error=error)
                               for plan, error in zip(planned.plans, errors_of, strict=True)])


def _shape_feed(source: ModelLike, model: ir.Model, data: DataSource | None, dims: Mapping[str, int]) -> Feed:
    """A few samples the model really sees (the data's first 8), or one generated one: to observe activation shapes."""
    if data is not None:
        return {name: array[:8] for name, array in load_data(data, model)[0].items()}
    return generated_batches(make_session(model_source(source)[0]), model, dims, samples=1)[0]
