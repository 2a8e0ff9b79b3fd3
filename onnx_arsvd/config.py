"""Every option of a run, in typed groups whose fields hold the defaults and the help text, once.

The Python API takes these objects (or their fields by name, see :meth:`CompressOptions.replace`); the CLI
generates its options from the same fields (:mod:`onnx_arsvd.cli.options`), so a default lives in one place. A
field left at ``None`` is decided by :mod:`onnx_arsvd.rules` from the model and the data, the same way for both.

Messages name an option by its field, in backticks (`max_drop`): the CLI shows the flag instead (`--max-drop`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.fields import option
from onnx_arsvd.methods.quantize.configs import Quantization, quantization
from onnx_arsvd.numerics.rank import DEFAULT_MAX_RANK_FRACTION, DEFAULT_MIN_PARAMS, RankPolicy
from onnx_arsvd.search.budget import Budget

if TYPE_CHECKING:
    from onnx_arsvd.io.calls import DataInput

__all__ = ["CompressOptions", "DataOptions", "FactorOptions", "LatencyGuard", "OutputOptions", "option_names",
           "parse_dims"]

@dataclass(frozen=True)
class FactorOptions:
    """Which layers are considered, how each weight is factored, and at which rank."""

    policy: RankPolicy | None = option(None, "the rank policy (default: energy at tau 0.99, or a budget with data)",
                                       cli=False)
    method: str | None = option(None, "svd: minimise the weight error; whitened: minimise the layer's output error "
                                "on calibration inputs; lp: robust l_p fit of the weight's rows, see `lp_power`",
                                choices=("svd", "whitened", "lp"),
                                default_text="whitened under a budget with data, else svd")
    max_rank_fraction: float = option(DEFAULT_MAX_RANK_FRACTION, "factor a layer only if its rank is at most F x "
                                      "its break-even rank m*n/(m+n): demand a real saving", metavar="F")
    min_params: int = option(DEFAULT_MIN_PARAMS, "leave weights with fewer than N parameters dense (heads are often "
                             "this small)", metavar="N")
    lp_power: float = option(1.0, "the p of the lp method, in [1, 2]", flag="--p")
    embedding_policy: RankPolicy | None = option(None, "also factor embedding tables (Gather on a constant) at this "
                                                 "energy threshold; they usually need a higher one than dense layers",
                                                 flag="--embedding-tau", metavar="TAU", cli=False)
    calibration: DataInput | None = option(None, "inputs for the whitened method: arrays keyed by input name, "
                                           "first axis = samples, or a folder of .npz files, one feed per call",
                                           metavar="NPZ|DIR")
    factor_heads: bool | None = option(None, "also factor layers that feed a graph output (classifier heads)",
                                       kind="switch", default_text="only when real inputs (`data` or `calibration`) "
                                       "check them")
    width: bool = option(False, "under a budget with data, also offer to narrow hidden layers (remove FFN units, "
                         "refit the next product) beside factoring, in the same search; off by default until the "
                         "default budgets are measured with it", kind="switch")
    jobs: int = option(1, "factor N weights at once, one BLAS thread each, N capped at the cores; the output is the "
                       "same whatever N", metavar="N")
    include: tuple[str, ...] = option((), "only layers whose node or weight name matches (repeatable)",
                                      metavar="GLOB", kind="repeat")
    exclude: tuple[str, ...] = option((), "skip layers whose node or weight name matches (repeatable)",
                                      metavar="GLOB", kind="repeat")


def parse_dims(pairs: tuple[str, ...]) -> dict[str, int]:
    """``NAME=VALUE`` pairs as a dict of positive integers."""
    dims: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise InvalidInputError(f"`dims` expects NAME=POSITIVE_INTEGER, got {pair!r}")
        dims[name] = int(value)
    return dims


@dataclass(frozen=True)
class DataOptions:
    """The inputs that check (and, under a budget, choose) the result: real data, or generated inputs."""

    data: DataInput | None = option(None, ".npz of arrays keyed by input name (first axis = samples; an input of a "
                                    "fixed shape that takes one value per call may be given once), optional "
                                    "'labels'; or a folder of .npz files, one feed per call, for inputs whose "
                                    "batch axis is not the first or that have no sample axis", metavar="NPZ|DIR")
    labels: np.ndarray | str | os.PathLike | None = option(None, ".npy of integer labels: adds top-1 accuracy and "
                                                           "macro-F1", metavar="NPY")
    dims: Mapping[str, int] = option(help="value of a dynamic dimension for generated inputs (default 1; "
                                     "repeatable)", flag="--dim", metavar="NAME=VALUE", kind="repeat",
                                     parse=parse_dims, factory=dict, default_text="")
    score_threshold: float | None = option(None, "where an output of one score per sample decides (its flips, and "
                                           "`max_flips`)", metavar="T",
                                           default_text="0.5 for a probability, else 0")
    samples: int = option(16, "generated input batches")
    batch_size: int = option(64, "samples per onnxruntime call when verifying data (bounds memory)", metavar="N")
    one_at_a_time: bool | None = option(None, "hold one model in onnxruntime at a time: verification keeps the "
                                        "original's outputs, timing runs each model alone in turn",
                                        kind="switch", default_text="when both models' weights exceed half the "
                                        "available memory")


@dataclass(frozen=True)
class OutputOptions:
    """How the result is written and checked."""

    external_data: bool | None = option(None, "always write weights as external data", kind="switch",
                                        default_text="above 1.8 GB or when the input has it")
    check: bool = option(True, "skip the onnxruntime comparison of the written model with the original",
                         flag="--no-verify", kind="off")
    strict: bool = option(False, "fail (nothing written) when a run with a rank policy, checked on real `data`, misses "
                          "what the default budget keeps (1 accuracy point lost with labels, else 0.5% of the "
                          "decisions flipped where an output decides, else a mean output cosine of 0.99); without "
                          "it, a warning", kind="switch")
    progress: bool = option(False, "progress bars", cli=False)


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise InvalidInputError(f"`batches` expects positive integers separated by commas, got {text!r}")
    return batches


@dataclass(frozen=True)
class LatencyGuard:
    """Settings of the latency guard: where to time, at which batch sizes, and how strictly."""

    target: str = option("cpu", "execution provider the guard times on: cpu, cuda, ...")
    batches: tuple[int, ...] = option((1, 32), "batch sizes for dynamic batch dims (fixed dims are respected)",
                                      flag="--batch", metavar="B1,B2", parse=_batches)
    threads: int = option(0, "intra-op threads per session", default_text="onnxruntime's")
    margin: float = option(0.0, "factor a layer only if it is at least M faster, e.g. 0.05 (0: any gain)",
                           flag="--guard-margin", metavar="M")
    layer_seconds: float = option(0.3, "minimum measuring time per layer and batch size", flag="--guard-seconds",
                                  metavar="S")
    model_seconds: float = option(1.0, "minimum measuring time per batch size", flag="--seconds", metavar="S")

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise InvalidInputError(f"guard batch sizes must be positive, got {list(self.batches)}")
        if not 0.0 <= self.margin < 1.0:
            raise InvalidInputError(f"guard margin must be in [0, 1), got {self.margin}")
        if self.layer_seconds <= 0 or self.model_seconds <= 0:
            raise InvalidInputError("guard measuring times must be positive")

    def provider(self) -> str:
        """The target's execution provider, or a clear error when it cannot run here."""
        from onnx_arsvd.measure.benchmark import discover_providers

        try:
            return discover_providers([self.target])[0][0]
        except InvalidInputError as error:
            raise InvalidInputError(f"guard target {self.target!r}: {error}") from None


GROUPS = {"factor": FactorOptions, "data": DataOptions, "output": OutputOptions}
_TOP = ("budget", "guard", "quantize")


@dataclass(frozen=True)
class CompressOptions:
    """Everything ``compress`` is asked: the groups, a ``budget`` (else the ranks come from the policy), a latency
    ``guard`` and a ``quantize`` config."""

    factor: FactorOptions = field(default_factory=FactorOptions)
    data: DataOptions = field(default_factory=DataOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    budget: Budget | None = None
    guard: LatencyGuard | None = None
    quantize: Quantization | None = None
    """A quantization config (:mod:`onnx_arsvd.methods.quantize.configs`; a mode name is made one)."""

    def __post_init__(self) -> None:
        if isinstance(self.quantize, str):  # a mode name: its config
            object.__setattr__(self, "quantize", quantization(self.quantize))

    def replace(self, **overrides: Any) -> CompressOptions:
        """These options with fields changed by name, whatever their group (``policy=``, ``data=``, ``check=``,
        ``budget=``, ...); ``quantize`` may be a mode name. An unknown name is an error."""
        top = {name: overrides.pop(name) for name in _TOP if name in overrides}
        groups: dict[str, Any] = {}
        for group, cls in GROUPS.items():
            names = {f.name for f in fields(cls)} & set(overrides)
            if names:
                groups[group] = replace(getattr(self, group), **{name: overrides.pop(name) for name in names})
        if overrides:
            raise InvalidInputError(f"unknown option {', '.join(sorted(overrides))}; options are: "
                                    f"{', '.join(sorted(option_names()))}")
        return replace(self, **groups, **top)


def option_names() -> set[str]:
    """Every name :meth:`CompressOptions.replace` takes."""
    return {f.name for cls in GROUPS.values() for f in fields(cls)} | set(_TOP)
