"""Train a digits classifier whose forward branches on an input, and export it with torch.onnx: an ``If``.

Builds ``models/branch_mlp.onnx`` (its test split is ``models/digits_test.npz``, the same 540 images
as ``digits_mlp.onnx``, from the same stratified 70/30 split of scikit-learn's ``load_digits``).

The network: ``x / 16 -> Linear(64, 128) -> ReLU`` (the trunk, main graph), then, chosen by the
scalar input ``branch``: ``Linear(128, 128) -> ReLU`` (``branch`` > 0) or ``Linear(128, 128) -> Tanh``,
then ``Linear(128, 10)`` (the head, main graph). Both branches are trained (the loss sums both
paths' cross-entropies), so both hold learned weights. ``torch.jit.script`` keeps the Python ``if``,
and the TorchScript exporter (``dynamo=False``, opset 17) writes it as an ``If`` whose two branches each
hold a ``Gemm`` on a weight captured from the main graph: the form real exporters produce.

Inputs: ``input`` float32 ``[batch, 64]`` (raw pixels 0..16) and ``branch`` float32 ``[1]``; output
``logits`` float32 ``[batch, 10]``. Rebuild: ``python models/train_branch_mlp.py`` (needs torch,
scikit-learn, onnx, onnxruntime; downloads nothing; about 10 s on one CPU core).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "branch_mlp.onnx"
NPZ_PATH = HERE / "digits_test.npz"
SEED = 0
EPOCHS = 40


class BranchMLP(torch.nn.Module):
    """Trunk, one of two hidden layers chosen by ``branch``, head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(64, 128)
        self.relu_branch = torch.nn.Linear(128, 128)
        self.tanh_branch = torch.nn.Linear(128, 128)
        self.head = torch.nn.Linear(128, 10)

    def hidden(self, x: torch.Tensor, use_relu: bool) -> torch.Tensor:
        h = torch.relu(self.trunk(x / 16.0))
        return torch.relu(self.relu_branch(h)) if use_relu else torch.tanh(self.tanh_branch(h))

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.trunk(x / 16.0))
        if bool(branch.sum() > 0):
            h = torch.relu(self.relu_branch(h))
        else:
            h = torch.tanh(self.tanh_branch(h))
        return self.head(h)


def train(x: np.ndarray, y: np.ndarray) -> BranchMLP:
    """Adam, batches of 64, both paths' losses summed."""
    torch.manual_seed(SEED)
    model = BranchMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            loss = sum(torch.nn.functional.cross_entropy(model.head(model.hidden(inputs[batch], use_relu)),
                                                         labels[batch])
                       for use_relu in (True, False))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(digits.data.astype(np.float32), digits.target.astype(np.int64),
                                              test_size=0.3, stratify=digits.target, random_state=SEED)
    model = train(x_train, y_train)
    torch.onnx.export(torch.jit.script(model), (torch.from_numpy(x_train[:2]), torch.ones(1)), str(ONNX_PATH),
                      dynamo=False, opset_version=17, input_names=["input", "branch"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(str(ONNX_PATH), full_check=True)
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    with np.load(NPZ_PATH) as data:
        for flag in (1.0, -1.0):
            (logits,) = session.run(None, {"input": data["input"], "branch": np.array([flag], np.float32)})
            print(f"branch {flag:+.0f}: test accuracy {np.mean(logits.argmax(axis=1) == data['labels']):.4f}")
    print(f"wrote {ONNX_PATH} ({ONNX_PATH.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
