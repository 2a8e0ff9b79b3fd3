"""Read models lazily and write them atomically, with external data when they need it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "external_data_files",
    "load_model",
    "model_file_bytes",
    "save_model",
    "to_model",
    "weight_stats",
]

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Weights above this many bytes go to external data: protobuf cannot serialize past 2 GB."""


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path``; tensors stored as external data stay on disk (memory-mapped when read)."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidInputError(f"{path}: not a file")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning, ... on broken files
        raise UnsupportedModelError(f"{path}: not a readable ONNX model ({type(error).__name__}: {error})") from None
    if model.ir_version < 1 or (len(model.graph) == 0 and not model.graph.outputs):
        raise UnsupportedModelError(f"{path}: not an ONNX model (no graph found)")
    return model


def to_model(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """An ``ir.Model`` the caller's object does not see changes to."""
    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise InvalidInputError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def weight_stats(model: ir.Model) -> tuple[int, int]:
    """(parameters, bytes) of the model's constant tensors: initializers of every graph and ``Constant`` nodes."""
    tensors: list[ir.TensorProtocol] = []
    graphs = [model.graph]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = node.attributes.get("value")
            if value is not None and value.type == ir.AttributeType.TENSOR:
                tensors.append(value.as_tensor())
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                graphs.append(attribute.as_graph())
            elif attribute.type == ir.AttributeType.GRAPHS:
                graphs.extend(attribute.as_graphs())
    for graph in graphs:
        tensors += [value.const_value for value in graph.initializers.values() if value.const_value is not None]
    return sum(t.size for t in tensors), sum(t.nbytes for t in tensors)


def external_data_files(model: ir.Model) -> set[Path]:
    """Resolved paths of the external data files the model's initializers point to."""
    files: set[Path] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path).resolve())
    return files


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file and the external data files it references."""
    path = Path(path)
    model = ir.load(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(model) if f.exists())


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; external data goes to ``<name>.data`` beside it.

    ``external_data=None`` chooses: external when the weights exceed
    :data:`EXTERNAL_DATA_THRESHOLD` or the model already used external data. The files are first
    written into a temporary folder beside ``path`` and then renamed into place, data first, so an
    interrupted run never leaves a half-written model.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InvalidInputError(f"{path.parent}: output folder does not exist")
    if external_data is None:
        external_data = bool(external_data_files(model)) or weight_stats(model)[1] > EXTERNAL_DATA_THRESHOLD
    data_name = f"{path.name}.data"
    if external_data and (path.parent / data_name).resolve() in external_data_files(model):
        raise InvalidInputError(f"{path.parent / data_name}: the output's data file would overwrite the input's")
    staging = Path(tempfile.mkdtemp(prefix=".onnx-arsvd-", dir=path.parent))
    try:
        staged = staging / path.name
        ir.save(model, staged, external_data=data_name if external_data else None)
        if external_data:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
