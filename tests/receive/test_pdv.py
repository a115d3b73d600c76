"""PDV fragments to DIMSE messages (dicom_ai/dimse/pdv.py): what assembles, what is a
protocol error, and (fuzzed) that any fragmentation of a valid message reassembles to the
same message while any bytes at all raise nothing but ProtocolError."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage

from dicom_ai.dimse.pdv import (
    COMMAND_FRAGMENT,
    LAST_FRAGMENT,
    NO_DATA_SET,
    PDU_HEADER,
    AbortReason,
    CommandField,
    Message,
    MessageAssembler,
    PDUType,
    ProtocolError,
    decode_command,
    p_data_tf,
)
from dicom_ai.dimse.wire import command_response

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow],
)
INSTANCE = "1.2.826.0.1.3680043.8.498.1"
CMD, LAST = COMMAND_FRAGMENT, LAST_FRAGMENT


def _implicit(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _command(field: int, data_set_type: int, message_id: int = 7) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = field
    command.MessageID = message_id
    command.CommandDataSetType = data_set_type
    if field == CommandField.C_STORE_RQ:
        command.Priority = 0
        command.AffectedSOPInstanceUID = INSTANCE
    body = _implicit(command)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return _implicit(group) + body


C_STORE = _command(CommandField.C_STORE_RQ, 0x0000)
C_ECHO = _command(CommandField.C_ECHO_RQ, NO_DATA_SET, message_id=3)
DATA = bytes(range(256)) * 5


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _feed(assembler: MessageAssembler, *bodies: bytes) -> list[Message]:
    return [message for body in bodies for message in assembler.feed(bytearray(body))]


def _data(message: Message) -> bytes:
    return b"".join(bytes(fragment) for fragment in message.data_set)


def test_command_then_data_set_fragments_make_one_c_store() -> None:
    assembler = MessageAssembler({1})
    assert _feed(assembler, _pdv(1, CMD, C_STORE[:10])) == []
    assert _feed(assembler, _pdv(1, CMD | LAST, C_STORE[10:])) == []  # a data set follows
    assert assembler.in_progress
    assert _feed(assembler, _pdv(1, 0, DATA[:100]) + _pdv(1, 0, DATA[100:200])) == []
    [message] = _feed(assembler, _pdv(1, LAST, DATA[200:]))
    assert not assembler.in_progress
    assert message.context_id == 1
    assert message.command.command_field == CommandField.C_STORE_RQ
    assert message.command.message_id == 7
    assert message.command.affected_sop_class_uid == CTImageStorage
    assert message.command.affected_sop_instance_uid == INSTANCE
    assert _data(message) == DATA
    assert len(message.data_set) == 3  # views of the fragments, not joined


def test_a_command_without_data_set_completes_at_its_last_fragment() -> None:
    assembler = MessageAssembler({1, 3})
    [message] = _feed(assembler, _pdv(3, CMD, C_ECHO[:5]) + _pdv(3, CMD | LAST, C_ECHO[5:]))
    assert message.command.command_field == CommandField.C_ECHO_RQ
    assert message.command.message_id == 3 and message.data_set == ()


def test_messages_in_one_p_data_tf_come_out_in_order_one_after_the_other() -> None:
    assembler = MessageAssembler({1, 3})
    body = (
        _pdv(1, CMD | LAST, C_STORE)
        + _pdv(1, LAST, DATA)
        + _pdv(3, CMD | LAST, C_ECHO)  # another context once the first message ended
    )
    messages = _feed(assembler, body)
    assert [m.command.command_field for m in messages] == [0x0001, 0x0030]
    assert [m.context_id for m in messages] == [1, 3]


def test_a_message_is_yielded_before_a_later_pdv_breaks_the_rules() -> None:
    """The acceptor answers a complete message even when the rest of its PDU is wrong."""
    feed = MessageAssembler({1}).feed(bytearray(_pdv(1, CMD | LAST, C_ECHO) + _pdv(1, LAST, b"x")))
    assert next(feed).command.command_field == CommandField.C_ECHO_RQ
    with pytest.raises(ProtocolError, match="before its command set"):
        next(feed)


@pytest.mark.parametrize(
    ("bodies", "match", "reason"),
    [
        ([_pdv(2, CMD | LAST, C_ECHO)], "context 2, not accepted", AbortReason.UNEXPECTED_PDU),
        (
            [_pdv(1, CMD | LAST, C_STORE), _pdv(3, LAST, DATA)],
            "on two presentation contexts",
            AbortReason.UNEXPECTED_PDU,
        ),
        ([_pdv(1, CMD, C_STORE[:9]) + _pdv(3, CMD | LAST, C_STORE[9:])], "two presentation", 2),
        ([_pdv(1, LAST, DATA)], "before its command set", AbortReason.UNEXPECTED_PDU),
        (
            [_pdv(1, CMD | LAST, C_STORE), _pdv(1, CMD | LAST, C_STORE)],
            "a second command set",
            AbortReason.UNEXPECTED_PDU,
        ),
        (
            [_pdv(1, CMD | LAST, _command(CommandField.C_STORE_RQ, NO_DATA_SET))],
            "C-STORE-RQ that says no data set follows",
            AbortReason.UNEXPECTED_PDU,
        ),
        ([_pdv(1, CMD | LAST, b"\xff" * 9)], "does not decode", AbortReason.INVALID_PDU_PARAMETER),
        ([_pdv(1, CMD | LAST, _implicit(Dataset()))], "no Command Field", 6),
        # Bad lengths: an item shorter than its own header fields, one that runs past the
        # PDU, a PDU ending inside an item header.
        ([struct.pack(">IBB", 1, 1, CMD)], "runs past", AbortReason.INVALID_PDU_PARAMETER),
        ([struct.pack(">IBB", 50, 1, CMD) + b"\x00" * 10], "runs past", 6),
        ([_pdv(1, CMD | LAST, C_ECHO) + b"\x00\x00\x00"], "runs past", 6),
    ],
)
def test_protocol_errors(bodies: list[bytes], match: str, reason: int) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        _feed(MessageAssembler({1, 3}), *bodies)
    assert caught.value.reason == reason


def test_decode_command_reads_the_fields_the_acceptor_acts_on() -> None:
    command = decode_command(C_STORE)
    assert (command.command_field, command.message_id, command.data_set_type) == (1, 7, 0)
    assert command.affected_sop_instance_uid == INSTANCE


@pytest.mark.parametrize("maximum", [0, 16, 64, 1000])
def test_p_data_tf_splits_to_the_peers_maximum_and_reassembles(maximum: int) -> None:
    response = command_response(0x8001, 7, CTImageStorage, INSTANCE, 0xA700)
    pdus = _split_pdus(p_data_tf(5, response, maximum))
    assert all(pdu_type == PDUType.P_DATA_TF for pdu_type, _ in pdus)
    if maximum:
        assert max(len(body) for _, body in pdus) <= maximum  # PS3.8 D.1
    else:
        assert len(pdus) == 1
    [message] = _feed(MessageAssembler({5}), *(body for _, body in pdus))
    assert message.command.command_field == 0x8001 and message.command.message_id == 0


def _split_pdus(data: bytes) -> list[tuple[int, bytes]]:
    pdus, offset = [], 0
    while offset < len(data):
        pdu_type, length = PDU_HEADER.unpack_from(data, offset)
        start = offset + PDU_HEADER.size
        pdus.append((pdu_type, data[start : start + length]))
        offset = start + length
    return pdus


# -- fuzzed ---------------------------------------------------------------------------------


def _pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in pairwise(points)] or [b""]


@st.composite
def _fragmented(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """A C-STORE then a C-ECHO, every part cut into random fragments, the PDVs grouped
    into P-DATA-TF bodies at random."""
    data = draw(st.binary(min_size=1, max_size=2000))
    cut = st.lists(st.integers(0, 5000), max_size=8)
    pdvs = []
    for command, payload in ((C_STORE, data), (C_ECHO, b"")):
        pieces = _pieces(command, draw(cut))
        pdvs += [
            _pdv(1, CMD | (LAST if i == len(pieces) - 1 else 0), p) for i, p in enumerate(pieces)
        ]
        if payload:
            pieces = _pieces(payload, draw(cut))
            pdvs += [_pdv(1, LAST if i == len(pieces) - 1 else 0, p) for i, p in enumerate(pieces)]
    groups = _pieces(bytes(range(len(pdvs))), draw(cut))  # indexes, grouped
    return [b"".join(pdvs[i] for i in group) for group in groups], data


@FUZZ
@given(_fragmented())
def test_any_fragmentation_reassembles_to_the_same_messages(
    case: tuple[list[bytes], bytes],
) -> None:
    bodies, data = case
    store, echo = _feed(MessageAssembler({1}), *bodies)
    assert store.command == decode_command(C_STORE)
    assert _data(store) == data
    assert echo.command == decode_command(C_ECHO) and echo.data_set == ()


_PDV_ITEMS = st.lists(
    st.tuples(st.sampled_from([1, 2, 3, 255]), st.integers(0, 255), st.binary(max_size=64)),
    max_size=6,
)


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=200), _PDV_ITEMS), max_size=5))
def test_any_bytes_raise_nothing_but_protocol_error(
    bodies: list[bytes | list[tuple[int, int, bytes]]],
) -> None:
    """Raw bytes, and well-framed PDVs with any context, control bits and contents."""
    assembler = MessageAssembler({1, 3})
    try:
        for body in bodies:
            raw = body if isinstance(body, bytes) else b"".join(_pdv(*item) for item in body)
            for message in assembler.feed(bytearray(raw)):
                assert message.context_id in {1, 3}
    except ProtocolError as exc:
        assert isinstance(exc.reason, AbortReason)
