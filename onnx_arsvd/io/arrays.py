"""Arrays from an ``.npz`` file, read one at a time and only when asked for, each checked before it is allocated."""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onnx_arsvd.errors import InvalidInputError

__all__ = ["DataSource", "available_memory", "open_arrays"]

DataSource = str | os.PathLike | Mapping[str, np.ndarray]


def available_memory() -> int:
    """Bytes of memory available to new allocations without swapping, on any platform (psutil: MemAvailable on
    Linux)."""
    import psutil

    return int(psutil.virtual_memory().available)


class _Archive(Mapping[str, np.ndarray]):
    """The arrays of an open ``.npz``, each read only when asked for, after its declared size is checked.

    A member's ``.npy`` header declares its dtype and shape: a member whose declared size disagrees with what
    the archive says it holds, or exceeds the memory available, is refused before anything is allocated, so
    neither a member the model does not use nor a lying header can inflate into memory.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._zip = zipfile.ZipFile(path)
        self._members = {info.filename.removesuffix(".npy"): info for info in self._zip.infolist()
                         if not info.is_dir()}
        self._read: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._read:
            self._read[name] = self._load(self._members[name])
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def _load(self, info: zipfile.ZipInfo) -> np.ndarray:
        name = info.filename.removesuffix(".npy")
        with self._zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(member)
            if dtype.hasobject:
                raise ValueError(f"array {name!r} holds Python objects (samples of different lengths?): pad every "
                                 "sample to one length")
            declared = math.prod(shape) * dtype.itemsize
            stored = info.file_size - member.tell()
        if declared != stored:
            raise ValueError(f"array {name!r} declares shape {shape} of {dtype} ({declared} bytes) but holds "
                             f"{stored} bytes")
        if declared > available_memory() // 2:
            raise ValueError(f"array {name!r} declares {declared / 2**30:.1f} GiB ({shape} of {dtype}), more than "
                             "half the memory available")
        with self._zip.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    def close(self) -> None:
        self._zip.close()


def _what_instead(path: Path) -> str:
    """What a file that is not an ``.npz`` archive is, by its first bytes."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if head.startswith(b"\x93NUMPY"):
        return "is one .npy array, not an .npz archive of arrays keyed by input name"
    return "is not an .npz archive"


@contextmanager
def open_arrays(data: DataSource, what: str = "data") -> Iterator[Mapping[str, np.ndarray]]:
    """The arrays of an ``.npz`` path (each read when first asked for, see :class:`_Archive`; no pickles) or a
    mapping; a member that cannot be read is a one-line error naming the file."""
    if isinstance(data, Mapping):
        yield {str(key): np.asarray(value) for key, value in data.items()}
        return
    path = Path(data)
    if not path.is_file():
        raise InvalidInputError(f"{os.fspath(data)}: no such {what} file")
    try:
        archive = _Archive(path)
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise InvalidInputError(f"{path}: {_what_instead(path)}; save the inputs as an .npz of arrays keyed by "
                                "the model's input names, e.g. np.savez(path, input_ids=..., attention_mask=...)"
                                ) from error
    try:
        yield archive
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as error:
        raise InvalidInputError(f"{path}: not a readable .npz file ({error})") from error
    finally:
        archive.close()
