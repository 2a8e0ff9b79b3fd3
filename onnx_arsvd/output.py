"""The one place that writes: path checks before any work, staging beside the target, placement last.

Every path a run writes is checked against every path it reads, and against each other, before any
work: same resolved path or same inode (hard links) is a clash. A model is written into a hidden
``.onnx-arsvd-<pid>-*`` folder beside its target, checked there by the caller, and only then moved
into place. Its external data gets a fresh name each write (``<name>.<8 hex>.data``) and is moved
first, so an interruption between the two renames leaves the old model with its old data. Reports
and plots go through a temporary file the same way. Staging left behind by a killed run (its pid
is gone) is removed by the next run that writes into the same folder.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, OutputError
from onnx_arsvd.model_io import EXTERNAL_DATA_THRESHOLD, external_data_files, proto_tensors, weight_stats

__all__ = [
    "STAGING_PREFIX",
    "Staged",
    "check_paths",
    "clean_stale",
    "output_path",
    "save_model",
    "stage_model",
    "write_file",
    "write_text",
]

STAGING_PREFIX = ".onnx-arsvd-"
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


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_paths(outputs: Mapping[str, PathLike | None],
                inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> None:
    """Fail before any work when an output is not writable or is an input or another output.

    ``outputs`` and ``inputs`` map a description (``"-o"``, ``"--data"``) to a path; an input may
    map to several paths (a model's external data files).
    """
    written = [(what, output_path(path, what)) for what, path in outputs.items() if path is not None]
    read: list[tuple[str, Path]] = []
    for what, paths in inputs.items():
        if paths is None:
            continue
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            read.append((what, Path(os.path.abspath(path))))
    for index, (what, path) in enumerate(written):
        for other, source in read:
            if _same_file(path, source):
                raise InvalidInputError(f"{os.fspath(path)}: {what} would overwrite the {other} file; "
                                        "choose another path")
        for other, earlier in written[:index]:
            if _same_file(path, earlier):
                raise InvalidInputError(f"{os.fspath(path)}: {what} and {other} name the same file")


def _writer_gone(name: str) -> bool:
    match = re.match(re.escape(STAGING_PREFIX) + r"(\d+)-", name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def clean_stale(folder: Path) -> None:
    """Remove staging folders and temporary files in ``folder`` whose writing process is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(STAGING_PREFIX) and _writer_gone(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _temporary_name(target: Path) -> Path:
    return target.parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"


def write_file(path: PathLike, write: Callable[[Path], object], what: str = "output") -> Path:
    """Call ``write(temporary)`` beside ``path``, then rename it into place; no file is left on failure.

    The file is created with the user's umask, as ``open`` does.
    """
    target = output_path(path, what)
    clean_stale(target.parent)
    temporary = _temporary_name(target)
    try:
        write(temporary)
        os.replace(temporary, target)
    except OSError as error:
        raise OutputError(f"{os.fspath(path)}: cannot write the {what} ({error.strerror or error})") from error
    finally:
        temporary.unlink(missing_ok=True)
    return target


def write_text(path: PathLike, text: str, what: str = "report") -> Path:
    """Write ``text`` and a newline to ``path`` through :func:`write_file`."""
    return write_file(path, lambda temporary: temporary.write_text(text + "\n"), what)


def _data_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"\.[0-9a-f]{8}\.data")


def _inline_attribute_data(model: ir.Model) -> None:
    """Read external tensors held in attributes into memory: ``ir.save`` writes only initializers out."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attribute in node.attributes.values():
            if attribute.is_ref():
                continue
            if attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                node.attributes[attribute.name] = ir.AttrTensor(attribute.name, _in_memory(attribute.value))
            elif attribute.type == ir.AttributeType.TENSORS and any(
                isinstance(t, ir.ExternalTensor) for t in attribute.value
            ):
                tensors = [_in_memory(t) for t in attribute.value]
                node.attributes[attribute.name] = ir.AttrTensors(attribute.name, tensors)


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name)


@dataclass
class Staged:
    """A model written into its staging folder: check :attr:`path`, then :meth:`place` it."""

    path: Path
    target: Path
    data_name: str | None
    keep: frozenset[Path]
    """Files never removed as an old output's data (the run's inputs)."""

    def place(self) -> Path:
        """Move the data, then the model into place; then remove the data file the replaced output used."""
        previous = _own_data_files(self.target)
        try:
            if self.data_name is not None:
                destination = self.target.parent / self.data_name
                if destination.exists():
                    raise OutputError(f"{destination}: exists; run again")
                os.replace(self.path.parent / self.data_name, destination)
            os.replace(self.path, self.target)
        except OSError as error:
            raise OutputError(f"{self.target}: cannot move the output into place "
                              f"({error.strerror or error})") from error
        for path in previous - self.keep:
            if path.name != self.data_name:
                path.unlink(missing_ok=True)
        return self.target


def _own_data_files(model_path: Path) -> set[Path]:
    """The data files an earlier output at ``model_path`` refers to that this tool named (``<name>.<hex>.data``)."""
    if not model_path.is_file():
        return set()
    try:
        proto = onnx.load(model_path, load_external_data=False)
    except Exception:  # not a model we wrote: nothing of it is ours to remove
        return set()
    pattern = _data_pattern(model_path.name)
    locations = {entry.value for tensor in proto_tensors(proto) for entry in tensor.external_data
                 if entry.key == "location"}
    return {(model_path.parent / name).resolve() for name in locations if pattern.fullmatch(name)}


@contextmanager
def stage_model(model: ir.Model, output: PathLike, *, external_data: bool | None = None,
                keep: Iterable[PathLike] = ()) -> Iterator[Staged]:
    """Write ``model`` into a staging folder beside ``output``; the folder is removed on leaving.

    ``external_data=None`` chooses: external when the weights exceed :data:`EXTERNAL_DATA_THRESHOLD`
    or the model already had external data. Tensors in attributes (``Constant`` nodes) are written
    inline, so the output never points back at the input's files.
    """
    target = output_path(output)
    if external_data is None:
        external_data = bool(external_data_files(model)) or weight_stats(model)[1] > EXTERNAL_DATA_THRESHOLD
    clean_stale(target.parent)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=target.parent))
    except OSError as error:
        raise OutputError(f"{target.parent}: cannot write the output ({error.strerror or error})") from error
    try:
        data_name = f"{target.name}.{secrets.token_hex(4)}.data" if external_data else None
        _inline_attribute_data(model)
        staged = folder / target.name
        try:
            ir.save(model, staged, external_data=data_name)
        except OSError as error:
            raise OutputError(f"{target}: cannot write the output ({error.strerror or error})") from error
        yield Staged(staged, target, data_name, frozenset(Path(p).resolve() for p in keep))
    finally:
        shutil.rmtree(folder, ignore_errors=True)



def save_model(model: ir.Model, output: PathLike, *, external_data: bool | None = None) -> Path:
    """Stage ``model`` beside ``output`` and move it into place (no check in between)."""
    with stage_model(model, output, external_data=external_data) as staged:
        return staged.place()
