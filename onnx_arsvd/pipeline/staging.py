"""Where a run writes: its scratch folder, and the output pending placement with whatever is staged beside it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from onnx_arsvd.io.output import StagedFile, StagingFolder, clean_stale, stage_file
from onnx_arsvd.io.paths import output_path
from onnx_arsvd.report.model_report import Report

__all__ = ["PendingOutput", "scratch_folder"]


class PendingOutput:
    """The compressed model written and checked in its staging folder, not yet placed (see ``before_placing`` in
    :func:`onnx_arsvd.api.compress`): :attr:`path` is the staged model file (None without an output path),
    :attr:`report` the run's report; :meth:`stage` adds a file to place with the model."""

    def __init__(self, path: Path | None, report: Report, run: ExitStack) -> None:
        self.path, self.report = path, report
        self._run = run
        self.staged: list[StagedFile] = []

    def stage(self, path: str | os.PathLike, write: Callable[[Path], object], what: str = "output") -> None:
        """Call ``write(temporary)`` in a staging folder beside ``path``; the file is placed with the model."""
        self.staged.append(self._run.enter_context(stage_file(path, write, what)))


@contextmanager
def scratch_folder(output: str | os.PathLike | None, inputs: Sequence[Path]) -> Iterator[StagingFolder]:
    """A staging folder for the run's scratch files: beside the output, else in the system's temporary folder
    (after removing, there, the staging that killed runs left)."""
    if output is not None:
        parent, doing = output_path(output).parent, "write the output"
    else:
        parent, doing = Path(tempfile.gettempdir()), "write scratch files in the temporary folder"
    clean_stale(parent, inputs)
    with StagingFolder(parent, doing) as folder:
        yield folder
