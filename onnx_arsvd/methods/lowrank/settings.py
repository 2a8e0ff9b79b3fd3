"""What decides each layer's fate, shared by ``inspect_model`` and ``compress``: one frozen config object."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.io.calls import Calls, DataInput
from onnx_arsvd.methods.lowrank.decision import DEFAULT_MAX_RANK_FRACTION, DEFAULT_MIN_PARAMS
from onnx_arsvd.numerics.rank import EnergyPolicy, RankPolicy
from onnx_arsvd.numerics.threads import job_count

__all__ = ["METHODS", "CalibrationSource", "Settings"]

METHODS = ("svd", "whitened", "lp")

CalibrationSource = DataInput
"""An ``.npz`` path, arrays keyed by input name, or one feed per call (a folder, a ``CalibrationDataReader``)."""


@dataclass(frozen=True)
class Settings:
    """The rank policy, the layers considered, the gates and the factorization method."""

    policy: RankPolicy = field(default_factory=EnergyPolicy)
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION
    min_params: int = DEFAULT_MIN_PARAMS
    method: str = "svd"
    calibration: CalibrationSource | None = None
    lp_power: float = 1.0
    embedding_policy: RankPolicy | None = None
    factor_heads: bool = True
    """Factor layers that feed a graph output (classifier heads); without real data to check them, don't."""
    jobs: int = 1
    """Weights factored at once (threads, one BLAS thread each, capped at the cores); results do not depend on it."""
    width: bool = False
    """Under a budget with calibration data, also offer to narrow hidden layers (FFN units) beside factoring."""
    unreached_dense: bool = False
    """With whitened factors, keep dense a weight the calibration data never reached (else it gets plain factors):
    a budget judged on that data could not see what factoring it does."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.method == "lp" and not 1.0 <= self.lp_power <= 2.0:
            raise InvalidInputError(f"the l_p power p must be in [1, 2], got {self.lp_power}")
        if self.method == "whitened" and self.calibration is None:
            raise InvalidInputError("the whitened method needs calibration inputs (an .npz, arrays or a reader)")
        if self.method != "whitened" and self.calibration is not None:
            raise InvalidInputError("calibration inputs are only used by the whitened method")
        job_count(self.jobs)
        if isinstance(self.calibration, (str, os.PathLike)) and not (Path(self.calibration).is_file()
                                                                     or Path(self.calibration).is_dir()):
            raise InvalidInputError(f"{os.fspath(self.calibration)}: no such calibration file")

    def describe(self) -> str:
        """The method, as the report shows it."""
        if self.method == "svd":
            return "svd"
        if self.method == "lp":
            return f"lp (p={self.lp_power:g}, rows of W as X @ W uses it)"
        if isinstance(self.calibration, (str, os.PathLike)):
            source = os.fspath(self.calibration)
        elif isinstance(self.calibration, Mapping):
            source = f"{len(next(iter(self.calibration.values())))} samples of the data"
        elif isinstance(self.calibration, Calls):
            source = f"{len(self.calibration)} calls of the data"
        else:
            source = "a reader"
        return f"whitened (calibration: {source})"

    def describe_policy(self) -> str:
        """The rank policies, as the report shows them."""
        embedding = f"; embedding tables {self.embedding_policy.describe()}" if self.embedding_policy else ""
        output = "output " if self.method == "whitened" and isinstance(self.policy, EnergyPolicy) else ""
        return output + self.policy.describe() + embedding
