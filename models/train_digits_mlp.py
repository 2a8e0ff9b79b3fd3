"""Train a small MLP on scikit-learn's digits and export it to ONNX by hand.

Builds ``models/digits_mlp.onnx`` and ``models/digits_test.npz``.

The model is a real (trained) fully connected network, 64 -> 256 -> 128 -> 10
with ReLU, trained with scikit-learn's ``MLPClassifier`` on the 8x8 ``load_digits``
images (1797 samples, stratified 70/30 split, fixed seeds).  It is exported with
``onnx.helper`` as ``Mul(1/16) -> Gemm -> Relu -> Gemm -> Relu -> Gemm``:
the weights keep sklearn's ``coefs_`` layout ``(in, out)``, so every ``Gemm``
has ``transB=0`` (the other layout, ``transB=1``, is covered by the Fashion-MNIST
model).  The last ``Gemm`` yields logits; argmax is the class.

The test split is saved with the raw pixel values 0..16 as float32 under the
graph input name ``input`` (the /16 scaling happens inside the graph), plus
``labels`` as int64.  Accuracy and macro-F1 are measured by running the ONNX
file in onnxruntime on the saved npz.

Rebuild: ``python models/train_digits_mlp.py`` (needs numpy, onnx,
onnxruntime, scikit-learn; downloads nothing).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_eval import evaluate  # models/onnx_eval.py: this folder is on sys.path when run as a script
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "digits_mlp.onnx"
NPZ_PATH = HERE / "digits_test.npz"
SEED = 0
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17


def train(x_train: np.ndarray, y_train: np.ndarray) -> MLPClassifier:
    """Fit the MLP on pixels scaled to [0, 1]."""
    clf = MLPClassifier(
        hidden_layer_sizes=(256, 128),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=64,
        learning_rate_init=1e-3,
        max_iter=300,
        random_state=SEED,
    )
    clf.fit(x_train / 16.0, y_train)
    return clf


def to_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    """Write the fitted MLP as Mul(1/16) followed by Gemm(transB=0)/Relu layers."""
    n_in = clf.coefs_[0].shape[0]
    n_out = clf.coefs_[-1].shape[1]
    inits = [numpy_helper.from_array(np.array(1.0 / 16.0, dtype=np.float32), "scale")]
    nodes = [helper.make_node("Mul", [INPUT_NAME, "scale"], ["x0"], name="scale_input")]
    prev = "x0"
    n_layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        w_name, b_name = f"fc{i}.weight", f"fc{i}.bias"
        inits.append(numpy_helper.from_array(w.astype(np.float32), w_name))
        inits.append(numpy_helper.from_array(b.astype(np.float32), b_name))
        last = i == n_layers - 1
        gemm_out = OUTPUT_NAME if last else f"fc{i}_out"
        nodes.append(
            helper.make_node(
                "Gemm", [prev, w_name, b_name], [gemm_out],
                name=f"fc{i}", alpha=1.0, beta=1.0, transA=0, transB=0,
            )
        )
        if not last:
            prev = f"relu{i}_out"
            nodes.append(helper.make_node("Relu", [gemm_out], [prev], name=f"relu{i}"))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnx-arsvd/models/train_digits_mlp.py",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    t0 = time.perf_counter()
    digits = load_digits()
    x = digits.data.astype(np.float32)  # raw values 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=SEED
    )
    clf = train(x_train, y_train)
    onnx.save_model(to_onnx(clf), ONNX_PATH)
    np.savez_compressed(NPZ_PATH, **{INPUT_NAME: x_test, "labels": y_test})
    acc, f1 = evaluate(ONNX_PATH, NPZ_PATH, INPUT_NAME)
    print(f"train={len(y_train)} test={len(y_test)} sklearn_iters={clf.n_iter_}")
    print(f"wrote {ONNX_PATH.name} ({ONNX_PATH.stat().st_size} B), "
          f"{NPZ_PATH.name} ({NPZ_PATH.stat().st_size} B)")
    print(f"ONNX test accuracy={acc:.4f} macro_f1={f1:.4f} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
