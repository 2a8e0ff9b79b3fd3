"""The Python API, mirroring the CLI: ``inspect_model``, ``compress`` and ``verify``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_arsvd.budget import Budget, SearchStep, bisect_tau, split_data
from onnx_arsvd.calibration import CalibrationDataReader, capture_grams
from onnx_arsvd.candidates import Layer, Skipped, WeightKey, filter_layers, find_layers, read_array
from onnx_arsvd.factorize import Spectrum
from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.guard import LatencyGuard
from onnx_arsvd.model_io import load_model, model_file_bytes, to_model, weight_stats
from onnx_arsvd.output import save_model
from onnx_arsvd.plan import (
    DEFAULT_MAX_RANK_FRACTION,
    DEFAULT_MIN_PARAMS,
    LayerDecision,
    WeightPlan,
    dense_decision,
    plan_layers,
    relative_output_error,
)
from onnx_arsvd.rank import EnergyPolicy, RankPolicy
from onnx_arsvd.report import NOTHING_FACTORED_NOTE, Report
from onnx_arsvd.rewrite import apply_plans
from onnx_arsvd.verify import (
    VerificationReport,
    check_dims,
    compare_models,
    generated_batches,
    load_data,
    make_session,
    split_batches,
)

__all__ = ["METHODS", "compress", "inspect_model", "verify"]

METHODS = ("svd", "whitened", "lp")

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


def _describe(model: ModelLike) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"<in-memory {type(model).__name__}>"


@dataclass(frozen=True)
class _Settings:
    """What decides each layer's fate: shared by inspect and compress."""

    policy: RankPolicy
    include: Sequence[str]
    exclude: Sequence[str]
    max_rank_fraction: float
    min_params: int
    method: str = "svd"
    calibration: str | os.PathLike | CalibrationDataReader | None = None
    lp_power: float = 1.0
    embedding_policy: RankPolicy | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.method == "lp" and not 1.0 <= self.lp_power <= 2.0:
            raise InvalidInputError(f"--p must be in [1, 2], got {self.lp_power}")
        if self.method == "whitened" and self.calibration is None:
            raise InvalidInputError("--method whitened needs calibration inputs (--calibration inputs.npz)")
        if self.method != "whitened" and self.calibration is not None:
            raise InvalidInputError("calibration inputs are only used by --method whitened")
        if isinstance(self.calibration, (str, os.PathLike)) and not Path(self.calibration).is_file():
            raise InvalidInputError(f"{os.fspath(self.calibration)}: no such calibration file")

    def describe(self) -> str:
        if self.method == "svd":
            return "svd"
        if self.method == "lp":
            return f"lp (p={self.lp_power:g}, rows of W as X @ W uses it)"
        if isinstance(self.calibration, (str, os.PathLike)):
            source = os.fspath(self.calibration)
        elif isinstance(self.calibration, Mapping):
            source = f"{len(next(iter(self.calibration.values())))} samples of the data"
        else:
            source = "a reader"
        return f"whitened (calibration: {source})"


@dataclass
class _Memo:
    """What successive plans of one model share, keyed by weight name: Gram matrices and spectra."""

    grams: dict[WeightKey, np.ndarray] | None = None
    spectra: dict[WeightKey, Spectrum] = dataclasses.field(default_factory=dict)


def _plan(
    model: ir.Model, settings: _Settings, with_factors: bool, progress: bool, memo: _Memo | None = None
) -> tuple[list[WeightPlan], list[tuple[Layer, LayerDecision]], dict[int, int], list[Skipped]]:
    """Plans for the layers to consider, rows for the layers excluded by name, graph order, nodes skipped.

    Whitened plans capture their Gram matrices here; a ``memo`` keeps them, and every spectrum,
    for later plans of the same model (reloads included).
    """
    layers, skipped = find_layers(model)
    if not layers:
        reasons = "; ".join(sorted({f"{s.op_type} {s.name!r}: {s.reason}" for s in skipped})[:3])
        raise UnsupportedModelError("no factorable layer (MatMul/Gemm with a 2-D float constant weight)"
                                    + (f"; skipped: {reasons}" if reasons else ""))
    considered, excluded = filter_layers(layers, settings.include, settings.exclude)
    dense = [layer for layer in considered if not layer.is_embedding]
    embeddings = [layer for layer in considered if layer.is_embedding]
    if settings.embedding_policy is None:
        excluded += [(layer, "embedding table: factored only with --embedding-tau") for layer in embeddings]
        embeddings = []
    grams = memo.grams if memo is not None else None
    if settings.method == "whitened" and dense and grams is None:
        grams = capture_grams(model, dense, settings.calibration, progress=progress)
        if memo is not None:
            memo.grams = grams
    common = {"max_rank_fraction": settings.max_rank_fraction, "min_params": settings.min_params,
              "with_factors": with_factors, "cache": memo.spectra if memo is not None else None, "progress": progress,
              "lp_power": settings.lp_power if settings.method == "lp" else None}
    plans = plan_layers(dense, settings.policy, grams=grams if settings.method == "whitened" else None, **common)
    if embeddings:  # a lookup has no input activations to whiten: plain or l_p factors of the table's rows
        plans += plan_layers(embeddings, settings.embedding_policy, **common)
    order = {id(layer.node): index for index, layer in enumerate(layers)}
    return plans, [(layer, dense_decision(layer, reason)) for layer, reason in excluded], order, skipped


def _decisions(plans: list[WeightPlan], excluded: list[tuple[Layer, LayerDecision]], order: dict[int, int]) -> list[LayerDecision]:
    """Every layer's decision, in graph order."""
    rows = [(layer, decision) for plan in plans for layer, decision in zip(plan.layers, plan.decisions)] + excluded
    rows.sort(key=lambda row: order[id(row[0].node)])
    return [decision for _, decision in rows]


def _new_report(source: ModelLike, model: ir.Model, settings: _Settings, decisions: list[LayerDecision],
                skipped: list[Skipped]) -> Report:
    params, nbytes = weight_stats(model)
    report = Report(
        model=_describe(source),
        policy=settings.policy.describe()
        + (f"; embedding tables {settings.embedding_policy.describe()}" if settings.embedding_policy else ""),
        method=settings.describe(),
        max_rank_fraction=settings.max_rank_fraction,
        min_params=settings.min_params,
        layers=decisions,
        skipped=skipped,
        params_before=params,
        params_after=params,
        weight_bytes_before=nbytes,
        weight_bytes_after=nbytes,
    )
    if report.factored == 0:
        report.notes.append(NOTHING_FACTORED_NOTE)
    return report


def inspect_model(
    model: ModelLike,
    *,
    policy: RankPolicy | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION,
    min_params: int = DEFAULT_MIN_PARAMS,
    method: str = "svd",
    calibration: str | os.PathLike | CalibrationDataReader | None = None,
    lp_power: float = 1.0,
    embedding_policy: RankPolicy | None = None,
    progress: bool = False,
) -> Report:
    """What ``compress`` would do: every candidate layer with its rank, energy kept and saving."""
    settings = _Settings(policy or EnergyPolicy(), include, exclude, max_rank_fraction, min_params, method, calibration,
                         lp_power, embedding_policy)
    loaded = to_model(model)
    plans, excluded, order, skipped = _plan(loaded, settings, False, progress)
    report = _new_report(model, loaded, settings, _decisions(plans, excluded, order), skipped)
    if isinstance(model, (str, os.PathLike)):
        report.file_bytes_before = model_file_bytes(model)
    return report


def _check_output_path(source: ModelLike, output: str | os.PathLike) -> None:
    if isinstance(source, (str, os.PathLike)):
        src, dst = Path(source), Path(output)
        if src.resolve() == dst.resolve() or (dst.exists() and os.path.samefile(src, dst)):
            raise InvalidInputError(f"{output}: the output path is the input model; choose another path")


def _check_files(**paths: object) -> None:
    """Fail before any work when a named input file is missing."""
    for kind, path in paths.items():
        if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
            raise InvalidInputError(f"{os.fspath(path)}: no such {kind} file")


class _BudgetSearch:
    """Splits the data, then finds the energy threshold whose model meets the budget with fewest parameters."""

    def __init__(self, model: ModelLike, budget: Budget, data, labels, method: str, calibration) -> None:
        self.model, self.budget = model, budget
        self.calibration_part: dict[str, np.ndarray] = {}
        self.held_out: dict[str, np.ndarray] | None = None
        self.steps: list[SearchStep] = []
        self.chosen: SearchStep | None = None
        if budget.needs_data:
            if data is None:
                raise InvalidInputError("an accuracy budget needs --data: inputs (and labels) to split and measure")
            arrays = _arrays(data)
            if labels is not None:
                arrays["labels"] = _load_labels(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
            if budget.max_drop is not None and "labels" not in arrays:
                raise InvalidInputError("--max-drop needs labels (a 'labels' array in --data, or --labels)")
            self.calibration_part, self.held_out = split_data(arrays, budget.holdout, budget.seed)
        if method == "whitened" and calibration is None and not self.calibration_part:
            raise InvalidInputError("--method whitened needs calibration inputs (--calibration or --data)")
        self.calibration = calibration if calibration is not None else (self.calibration_part or None)

    def run(self, loaded: ir.Model, settings: _Settings, progress: bool):
        """The settings with the chosen threshold, and the memo of Gram matrices and spectra."""
        memo = _Memo()
        _plan(loaded, settings, False, progress, memo)  # calibrate and decompose once, with progress shown
        original = _source(self.model)[0]
        judge = make_session(original) if self.budget.needs_data else None
        batches = list(split_batches(load_data(self.calibration_part, judge)[0], judge, 256)) if judge else []

        def evaluate(tau: float) -> SearchStep:
            candidate = to_model(self.model)
            plans, excluded, _, _ = _plan(candidate, replace(settings, policy=EnergyPolicy(tau)), True, False, memo)
            decisions = [d for plan in plans for d in plan.decisions[:1]] + [d for _, d in excluded]
            kept = sum(d.params_after for d in decisions) / sum(d.params for d in decisions)
            if self.budget.target_params is not None:
                return SearchStep(tau, kept, None, kept <= self.budget.target_params)
            apply_plans(candidate, plans)
            result = compare_models(judge, make_session(ir.to_proto(candidate).SerializeToString()), batches,
                                    labels=self.calibration_part.get("labels"))
            if self.budget.max_drop is not None:  # the drop's 95% upper bound, so held-out data meets it too
                bound = result.accuracy_drop_bound()
                return SearchStep(tau, kept, bound, bound <= self.budget.max_drop)
            cosine = min(o.cosine_bound() for o in result.outputs)  # 95% lower bound, as for --max-drop
            return SearchStep(tau, kept, cosine, cosine >= self.budget.min_cosine)

        self.chosen, self.steps = bisect_tau(evaluate, self.budget.steps,
                                             feasible_above=self.budget.target_params is None)
        return replace(settings, policy=EnergyPolicy(self.chosen.tau)), memo

    def measure_errors(self, loaded: ir.Model, plans: list[WeightPlan], progress: bool) -> None:
        """Each factored layer's relative output error on the held-out part's activations."""
        factored = [plan for plan in plans if plan.factored and plan.factors is not None and not plan.layers[0].is_embedding]
        if not factored:
            return
        inputs = {k: v for k, v in self.held_out.items() if k != "labels"}
        grams = capture_grams(loaded, [layer for plan in factored for layer in plan.layers], inputs, progress=progress)
        for plan in factored:
            first = plan.layers[0]
            matrix = read_array(first.weight)
            error = relative_output_error(matrix.T if first.transposed else matrix, plan.factors, grams[first.weight_key])
            plan.decisions = [replace(d, measured_error=error) for d in plan.decisions]

    def summary(self) -> dict[str, object]:
        """What the report shows of the search."""
        samples = {name: len(next(iter(part.values()))) if part else 0
                   for name, part in (("calibration", self.calibration_part), ("held_out", self.held_out or {}))}
        return {"budget": self.budget.describe(), "measure": self.budget.measure,
                "met": bool(self.chosen and self.chosen.feasible),
                "tau": self.chosen.tau if self.chosen else None, "samples": samples,
                "steps": [dataclasses.asdict(step) for step in self.steps]}


def _arrays(data: str | os.PathLike | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {k: np.asarray(v) for k, v in data.items()}
    try:
        with np.load(data, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:
        raise InvalidInputError(f"{os.fspath(data)}: not a readable .npz file ({error})") from None


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
    calibration: str | os.PathLike | CalibrationDataReader | None = None,
    lp_power: float = 1.0,
    embedding_policy: RankPolicy | None = None,
    external_data: bool | None = None,
    check: bool = True,
    progress: bool = False,
    data: str | os.PathLike | None = None,
    labels: np.ndarray | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    samples: int = 16,
    guard: LatencyGuard | None = None,
    budget: Budget | None = None,
) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Factor the dense layers of ``model``; write ``output`` when given; verify unless ``check=False``.

    Returns the compressed model, of the kind given (``onnx.ModelProto`` for a ModelProto, else an
    ``onnx_ir.Model``, whose external weights stay memory-mapped), and the report. The input is
    never modified. ``method="whitened"`` factors each layer to minimise its output error on the
    ``calibration`` inputs (an ``.npz``, arrays, or a ``CalibrationDataReader``) instead of the weight
    error; ``method="lp"`` fits each weight's rows with the robust l_p subspace (``lp_power`` p in [1, 2]).
    Embedding tables (``Gather`` on a constant) are factored only with an ``embedding_policy``;
    the default is ``"whitened"`` under an accuracy budget (its data calibrates) and ``"svd"`` otherwise.
    ``data``, ``labels``, ``dims`` and ``samples`` are as in :func:`verify`. With a ``budget``, ``data``
    is split into a calibration part (Gram matrices, and the end-to-end checks that choose one global
    output-energy threshold, see :mod:`onnx_arsvd.budget`) and a held-out part that the final
    verification reports on; ``policy`` must then be left out. With a
    ``guard``, each layer is kept dense where factoring it is not faster on the guard's provider, and
    the whole model is timed against the original at the end (``report.latency_check``).
    """
    if budget is not None and policy is not None:
        raise InvalidInputError("a budget chooses the ranks itself: leave out the policy")
    if method is None:  # data-driven factors when the data is there for a budget anyway
        method = "whitened" if budget is not None and budget.needs_data else "svd"
    search = _BudgetSearch(model, budget, data, labels, method, calibration) if budget is not None else None
    if search is not None and method == "whitened":
        calibration = search.calibration
    settings = _Settings(policy or EnergyPolicy(), include, exclude, max_rank_fraction, min_params, method, calibration,
                         lp_power, embedding_policy)
    if output is not None:
        _check_output_path(model, output)
    _check_files(data=data, labels=labels)
    provider = guard.provider() if guard is not None else None
    loaded = to_model(model)
    check_dims({str(d) for v in loaded.graph.inputs if v.shape for d in v.shape if not isinstance(d, int)}, dims or {})
    memo = None
    if search is not None:
        settings, memo = search.run(loaded, settings, progress)
        if search.held_out is not None:  # report on data the search never saw
            data, labels = search.held_out, None
    plans, excluded, order, skipped = _plan(loaded, settings, True, progress, memo)
    if guard is not None:
        guard.apply(plans, provider, dims or {}, progress)
    if search is not None and search.held_out is not None:
        search.measure_errors(loaded, plans, progress)
    report = _new_report(model, loaded, settings, _decisions(plans, excluded, order), skipped)
    if search is not None:
        report.budget = search.summary()
    if apply_plans(loaded, plans):
        loaded.metadata_props["onnx_arsvd.policy"] = settings.policy.describe()
    report.params_after, report.weight_bytes_after = weight_stats(loaded)
    if output is not None:
        save_model(loaded, output, external_data=external_data)
        report.output = os.fspath(output)
        report.file_bytes_after = model_file_bytes(output)
        if isinstance(model, (str, os.PathLike)):
            report.file_bytes_before = model_file_bytes(model)
    if guard is not None and report.factored:
        original_source = _source(model)[0]
        compressed_source = os.fspath(output) if output is not None else _source(loaded)[0]
        report.latency_check = guard.check_model(original_source, compressed_source, provider, dims or {}, loaded)
        report.notes += guard.regressions(report.latency_check)
    if check:
        original = model if isinstance(model, (str, os.PathLike)) else to_model(model)
        report.verification = verify(original, output if output is not None else loaded,
                                     data=data, labels=labels, dims=dims, samples=samples)
    result = ir.to_proto(loaded) if isinstance(model, onnx.ModelProto) else loaded
    return result, report


def _source(model: ModelLike) -> tuple[str | bytes, ir.Model | None]:
    """What onnxruntime loads (a path, or serialized bytes), and the IR when it is at hand."""
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise InvalidInputError(f"{os.fspath(model)}: no such file")
        return os.fspath(model), None
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return proto.SerializeToString(), model if isinstance(model, ir.Model) else None


def verify(
    original: ModelLike,
    compressed: ModelLike,
    *,
    data: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    samples: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> VerificationReport:
    """Compare ``compressed`` with ``original`` in onnxruntime on ``data`` or generated inputs.

    ``data`` is an ``.npz`` path or a mapping of arrays keyed by input name (optional ``labels``).
    """
    _check_files(data=data, labels=labels)
    original_source, original_ir = _source(original)
    compressed_source, _ = _source(compressed)
    session_a = make_session(original_source, provider)
    session_b = make_session(compressed_source, provider)
    if data is not None:
        feed, data_labels = load_data(data, session_a)
        batches = list(split_batches(feed, session_a, batch_size))
        described = "given arrays" if isinstance(data, Mapping) else os.fspath(data)
    else:
        if samples < 1:
            raise InvalidInputError(f"samples must be at least 1, got {samples}")
        ir_model = original_ir or (load_model(original) if isinstance(original, (str, os.PathLike)) else None)
        batches = generated_batches(session_a, ir_model, dims or {}, samples, seed)
        data_labels = None
        described = f"generated, seed {seed}" + (f", dims {dict(dims)}" if dims else "")
    if isinstance(labels, (str, os.PathLike)):
        labels = _load_labels(labels)
    return compare_models(session_a, session_b, batches,
                          labels=labels if labels is not None else data_labels, inputs=described)


def _load_labels(path: str | os.PathLike) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:
        raise InvalidInputError(f"{path}: cannot read labels ({error})") from None
