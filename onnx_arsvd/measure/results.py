"""The measurements the pipeline produces, as plain dataclasses: what reports render.

Nothing here runs a model, so presentation (``report``, ``bench_report``) imports these without
importing onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BenchmarkResult",
    "LatencyComparison",
    "LatencyStats",
    "LayerTiming",
    "MemoryStats",
    "OutputComparison",
    "TaskScores",
    "VerificationReport",
]


@dataclass(frozen=True)
class OutputComparison:
    """How far one output of the compressed model is from the original's."""

    name: str
    max_abs_error: float
    relative_error: float
    mean_cosine: float
    min_cosine: float
    cosine_stderr: float = 0.0
    """Standard error of the mean cosine over samples."""
    newly_nonfinite: int = 0
    """Samples whose output holds NaN or Inf in the compressed model but not in the original."""
    kind: str = "values"
    """What the output is (:mod:`onnx_arsvd.graph.outputs`): "decisions", "score" or "values"."""
    decisions: int = 0
    """Decisions the output makes: the argmax of its last axis at every position (class scores, probabilities,
    per-token logits), or for a score per sample the side of its threshold; 0 when it makes none (a vector of one
    value per position is a score, an embedding's argmax is a decision too, so read :attr:`flips` by what the output
    is)."""
    flips: int = 0
    """Decisions the compressed model makes differently."""
    kl: float | None = None
    """Mean KL divergence of the compressed model's distribution from the original's over the last axis (softmax of
    scores, or the probabilities themselves)."""
    spread_error: float | None = None
    """For a score per sample: the root-mean-square error over the score's standard deviation on the data."""
    threshold: float | None = None
    """For a score per sample: the threshold its decisions were read at."""

    @property
    def flip_rate(self) -> float | None:
        return self.flips / self.decisions if self.decisions else None

    def cosine_bound(self, z: float = 1.645) -> float:
        """One-sided lower confidence bound on the mean cosine (z = 1.645: 95%)."""
        return self.mean_cosine - z * self.cosine_stderr

    @property
    def unrelated(self) -> bool:
        """Whether the compressed model's output is no closer to the original's than an all-zero output would be
        (relative error 1 or more): a different model, whatever was asked for."""
        return not self.relative_error < 1.0


@dataclass(frozen=True)
class TaskScores:
    """Top-1 accuracy and macro-F1 of a classifier's first output against labels."""

    accuracy: float
    macro_f1: float


@dataclass(frozen=True)
class VerificationReport:
    """Original vs compressed on one execution provider."""

    provider: str
    inputs: str
    samples: int
    outputs: list[OutputComparison] = field(default_factory=list)
    original: TaskScores | None = None
    compressed: TaskScores | None = None
    flipped: int | None = None
    """Samples one model classifies correctly and the other not (the discordant pairs)."""
    labelled: int | None = None
    """Labels scored (the samples, or for per-call data each call's rows)."""
    per_call: bool = False
    """Whether each sample is one call's feed (:mod:`onnx_arsvd.io.calls`)."""
    padded_positions: int = 0
    """Token positions the attention mask marks as padding, left out of every comparison (see
    :mod:`onnx_arsvd.numerics.padding`)."""
    compared_positions: tuple[int, int, int] | None = None
    """With padding left out: (real positions compared in all, fewest in one sample, most in one sample)."""

    @property
    def flip_share(self) -> float | None:
        """The largest share of decisions flipped over the outputs that decide (class scores, a score per sample);
        None when none does."""
        shares = [o.flip_rate for o in self.outputs if o.kind in ("decisions", "score") and o.flip_rate is not None]
        return max(shares) if shares else None

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy points lost (original - compressed, in percentage points)."""
        if self.original is None or self.compressed is None:
            return None
        return 100.0 * (self.original.accuracy - self.compressed.accuracy)

    def accuracy_drop_bound(self, z: float = 1.645) -> float | None:
        """One-sided upper confidence bound on the accuracy drop, in points (z = 1.645: 95%).

        The two models are scored on the same samples, so the drop's standard error comes from the
        discordant pairs alone: sqrt(flipped) / n, a slight overestimate (it omits -(b - c)^2 / n^3).
        """
        scored = self.labelled or self.samples
        if self.accuracy_drop is None or self.flipped is None or not scored:
            return None
        return self.accuracy_drop + z * 100.0 * float(np.sqrt(self.flipped)) / scored


@dataclass(frozen=True)
class LayerTiming:
    """Median milliseconds of one layer, dense and factored, at one batch size (``rows`` activation rows)."""

    batch: int
    rows: int
    dense_ms: float
    factored_ms: float

    @property
    def ratio(self) -> float:
        return self.factored_ms / self.dense_ms


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of one model: milliseconds, and samples per second at the median."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    runs: int


@dataclass(frozen=True)
class LatencyComparison:
    """Original vs compressed on one provider at one batch size, over several rounds.

    Each round creates fresh sessions for both models and times them interleaved. ``ratio`` is the
    median of all per-pair ratios compressed / original, with their p10-p90; ``round_ratios`` holds
    each round's median ratio. Two sessions of the *same* file differ by a few percent at small
    batch sizes (where the weights land in memory), so a difference counts only when every round,
    each with its own sessions, shows it.
    """

    provider: str
    batch: int
    original: LatencyStats
    compressed: LatencyStats
    ratio: float
    ratio_p10: float
    ratio_p90: float
    round_ratios: tuple[float, ...]

    def ratio_bound(self, z: float = 1.645) -> float:
        """One-sided upper prediction bound for the ratio another measurement like this one will show.

        Each round has its own sessions, so the rounds' spread is the noise a fresh measurement meets
        (sessions, and the machine's load over seconds): the ratio plus z times that spread, widened by
        sqrt(1 + 1/rounds) for the new measurement's own noise. One round gives no spread: the ratio itself.
        """
        rounds = len(self.round_ratios)
        if rounds < 2:
            return self.ratio
        return self.ratio + z * float(np.std(self.round_ratios, ddof=1)) * float(np.sqrt(1.0 + 1.0 / rounds))

    @property
    def resolved(self) -> bool:
        """Whether the measurement tells which model is faster: every round on one side of 1, and the rounds'
        spread smaller than the effect (the same file against itself straddles 1, or spreads past its effect)."""
        rounds = self.round_ratios
        if len(rounds) < 2 or min(rounds) <= 1.0 <= max(rounds):
            return False
        return max(rounds) - min(rounds) < abs(1.0 - self.ratio)

    @property
    def consistently_slower(self) -> bool:
        """Slower overall and in every round (with 3 rounds, pure session noise does this 1 time in 8)."""
        return self.ratio > 1.0 and len(self.round_ratios) > 1 and min(self.round_ratios) > 1.0


@dataclass(frozen=True)
class MemoryStats:
    """What a model costs in bytes: on disk, in weights, and as resident memory of a fresh process."""

    file_bytes: int
    weight_params: int
    weight_bytes: int
    peak_rss_bytes: int | None
    rss_increase_bytes: int | None


@dataclass(frozen=True)
class BenchmarkResult:
    """Everything ``bench`` measured."""

    threads: int
    providers: list[str]
    dense_flop_ratio: float | None
    """The dense layers' multiply-add ratio, the latency limit; None with quantized layers."""
    latency: list[LatencyComparison] = field(default_factory=list)
    memory: dict[str, MemoryStats] = field(default_factory=dict)
    accuracy: dict[str, VerificationReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    models: tuple[str, str] = ("original", "compressed")
    """The two files compared, as given."""
    input_shapes: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    """The shape of every input fed at each batch size."""
