"""Peers that misbehave on the wire, and a C-STORE that reports the status it got.

The PDUs are written by hand (PS3.8 9.3) so a test controls every byte: an association
request, then whatever the test wants to do wrong after it.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

__all__ = ["associate", "c_store_status", "p_data_header", "read_pdu"]

_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _associate_rq(called: str, calling: str, sop_class: str, transfer_syntax: str) -> bytes:
    context = _item(
        0x20,
        bytes([1, 0, 0, 0])  # presentation context ID 1
        + _item(0x30, sop_class.encode())
        + _item(0x40, transfer_syntax.encode()),
    )
    user_information = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + _item(0x10, _APPLICATION_CONTEXT)
        + context
        + user_information
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU: (type, body)."""
    header = _read_exactly(sock, 6)
    (length,) = struct.unpack(">I", header[2:])
    return header[0], _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def associate(
    port: int,
    sop_class: str,
    called: str = "DICOM_AI",
    calling: str = "RAWPEER",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> socket.socket:
    """A socket with an accepted association (presentation context 1), nothing sent after."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_associate_rq(called, calling, sop_class, transfer_syntax))
    pdu_type, _ = read_pdu(sock)
    if pdu_type != 0x02:
        sock.close()
        raise ConnectionError(f"association not accepted: PDU type 0x{pdu_type:02X}")
    return sock


def p_data_header(announced_length: int, context_id: int = 1, command: bool = True) -> bytes:
    """A P-DATA-TF PDU header and the start of its one PDV, announcing more than may follow."""
    pdv_length = announced_length - 4
    control = 0x03 if command else 0x02  # last fragment; command or data set
    return struct.pack(">BBI", 0x04, 0, announced_length) + struct.pack(
        ">IBB", pdv_length, context_id, control
    )


def c_store_status(
    port: int,
    sop_class: str,
    dataset: Dataset | Path,
    called: str = "DICOM_AI",
    raw: bool = False,
) -> int:
    """The status of one C-STORE. ``raw``: send the file's bytes as they are (pynetdicom
    then takes the SOP class for the context from the file meta, not from the data set)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association not established"
        try:
            rsp = assoc.send_c_store(dataset)
            assert "Status" in rsp, "no C-STORE response"
            return int(rsp.Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
