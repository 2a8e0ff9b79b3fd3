"""Inputs generated from a model's declared inputs, for a check of the rewrite when no real data is given."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.graph.layers import constant_tensor
from onnx_arsvd.io.data import Feed

__all__ = ["check_dims", "dims_from_data", "generated_batches", "unset_dims"]


def _input_dtype(node_arg: ort.NodeArg) -> np.dtype:
    type_name = node_arg.type.removeprefix("tensor(").removesuffix(")")
    aliases = {"float": "float32", "double": "float64", "bool": "bool_"}
    try:
        return np.dtype(aliases.get(type_name, type_name))
    except TypeError:
        raise UnsupportedModelError(f"input {node_arg.name!r} has unsupported type {node_arg.type}") from None


def _index_bounds(model: ir.Model) -> dict[str, int]:
    """For integer inputs that index an embedding table (Gather on a constant), the table's size."""
    bounds: dict[str, int] = {}
    for value in model.graph.inputs:
        for user, index in value.uses():
            table = constant_tensor(user.inputs[0]) if user.op_type == "Gather" and index == 1 else None
            if table is not None and value.name:
                axis = user.attributes.get_int("axis", 0)
                size = table.shape.numpy()[axis]
                bounds[value.name] = min(size, bounds.get(value.name, size))
    return bounds


def check_dims(dynamic: set[str], dims: Mapping[str, int]) -> None:
    """Every name in ``dims`` must be one of the model's dynamic input dimensions."""
    unknown = sorted(set(dims) - dynamic)
    if unknown:
        raise InvalidInputError(f"dimension {', '.join(unknown)}: no dynamic dimension of that name; the model's are: "
                                f"{', '.join(sorted(dynamic)) or 'none'}")


def _declared(source: ort.InferenceSession | ir.Model) -> list[tuple[str, list[int | str | None]]]:
    """Each input a feed gives (name, dims: an int, a symbolic name, or None)."""
    if isinstance(source, ir.Model):
        return [(v.name or "", [d if isinstance(d, int) else (str(d) if str(d) else None) for d in (v.shape or [])])
                for v in source.graph.inputs if not v.is_initializer()]
    return [(arg.name, [d if isinstance(d, int) and d >= 0 else d for d in (arg.shape or [])])
            for arg in source.get_inputs()]


def unset_dims(source: ort.InferenceSession | ir.Model, dims: Mapping[str, int]) -> list[str]:
    """The symbolic dims past each input's first (batch) axis that ``dims`` leaves unset: generated inputs and timings
    would take 1 for them (a sequence of one token times and behaves like another model)."""
    return sorted({str(d) for _, shape in _declared(source) for d in shape[1:]
                   if not isinstance(d, int) and d is not None} - set(dims))


def dims_from_data(source: ort.InferenceSession | ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The symbolic dims past the first axis, as the data's arrays have them (the shapes the model really sees)."""
    found: dict[str, int] = {}
    for name, shape in _declared(source):
        array = feed.get(name)
        if array is None or array.ndim != len(shape):
            continue
        for axis, dim in enumerate(shape[1:], start=1):
            if isinstance(dim, str) and dim:
                found.setdefault(dim, int(array.shape[axis]))
    return found


def generated_batches(
    session: ort.InferenceSession,
    model: ir.Model | None,
    dims: Mapping[str, int],
    samples: int,
    seed: int = 0,
) -> list[Feed]:
    """``samples`` random feeds built from the input types and shapes; dynamic dims from ``dims`` (default 1).

    Floats are standard normal; inputs named like ``*mask*`` are all ones (a random 0/1 mask has holes
    that fused attention kernels, which read it as sequence lengths, do not support); other integers
    index validly into the embedding table they feed, else are 0 or 1.
    """
    check_dims({str(d) for arg in session.get_inputs() for d in arg.shape if not (isinstance(d, int) and d >= 0)}, dims)
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(model) if model is not None else {}
    batches: list[Feed] = []
    for _ in range(samples):
        feed: Feed = {}
        for node_arg in session.get_inputs():
            shape = [d if isinstance(d, int) and d >= 0 else dims.get(str(d), 1) for d in node_arg.shape]
            dtype = _input_dtype(node_arg)
            if np.issubdtype(dtype, np.floating):
                feed[node_arg.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[node_arg.name] = rng.integers(0, 2, shape).astype(bool)
            elif "mask" in node_arg.name.lower():  # attention masks: fused attention assumes right padding
                feed[node_arg.name] = np.ones(shape, dtype)
            elif np.issubdtype(dtype, np.integer):
                feed[node_arg.name] = rng.integers(0, bounds.get(node_arg.name, 2), shape).astype(dtype)
            else:
                raise UnsupportedModelError(f"cannot generate inputs of type {dtype} for {node_arg.name!r}; "
                                            "give `data`")
        batches.append(feed)
    return batches
