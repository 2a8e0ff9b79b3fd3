"""Quantization of a (compressed or original) model with onnxruntime's own quantizers (the configs that choose
them: :mod:`.configs`).

- ``int8``: ``onnxruntime.quantization.quantize_dynamic``, signed per-channel weights; with
  ``reduce_range`` (7-bit weights) on CPUs without VNNI, where the u8 x s8 kernels can saturate (signed
  INT8 lost 8.8 points on the Fashion MLP there). Every op type it supports is quantized (MatMul, Gemm,
  Gather on constant tables, ...) except ``Conv``: its dynamic ``ConvInteger`` form read no text line
  right and ran 3.4x slower on the PP-OCRv6 recogniser (``benchmarks/results/ppocr.md``).
- ``int4``: ``MatMulNBitsQuantizer`` (weight-only, blockwise, symmetric; the ``MatMulNBits`` contrib
  op). It only takes MatMul, so dense ``Gemm`` layers are first rewritten as MatMul (+ Add), which
  computes the same thing.
- ``int8+int4-tables``: embedding tables (``Gather`` on a constant) 4-bit blockwise along the hidden
  axis (``MatMulNBitsQuantizer`` on Gather: the ``GatherBlockQuantized`` contrib op; it raises the
  model to opset 21 and IR 10 for the int4 type; a model without tables is left at its opset), then
  ``int8`` for every other layer. A lookup reads one row, so a table's 4-bit error stays in that row:
  on all-MiniLM-L6-v2, where the word table is half the parameters, this is 0.805x the size of
  ``int8`` alone at 0.0042 less output cosine (``benchmarks/results/minilm_quantization.md``).

Both are onnxruntime's code, called as users call it; this module only chooses the settings and
keeps onnxruntime's logging habits (a root-logger ``basicConfig`` at import, a warning on every call)
out of the caller's logs.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.graph.layers import find_layers, node_label, read_array

__all__ = ["check_quantizable", "int4_weight_only", "int8_dynamic", "int8_with_int4_tables"]

_PREPROCESS_HINT = "Please consider to run pre-processing before quantization"


class _ForwardToOurs(logging.Handler):
    """Stands in as the root logger's handler while onnxruntime's quantizers run: their root-logger messages go to
    the ``onnx_arsvd`` logger (shown like ours), except the pre-processing hint printed on every call.

    With a handler on the root logger, ``logging.basicConfig`` (which onnxruntime calls at import, and which
    ``logging.warning`` calls on a bare root logger) does nothing: without one it installed a second handler
    that printed every later warning of this tool twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("onnx_arsvd") or record.getMessage().startswith(_PREPROCESS_HINT):
            return
        logging.getLogger("onnx_arsvd").log(record.levelno, "onnxruntime quantization: %s", record.getMessage())


@contextmanager
def _root_logger_kept() -> Iterator[None]:
    """onnxruntime's quantization code, called without it changing or flooding the root logger."""
    root, forward = logging.getLogger(), _ForwardToOurs()
    root.addHandler(forward)
    try:
        yield
    finally:
        root.removeHandler(forward)


def _nbits_quantizer() -> type:
    """onnxruntime's MatMulNBitsQuantizer (its module calls basicConfig at import)."""
    with _root_logger_kept():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    return MatMulNBitsQuantizer


def _gemm_as_matmul(model: ir.Model) -> int:
    """Rewrite, in place, every dense Gemm with a constant weight as MatMul(X, alpha W) [+ Add(beta C)]."""
    count, replaced = 0, []
    for layer in find_layers(model)[0]:
        if layer.op_type != "Gemm" or layer.left or layer.trans_x or layer.scope:
            continue  # MatMulNBits takes X @ W in the main graph only
        node, dtype = layer.node, layer.dtype.numpy()
        weight = layer.alpha * layer.matrix().astype(np.float64)
        label = node_label(node)
        w = _initializer(model, f"{label}.int4_weight", weight.astype(dtype))
        output = node.outputs[0]
        product = ir.Value(name=f"{label}/int4_matmul_out")
        nodes = [ir.Node("", "MatMul", [node.inputs[0], w], outputs=[product], name=f"{label}/int4_matmul")]
        result = product
        if layer.bias is not None:
            bias = layer.beta * read_array(layer.bias).astype(np.float64).reshape(-1)
            bias = np.broadcast_to(bias, (layer.shape[1],)).astype(dtype)
            b = _initializer(model, f"{label}.int4_bias", bias)
            result = ir.Value(name=f"{label}/int4_add_out")
            nodes.append(ir.Node("", "Add", [product, b], outputs=[result], name=f"{label}/int4_add"))
        model.graph.insert_before(node, nodes)
        name, value_type, shape = output.name, output.type, output.shape
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        result.name, result.type, result.shape = name, value_type, shape
        replaced += [layer.weight, layer.bias]
        count += 1
    for value in replaced:
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
            if value.name is None:  # onnx_ir registers initializers by name only
                raise ValueError("an initializer without a name")
            del model.graph.initializers[value.name]
    return count


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    if name in model.graph.initializers:
        raise InvalidInputError(f"cannot convert Gemm for int4: the model already has an initializer {name!r}")
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))
    model.graph.register_initializer(value)
    return value


def check_quantizable(model: ir.Model) -> None:
    """onnxruntime's quantizers take layers that compute in float32 only: refuse an fp16, bf16 or fp64 layer in one
    line, before any work (onnxruntime's own error comes late, from a session on a staging path)."""
    for layer in find_layers(model)[0]:
        if layer.dtype != ir.DataType.FLOAT:
            raise UnsupportedModelError(f"quantization takes layers that compute in float32; {layer.name!r} computes "
                                        f"in {layer.dtype.name.lower()}: convert the model to float32 first")


def _proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, ir.Model):
        check_quantizable(model)
        return ir.to_proto(model)
    return model


def int8_dynamic(model: ir.Model | onnx.ModelProto, reduce_range: bool, scratch: Path | None = None,
                 skip: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """``quantize_dynamic`` on every op type it supports but ``Conv`` (and ``skip``).

    onnxruntime's int8 quantizer works on a copy of the model on disk (and writes a second, shape-inferred one
    beside it): in a temporary folder inside ``scratch`` (the run's staging folder, which a later run removes if
    this one is killed), else in the system's temporary folder.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    proto = _proto(model)
    with _root_logger_kept(), tempfile.TemporaryDirectory(prefix="int8-", dir=scratch) as folder:
        source, target = Path(folder) / "input.onnx", Path(folder) / "model.onnx"
        large = proto.ByteSize() > 1_800_000_000
        onnx.save_model(proto, source, save_as_external_data=large)  # the quantizer's copies go beside it
        quantize_dynamic(source, target, per_channel=True, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, use_external_data_format=large,
                         op_types_to_quantize=sorted(set(IntegerOpsRegistry) - {"Conv", *skip}),
                         # after the 4-bit tables, shape inference cannot type the contrib op's output
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT} if skip else {})
        return onnx.load(target)


def int8_with_int4_tables(model: ir.Model | onnx.ModelProto, reduce_range: bool, block_size: int,
                          scratch: Path | None = None) -> onnx.ModelProto:
    """Embedding tables 4-bit blockwise (``GatherBlockQuantized``), then :func:`int8_dynamic` for the rest; a model
    without tables is quantized by :func:`int8_dynamic` alone (and stays at its opset)."""
    graph = model if isinstance(model, ir.Model) else ir.from_proto(model)  # a search's candidate: no conversion
    proto = _proto(model)
    if not any(layer.is_embedding for layer in find_layers(graph)[0]):
        return int8_dynamic(proto, reduce_range, scratch)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # the quantizer edits the model it is given
    quantizer = _nbits_quantizer()(copy, bits=4, block_size=block_size, is_symmetric=True,
                                   op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    nbits_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits_logger.level
    nbits_logger.setLevel(logging.ERROR)  # the opset/IR raise for int4 is this mode's documented effect
    try:
        with _root_logger_kept():
            quantizer.process()
    finally:
        nbits_logger.setLevel(level)
    return int8_dynamic(quantizer.model.model, reduce_range, scratch, skip=frozenset({"Gather"}))


def int4_weight_only(model: ir.Model | onnx.ModelProto, block_size: int,
                     accuracy_level: int | None) -> onnx.ModelProto:
    """``MatMulNBits`` on every MatMul, dense Gemm layers first rewritten as MatMul (+ Add)."""
    proto = _proto(model)
    graph = ir.from_proto(proto)
    if _gemm_as_matmul(graph):
        proto = ir.to_proto(graph)
    quantizer = _nbits_quantizer()(proto, bits=4, block_size=block_size, is_symmetric=True,
                                   accuracy_level=accuracy_level)
    with _root_logger_kept():
        quantizer.process()
    return quantizer.model.model
