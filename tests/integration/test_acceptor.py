"""The node's own association acceptor (dicom_ai/dimse/acceptor.py) against peers that push
its edges: the association limit, protocol errors, fragmented messages, a command that
contradicts its data set. The SCP runs in this process on an ephemeral port."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF

from dicom_ai.dimse.scp import StorageSCP
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets
from tests.peers import echoscu, local_scp, wait_until
from tests.raw_dicom import associate, read_pdu


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    with local_scp(tmp_path, max_associations=1, network_timeout=5.0, acse_timeout=5.0) as node:
        yield node


def _port(scp: StorageSCP) -> int:
    assert scp.port is not None
    return scp.port


def _ct(rows: int = 16) -> Dataset:
    return next(phantom_ct_datasets(PhantomSpec(slices=1, rows=rows, columns=rows)))


def _encode(ds: Dataset, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _c_store_rq(sop_instance: str, data_set_type: int = 0x0000) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = data_set_type
    command.AffectedSOPInstanceUID = sop_instance
    body = _encode(command, implicit=True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return _encode(group, implicit=True) + body


def _aborted(sock: socket.socket) -> bool:
    """True when the next PDU is an A-ABORT and the node then closes the connection."""
    pdu_type, _ = read_pdu(sock)
    try:
        sock.settimeout(5)
        rest = sock.recv(1)
    except ConnectionResetError:
        rest = b""
    return pdu_type == 0x07 and rest == b""


def test_association_over_the_limit_is_rejected_transiently(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", _port(scp), ae_title="DICOM_AI")
    assert first.is_established
    try:
        second = ae.associate("127.0.0.1", _port(scp), ae_title="DICOM_AI")
        assert second.is_rejected
        assert "1 associations are open already" in caplog.text
    finally:
        first.release()
    # The slot is free again once the first one is gone.
    assert echoscu(_port(scp)).returncode == 0


@pytest.mark.parametrize(
    ("what", "payload"),
    [
        ("a PDV on a context that was not accepted", _pdu(0x04, _pdv(3, 0x03, b"\x00" * 8))),
        ("a second A-ASSOCIATE-RQ", _pdu(0x01, b"\x00" * 68)),
        ("an unknown PDU type", _pdu(0x0A, b"\x00" * 4)),
        ("a command set that does not decode", _pdu(0x04, _pdv(1, 0x03, b"\xff" * 9))),
        ("a data set before its command", _pdu(0x04, _pdv(1, 0x02, b"\x00" * 8))),
        ("a P-DATA-TF announcing 1 GiB", struct.pack(">BBI", 0x04, 0, 1 << 30) + b"\x00" * 64),
        ("a C-STORE-RQ without a data set", _pdu(0x04, _pdv(1, 0x03, _c_store_rq("1.2", 0x0101)))),
    ],
)
def test_protocol_errors_get_an_abort_and_the_node_keeps_serving(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture, what: str, payload: bytes
) -> None:
    caplog.set_level(logging.WARNING)
    with associate(_port(scp), CTImageStorage) as sock:
        sock.sendall(payload)
        assert _aborted(sock), what
    assert "association from RAWPEER@127.0.0.1 aborted by the node" in caplog.text
    assert echoscu(_port(scp)).returncode == 0


def test_response_fragmented_for_a_peer_with_small_pdus(scp: StorageSCP) -> None:
    """A requestor that takes at most 64-byte PDUs gets the C-STORE-RSP (about 100 bytes)
    in fragments it can reassemble."""
    ds = _ct(rows=32)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    received: list[int] = []

    def record(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            received.append(len(event.pdu.encode()))

    assoc = ae.associate(
        "127.0.0.1",
        _port(scp),
        ae_title="DICOM_AI",
        max_pdu=64,
        evt_handlers=[(evt.EVT_PDU_RECV, record)],
    )
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    # Maximum Length Received bounds a P-DATA-TF's variable field (PS3.8 D.1).
    assert len(received) >= 2 and max(received) <= 64 + 6
    [stored] = scp.spool.instance_files()
    back = dcmread(stored)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.PixelData == ds.PixelData


def test_command_that_names_another_instance_gets_a900(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    """As DCMTK's storescp answers it: the file meta would contradict its data set."""
    caplog.set_level(logging.WARNING)
    ds = _ct()
    with associate(_port(scp), CTImageStorage) as sock:
        sock.sendall(_pdu(0x04, _pdv(1, 0x03, _c_store_rq("1.2.3.4"))))
        data = _encode(ds, implicit=False)  # in three fragments, two PDUs
        sock.sendall(_pdu(0x04, _pdv(1, 0x00, data[:100]) + _pdv(1, 0x00, data[100:300])))
        sock.sendall(_pdu(0x04, _pdv(1, 0x02, data[300:])))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        command = read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)
        sock.sendall(_pdu(0x05, b"\x00" * 4))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
    assert command.CommandField == 0x8001 and command.MessageIDBeingRespondedTo == 7
    assert command.Status == 0xA900
    assert command.AffectedSOPInstanceUID == "1.2.3.4"
    assert f"dataset SOP instance {ds.SOPInstanceUID} differs from the command's" in caplog.text
    assert scp.spool.instance_files() == []


def test_the_end_of_an_association_is_reported_once_indexed(scp: StorageSCP) -> None:
    """The node's scheduler is woken by it; the index already says the association closed."""
    closed: list[int] = []

    def ended() -> None:
        rows = scp.index._query("SELECT COUNT(*) FROM associations WHERE closed_at IS NOT NULL")
        closed.append(int(rows[0][0]))

    scp.on_association_ended = ended
    assert echoscu(_port(scp)).returncode == 0
    assert closed == []  # an echo opens no association record: nothing to report
    ds = _ct()
    with associate(_port(scp), CTImageStorage) as sock:
        sock.sendall(
            _pdu(0x04, _pdv(1, 0x03, _c_store_rq(ds.SOPInstanceUID)))
            + _pdu(0x04, _pdv(1, 0x02, _encode(ds, implicit=False)))
        )
        read_pdu(sock)  # the C-STORE-RSP
        sock.sendall(_pdu(0x05, b"\x00" * 4))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
    wait_until(lambda: closed == [1], 10, "the end of the association reported")
