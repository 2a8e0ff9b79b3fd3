"""A candidate model against the original on one part of the data, and the verdict on it.

An accuracy budget is judged by a one-sided 95% upper bound of the drop, a cosine budget by a lower bound of
the mean cosine, not by the point estimates: a search that stops exactly at the budget on one sample
overshoots it on another about half the time. The bounds predict the held-out measurement (both parts'
sampling noise), since that is what the report shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.outputs import DECISIONS, SCORE
from onnx_arsvd.io.data import Feed
from onnx_arsvd.measure.results import VerificationReport
from onnx_arsvd.measure.sessions import make_session, model_session
from onnx_arsvd.measure.verification import ReferenceOutputs, compare_with_reference
from onnx_arsvd.methods.quantize.configs import Quantization
from onnx_arsvd.search.budget import Budget

__all__ = ["Z_95", "Judge", "flip_bound", "prediction_z", "verdict"]

Z_95 = 1.645
"""One-sided 95% normal quantile."""


def prediction_z(judged_samples: int, held_samples: int, z: float = Z_95) -> float:
    """The normal quantile widened for a *prediction* of what the held-out part will measure: the held-out estimate
    has its own sampling noise, so the standard error grows by sqrt(1 + n_judged / n_held) (the variance of a
    difference of two independent means). The plain confidence bound let the Fashion MLP at a 0.5-point budget
    measure 0.60 points on its 4,000 held-out images. Without a held-out part, the plain quantile."""
    return float(z * (np.sqrt(1.0 + judged_samples / held_samples) if held_samples else 1.0))


def flip_bound(flips: int, decisions: int, held_decisions: float) -> float:
    """A one-sided 95% upper prediction bound of the share of decisions the held-out part will see flipped, from
    ``flips`` of ``decisions`` judged: the exact (Clopper-Pearson) binomial bound at the effective count of a
    difference of two shares, 1 / (1/n + 1/n_held), so that few flips (or none) still bound honestly."""
    from scipy.stats import beta

    effective = 1.0 / (1.0 / decisions + 1.0 / held_decisions) if held_decisions > 0 else float(decisions)
    flipped = flips * effective / decisions
    return float(beta.ppf(0.95, flipped + 1.0, effective - flipped)) if flipped < effective else 1.0


def verdict(budget: Budget, result: VerificationReport, held_samples: int) -> tuple[float | None, bool]:
    """The measured bound on ``result`` and whether it is within ``budget``: the accuracy drop's upper prediction
    bound for ``max_drop``, the share of flipped decisions' for ``max_flips`` (the output that decides worst), else
    the lowest mean cosine's lower prediction bound over the outputs."""
    z = prediction_z(result.samples, held_samples)
    if budget.max_drop is not None:
        bound = result.accuracy_drop_bound(z)
        return (None, False) if bound is None else (float(bound), bool(bound <= budget.max_drop))
    if budget.max_flips is not None:
        deciding = [o for o in result.outputs if o.kind in (DECISIONS, SCORE) and o.decisions]
        if not deciding:
            return None, False
        share = held_samples / result.samples if result.samples else 0.0
        worst = max(flip_bound(o.flips, o.decisions, o.decisions * share) for o in deciding)
        return worst, bool(worst <= budget.max_flips)
    cosine = float(min(o.cosine_bound(z) for o in result.outputs))
    return cosine, bool(cosine >= (budget.min_cosine or 0.0))


@dataclass(frozen=True)
class Judge:
    """Runs candidates on one part of the data (``batches``, the original's outputs on them in ``reference``)
    and gives the budget's verdict; quantized candidates are quantized first (the quantizer's copies in
    ``scratch``), so the budget judges the model that ships."""

    budget: Budget
    reference: ReferenceOutputs
    batches: Sequence[Feed]
    labels: np.ndarray | None
    held_samples: int
    quantize: Quantization | None = None
    scratch: Path | None = None

    def measure(self, candidate: ir.Model, quantized: bool) -> tuple[VerificationReport, int]:
        """The comparison with the original, and the candidate's size: serialized when quantized (onnxruntime's
        quantizers return a proto), else as written with external data (never serialized)."""
        if quantized and self.quantize is not None:
            serialized = self.quantize.apply(candidate, self.scratch).SerializeToString()
            session, nbytes = make_session(serialized), len(serialized)
            del serialized  # onnxruntime holds its own copy: not this one too while the candidate runs
        else:
            session, nbytes = model_session(candidate)
        return compare_with_reference(self.reference, session, self.batches, labels=self.labels), nbytes

    def judge(self, candidate: ir.Model, quantized: bool) -> tuple[float | None, bool, int]:
        """The candidate's bound, verdict and size."""
        result, nbytes = self.measure(candidate, quantized)
        return (*verdict(self.budget, result, self.held_samples), nbytes)
