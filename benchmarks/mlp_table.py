"""Reproduce the ARSVD paper's table style for the two shipped MLPs.

For each model (``models/digits_mlp.onnx``, ``models/fashion_mlp.onnx``) and each rank policy
(energy tau 0.8/0.9/0.95/0.99, entropy scale 1.0/0.5, ratio 0.1/0.25/0.5), compress, verify on
the shipped test split, and print one Markdown row: per-layer ranks (``*`` = layer kept dense),
dense parameters kept, written file size, test accuracy and macro-F1 of original and compressed,
and the accuracy change in points. Each model gets two tables: the tool's defaults (a layer is
factored only at rank <= 0.8 x break-even and with >= 4096 parameters, so the 10-class head stays
dense) and ``min_params=0`` (the head is factored too, as in the paper). A closing line per table
names the best setting keeping at most 2/3 of the dense parameters with at most 1.0 point
accuracy loss, or says that none does.

Usage: python -m benchmarks.mlp_table [--models digits fashion] [--out benchmarks/results/mlp_table.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import header, markdown_table, write_result
from onnx_arsvd import EnergyPolicy, EntropyPolicy, RatioPolicy, Report, compress
from onnx_arsvd.methods.lowrank.decision import DEFAULT_MIN_PARAMS
from onnx_arsvd.numerics.rank import RankPolicy

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mlp_table.md"
POLICIES: list[RankPolicy] = [
    *(EnergyPolicy(tau) for tau in (0.8, 0.9, 0.95, 0.99)),
    *(EntropyPolicy(scale) for scale in (1.0, 0.5)),
    *(RatioPolicy(ratio) for ratio in (0.1, 0.25, 0.5)),
]
MAX_KEPT = 2 / 3  # share of dense parameters a "best" setting may keep
MAX_LOSS = 1.0  # accuracy points a "best" setting may lose
HEADERS = ["policy", "ranks", "dense params kept", "file bytes", "acc orig", "acc comp",
           "F1 orig", "F1 comp", "Δacc (pts)"]


@dataclass(frozen=True)
class Row:
    """One policy's outcome on one model."""

    policy: str
    ranks: str
    kept: int
    total: int
    file_bytes: int
    acc_orig: float
    acc_comp: float
    f1_orig: float
    f1_comp: float

    @property
    def kept_share(self) -> float:
        return self.kept / self.total

    @property
    def change(self) -> float:
        """Accuracy change in points, compressed minus original (negative = loss)."""
        return 100.0 * (self.acc_comp - self.acc_orig)

    def cells(self) -> list[str]:
        return [self.policy, f"`{self.ranks}`", f"{self.kept:,} ({self.kept_share:.1%})", f"{self.file_bytes:,}",
                f"{self.acc_orig:.2%}", f"{self.acc_comp:.2%}", f"{self.f1_orig:.4f}", f"{self.f1_comp:.4f}",
                f"{self.change:+.2f}"]


def to_row(report: Report) -> Row:
    v = report.verification
    if v is None or v.original is None or v.compressed is None or report.file_bytes_after is None:
        raise RuntimeError("compress ran without labelled data or an output file")
    ranks = "/".join(f"{layer.rank}{'' if layer.factored else '*'}" for layer in report.layers)
    return Row(report.policy, ranks, report.dense_params_after, report.dense_params_before,
               report.file_bytes_after, v.original.accuracy, v.compressed.accuracy,
               v.original.macro_f1, v.compressed.macro_f1)


def run_model(name: str, workdir: Path, min_params: int) -> list[Row]:
    model, data = MODELS / f"{name}_mlp.onnx", MODELS / f"{name}_test.npz"
    rows = []
    for i, policy in enumerate(POLICIES):
        _, report = compress(model, workdir / f"{name}_{i}.onnx", policy=policy, data=data,
                             min_params=min_params, progress=False)
        rows.append(to_row(report))
    return rows


def best_line(rows: list[Row]) -> str:
    ok = [r for r in rows if r.kept_share <= MAX_KEPT + 1e-12 and r.change >= -MAX_LOSS - 1e-9]
    if not ok:
        return (f"**Best:** none — no setting keeps at most {MAX_KEPT:.1%} of the dense parameters "
                f"with at most {MAX_LOSS:g} point accuracy loss.")
    best = min(ok, key=lambda r: (r.kept, -r.acc_comp))
    return (f"**Best:** `{best.policy}` keeps {best.kept_share:.1%} of the dense parameters "
            f"at {best.change:+.2f} points accuracy (ranks `{best.ranks}`).")


NOTE = ("ranks per layer in graph order; `*` = layer kept dense (rank above 0.8 x break-even m·n/(m+n),"
        " or, with the defaults, fewer than 4096 parameters);"
        " dense params = weights of the candidate MatMul/Gemm layers; file bytes = the written model;"
        " Δacc = compressed − original.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["digits", "fashion"], default=["digits", "fashion"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    parts = ["\n".join(header("ARSVD on the shipped MLPs", __file__, argv, notes=[NOTE]))]
    with tempfile.TemporaryDirectory(prefix="mlp_table_") as tmp:
        for name in args.models:
            original = (MODELS / f"{name}_mlp.onnx").stat().st_size
            for min_params, title in ((DEFAULT_MIN_PARAMS,
                                       "defaults: layers under 4096 parameters (the head) kept dense"),
                                      (0, "`min_params=0`: every layer considered, head included, as in the paper")):
                rows = run_model(name, Path(tmp), min_params)
                parts += [f"## {name}_mlp.onnx, {title}\n\n{rows[0].total:,} dense params, {original:,} bytes",
                          markdown_table(HEADERS, [r.cells() for r in rows], "ll" + "r" * 7), best_line(rows)]
    text = "\n\n".join(parts) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
