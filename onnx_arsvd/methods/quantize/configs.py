"""Quantization configs, one typed class per kind (:data:`QUANTIZERS` by mode name), light to import: each applies
itself through onnxruntime's quantizers (:mod:`.quantizers`, imported only then).

- :class:`Int8Dynamic` (``int8``): ``quantize_dynamic``, signed per-channel weights; ``reduce_range`` (7-bit weights)
  by default on CPUs without VNNI, where the u8 x s8 kernels can saturate (signed INT8 lost 8.8 points on the
  Fashion MLP there).
- :class:`Int4WeightOnly` (``int4``): ``MatMulNBits``, weight-only, blockwise, symmetric.
- :class:`Int8WithInt4Tables` (``int8+int4-tables``): embedding tables 4-bit blockwise, every other layer ``int8``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from onnx_arsvd.errors import InvalidInputError

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

__all__ = ["QUANTIZERS", "Int4WeightOnly", "Int8Dynamic", "Int8WithInt4Tables", "Quantization", "cpu_has_vnni",
           "quantization"]

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_vnni(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX); False when unknown."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return bool(flags & VNNI_FLAGS)


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise InvalidInputError(f"int4 block size must be a power of 2, at least 16, got {block_size}")


def _int8_text(reduce_range: bool) -> str:
    return f"int8 dynamic (per-channel{', reduce_range' if reduce_range else ''})"


@dataclass(frozen=True)
class Int8Dynamic:
    """Dynamic INT8 on every op type onnxruntime quantizes but ``Conv``; ``reduce_range`` None: on CPUs without VNNI."""

    reduce_range: bool | None = None
    mode: ClassVar[str] = "int8"

    @property
    def uses_reduce_range(self) -> bool:
        return (not cpu_has_vnni()) if self.reduce_range is None else self.reduce_range

    def describe(self) -> str:
        return _int8_text(self.uses_reduce_range)

    def apply(self, model: ir.Model | onnx.ModelProto, scratch: Path | None = None) -> onnx.ModelProto:
        """The quantized model (the input is not modified); the quantizer's copies go into ``scratch``."""
        from onnx_arsvd.methods.quantize.quantizers import int8_dynamic

        return int8_dynamic(model, self.uses_reduce_range, scratch)


@dataclass(frozen=True)
class Int4WeightOnly:
    """4-bit weight-only ``MatMulNBits`` in blocks of ``block_size`` (``accuracy_level``: MatMulNBits' own)."""

    block_size: int = 32
    accuracy_level: int | None = None
    mode: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        _check_block(self.block_size)

    def describe(self) -> str:
        return f"int4 weight-only (MatMulNBits, block {self.block_size}, symmetric)"

    def apply(self, model: ir.Model | onnx.ModelProto, scratch: Path | None = None) -> onnx.ModelProto:
        """The quantized model (the input is not modified)."""
        from onnx_arsvd.methods.quantize.quantizers import int4_weight_only

        return int4_weight_only(model, self.block_size, self.accuracy_level)


@dataclass(frozen=True)
class Int8WithInt4Tables:
    """Embedding tables 4-bit in blocks of ``block_size`` along the hidden axis, then :class:`Int8Dynamic`."""

    reduce_range: bool | None = None
    block_size: int = 32
    mode: ClassVar[str] = "int8+int4-tables"

    def __post_init__(self) -> None:
        _check_block(self.block_size)

    def describe(self) -> str:
        int8 = Int8Dynamic(self.reduce_range)
        return f"{int8.describe()}, embedding tables int4 (block {self.block_size}, symmetric)"

    def apply(self, model: ir.Model | onnx.ModelProto, scratch: Path | None = None) -> onnx.ModelProto:
        """The quantized model (the input is not modified); the quantizer's copies go into ``scratch``."""
        from onnx_arsvd.methods.quantize.quantizers import int8_with_int4_tables

        return int8_with_int4_tables(model, Int8Dynamic(self.reduce_range).uses_reduce_range, self.block_size,
                                     scratch)


Quantization = Int8Dynamic | Int4WeightOnly | Int8WithInt4Tables
"""Any quantization config."""

QUANTIZERS: dict[str, type[Int8Dynamic] | type[Int4WeightOnly] | type[Int8WithInt4Tables]] = {
    cls.mode: cls for cls in (Int8Dynamic, Int4WeightOnly, Int8WithInt4Tables)}


def quantization(mode: str) -> Quantization:
    """The config of a mode name, with its defaults."""
    if mode not in QUANTIZERS:
        raise InvalidInputError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANTIZERS)}")
    return QUANTIZERS[mode]()
