"""How much each layer's output error moves the model's outputs: one onnxruntime run per weight.

A layer's loss curve gives its own relative output error e_l(k). What the budget judges is the
model's: to first order, the model's relative squared output error is D ~ sum_l g_l e_l(k_l), with a
gain g_l per layer (how much of a unit of error at that layer reaches the outputs: attenuated by a
following softmax or normalisation, amplified by a sensitive head). g_l is measured once per weight:
the model with only that weight factored, at the rank whose relative error is nearest ``probe``,
runs on the calibration batches, and g_l = D_l / e_l. The allocation then minimises sum_l g_l e_l.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnx_arsvd.allocate import Allocation
from onnx_arsvd.candidates import WeightKey, find_layers
from onnx_arsvd.curves import WeightCurve, allocation_plans
from onnx_arsvd.model_io import to_model
from onnx_arsvd.rewrite import apply_plans
from onnx_arsvd.sessions import make_session
from onnx_arsvd.verification import Feed, ModelLike

__all__ = ["layer_gains", "output_distortion"]

DEFAULT_PROBE = 0.01


def _outputs(session, batches: Sequence[Feed]) -> list[list[np.ndarray]]:
    return [[np.asarray(o, dtype=np.float64) for o in session.run(None, feed)] for feed in batches]


def output_distortion(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """sum ||y' - y||^2 / sum ||y||^2 over every output and batch: the model's relative squared output error."""
    error = sum(float(np.sum((b - a) ** 2))
                for ra, rb in zip(reference, outputs, strict=True) for a, b in zip(ra, rb, strict=True))
    energy = sum(float(np.sum(a * a)) for ra in reference for a in ra)
    return error / energy if energy > 0 else error


def layer_gains(model: ModelLike, curves: Sequence[WeightCurve], batches: Sequence[Feed], *,
                probe: float = DEFAULT_PROBE, progress: bool = False) -> dict[WeightKey, float]:
    """g_l = D_l / e_l for every weight (see the module's docstring); 0 for a weight whose curve is flat zero."""
    reference = _outputs(make_session(ir.to_proto(to_model(model)).SerializeToString()), batches)
    gains: dict[WeightKey, float] = {}
    for c in tqdm(curves, desc="layer sensitivity", unit="weight", disable=None if progress else True):
        relative = c.curve.relative()
        rank = int(np.clip(np.argmin(np.abs(relative[1:] - probe)) + 1, 1, c.curve.max_rank))
        if relative[rank] <= 0:
            gains[c.key] = 0.0
            continue
        candidate = to_model(model)
        apply_plans(candidate, allocation_plans(find_layers(candidate)[0], [c], Allocation({c.key: rank}, 0.0, 0.0),
                                                min_params=0))
        session = make_session(ir.to_proto(candidate).SerializeToString())
        gains[c.key] = output_distortion(reference, _outputs(session, batches)) / float(relative[rank])
    return gains
