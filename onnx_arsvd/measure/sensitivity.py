"""How much each layer's output error moves the model's outputs: one onnxruntime run per weight.

A layer's loss curve gives its own relative squared output error e_l(k). What the budget judges is
the model's: the model's relative squared output error is taken as D ~ sum_l D_l(e_l(k_l)), each
layer's response D_l measured, not assumed: how much of an error at that layer reaches the outputs
(attenuated by a following ReLU, softmax or normalisation, amplified by a sensitive head). It is
measured once per weight and probe: the model with only that weight factored, at the rank whose
relative error is nearest the probe (0.01 and 0.1), runs on the calibration batches. A power law
D_l = a e^b through the two points carries it between and beyond them: one probe alone (a linear
gain) overrated the layers whose response saturates, and starved them at small budgets.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import WeightKey, find_layers
from onnx_arsvd.io.models import to_model
from onnx_arsvd.measure.sessions import make_session, run_session
from onnx_arsvd.measure.verification import Feed, ModelLike, ReferenceOutputs
from onnx_arsvd.methods.lowrank.curves import WeightCurve, allocation_plans
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.methods.width.method import UnitCurve, Width
from onnx_arsvd.numerics.allocate import Allocation
from onnx_arsvd.numerics.padding import real_positions, sequence_outputs, zero_padding
from onnx_arsvd.progress import progress_bar

__all__ = ["DEFAULT_PROBES", "Response", "layer_responses", "output_distortion", "width_responses"]

DEFAULT_PROBES = (0.01, 0.1)


def _outputs(session, batches: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Every output on each batch, zero at padded token positions (:mod:`onnx_arsvd.numerics.padding`)."""
    sequence = sequence_outputs(session.get_inputs(), session.get_outputs())
    return [_real(run_session(session, None, feed), feed, sequence) for feed in batches]


def _real(outputs: Sequence[np.ndarray], feed: Feed, sequence: Sequence[bool]) -> list[np.ndarray]:
    positions = real_positions(feed)
    return [zero_padding(np.asarray(o, dtype=np.float64), positions, seq)
            for o, seq in zip(outputs, sequence, strict=True)]


def output_distortion(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """sum ||y' - y||^2 / sum ||y||^2 over every output and batch: the model's relative squared output error."""
    error = sum(float(np.sum((b - a) ** 2))
                for ra, rb in zip(reference, outputs, strict=True) for a, b in zip(ra, rb, strict=True))
    energy = sum(float(np.sum(a * a)) for ra in reference for a in ra)
    return error / energy if energy > 0 else error


@dataclass(frozen=True)
class Response:
    """How a layer's relative output error e reaches the model's outputs: D = scale * e ** power,
    fitted through two probes (one probe: power 1)."""

    scale: float
    power: float = 1.0

    def __call__(self, relative: np.ndarray) -> np.ndarray:
        return self.scale * np.power(np.clip(relative, 0.0, None), self.power)


def _expected(base: ir.Model, batches: Sequence[Feed], reference: ReferenceOutputs | None) -> list[list[np.ndarray]]:
    """The original's outputs on ``batches`` (from ``reference`` when the caller has them)."""
    if reference is None:
        return _outputs(make_session(base), batches)
    return [_real(outputs, feed, reference.sequence) for outputs, feed in zip(reference.outputs, batches, strict=True)]


@dataclass(frozen=True)
class _Probed:
    """What a response is measured for: a unit's relative error at each setting it may take (index = setting), the
    settings allowed, and how to apply one to a clone of the model."""

    key: Hashable
    relative: np.ndarray
    settings: Sequence[int]
    apply: Callable[[ir.Model, int], None]


def _responses(base: ir.Model, expected: list[list[np.ndarray]], probed: Sequence[_Probed], batches: Sequence[Feed],
               probes: Sequence[float], progress: bool, description: str) -> dict[Hashable, Response]:
    responses: dict[Hashable, Response] = {}
    for unit in progress_bar(probed, desc=description, unit="unit", progress=progress):
        points: list[tuple[int, float, float]] = []
        allowed = np.asarray(unit.settings)
        for probe in probes:
            setting = int(allowed[np.argmin(np.abs(unit.relative[allowed] - probe))]) if len(allowed) else 0
            if not len(allowed) or unit.relative[setting] <= 0 or any(s == setting for s, _, _ in points):
                continue
            candidate = base.clone()
            unit.apply(candidate, setting)
            outputs = _outputs(make_session(candidate), batches)  # the session is gone before the next opens
            points.append((setting, float(unit.relative[setting]), output_distortion(expected, outputs)))
        responses[unit.key] = _fit(points)
    return responses


def layer_responses(model: ModelLike, curves: Sequence[WeightCurve], batches: Sequence[Feed], *,
                    probes: Sequence[float] = DEFAULT_PROBES, progress: bool = False,
                    reference: ReferenceOutputs | None = None) -> dict[WeightKey, Response]:
    """Every weight's response (see the module's docstring), each probe one onnxruntime run.

    ``reference`` holds the model's every output on each of ``batches`` when the caller has them already;
    else the model runs once for them.
    """
    base = to_model(model)  # loaded once; each probe rewrites a clone

    def factor(c: WeightCurve) -> Callable[[ir.Model, int], None]:
        def apply(candidate: ir.Model, rank: int) -> None:
            apply_plans(candidate, allocation_plans(find_layers(candidate)[0], [c], Allocation({c.key: rank}, 0.0, 0.0),
                                                    min_params=0))
        return apply

    probed = [_Probed(c.key, c.curve.relative(), range(1, len(c.curve.relative())), factor(c)) for c in curves]
    return _responses(base, _expected(base, batches, reference), probed, batches, probes, progress,
                      "layer sensitivity")  # type: ignore[return-value]


def width_responses(model: ModelLike, units: Sequence[UnitCurve], batches: Sequence[Feed], *, multiple: int,
                    probes: Sequence[float] = DEFAULT_PROBES, progress: bool = False,
                    reference: ReferenceOutputs | None = None) -> dict[Hashable, Response]:
    """Every width unit's response, as :func:`layer_responses` measures a weight's: the model with only that unit
    narrowed, at the widths of its grid whose relative error at the exit is nearest the probes. Measured on data
    the refit never saw, it also prices how far the refit carries beyond its own calibration data."""
    base = to_model(model)
    method = Width(multiple)

    def narrow(c: UnitCurve) -> Callable[[ir.Model, int], None]:
        def apply(candidate: ir.Model, width: int) -> None:
            method.rewrite(method.plan(candidate, {c.key: width}, [c]))(candidate)
        return apply

    probed = [_Probed(c.key, c.curve.relative(), c.unit.settings(multiple), narrow(c)) for c in units]
    return _responses(base, _expected(base, batches, reference), probed, batches, probes, progress, "width sensitivity")


def _fit(points: list[tuple[int, float, float]]) -> Response:
    """The power law through the probes (log-log line through the outer two), power clipped to [0.5, 2]."""
    usable = [(e, d) for _, e, d in points if e > 0 and d > 0]
    if not usable:
        return Response(0.0)
    if len(usable) == 1 or usable[0][0] == usable[-1][0]:
        return Response(usable[0][1] / usable[0][0])
    (e1, d1), (e2, d2) = usable[0], usable[-1]
    power = float(np.clip(np.log(d2 / d1) / np.log(e2 / e1), 0.5, 2.0))
    return Response(d1 / e1**power, power)
