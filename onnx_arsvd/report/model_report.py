"""The compression report: one dataclass, rendered as a terminal table, JSON or Markdown."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from tabulate import tabulate

from onnx_arsvd.graph.layers import Skipped
from onnx_arsvd.measure.results import LatencyComparison, OutputComparison, VerificationReport
from onnx_arsvd.methods.lowrank.decision import LayerDecision

__all__ = ["Report", "format_report", "format_verification", "nothing_factored_note", "report_to_json",
           "verification_to_dict"]

_CAUSES = (  # (what a keep reason starts with, what the note says of such layers)
    (("not matched by `include`", "matched by `exclude`"), "not selected by `include`/`exclude`"),
    (("latency guard",), "kept dense by the latency guard: factored was not faster on the target"),
    (("feeds a graph output",), "heads (they feed a graph output), kept dense without real data to check them "
     "(give `data`, or `factor_heads`)"),
    (("dense in the global allocation",), "kept dense by the budget's allocation"),
    (("too small",), "too small to pay off (see `min_params`)"),
    (("embedding table",), "embedding tables, factored only with an `embedding_policy`"),
    (("saves too little",), "at a rank that saves too little (see `max_rank_fraction`). On ordinarily trained "
     "weights, energy thresholds of 0.95 and above (and the entropy rank at scale 1) often select ranks near or "
     "above break-even; try a lower threshold or scale, or the ratio `policy`, and check accuracy with `data`"),
)


def nothing_factored_note(layers: list[LayerDecision]) -> str:
    """Why no layer was factored, counted by cause, from the layers' own keep reasons (a reason of no known cause
    counted under its own words)."""
    if not layers:
        return "note: no layer was factored: no candidate layer."
    parts, counted = [], 0
    for prefixes, cause in _CAUSES:
        count = sum(layer.reason.startswith(prefixes) for layer in layers)
        if count:
            parts.append(f"{count} of {len(layers)} {cause}")
            counted += count
    others: dict[str, int] = {}
    for layer in layers:
        if not any(layer.reason.startswith(prefixes) for prefixes, _ in _CAUSES):
            key = layer.reason.split(":")[0] or "kept dense"
            others[key] = others.get(key, 0) + 1
    parts += [f"{count} of {len(layers)} {reason}" for reason, count in others.items()]
    return "note: no layer was factored: " + "; ".join(parts) + "."


@dataclass
class Report:
    """What inspect found or compress did, with the verification when one ran."""

    model: str
    policy: str
    method: str
    max_rank_fraction: float
    min_params: int
    layers: list[LayerDecision]
    skipped: Sequence[Skipped]
    params_before: int
    params_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    output: str | None = None
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None
    verification: VerificationReport | None = None
    latency_check: list[LatencyComparison] = field(default_factory=list)
    budget: dict[str, object] | None = None
    notes: list[str] = field(default_factory=list)

    def _unique(self, tables: bool) -> list[LayerDecision]:
        """Dense layers' (or, with ``tables``, embedding tables') decisions, each shared weight once."""
        seen: dict[str, LayerDecision] = {}
        for layer in self.layers:
            if (layer.op_type == "Gather") == tables:
                seen.setdefault(f"{layer.weight}/{layer.shape}", layer)
        return list(seen.values())

    @property
    def dense_params_before(self) -> int:
        """Parameters of the dense (MatMul/Gemm) layers' weights, each shared weight once."""
        return sum(layer.params for layer in self._unique(tables=False))

    @property
    def dense_params_after(self) -> int:
        return sum(layer.params_after for layer in self._unique(tables=False))

    @property
    def embedding_params_before(self) -> int:
        """Parameters of the embedding tables (Gather on a constant), counted apart from dense layers."""
        return sum(layer.params for layer in self._unique(tables=True))

    @property
    def embedding_params_after(self) -> int:
        return sum(layer.params_after for layer in self._unique(tables=True))

    @property
    def factorable_share(self) -> float | None:
        """Share of the model's parameters in the layers found (dense layers and tables), before compression."""
        found = self.dense_params_before + self.embedding_params_before
        return found / self.params_before if self.params_before else None

    @property
    def factored(self) -> int:
        return sum(layer.factored for layer in self.layers)

    @property
    def narrowed(self) -> int:
        return sum(layer.narrowed_to is not None for layer in self.layers)


def report_to_json(report: Report) -> str:
    """The report as JSON, with derived totals spelled out for machines."""
    data = dataclasses.asdict(report)
    for row, layer in zip(data["layers"], report.layers, strict=True):
        row.update(params=layer.params, params_after=layer.params_after, saving=layer.saving,
                   predicted_error=layer.predicted_error)
    data.update(
        dense_params_before=report.dense_params_before,
        dense_params_after=report.dense_params_after,
        embedding_params_before=report.embedding_params_before,
        embedding_params_after=report.embedding_params_after,
        factorable_share=report.factorable_share,
        factored_layers=report.factored,
        narrowed_layers=report.narrowed,
    )
    if report.verification is not None:
        data["verification"] = verification_to_dict(report.verification)
    return json.dumps(data, indent=2)


def verification_to_dict(verification: VerificationReport) -> dict[str, object]:
    """The verification as plain data; ``accuracy_drop_points`` is original - compressed (positive = lost)."""
    drop = verification.accuracy_drop
    return dataclasses.asdict(verification) | {"accuracy_drop_points": None if drop is None else round(drop, 6)}


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 10_000 else str(n)


def _share(what: str, before: int, after: int) -> str:
    return f"{what}: {_count(before)} -> {_count(after)} ({after / before:.1%} kept)" if before else ""


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _guard_cell(layer: LayerDecision) -> str:
    return "  ".join(f"b{t.batch} {t.ratio:.2f}x" for t in layer.timings)


def _error_cell(layer: LayerDecision, whitened: bool) -> str:
    """Predicted (only whitened spectra predict an *output* error) / measured on held-out activations."""
    if not layer.factored or layer.measured_error is None:
        return ""
    return (f"{layer.predicted_error:.3f} / {layer.measured_error:.3f}" if whitened
            else f"- / {layer.measured_error:.3f}")


def _layer_rows(layers: list[LayerDecision], whitened: bool) -> list[list[str]]:
    rows = []
    guarded = any(layer.timings for layer in layers)
    measured = any(layer.measured_error is not None for layer in layers)
    for layer in layers:
        action = ("factor" if layer.factored else layer.reason if layer.narrowed_to else f"keep: {layer.reason}")
        action += f" ({layer.note})" if layer.note else ""
        rows.append([
            layer.name + (f" (shares weight x{layer.shared_by})" if layer.shared_by > 1 else ""),
            layer.op_type,
            f"{layer.shape[0]}x{layer.shape[1]}",
            _count(layer.params),
            f"{layer.break_even:.1f}",
            f"{layer.rank}/{layer.full_rank}" if layer.narrowed_to is None else "-",
            f"{layer.energy_kept:.4f}" if layer.narrowed_to is None else "-",
            f"{layer.saving:+.1%}",
            *([_guard_cell(layer)] if guarded else []),
            *([_error_cell(layer, whitened)] if measured else []),
            action,
        ])
    return rows


def _positions_line(verification: VerificationReport) -> str:
    """How many real token positions were compared, per sample, when the mask's padding was left out."""
    if verification.compared_positions is None:
        return ""
    total, fewest, most = verification.compared_positions
    return (f"\ncompared at {total} real token positions ({fewest} to {most} per sample); "
            f"{verification.padded_positions} padded positions (attention mask 0) left out")


def _decisions_cell(output: OutputComparison) -> str:
    """The decisions an output flips, with its KL (class scores) or its error over its spread (a score)."""
    if output.kind == "values" or not output.decisions:
        return ""
    detail = (f"KL {output.kl:.3g}" if output.kl is not None else
              f"err/spread {output.spread_error:.3g}" if output.spread_error is not None else "")
    if output.threshold is not None:
        detail = f"at {output.threshold:g}" + (f", {detail}" if detail else "")
    return f"{output.flips} of {output.decisions} ({output.flips / output.decisions:.2%})" + (
        f", {detail}" if detail else "")


def format_verification(verification: VerificationReport, markdown: bool = False) -> str:
    """Per-output errors and, with labels, accuracy and macro-F1 of both models."""
    style = "github" if markdown else "simple"
    deciding = any(o.kind != "values" and o.decisions for o in verification.outputs)
    rows = [[o.name, o.kind, f"{o.max_abs_error:.3g}", f"{o.relative_error:.3g}", f"{o.mean_cosine:.6f}",
             f"{o.min_cosine:.6f}", *([_decisions_cell(o)] if deciding else [])] for o in verification.outputs]
    lines = [
        f"verification on {verification.provider}, {verification.samples} "
        f"{'calls' if verification.per_call else 'samples'} ({verification.inputs})"
        + ("\nthese inputs are generated: they check the rewrite, not accuracy on real data (give `data`)"
           if verification.inputs.startswith("generated") else "")
        + _positions_line(verification),
        tabulate(rows, ["output", "kind", "max abs err", "rel err", "cosine (mean)", "cosine (min)",
                        *(["decisions flipped"] if deciding else [])], tablefmt=style),
    ]
    if verification.original is not None and verification.compressed is not None:
        o, c = verification.original, verification.compressed
        lines.append(tabulate(
            [["original", f"{o.accuracy:.2%}", f"{o.macro_f1:.4f}"],
             ["compressed", f"{c.accuracy:.2%}", f"{c.macro_f1:.4f}"]],
            ["model", "top-1 accuracy", "macro-F1"], tablefmt=style,
        ))
        lines.append(f"accuracy drop: {verification.accuracy_drop:.2f} points (original - compressed)")
    return "\n\n".join(lines)


def _budget_text(budget: dict, style: str) -> str:
    samples, measure, unit = budget["samples"], budget["measure"], budget.get("unit", "samples")
    by_threshold = budget["tau"] is not None
    chosen_with = (f"tau = {budget['tau']:.4f} (energy of each layer's output)" if by_threshold
                   else budget.get("allocation", "a global allocation"))
    verdict = (f"met with {chosen_with}" if budget["met"]
               else "NOT met even with every layer dense: the model is returned unfactored")
    fit = samples.get("fit")
    if budget.get("timed"):
        chosen = "chosen by timing each candidate's whole model against the original" + (
            f" (factors fitted on {fit} {unit})" if fit else "")
    elif measure:
        chosen = f"chosen on {samples['calibration']} calibration {unit}" + (
            f" (factors fitted on {fit} others)" if fit else "")
    else:
        chosen = "chosen by the parameter count alone"
    verified = (f"verified below on {samples['held_out']} held-out {unit}" if samples["held_out"]
                else "no held-out data")
    steps = budget["steps"]
    latency = any(s.get("latency") is not None for s in steps)
    rows = [[f"{s['tau']:.4f}" if by_threshold else str(s["point"]), f"{s['params_kept']:.1%}",
             *([f"{s['latency']:.3f}"] if latency else []),
             *([] if by_threshold else [f"{s['predicted_loss']:.4g}"]),
             *([] if not measure else ["" if s["value"] is None else f"{s['value']:.4g}"]),
             *(["yes" if s.get("quantized") else "no"] if budget.get("quantize") else []),
             "yes" if s["feasible"] else "no"] for s in steps]
    headers = ["tau" if by_threshold else "frontier point", "dense params kept",
               *(["predicted layer latency (x dense)"] if latency else []),
               *([] if by_threshold else ["predicted loss"]),
               *([measure if budget.get("timed") else f"{measure} on calibration part"] if measure else []),
               *(["quantized"] if budget.get("quantize") else []), "within budget"]
    lines = [f"budget: {budget['budget']}; {verdict}; {chosen}, {verified}",
             tabulate(rows, headers, tablefmt=style, disable_numparse=True)]
    if budget.get("frontier"):
        original = budget["frontier"][0]["model_bytes"]
        table = [[r["variant"], f"{r['model_bytes'] / original:.3f}", f"{r['params_kept']:.1%}",
                  f"{r['mean_cosine']:.4f}", *([f"{r['accuracy_drop']:+.2f}"] if "accuracy_drop" in r else []),
                  *([f"{r['flip_share']:.2%}"] if "flip_share" in r else [])]
                 for r in budget["frontier"]]
        head = ["variant", "size (serialized, x original)", "dense params kept", "output cosine (mean)",
                *(["accuracy drop (pts)"] if "accuracy_drop" in budget["frontier"][0] else []),
                *(["decisions flipped"] if "flip_share" in budget["frontier"][0] else [])]
        lines += [f"frontier on the {samples['held_out']} held-out {unit}:",
                  tabulate(table, head, tablefmt=style, disable_numparse=True)]
    lines += [f"NOTE: {note}" for note in budget.get("notes", [])]
    return "\n".join(lines)


def _share_line(report: Report) -> str:
    """How much of the model the layers found cover, and how many nodes were passed over."""
    if report.factorable_share is None:
        return ""
    passed = f"; {len(report.skipped)} nodes passed over, with why, under 'not factored'" if report.skipped else ""
    found = report.dense_params_before + report.embedding_params_before
    return (f"factorable layers hold {_count(found)} of the model's {_count(report.params_before)} "
            f"parameters ({report.factorable_share:.1%}){passed}")


def format_report(report: Report, markdown: bool = False) -> str:
    """A human-readable report: layer table, skipped nodes, totals, verification."""
    style = "github" if markdown else "simple"
    headers = ["layer", "op", "W (in x out)", "params", "break-even", "rank", "energy kept", "saving",
               *(["factored/dense time"] if any(layer.timings for layer in report.layers) else []),
               *(["output error predicted / held-out"]
                 if any(layer.measured_error is not None for layer in report.layers) else []),
               "decision"]
    parts = [f"model: {report.model}   policy: {report.policy}   factors: {report.method}   factor only at rank <= "
             f"{report.max_rank_fraction:g} x break-even and >= {report.min_params} parameters"]
    parts.append(tabulate(_layer_rows(report.layers, report.method.startswith("whitened")), headers, tablefmt=style,
                          disable_numparse=True))
    if report.skipped:
        parts.append("not factored:\n" + tabulate([[s.name, s.op_type, s.reason] for s in report.skipped],
                                                   ["node", "op", "reason"], tablefmt=style))
    before, after = report.dense_params_before, report.dense_params_after
    totals = [
        f"layers factored: {report.factored} of {len(report.layers)}"
        + (f"; narrowed: {report.narrowed}" if report.narrowed else ""),
        _share_line(report),
        _share("dense-layer parameters", before, after),
        _share("embedding-table parameters", report.embedding_params_before, report.embedding_params_after),
        f"model parameters: {_count(report.params_before)} -> {_count(report.params_after)}; "
        f"weight bytes: {_bytes(report.weight_bytes_before)} -> {_bytes(report.weight_bytes_after)}",
    ]
    if report.file_bytes_before is not None and report.file_bytes_after is not None:
        totals.append(f"file size: {_bytes(report.file_bytes_before)} -> {_bytes(report.file_bytes_after)}"
                      + (f"  ({report.output})" if report.output else ""))
    parts.append("\n".join(t for t in totals if t))
    if report.budget is not None:
        parts.append(_budget_text(report.budget, style))
    if report.latency_check:
        parts.append("whole model, timed against the original:\n" + tabulate(
            [[c.provider.removesuffix("ExecutionProvider"), c.batch, f"{c.original.median_ms:.4g}",
              f"{c.compressed.median_ms:.4g}", f"{c.ratio:.3f} [{c.ratio_p10:.3f}, {c.ratio_p90:.3f}]",
              ", ".join(f"{r:.3f}" for r in c.round_ratios)]
             for c in report.latency_check],
            ["provider", "batch", "orig median ms", "comp median ms", "ratio [p10, p90]", "ratio per round"],
            tablefmt=style, disable_numparse=True))
    if report.verification is not None:
        parts.append(format_verification(report.verification, markdown))
    parts.extend(report.notes)
    return "\n\n".join(parts)
