"""Output paths checked before any work: writable, a regular file's name, and no input or other output."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from onnx_arsvd.errors import InvalidInputError

__all__ = ["PathLike", "check_paths", "listed", "output_path", "same_file"]

PathLike = str | os.PathLike


def output_path(path: PathLike, what: str = "output") -> Path:
    """``path`` as an absolute path a regular file can be written to, else a one-line error."""
    text = os.fspath(path)
    if text.strip() in ("", ".", ".."):
        raise InvalidInputError(f"{what} path {text!r} is not a file name")
    target = Path(os.path.abspath(text))
    if text.endswith((os.sep, "/")) or target.is_dir():
        raise InvalidInputError(f"{text}: the {what} path is a folder; name a file")
    if target.exists() and not target.is_file():
        raise InvalidInputError(f"{text}: the {what} path is not a regular file (a device, pipe or socket)")
    if not target.parent.is_dir():
        raise InvalidInputError(f"{target.parent}: {what} folder does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{target.parent}: {what} folder is not writable")
    return target


def same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def listed(paths: PathLike | Iterable[PathLike] | None) -> list[Path]:
    if paths is None:
        return []
    return [Path(os.path.abspath(p)) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]


def check_paths(outputs: Mapping[str, PathLike | None],
                inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> None:
    """Fail before any work when an output is not writable or is an input or another output.

    ``outputs`` and ``inputs`` map a description (``"-o"``, ``"--data"``) to a path; an input may
    map to several paths (a model's external data files).
    """
    written = [(what, output_path(path, what)) for what, path in outputs.items() if path is not None]
    read = [(what, path) for what, paths in inputs.items() for path in listed(paths)]
    for index, (what, path) in enumerate(written):
        for other, source in read:
            if same_file(path, source):
                raise InvalidInputError(f"{os.fspath(path)}: {what} would overwrite the {other} file; "
                                        "choose another path")
        for other, earlier in written[:index]:
            if same_file(path, earlier):
                raise InvalidInputError(f"{os.fspath(path)}: {what} and {other} name the same file")
