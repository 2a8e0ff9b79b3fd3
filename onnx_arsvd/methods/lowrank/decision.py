"""One layer's fate as the report shows it (:class:`LayerDecision`), and the gates that decide it by default.

Light on purpose: the report reads these rows, and must not load the numerics (scipy) or the runtime to do so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_arsvd.graph.layers import Layer
from onnx_arsvd.measure.results import LayerTiming
from onnx_arsvd.numerics.rank import DEFAULT_MAX_RANK_FRACTION, DEFAULT_MIN_PARAMS, break_even_rank

__all__ = ["DEFAULT_MAX_RANK_FRACTION", "DEFAULT_MIN_PARAMS", "LayerDecision", "dense_decision"]

@dataclass(frozen=True)
class LayerDecision:
    """What happens to one node: one row of the inspect/compress table."""

    name: str
    op_type: str
    weight: str
    shape: tuple[int, int]
    dtype: str
    break_even: float
    full_rank: int
    rank: int
    energy_kept: float
    factored: bool
    reason: str
    shared_by: int
    timings: tuple[LayerTiming, ...] = field(default=())
    """Latency-guard measurements, when the guard ran."""
    measured_error: float | None = None
    """Relative output error ||X(W - AB)|| / ||XW|| on held-out activations, when a budget measured it."""
    solver: str = ""
    """How the spectrum was computed (LAPACK driver or randomized basis size, and the dtype)."""
    narrowed_to: tuple[int, int] | None = None
    """The weight's (in, out) shape after width reduction removed hidden units, when it did."""
    note: str = ""
    """What the reader should know of this row: a rank chosen on a randomized spectrum that may differ
    from the exact one (and by how much at most), an l_p fit stopped at its iteration cap."""

    @property
    def predicted_error(self) -> float:
        """Relative error the spectrum predicts at ``rank``: sqrt(1 - energy kept) (output energy when whitened)."""
        return float(np.sqrt(max(0.0, 1.0 - self.energy_kept)))

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def changed(self) -> bool:
        """Whether the layer is rewritten: factored or narrowed."""
        return self.factored or self.narrowed_to is not None

    @property
    def params_after(self) -> int:
        if self.narrowed_to is not None:
            return self.narrowed_to[0] * self.narrowed_to[1]
        return self.rank * sum(self.shape) if self.factored else self.params

    @property
    def saving(self) -> float:
        """Fraction of the weight's parameters that factors at ``rank`` remove (whether or not factored;
        negative when they would be larger); for a narrowed layer, the share narrowing removes."""
        if self.narrowed_to is not None:
            return 1.0 - self.params_after / self.params
        return 1.0 - self.rank * sum(self.shape) / self.params


def dense_decision(layer: Layer, reason: str) -> LayerDecision:
    """The row of a layer left dense without looking at its spectrum (e.g. excluded by name)."""
    shape = layer.shape
    return LayerDecision(
        name=layer.name, op_type=layer.op_type, weight=layer.weight_key[0], shape=shape,
        dtype=layer.dtype.name.lower(), break_even=break_even_rank(shape), full_rank=min(shape),
        rank=min(shape), energy_kept=1.0, factored=False, reason=reason, shared_by=1,
    )
