"""Wait until creating a file costs what it costs on a quiet filesystem, and say what it cost.

This machine's root filesystem is ext4 without a journal. There, the kernel does not hand out
an inode freed in the last minute or so (``recently_deleted``, longer while the inode table
is not written back) and looks past each such inode for a free one: after a benchmark or the
test suite deletes a few thousand files, every new file costs 0.3-1 ms of CPU instead of
~0.07 ms, for a minute or more. Every receiver here writes one file per instance, the node
and the peers alike, so each benchmark first waits for that cost to fall (or a time limit)
and prints it beside its figures.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

_CALM_MS = 0.15
_PROBE_FILES = 100


def file_create_ms(folder: Path) -> float:
    """Median wall time of creating one empty file in ``folder`` (the files stay)."""
    folder.mkdir(parents=True, exist_ok=True)
    times = []
    for _ in range(_PROBE_FILES):
        path = folder / f"probe-{time.monotonic_ns()}"
        started = time.perf_counter()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def settle(folder: Path, limit_seconds: float = 120.0) -> str:
    """Wait (at most ``limit_seconds``) for file creation in ``folder`` to be cheap again;
    a line that says what it cost and how long it took."""
    started = time.monotonic()
    cost = file_create_ms(folder)
    while cost > _CALM_MS and time.monotonic() - started < limit_seconds:
        time.sleep(10)
        cost = file_create_ms(folder)
    waited = time.monotonic() - started
    state = "calm" if cost <= _CALM_MS else f"not calm after {limit_seconds:.0f} s"
    return f"file creation here: {cost:.2f} ms ({state}; waited {waited:.0f} s)"
