"""Scratch storage on disk for factors, so compressing a big model holds about one layer's factors in memory.

A :class:`Spill` is one append-only file in the run's staging folder beside the output (see
:mod:`onnx_arsvd.io.output`: removed when the run ends, and by a later run if this one was killed).
Factors are spilled as soon as a weight is planned (:meth:`Spill.array`: a read-only memory map whose
pages are read back only when used), and the rewritten model's factor initializers point into the file
(:meth:`Spill.tensor`: an ``onnx_ir.ExternalTensor``), which ``ir.save`` copies into the output's
external data file in the kernel (``copy_file_range``) without reading it into this process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import OutputError

__all__ = ["Spill", "spill_into"]

_ALIGNMENT = 64
"""Byte alignment of every array in the file (a memory map's view must be aligned to its dtype)."""


class Spill:
    """An append-only file of arrays in ``folder``."""

    def __init__(self, folder: Path, name: str = "factors.bin") -> None:
        self.folder = folder
        self.name = name
        self.path = folder / name
        try:
            self._file = self.path.open("xb")
        except OSError as error:
            raise OutputError(f"{folder.parent}: cannot write scratch data ({error.strerror or error})") from error
        self.bytes_written = 0
        self._lock = threading.Lock()

    def _append(self, array: np.ndarray) -> int:
        """Write ``array`` (C order) at the next aligned offset; return that offset. Safe from several threads."""
        with self._lock:
            padding = -self._file.tell() % _ALIGNMENT
            if padding:
                self._file.write(b"\0" * padding)
            offset = self._file.tell()
            try:
                np.ascontiguousarray(array).tofile(self._file)
                self._file.flush()
            except OSError as error:
                raise OutputError(f"{self.folder.parent}: cannot write scratch data "
                                  f"({error.strerror or error})") from error
            self.bytes_written += array.nbytes
            return offset

    def array(self, array: np.ndarray) -> np.ndarray:
        """``array`` moved to the file: a read-only memory map of the same dtype, shape and values."""
        if array.size == 0:
            return array
        offset = self._append(array)
        return np.memmap(self.path, dtype=array.dtype, mode="r", offset=offset, shape=array.shape)

    def tensor(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        """``array`` moved to the file, as an initializer's tensor that points into it."""
        offset = self._append(array)
        return ir.ExternalTensor(self.name, offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                 shape=ir.Shape(array.shape), name=name, base_dir=os.fspath(self.folder))

    def close(self) -> None:
        self._file.close()


@contextmanager
def spill_into(folder: Path) -> Iterator[Spill]:
    """A :class:`Spill` in ``folder`` (the run's staging folder beside the output: the same file system, so the
    output's data is copied from it in the kernel); its file is removed on leaving."""
    spill = Spill(folder)
    try:
        yield spill
    finally:
        spill.close()
        spill.path.unlink(missing_ok=True)
