"""Child processes end with the node, also when it is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

__all__ = ["die_with_parent"]

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
