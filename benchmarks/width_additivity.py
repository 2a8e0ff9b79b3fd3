"""Why width is opt-in: the knapsack's predicted loss against the measured one, with and without width units.

On all-MiniLM-L6-v2 with the 200 polarity sentences split as a budget splits them, the search space is built twice
(rank only; widths and ranks), and at each parameter target the point the knapsack picks is rewritten and run: its
predicted loss (the sum of the units' measured responses at their settings) beside the model's relative squared
output error measured on the judge part and on the held-out part. The search assumes the units' losses add up.

Usage: python -m benchmarks.width_additivity [--targets 0.85 0.7] [--out benchmarks/results/width_additivity.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_ir as ir

from benchmarks.results_io import header, markdown_table, write_result
from benchmarks.text_eval import MINILM, load_text_set, minilm_built
from onnx_arsvd.graph.outputs import output_kinds
from onnx_arsvd.measure.sensitivity import _outputs, output_distortion
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.numerics.allocate import DENSE, best_within
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.parts import feeds
from onnx_arsvd.search.run import prepare_search
from onnx_arsvd.search.space import allocation_space

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "width_additivity.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.7])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not minilm_built():
        return 1
    model = ir.load(MINILM)
    budget = Budget(target_params=max(args.targets))
    prepared = prepare_search(budget, model, load_text_set("polarity")[0], None, "whitened", None, None)
    data = feeds(MINILM, prepared.parts, 64, judge=False, responses=True, held_out=True, kinds=output_kinds(model))
    assert data.held is not None
    original = make_session(MINILM)
    expected = {"judge": _outputs(original, data.judge), "held": _outputs(original, data.held)}
    del original
    rows = []
    for width in (False, True):
        settings = Settings(method="whitened", calibration=prepared.parts.calibration, width=width)
        space = allocation_space(model, settings, budget, data, latency=None, dims={}, progress=False)
        for target in args.targets:
            chosen = best_within(list(space.points), target * space.total - space.fixed)
            assert chosen is not None
            index = space.points.index(chosen)
            session = make_session(ir.to_proto(space.candidate(index)).SerializeToString())
            measured = {part: output_distortion(expected[part], _outputs(session, getattr(data, part)))
                        for part in expected}
            units = [c.unit for c in space.widths if chosen.ranks.get(c.key, DENSE) != DENSE]
            narrowed = f"{sum(u.group == 1 for u in units)} / {sum(u.group > 1 for u in units)}"
            rows.append((f"{target:.0%}", "widths + ranks" if width else "rank only", f"{space.kept(index):.3f}",
                         narrowed, f"{chosen.loss:.4f}", f"{measured['judge']:.4f}", f"{measured['held']:.4f}",
                         f"{measured['judge'] / chosen.loss:.2f}"))
            print(rows[-1], file=sys.stderr, flush=True)
    columns = ["target", "search", "dense params kept", "FFNs / attentions narrowed", "predicted loss",
               "measured, judge part",
               "measured, held-out part", "measured / predicted (judge)"]
    notes = ["loss = relative squared output error of `last_hidden_state` at real tokens, summed over the units "
             "(predicted) or measured on the model",
             "split as `compress` splits 200 polarity sentences for a budget: fit, judge (responses measured on "
             "its first sentences) and held-out parts"]
    text = "\n".join([*header("Width units: predicted against measured loss (MiniLM)", __file__, argv, notes=notes),
                      "", markdown_table(columns, rows, "llrrrrrr")]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
