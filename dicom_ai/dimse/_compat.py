"""Where the DIMSE layer leans on pynetdicom's internals, fenced as in :mod:`dicom_ai._compat`.

Here rather than there because pynetdicom is imported only under ``dicom_ai/dimse/``. Each
function is for the pynetdicom version it was written for; on another it logs once and
takes pynetdicom's own path. Nothing is applied by importing this module.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pynetdicom import _config

from dicom_ai._compat import written_for

__all__ = [
    "PYNETDICOM",
    "association_socket",
    "pause_reactor_safely",
    "pynetdicom_send_chunked_datasets",
    "pynetdicom_unrestricted_storage",
]

PYNETDICOM = "3.0.4"


def pynetdicom_send_chunked_datasets() -> bool:
    """Have ``Association.send_c_store(path)`` stream the file's data set from disk as it
    is, instead of decoding it with pydicom and encoding it again. Returns whether it is on.

    Why: result files (SEGs) can be large, and the SCU sends each file in the transfer
    syntax it was written in (one presentation context per SOP class and transfer syntax),
    so there is nothing to convert. The switch is ``pynetdicom._config``'s, process-wide;
    setting it again is harmless, and it is set at every send so that whatever else in the
    process turned it off cannot leave the SCU decoding.

    Fallback (another pynetdicom): left as it is; pynetdicom reads each file and encodes
    it again, which sends the same data set.
    """
    if not written_for("pynetdicom", PYNETDICOM, "pynetdicom_send_chunked_datasets"):
        return False
    _config.STORE_SEND_CHUNKED_DATASET = True
    return True


def pynetdicom_unrestricted_storage() -> bool:
    """Have pynetdicom's acceptor take any storage, unknown or private abstract syntax with
    the first transfer syntax proposed, as the fast acceptor negotiates. Returns whether
    it is on.

    Why: a modality's private SOP classes must not be refused by one acceptor and taken by
    the other. The switch is ``pynetdicom._config``'s, process-wide, and only concerns
    association acceptors (the node's SCU requests its contexts one by one).

    Fallback (another pynetdicom): left as it is; only the node's supported presentation
    contexts are accepted.
    """
    if not written_for("pynetdicom", PYNETDICOM, "pynetdicom_unrestricted_storage"):
        return False
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    return True


def association_socket(assoc: Any) -> socket.socket | None:
    """The TCP socket under an established association (``assoc.dul.socket.socket``),
    for socket options pynetdicom does not set (TCP_NODELAY); None when there is none.

    Why: pynetdicom sends a C-STORE as several writes (command, then data set fragments);
    with Nagle's algorithm the peer's delayed ACK stalls each one.

    Fallback (another pynetdicom): None; the socket keeps pynetdicom's options.
    """
    if not written_for("pynetdicom", PYNETDICOM, "association_socket"):
        return None
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    return sock if isinstance(sock, socket.socket) else None


class _ReactorCheckpoint:
    """``Association._reactor_checkpoint`` (a ``threading.Event`` there, used through
    ``set``, ``clear`` and ``wait``) whose ``wait`` marks the reactor running again while
    it still holds the lock that ``clear`` takes.

    pynetdicom's reactor sets ``_is_paused = True``, waits on the checkpoint, then sets
    ``_is_paused = False``. A ``send_c_store`` that clears the checkpoint between the wait
    returning and that last assignment sees the stale ``True``, sends, and the reactor,
    running on, takes the C-STORE-RSP off the queue ("unexpected C-STORE service message"):
    the send waits out the DIMSE timeout. Here the sender sees either a reactor that will
    block, or one that is running and will pause at its next round.
    """

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._cond = threading.Condition(threading.Lock())
        self._flag = True

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            signaled = self._cond.wait_for(lambda: self._flag, timeout)
            if signaled:
                self._assoc._is_paused = False
            return signaled


def pause_reactor_safely(assoc: Any) -> bool:
    """Give an established association a `_ReactorCheckpoint`, so a response is never
    taken by its reactor (see there). Returns whether it is in place.

    Why: found by the retention soak test (tests/node/test_retention_soak.py): under CPU
    load about 1 association in 50 lost a C-STORE-RSP, and every delivery behind it waited
    ``delivery.timeout_seconds``. The race is in pynetdicom 3.0.4 and its main branch.

    Fallback (another pynetdicom): pynetdicom's own Event; the race stays.
    """
    if not written_for("pynetdicom", PYNETDICOM, "pause_reactor_safely"):
        return False
    old = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(old, threading.Event) or not old.is_set():
        return False  # not the state this was written for: leave it
    # The reactor looks the attribute up at each round; the old Event stays set, so a
    # reactor waiting on it now returns at once.
    assoc._reactor_checkpoint = _ReactorCheckpoint(assoc)
    return True
