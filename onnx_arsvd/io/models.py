"""The one place that opens models: every tensor is checked before any byte of external data is read.

A model file is read with ``onnx.load(..., load_external_data=False)``; then every tensor in it
(initializers, ``Constant`` and other tensor attributes, in subgraphs and functions too) must
declare non-negative dims whose size matches its data, and external data must, as onnx.load and
onnxruntime require, name a relative location inside the model's folder (after resolving
symlinks; a file with several hard links is refused, as a hard link can bring in a file from
elsewhere) and an ``offset + length`` inside that file with ``length`` equal to dims x element size.
Only then is the IR built; external tensors stay on disk (memory-mapped when read).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.external_data

from onnx_arsvd.errors import InvalidInputError, OutputError, UnsupportedModelError

__all__ = [
    "DROPPED_FIELDS_KEY",
    "check_written",
    "EXTERNAL_DATA_THRESHOLD",
    "external_data_files",
    "ir_tensors",
    "load_model",
    "model_file_bytes",
    "proto_tensors",
    "to_model",
    "utf8",
    "weight_stats",
]

logger = logging.getLogger("onnx_arsvd")

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Weights above this many bytes go to external data: protobuf cannot serialize past 2 GB."""

DROPPED_FIELDS_KEY = "onnx_arsvd.dropped_fields"
"""``model.meta`` key: the fields of the file that the IR does not carry (they are not written back)."""

_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _proto_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every dense tensor of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes) -> Iterator[onnx.TensorProto]:
    for attribute in attributes:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
        for sparse in attribute.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attribute.HasField("g"):
            yield from _proto_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _proto_tensors(graph)


def proto_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every dense tensor of the model: graphs, subgraphs, functions and training graphs."""
    yield from _proto_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node.attribute)
    for training in model.training_info:
        yield from _proto_tensors(training.initialization)
        yield from _proto_tensors(training.algorithm)


def _data_bytes(tensor: onnx.TensorProto) -> int:
    """What the declared dims and type take, in bytes."""
    try:
        itemsize = ir.DataType(tensor.data_type).itemsize
    except ValueError as error:
        raise UnsupportedModelError(f"tensor {tensor.name!r} has unknown data type {tensor.data_type}") from error
    return math.ceil(math.prod(tensor.dims) * itemsize)


def _typed_count(tensor: onnx.TensorProto) -> int:
    """How many entries the typed ``*_data`` fields must hold for the declared dims."""
    count = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return 2 * count
    itemsize = ir.DataType(tensor.data_type).itemsize
    return math.ceil(count * itemsize) if itemsize < 1 else count  # 4-bit types pack two per entry


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError as error:
        raise UnsupportedModelError(f"tensor {tensor.name!r}: external data offset/length are not integers") from error
    return info.get("location", ""), offset, length


def _check_external(tensor: onnx.TensorProto, folder: Path, where: str) -> None:
    """Refuse an external tensor whose location leaves ``folder`` or whose byte range is not its data."""
    location, offset, length = _external_info(tensor)
    name = f"{where}: tensor {tensor.name!r}"
    if not location:
        raise UnsupportedModelError(f"{name} has external data without a location")
    if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
        raise UnsupportedModelError(f"{name}: external data location {location!r} is absolute; it must be relative")
    real_folder = folder.resolve()
    target = Path(os.path.realpath(folder / location))
    if ".." in Path(os.path.normpath(location)).parts or not target.is_relative_to(real_folder):
        raise UnsupportedModelError(f"{name}: external data location {location!r} leaves the model's folder")
    try:
        stat = target.stat()
    except OSError as error:
        raise UnsupportedModelError(f"{name}: external data file {location!r} cannot be read "
                                    f"({error.strerror})") from error
    if not target.is_file():
        raise UnsupportedModelError(f"{name}: external data {location!r} is not a regular file")
    if stat.st_nlink > 1:
        raise UnsupportedModelError(f"{name}: external data file {location!r} has {stat.st_nlink} hard links; "
                                    "it may be a file from outside the model's folder: copy it")
    needed = _data_bytes(tensor)
    length = stat.st_size - offset if length is None else length  # no length: to the end of the file, as onnx reads it
    if offset < 0 or length < 0 or offset + length > stat.st_size:
        raise UnsupportedModelError(f"{name}: external data range (offset {offset}, length {length}) lies outside "
                                    f"{location!r} ({stat.st_size} bytes)")
    if length != needed:
        raise UnsupportedModelError(f"{name}: {length} bytes of external data for dims {list(tensor.dims)} "
                                    f"({needed} bytes)")


def _check_inline(tensor: onnx.TensorProto, where: str) -> None:
    if tensor.data_type == onnx.TensorProto.STRING:
        return
    if tensor.HasField("raw_data"):
        actual, expected, unit = len(tensor.raw_data), _data_bytes(tensor), "bytes"
    else:
        actual, expected, unit = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS), _typed_count(tensor), "values"
    if actual != expected:
        raise UnsupportedModelError(f"{where}: tensor {tensor.name!r} declares dims {list(tensor.dims)} "
                                    f"({expected} {unit}) but holds {actual}")


def _sparse_user(graph: onnx.GraphProto) -> str | None:
    """The first node (in ``graph`` or its bodies) with a sparse tensor attribute, by name or type."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("sparse_tensor") or attribute.sparse_tensors:
                return node.name or node.op_type
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                if (found := _sparse_user(body)) is not None:
                    return found
    return None


def _check_tensors(proto: onnx.ModelProto, folder: Path, where: str) -> None:
    """Refuse any tensor whose dims, data or external data location is not what it claims.

    Sparse tensors are refused outright: onnx_ir does not carry them, so they would vanish from the output.
    """
    if proto.graph.sparse_initializer:
        names = ", ".join(repr(s.values.name) for s in proto.graph.sparse_initializer)
        raise UnsupportedModelError(f"{where}: sparse initializers ({names}) are not supported; store them dense")
    if (node := _sparse_user(proto.graph)) is not None:
        raise UnsupportedModelError(f"{where}: node {node!r} has a sparse tensor attribute, which is not supported; "
                                    "store it dense")
    for tensor in proto_tensors(proto):
        if tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise UnsupportedModelError(f"{where}: tensor {tensor.name!r} has no data type (0)")
        if any(d < 0 for d in tensor.dims):
            raise UnsupportedModelError(f"{where}: tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(tensor, folder, where)
        else:
            _check_inline(tensor, where)


def _check_names(graph: onnx.GraphProto, where: str, scope: str = "the main graph") -> None:
    """Refuse a graph (or body) that defines one name twice: two initializers, or an initializer and a node output,
    or two node outputs. onnxruntime loads some such models and would run one definition while this tool changed
    the other (the checker rejects them)."""
    defined: set[str] = set()
    for name in [t.name for t in graph.initializer] + [o for node in graph.node for o in node.output if o]:
        if name in defined:
            raise UnsupportedModelError(f"{where}: {name!r} is defined twice in {scope} (initializers and node "
                                        "outputs must have unique names); fix the model")
        defined.add(name)
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _check_names(body, where, f"the {attribute.name} body of node {node.name or node.op_type!r}")


def _dropped_fields(proto: onnx.ModelProto) -> list[str]:
    """Fields of the file that ``onnx_ir`` does not carry into the model it builds."""
    dropped = []
    if proto.training_info:
        dropped.append(f"training_info ({len(proto.training_info)} entries)")
    return dropped


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` after checking every tensor; external data stays on disk (memory-mapped when read)."""
    if not os.fspath(path):
        raise InvalidInputError("the model path is empty")
    path = Path(os.path.abspath(path))  # 'm.onnx' has a folder too: external data is checked against it
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidInputError(f"{path}: not a file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning, ... on broken files
        raise UnsupportedModelError(f"{path}: not a readable ONNX model ({type(error).__name__}: {error})") from error
    if proto.ir_version < 1 or (not proto.graph.node and not proto.graph.output):
        raise UnsupportedModelError(f"{path}: not an ONNX model (no graph found)")
    _check_tensors(proto, path.parent, os.fspath(path))
    _check_names(proto.graph, os.fspath(path))
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:
        raise UnsupportedModelError(f"{path}: the model cannot be read ({type(error).__name__}: {error})") from error
    onnx_ir.external_data.set_base_dir(model.graph, path.parent)
    model.meta[DROPPED_FIELDS_KEY] = _dropped_fields(proto)
    return model


def to_model(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """An ``ir.Model`` the caller's object does not see changes to."""
    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, onnx.ModelProto):
        _check_tensors(model, Path.cwd(), "<in-memory model>")
        _check_names(model.graph, "<in-memory model>")
        loaded = ir.from_proto(model)
        loaded.meta[DROPPED_FIELDS_KEY] = _dropped_fields(model)
        return loaded
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise InvalidInputError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def ir_tensors(graph: ir.Graph) -> Iterator[ir.TensorProtocol]:
    """Every tensor of ``graph``: initializers and tensor attributes, subgraphs included."""
    for value in graph.initializers.values():
        if value.const_value is not None:
            yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attribute in node.attributes.values():
            if attribute.is_ref():
                continue
            if attribute.type == ir.AttributeType.TENSOR:
                yield attribute.value
            elif attribute.type == ir.AttributeType.TENSORS:
                yield from attribute.value
            elif attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                for subgraph in [attribute.value] if attribute.type == ir.AttributeType.GRAPH else attribute.value:
                    for value in subgraph.initializers.values():
                        if value.const_value is not None:
                            yield value.const_value


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
    """Resolved paths of the external data files any tensor of the model points to."""
    return {Path(tensor.path).resolve() for tensor in ir_tensors(model.graph) if isinstance(tensor, ir.ExternalTensor)}


def utf8(path: str) -> bool:
    """Whether ``path`` is valid UTF-8 (a name of other bytes reaches Python with surrogate escapes; onnxruntime and
    the checker take UTF-8 paths only)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def model_file_bytes(path: str | os.PathLike, model: ir.Model | None = None) -> int:
    """Bytes on disk of a model file and the external data files it references (``model``: the file already
    loaded, so it is not read again)."""
    path = Path(path)
    model = model if model is not None else load_model(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(model) if f.exists())


def _checker_problem(model: str | os.PathLike | onnx.ModelProto) -> str:
    """What ``onnx.checker`` (``full_check``: with strict shape inference) finds wrong with ``model``, or ""."""
    if not isinstance(model, onnx.ModelProto) and not utf8(os.fspath(model)):
        model = onnx.load(model)  # the checker takes UTF-8 paths only
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else os.fspath(model), full_check=True)
    except Exception as error:  # ValidationError, InferenceError, ...: any finding
        lines = str(error).strip().splitlines()
        return lines[0] if lines else type(error).__name__
    return ""


def check_written(path: Path, source: str | os.PathLike | onnx.ModelProto | ir.Model) -> None:
    """Fail when the model written at ``path`` does not pass ``onnx.checker`` and the ``source`` model does.

    A finding the source model has too is the source's: the output keeps it, with a warning.
    """
    problem = _checker_problem(path)
    if not problem:
        return
    original = _checker_problem(ir.to_proto(source) if isinstance(source, ir.Model) else source)
    if not original:
        raise OutputError(f"the written model fails onnx.checker ({problem}); nothing written")
    logger.warning(f"the input model fails onnx.checker ({original}), and so does the output ({problem})")
