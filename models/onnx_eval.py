"""Accuracy and macro-F1 of a shipped ONNX classifier on its saved test split.

Shared by the training scripts beside this file, which import it when run as
``python models/train_*.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import accuracy_score, f1_score


def evaluate(onnx_path: Path, npz_path: Path, input_name: str = "input") -> tuple[float, float]:
    """Accuracy and macro-F1 of the ONNX model's argmax on the split's ``labels``."""
    with np.load(npz_path) as data:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {input_name: data[input_name]})
        labels = data["labels"]
    predictions = logits.argmax(axis=1)
    return accuracy_score(labels, predictions), f1_score(labels, predictions, average="macro")
