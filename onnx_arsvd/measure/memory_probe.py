"""Peak resident memory of a fresh process that loads one model and runs it.

Run as ``python -m onnx_arsvd.measure.memory_probe MODEL PROVIDER FEED.npz THREADS``: it prints one JSON
line with the resident set size before the session is created (after importing onnxruntime and
reading the feed) and the peak while creating it and running the feed three times. The kernel's
high-water mark is reset first where the kernel allows it (Linux's ``/proc/self/clear_refs``), because
importing onnxruntime alone peaks higher than a small model adds; elsewhere the peak includes the import and
the increase is not reported. Each model gets its own process, so two models never share a
heap and the high-water mark belongs to one model alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def reset_peak() -> bool:
    """Reset the peak resident set size to the current one; False where the kernel does not allow it (only Linux
    does, through ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resident() -> int:
    """This process's resident set size in bytes (psutil: any platform)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_resident() -> int:
    """This process's peak resident set size in bytes: Linux's ``VmHWM`` (which :func:`reset_peak` resets), else
    the peak working set on Windows, else ``ru_maxrss`` (kilobytes on Linux, bytes on macOS)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    import psutil

    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):
        return int(info.peak_wset)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def main(argv: list[str]) -> int:
    model, provider, feed_path, threads = argv
    import numpy as np

    from onnx_arsvd.measure.sessions import make_session  # imports onnxruntime: before the baseline is read

    with np.load(feed_path) as archive:
        feed = {name: archive[name] for name in archive.files}
    exact = reset_peak()
    baseline = resident()
    session = make_session(model, provider, int(threads), cpu_fallback=True)
    for _ in range(3):
        session.run(None, feed)
    print(json.dumps({"baseline": baseline, "peak": peak_resident(), "peak_reset": exact}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
