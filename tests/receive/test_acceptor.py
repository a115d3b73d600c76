"""The association acceptors (node.acceptor: the node's own, dicom_ai/dimse/acceptor.py, and
pynetdicom's, dicom_ai/dimse/ae_acceptor.py) against peers that push their edges: the
association limit, protocol errors, fragmented messages, a command that contradicts its
data set. Every test runs on both; the SCP runs in this process on an ephemeral port."""

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

from dicom_ai.config import ClientTLSConfig, ServerTLSConfig
from dicom_ai.dimse.scp import AccessPolicy, CalledAE, StorageSCP
from dicom_ai.dimse.tls import client_context, server_context
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets
from tests.peers import echoscu, local_scp, wait_until
from tests.raw_dicom import associate, read_pdu
from tests.tls_certs import make_pki

pytestmark = [pytest.mark.dcmtk]


@pytest.fixture(params=["fast", "pynetdicom"])
def acceptor(request: pytest.FixtureRequest) -> str:
    """node.acceptor"""
    return str(request.param)


@pytest.fixture
def scp(tmp_path: Path, acceptor: str) -> Iterator[StorageSCP]:
    with local_scp(
        tmp_path, max_associations=1, network_timeout=5.0, acse_timeout=5.0, acceptor=acceptor
    ) as node:
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


# What pynetdicom 3.0's acceptor does instead of A-ABORT then close, as observed.
_PYNETDICOM_ANSWERS = {
    "a PDV on a context that was not accepted": "closes without A-ABORT",
    "an unknown PDU type": "A-ABORT, then waits in Sta13 for the peer to close",
    "a command set that does not decode": "closes without A-ABORT",
    "a P-DATA-TF announcing 1 GiB": "waits for the rest of the PDU",
    "a C-STORE-RQ without a data set": "answers 0xC210, aborts at the network timeout",
}


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
    scp: StorageSCP,
    acceptor: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    what: str,
    payload: bytes,
) -> None:
    if acceptor == "pynetdicom" and what in _PYNETDICOM_ANSWERS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=_PYNETDICOM_ANSWERS[what]))
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


def test_access_policy_and_tls(
    tmp_path: Path, acceptor: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Per called AE: who may call, and TLS only; refusals are A-ASSOCIATE-RJ with the
    standard's reasons. A silent TLS client does not hold up another's handshake."""
    caplog.set_level(logging.WARNING)
    pki = make_pki(tmp_path / "pki")
    access = AccessPolicy(
        {
            "OPEN": CalledAE("OPEN", frozenset({"CT_SCANNER"})),
            "SECURE": CalledAE("SECURE", require_tls=True),
        }
    )
    server = server_context(
        ServerTLSConfig(
            port=0,
            certificate=pki.server_certificate,
            private_key=pki.server_key,
            ca_certificates=pki.ca,
            require_client_certificate=True,
        )
    )
    client = client_context(
        ClientTLSConfig(
            ca_certificates=pki.ca,
            certificate=pki.client_certificate,
            private_key=pki.client_key,
            check_hostname=False,
        )
    )
    with local_scp(tmp_path, access=access, tls=(0, server), acceptor=acceptor) as scp:
        assert scp.port is not None and scp.tls_port is not None
        assert echoscu(scp.port, "OPEN", "CT_SCANNER").returncode == 0
        assert "Calling AE Title Not Recognized" in echoscu(scp.port, "OPEN", "OTHER").stderr
        assert "Called AE Title Not Recognized" in echoscu(scp.port, "NOBODY").stderr
        assert "Calling AE Title Not Recognized" in echoscu(scp.port, "SECURE").stderr
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        with socket.create_connection(("127.0.0.1", scp.tls_port)):  # says nothing
            assoc = ae.associate(
                "127.0.0.1", scp.tls_port, ae_title="SECURE", tls_args=(client, None)
            )
            assert assoc.is_established
            try:
                assert int(assoc.send_c_echo().Status) == 0x0000
                assert int(assoc.send_c_store(_ct()).Status) == 0x0000
            finally:
                assoc.release()
        assert len(scp.spool.instance_files()) == 1
    assert "calling AE 'OTHER' is not allowed on OPEN" in caplog.text
    assert "called AE 'NOBODY' is not served" in caplog.text
    assert "SECURE accepts TLS connections only" in caplog.text
