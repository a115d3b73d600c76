"""Process lifetimes: child processes end with the node, also when it is killed with
SIGKILL; a process's main thread waits for the stop its signal handler asks for."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
from multiprocessing.process import BaseProcess

__all__ = ["die_with_parent", "stop_child", "wait_for_stop"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent exits (Linux ``PR_SET_PDEATHSIG``).

    After a ``kill -9`` of the node, a child left running would keep its port or finish a
    job the restarted node runs again. Call first thing in the child.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's daemon flag still applies
        log.debug("PR_SET_PDEATHSIG not available")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def wait_for_stop(stop: threading.Event) -> None:
    """Return once ``stop`` is set, by a signal handler too. Timed: the kernel may hand a
    process's SIGTERM to any thread, and then the handler runs only at the main thread's
    next bytecode, which an untimed wait never reaches."""
    while not stop.wait(0.05):
        pass


def stop_child(process: BaseProcess | None, timeout: float = 10) -> None:
    """SIGTERM a child process and wait ``timeout`` seconds for it, then SIGKILL it."""
    if process is None or process.pid is None or not process.is_alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    process.join(timeout=timeout)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)
