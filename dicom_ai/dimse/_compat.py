"""Where the DIMSE layer leans on pynetdicom's internals, fenced as in :mod:`dicom_ai._compat`.

Here rather than there because pynetdicom is imported only under ``dicom_ai/dimse/``. Each
function is for the pynetdicom version it was written for; on another it logs once and
takes pynetdicom's own path. Nothing is applied by importing this module.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import _config

from dicom_ai._compat import written_for

__all__ = [
    "PYNETDICOM",
    "association_socket",
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
