"""Train an MLP on Fashion-MNIST with PyTorch and export it with torch.onnx.

Builds ``models/fashion_mlp.onnx`` and ``models/fashion_test.npz``.

The model is a real fully connected network, 784 -> 512 -> 256 -> 10 with
ReLU, trained for 10 epochs of Adam (lr 1e-3, batch 128) on the full 60k training set (seeded,
single-threaded, deterministic).  It is exported with the TorchScript exporter
(``dynamo=False``, opset 17, dynamic batch), which turns every ``nn.Linear``
into ``Gemm(transB=1)`` with the weight stored ``(out, in)``, the layout real
exporters produce (the digits model covers ``transB=0``).

To keep the committed test split small the graph takes the raw ``uint8``
pixels, shape ``[batch, 784]``, and begins with ``Cast``/``Div`` (x / 255);
``fashion_test.npz`` holds the 10k test images as uint8 under ``input`` and
``labels`` as int64.  The output ``logits`` is ``[batch, 10]`` float32.
Accuracy and macro-F1 are measured by running the ONNX file in onnxruntime
on the saved npz.

Rebuild: ``python models/train_fashion_mlp.py``.  Needs the Debian package
``dataset-fashion-mnist`` (IDX files under /usr/share/datasets/fashion-mnist,
override with ``$FASHION_MNIST_DIR``) and ``pip install torch==2.13.0`` (CPU)
plus numpy, onnx, onnxruntime, scikit-learn.  Downloads nothing.
"""

from __future__ import annotations

import gzip
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx_eval import evaluate  # models/onnx_eval.py: this folder is on sys.path when run as a script
from torch import nn

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "fashion_mlp.onnx"
NPZ_PATH = HERE / "fashion_test.npz"
DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
SEED = 0
EPOCHS = 10
BATCH_SIZE = 128
LR = 1e-3
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (uint8 payload) into an array of its shape."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 784] and labels as int64 [N]."""
    x = read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return x.reshape(len(x), -1).copy(), y.astype(np.int64)


class FashionMLP(nn.Module):
    """784 -> 512 -> 256 -> 10 MLP taking raw uint8 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def train(x: np.ndarray, y: np.ndarray) -> FashionMLP:
    """A few epochs of Adam with a seeded shuffle."""
    model = FashionMLP()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS} train_loss={total / len(xt):.4f}")
    return model.eval()


def export(model: FashionMLP) -> None:
    """TorchScript export: Linear -> Gemm(transB=1), dynamic batch dim."""
    dummy = torch.zeros(1, 784, dtype=torch.uint8)
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(ONNX_PATH),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(ONNX_PATH), full_check=True)
    gemms = [n for n in onnx.load(str(ONNX_PATH)).graph.node if n.op_type == "Gemm"]
    trans_b = [next((a.i for a in n.attribute if a.name == "transB"), 0) for n in gemms]
    if len(gemms) != 3 or trans_b != [1, 1, 1]:
        raise RuntimeError(f"expected 3 Gemm(transB=1), got transB={trans_b}")


def main() -> None:
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed thread count: bit-reproducible CPU reductions
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("t10k")
    model = train(x_train, y_train)
    export(model)
    np.savez_compressed(NPZ_PATH, **{INPUT_NAME: x_test, "labels": y_test})
    acc, f1 = evaluate(ONNX_PATH, NPZ_PATH, INPUT_NAME)
    print(f"train={len(y_train)} test={len(y_test)} epochs={EPOCHS}")
    print(f"wrote {ONNX_PATH.name} ({ONNX_PATH.stat().st_size} B), "
          f"{NPZ_PATH.name} ({NPZ_PATH.stat().st_size} B)")
    print(f"ONNX test accuracy={acc:.4f} macro_f1={f1:.4f} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
