"""The one place that writes: path checks before any work, staging beside the target, placement last.

Every path a run writes is checked against every path it reads, and against each other, before any
work: same resolved path or same inode (hard links) is a clash. Whatever a run writes (the model and its
external data, a report, a plot, scratch factors, the quantizer's temporary copy) is first written into a
hidden staging folder beside its target, and placed (renamed into the target's folder) only when the
whole run succeeded.

What is removed, and why it is safe:

- A staging folder (``.onnx-arsvd-staging-*``) holds a lock file that its run locks (``flock``) for as long
  as it lives and in which it writes a marker once it holds the lock. A run removes its own folder when
  it ends. A folder left by a killed run is removed by a later ``compress`` writing into the same folder,
  and only when the folder is a real directory (not a symlink) owned by the same user, its lock file is a
  regular file holding the marker, the lock is free (so its writer is gone, whatever PID namespace or host
  it ran in), and it holds none of the run's inputs. Read-only commands remove nothing.
- A model placed with external data records its data file's name and a random token in its metadata
  (:data:`DATA_KEY`) and ends the data file with the same token. Writing over that model later removes the
  old data file only when that record, the token at the file's end, the file's name
  (``<model name>.<8 hex>.data`` in the same folder) and its kind (a regular file, not a symlink, owned by
  the same user, not an input of the run) all agree.
- The data file of a placement that a kill interrupted (the data moved, the model not yet) is named in a
  journal inside the staging folder, and removed with that folder under the same checks, unless the model
  in place names it.

Placements into one folder take a lock on that folder (``flock`` on the directory), so two runs writing
the same output cannot orphan each other's data files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_arsvd.errors import OutputError
from onnx_arsvd.io.models import EXTERNAL_DATA_THRESHOLD, external_data_files, weight_stats
from onnx_arsvd.io.paths import PathLike, listed, output_path, same_file

__all__ = [
    "DATA_KEY",
    "STAGING_PREFIX",
    "Staged",
    "StagingFolder",
    "clean_stale",
    "place_all",
    "save_model",
    "stage_file",
    "stage_model",
    "write_file",
    "write_text",
]

STAGING_PREFIX = ".onnx-arsvd-staging-"
LOCK_NAME = "lock"
"""The lock file inside each staging folder, locked by its run while the run lives."""
_LOCK_MARKER = b"onnx-arsvd staging folder\n"
_JOURNAL_NAME = "placing.json"
DATA_KEY = "onnx_arsvd.external_data"
"""Model metadata key: ``<data file name> <token>`` of the external data file this tool wrote for the model."""
_DATA_MARK = b"\nonnx-arsvd external data "


# --- staging folders ----------------------------------------------------------------------------------------------

def _os_error(where: Path, doing: str, error: OSError) -> OutputError:
    return OutputError(f"{where}: cannot {doing} ({error.strerror or error})")


class StagingFolder:
    """A hidden folder in ``parent``, locked while this run lives; :meth:`close` removes it.

    Everything a run writes into ``parent`` is written here first.
    """

    def __init__(self, parent: Path, doing: str = "write the output") -> None:
        try:
            self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
        except OSError as error:
            raise _os_error(parent, doing, error) from error
        try:
            self._lock = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            os.write(self._lock, _LOCK_MARKER)  # only now may a later run, finding the lock free, remove the folder
        except OSError as error:
            shutil.rmtree(self.path, ignore_errors=True)
            raise _os_error(parent, doing, error) from error

    def close(self) -> None:
        """Remove the folder, then release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)

    def __enter__(self) -> StagingFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _owned_regular(path: Path, kind: int) -> os.stat_result | None:
    """``lstat`` of ``path`` when it is of ``kind`` (``stat.S_IFDIR``/``S_IFREG``), not a symlink, and this user's."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return info if stat.S_IFMT(info.st_mode) == kind and info.st_uid == os.geteuid() else None


def _holds(folder: Path, paths: Iterable[Path]) -> bool:
    """Whether any of ``paths`` (resolved) lies in ``folder``."""
    real = Path(os.path.realpath(folder))
    return any(Path(os.path.realpath(p)).is_relative_to(real) for p in paths)


def _abandoned(folder: Path) -> bool:
    """Whether ``folder`` is a staging folder of this tool whose run is gone (see the module's docstring)."""
    if _owned_regular(folder, stat.S_IFDIR) is None or _owned_regular(folder / LOCK_NAME, stat.S_IFREG) is None:
        return False
    try:
        lock = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its run is alive
            return False
        return os.read(lock, len(_LOCK_MARKER) + 1) == _LOCK_MARKER
    finally:
        os.close(lock)


def clean_stale(folder: Path, inputs: Iterable[PathLike] = ()) -> None:
    """Remove the staging folders in ``folder`` left by runs that were killed, and the data file each was placing.

    A folder that holds any of ``inputs`` is left alone.
    """
    keep = listed(inputs)
    try:
        entries = [entry for entry in folder.iterdir() if entry.name.startswith(STAGING_PREFIX)]
    except OSError:
        return
    for entry in entries:
        if _holds(entry, keep) or not _abandoned(entry):
            continue
        _remove_orphan(entry, keep)
        shutil.rmtree(entry, ignore_errors=True)


# --- external data files this tool wrote ------------------------------------------------------------------------

def _data_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"\.[0-9a-f]{8}\.data")


def _ends_with_token(path: Path, token: str) -> bool:
    mark = _DATA_MARK + token.encode()
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as file:
            file.seek(0, os.SEEK_END)
            if file.tell() < len(mark):
                return False
            file.seek(-len(mark), os.SEEK_END)
            return file.read() == mark
    except OSError:
        return False


def _ours(folder: Path, model_name: str, data_name: str, token: str, keep: Iterable[Path]) -> Path | None:
    """``folder/data_name`` when it is a data file this tool wrote for ``model_name`` with ``token`` and no input."""
    if not _data_pattern(model_name).fullmatch(data_name) or not re.fullmatch(r"[0-9a-f]{32}", token):
        return None
    path = folder / data_name
    info = _owned_regular(path, stat.S_IFREG)
    if info is None or any(same_file(path, other) for other in keep) or not _ends_with_token(path, token):
        return None
    return path


def _recorded_data(model_path: Path) -> tuple[str, str] | None:
    """(data file name, token) that the model at ``model_path`` records (:data:`DATA_KEY`), if any."""
    if _owned_regular(model_path, stat.S_IFREG) is None:
        return None
    try:
        proto = onnx.load(model_path, load_external_data=False)
    except Exception:  # not a model: nothing of it is ours to remove
        return None
    record = next((entry.value for entry in proto.metadata_props if entry.key == DATA_KEY), "")
    name, _, token = record.partition(" ")
    return (name, token) if name and token else None


def _remove_orphan(staging: Path, keep: list[Path]) -> None:
    """The data file an abandoned placement (journal in ``staging``) moved into place before it was killed."""
    try:
        journal = json.loads((staging / _JOURNAL_NAME).read_text())
        model_name, data_name, token = journal["model"], journal["data"], journal["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not all(isinstance(part, str) and os.sep not in part for part in (model_name, data_name, token)):
        return
    if _recorded_data(staging.parent / model_name) == (data_name, token):
        return  # the model was placed too: the data is in use
    if (orphan := _ours(staging.parent, model_name, data_name, token, keep)) is not None:
        orphan.unlink(missing_ok=True)


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the directory) while placing into it."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise _os_error(folder, "move the output into place", error) from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


# --- writing and placing ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StagedFile:
    """A file written into its staging folder (:attr:`path`), to be renamed to :attr:`target`."""

    path: Path
    target: Path

    def place(self) -> Path:
        try:
            os.replace(self.path, self.target)
        except OSError as error:
            raise _os_error(self.target, "move the output into place", error) from error
        return self.target


@dataclass(frozen=True)
class Staged:
    """A model written into its staging folder: check :attr:`path`, then :meth:`place` it.

    With external data, :attr:`data_name` is its file (beside :attr:`path`) and :attr:`token` the random token
    that the model's metadata and the file's last bytes share.
    """

    path: Path
    target: Path
    data_name: str | None
    token: str | None
    keep: frozenset[Path]
    """The run's inputs: never removed as an old output's data."""

    def place(self) -> Path:
        """Move the data, then the model into place; then remove the data file the replaced output used."""
        folder = self.target.parent
        with _folder_locked(folder):
            previous = _recorded_data(self.target)
            old = _ours(folder, self.target.name, *previous, self.keep) if previous else None
            try:
                if self.data_name is not None:
                    destination = folder / self.data_name
                    if os.path.lexists(destination):
                        raise OutputError(f"{destination}: exists; run again")
                    journal = {"model": self.target.name, "data": self.data_name, "token": self.token}
                    (self.path.parent / _JOURNAL_NAME).write_text(json.dumps(journal))
                    os.replace(self.path.parent / self.data_name, destination)
                os.replace(self.path, self.target)
            except OSError as error:
                raise _os_error(self.target, "move the output into place", error) from error
            if old is not None and old.name != self.data_name:
                old.unlink(missing_ok=True)
        return self.target


def place_all(staged: Iterable[Staged | StagedFile]) -> None:
    """Place each staged output in turn (a model's data before the model)."""
    for item in staged:
        item.place()


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


def _save(model: ir.Model, path: Path, data_name: str | None, token: str) -> str | None:
    """Write ``model`` to ``path`` (external data in ``data_name`` beside it, recorded and marked); the data file's
    name, or None when no tensor went to it."""
    if data_name is None:
        ir.save(model, path)
        return None
    model.metadata_props[DATA_KEY] = f"{data_name} {token}"
    try:
        ir.save(model, path, external_data=data_name)
    finally:
        del model.metadata_props[DATA_KEY]
    data = path.parent / data_name
    if not data.exists():
        data.touch()  # every tensor stayed inline: an empty data file keeps the record true
    with open(data, "ab") as file:
        file.write(_DATA_MARK + token.encode())
    return data_name


@contextmanager
def stage_model(model: ir.Model, output: PathLike, *, external_data: bool | None = None,
                keep: Iterable[PathLike] = ()) -> Iterator[Staged]:
    """Write ``model`` into a staging folder beside ``output``; the folder is removed on leaving.

    ``external_data=None`` chooses: external when the weights exceed :data:`EXTERNAL_DATA_THRESHOLD`
    or the model already had external data. Tensors in attributes (``Constant`` nodes) are written
    inline, so the output never points back at the input's files. Abandoned staging in the output's folder
    is removed first (:func:`clean_stale`), never a folder holding one of ``keep``.
    """
    target = output_path(output)
    keep_paths = listed(keep)
    if external_data is None:
        external_data = bool(external_data_files(model)) or weight_stats(model)[1] > EXTERNAL_DATA_THRESHOLD
    clean_stale(target.parent, keep_paths)
    with StagingFolder(target.parent) as staging:
        token = secrets.token_hex(16)
        _inline_attribute_data(model)
        staged = staging.path / target.name
        try:
            data_name = _save(model, staged, f"{target.name}.{secrets.token_hex(4)}.data" if external_data else None,
                              token)
        except OSError as error:
            raise _os_error(target, "write the output", error) from error
        yield Staged(staged, target, data_name, token if data_name else None, frozenset(keep_paths))


@contextmanager
def stage_file(path: PathLike, write: Callable[[Path], object], what: str = "output") -> Iterator[StagedFile]:
    """Call ``write(temporary)`` in a staging folder beside ``path``; the staged file, to place, or nothing on
    failure. The file is created with the user's umask, as ``open`` does."""
    target = output_path(path, what)
    with StagingFolder(target.parent) as staging:
        temporary = staging.path / target.name
        try:
            write(temporary)
        except OSError as error:
            raise OutputError(f"{os.fspath(path)}: cannot write the {what} ({error.strerror or error})") from error
        yield StagedFile(temporary, target)


def write_file(path: PathLike, write: Callable[[Path], object], what: str = "output") -> Path:
    """Call ``write(temporary)`` beside ``path``, then rename it into place; no file is left on failure."""
    with stage_file(path, write, what) as staged:
        return staged.place()


def write_text(path: PathLike, text: str, what: str = "report") -> Path:
    """Write ``text`` and a newline to ``path`` through :func:`write_file`."""
    return write_file(path, lambda temporary: temporary.write_text(text + "\n"), what)


def save_model(model: ir.Model, output: PathLike, *, external_data: bool | None = None) -> Path:
    """Stage ``model`` beside ``output`` and move it into place (no check in between)."""
    with stage_model(model, output, external_data=external_data) as staged:
        return staged.place()

