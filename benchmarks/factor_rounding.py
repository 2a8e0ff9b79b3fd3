"""Do factored pairs need GPTQ-style error compensation under INT8? The loss of factored + INT8 before and after.

For each budget, ``compress(models/fashion_mlp.onnx, budget=Budget(target_params=T))`` on the first 2,000 test
images writes a factored model (each chosen layer X W becomes (X A) B). onnxruntime's ``quantize_dynamic`` (the
tool's ``int8`` config: signed per-channel weights, ``reduce_range`` where the CPU lacks VNNI) then rounds both
factors and quantizes each MatMul's input on the fly. The compensation tried here: take A as onnxruntime rounds
it (read back from the quantized file: its int8 values times its scales), and refit the second factor by least
squares on the layer's input Gram G (from the same 2,000 images) so that X Â B' is as close as it can be to the
original X W: B' = (Â^T G Â)^-1 Â^T G W; then quantize that model the same way. Same shapes, same bytes.

Measured on the other 8,000 test images: accuracy, decisions flipped against the original, and each factored
layer's relative output error ||X W - X A B||^2 / ||X W||^2 for the float factors, the rounded factors, and the
rounded A with the refitted B' (weight rounding only: onnxruntime's rounding of the activations is not in it).

Usage: python -m benchmarks.factor_rounding [--targets 0.15 0.3 0.5] [--out benchmarks/results/factor_rounding.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from benchmarks.results_io import header, markdown_table, write_result
from onnx_arsvd import compress
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import input_moments
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.quantize.configs import Int8Dynamic
from onnx_arsvd.search.budget import Budget

MODELS = Path(__file__).resolve().parents[1] / "models"
SOURCE, DATA = MODELS / "fashion_mlp.onnx", MODELS / "fashion_test.npz"
CALIBRATION = 2000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "factor_rounding.md"


def pairs(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The factors A (m x k) and B (k x n) of each factored weight, by the original weight's name."""
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {name.removesuffix(".arsvd_a"): (array, stored[name.removesuffix("_a") + "_b"])
            for name, array in stored.items() if name.endswith(".arsvd_a")}


def rounded(quantized: onnx.ModelProto, name: str) -> np.ndarray:
    """A factor as onnxruntime's quantizer stored it, dequantized: int8 values times their per-channel scales."""
    stored = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    values, scale = stored[f"{name}_quantized"].astype(np.float64), stored[f"{name}_scale"].astype(np.float64)
    zero = stored[f"{name}_zero_point"].astype(np.float64)
    return (values - zero) * scale


def with_factors(model: onnx.ModelProto, factors: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the named initializers replaced."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name in factors:
            init.CopyFrom(numpy_helper.from_array(factors[init.name].astype(np.float32), init.name))
    return copy


def scores(model: onnx.ModelProto | Path, images: np.ndarray, labels: np.ndarray,
           reference: np.ndarray | None) -> tuple[float, float, np.ndarray]:
    """Accuracy, the share of decisions unlike ``reference``'s, and the decisions."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    decided = make_session(source).run(None, {"input": images})[0].argmax(axis=1)
    flipped = float(np.mean(decided != reference)) if reference is not None else 0.0
    return float(np.mean(decided == labels)), flipped, decided


def relative(w: np.ndarray, product: np.ndarray, gram: np.ndarray) -> float:
    difference = w - product
    return float(np.einsum("ij,ij->", difference, gram @ difference) / np.einsum("ij,ij->", w, gram @ w))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.3, 0.5])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with np.load(DATA) as archive:
        images, labels = archive["input"], archive["labels"]
    calibration = {"input": images[:CALIBRATION], "labels": labels[:CALIBRATION]}
    held_images, held_labels = images[CALIBRATION:], labels[CALIBRATION:]
    original = ir.load(SOURCE)
    layers = {layer.weight_name: layer for layer in find_layers(original)[0]}
    grams = {key: m.gram for key, m in input_moments(original, list(layers.values()),
                                                     {"input": images[:CALIBRATION]}).items()}
    base_accuracy, _, reference = scores(SOURCE, held_images, held_labels, None)
    int8 = Int8Dynamic()
    rows, layer_rows = [], []
    with tempfile.TemporaryDirectory(prefix="factor_rounding_") as folder:
        for target in args.targets:
            path = Path(folder) / f"factored_{target}.onnx"
            compress(SOURCE, path, data=calibration, budget=Budget(target_params=target), check=False)
            factored = onnx.load(path)
            quantized = int8.apply(factored, Path(folder))
            refits = {}
            for name, (a, b) in pairs(factored).items():
                layer = layers[name]
                w, gram = layer.matrix().astype(np.float64), np.asarray(grams[layer.weight_key], dtype=np.float64)
                a_hat, b_hat = rounded(quantized, f"{name}.arsvd_a"), rounded(quantized, f"{name}.arsvd_b")
                normal = a_hat.T @ gram @ a_hat
                refit = np.linalg.solve(normal + 1e-9 * np.trace(normal) / len(normal) * np.eye(len(normal)),
                                        a_hat.T @ gram @ w)
                refits[f"{name}.arsvd_b"] = refit
                refit_hat = rounded(int8.apply(with_factors(factored, {f"{name}.arsvd_b": refit}), Path(folder)),
                                    f"{name}.arsvd_b")
                layer_rows.append([f"{target:.0%}", name, f"{a.shape[0]}x{a.shape[1]}x{b.shape[1]}",
                                   f"{relative(w, a.astype(np.float64) @ b, gram):.5f}",
                                   f"{relative(w, a_hat @ b_hat, gram):.5f}",
                                   f"{relative(w, a_hat @ refit_hat, gram):.5f}"])
            compensated = int8.apply(with_factors(factored, refits), Path(folder))
            for label, model in (("factored, float", factored), ("factored + INT8", quantized),
                                 ("factored + INT8, second factor refitted", compensated)):
                accuracy, flipped, _ = scores(model, held_images, held_labels, reference)
                rows.append([f"{target:.0%}", label, f"{len(model.SerializeToString()) / SOURCE.stat().st_size:.3f}",
                             f"{100 * accuracy:.2f}%", f"{100 * (base_accuracy - accuracy):+.2f}",
                             f"{100 * flipped:.2f}%"])
                print(rows[-1], file=sys.stderr, flush=True)
        int8_alone = int8.apply(onnx.load(SOURCE), Path(folder))
        accuracy, flipped, _ = scores(int8_alone, held_images, held_labels, reference)
        rows.insert(0, ["-", "INT8 alone", f"{len(int8_alone.SerializeToString()) / SOURCE.stat().st_size:.3f}",
                        f"{100 * accuracy:.2f}%", f"{100 * (base_accuracy - accuracy):+.2f}", f"{100 * flipped:.2f}%"])
    notes = [f"model: models/fashion_mlp.onnx (accuracy {100 * base_accuracy:.2f}% on the {len(held_labels):,} "
             f"held-out test images); calibration: the first {CALIBRATION:,} test images",
             f"quantization: {int8.describe()}"]
    text = "\n".join([
        *header("Factored pairs under INT8: GPTQ-style refit of the second factor", __file__, argv, notes=notes), "",
        markdown_table(["dense params kept", "model", "file / original", "accuracy", "points lost",
                        "decisions flipped"], rows, "lllrrr"), "",
        "Each factored layer's relative output error on the calibration images (weights only):", "",
        markdown_table(["target", "weight", "m x k x n", "float factors", "both rounded",
                        "A rounded, B refitted and rounded"], layer_rows, "lllrrr"), ""])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
