"""PDU framing and DIMSE message assembly from PDVs (PS3.8 9.3, Annex E; PS3.7 6.3.1, E).

Pure: bytes in, messages out, no socket. ``MessageAssembler.feed`` takes a P-DATA-TF's
variable field and yields each DIMSE message as soon as its last fragment has arrived;
anything the standard does not allow raises ``ProtocolError``, which the acceptor answers
with A-ABORT (its ``reason`` is the A-ABORT reason/diag.).
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from io import BytesIO

from pydicom.filereader import data_element_generator

__all__ = [
    "COMMAND_FRAGMENT",
    "LAST_FRAGMENT",
    "MAXIMUM_LENGTH_RECEIVED",
    "MAX_DATA_PDU",
    "MAX_REQUEST_PDU",
    "PDU_HEADER",
    "PDV_HEADER",
    "AbortReason",
    "Command",
    "CommandField",
    "Message",
    "MessageAssembler",
    "PDUType",
    "ProtocolError",
    "decode_command",
    "p_data_tf",
]


class PDUType(IntEnum):
    """PS3.8 9.3.1, Table 9-11."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortReason(IntEnum):
    """A-ABORT Reason/Diag. when the source is the service provider (PS3.8 9.3.8)."""

    REASON_NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER = 0x06


class CommandField(IntEnum):
    """The requests the acceptor meets (PS3.7 E.1, Table E.1-1); a response sets 0x8000."""

    C_STORE_RQ = 0x0001
    C_ECHO_RQ = 0x0030
    C_CANCEL_RQ = 0x0FFF


RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 E.1-1)

PDU_HEADER = struct.Struct(">BxI")  # PDU-type, reserved, PDU-length (PS3.8 9.3.1)
PDV_HEADER = struct.Struct(">IBB")  # Item-length, Presentation-context-ID, control (9.3.5.1)
# Message Control Header bits (PS3.8 E.2): bit 0 command (else data set), bit 1 last fragment.
COMMAND_FRAGMENT, LAST_FRAGMENT = 0x01, 0x02

# An A-ASSOCIATE-RQ is a few KB; more before association is garbage, not a request.
MAX_REQUEST_PDU = 1 << 20
# Advertised Maximum Length Received (PS3.8 D.1): a 512x512 slice fits in one PDU. Each PDU
# is read into one buffer of its announced length, so a length far past what was
# advertised is refused (A-ABORT) rather than allocated.
MAXIMUM_LENGTH_RECEIVED = 4 << 20
MAX_DATA_PDU = 16 * MAXIMUM_LENGTH_RECEIVED


class ProtocolError(Exception):
    """The peer broke PS3.8 / PS3.7: answered with A-ABORT, ``reason`` its Reason/Diag."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Command:
    """The command set elements the acceptor acts on (PS3.7 E.1-1)."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    data_set_type: int


@dataclass(frozen=True)
class Message:
    """A complete DIMSE message: its command and its data set fragments as received."""

    context_id: int
    command: Command
    data_set: tuple[memoryview, ...] = ()


# Command set tags (group 0000) and how their values read. Elements are walked raw: a
# pydicom Dataset converts and validates each value on access, which costs more than the
# rest of the command's handling.
_US = struct.Struct("<H")
_COMMAND_FIELD, _MESSAGE_ID, _DATA_SET_TYPE = 0x00000100, 0x00000110, 0x00000800
_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE = 0x00000002, 0x00001000


def decode_command(data: bytes) -> Command:
    """A command set, always Implicit VR Little Endian (PS3.7 6.3.1); ``ProtocolError``
    when it does not decode or has no Command Field."""
    try:
        values = {
            int(element.tag): element.value
            for element in data_element_generator(BytesIO(data), True, True)
        }
        if _COMMAND_FIELD not in values:
            raise ValueError("it has no Command Field")

        def unsigned_short(tag: int, default: int) -> int:
            value = values.get(tag)
            return default if value is None else int(_US.unpack(value)[0])

        def uid(tag: int) -> str:
            value = values.get(tag)
            return value.decode("latin-1").strip(" \x00") if isinstance(value, bytes) else ""

        return Command(
            unsigned_short(_COMMAND_FIELD, 0),
            unsigned_short(_MESSAGE_ID, 0),
            uid(_AFFECTED_SOP_CLASS),
            uid(_AFFECTED_SOP_INSTANCE),
            unsigned_short(_DATA_SET_TYPE, NO_DATA_SET),
        )
    except Exception as exc:
        raise ProtocolError(
            f"a command set does not decode: {exc}", AbortReason.INVALID_PDU_PARAMETER
        ) from exc


@dataclass
class _Partial:
    """A message whose last fragment has not arrived yet (PS3.7 E.2)."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    command_set: Command | None = None
    data_set: list[memoryview] = field(default_factory=list)


class MessageAssembler:
    """PDVs of one association in, DIMSE messages out, one message at a time.

    ``accepted``: the presentation context IDs the association accepted; a PDV on any
    other is a protocol error. Data set fragments are kept as views of the PDU bodies
    fed, not copied.
    """

    def __init__(self, accepted: Container[int]) -> None:
        self._accepted = accepted
        self._partial: _Partial | None = None

    @property
    def in_progress(self) -> bool:
        """A message has begun and not ended."""
        return self._partial is not None

    def feed(self, body: bytes | bytearray | memoryview) -> Iterator[Message]:
        """The PDV items of one P-DATA-TF's variable field (PS3.8 9.3.5); each message
        is yielded as soon as it completes, before the PDVs after it are looked at."""
        view = memoryview(body)
        length = len(view)
        offset = 0
        while offset < length:
            if offset + PDV_HEADER.size > length:
                raise ProtocolError(
                    "a PDV item runs past its P-DATA-TF", AbortReason.INVALID_PDU_PARAMETER
                )
            item_length, context_id, control = PDV_HEADER.unpack_from(view, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > length:
                raise ProtocolError(
                    "a PDV item runs past its P-DATA-TF", AbortReason.INVALID_PDU_PARAMETER
                )
            if context_id not in self._accepted:
                raise ProtocolError(f"a PDV on presentation context {context_id}, not accepted")
            message = self._fragment(context_id, control, view[offset + PDV_HEADER.size : end])
            if message is not None:
                yield message
            offset = end

    def _fragment(self, context_id: int, control: int, fragment: memoryview) -> Message | None:
        partial = self._partial
        if partial is None:
            partial = self._partial = _Partial(context_id)
        elif partial.context_id != context_id:
            raise ProtocolError("a message's fragments on two presentation contexts")
        if control & COMMAND_FRAGMENT:
            if partial.command_set is not None:
                raise ProtocolError("a second command set inside one message")
            partial.command += fragment
            if control & LAST_FRAGMENT:
                partial.command_set = decode_command(bytes(partial.command))
                if partial.command_set.data_set_type == NO_DATA_SET:
                    if partial.command_set.command_field == CommandField.C_STORE_RQ:
                        raise ProtocolError("a C-STORE-RQ that says no data set follows")
                    return self._complete(partial)
            return None
        if partial.command_set is None:
            raise ProtocolError("a data set fragment before its command set")
        partial.data_set.append(fragment)
        if control & LAST_FRAGMENT:
            return self._complete(partial)
        return None

    def _complete(self, partial: _Partial) -> Message:
        self._partial = None
        assert partial.command_set is not None
        return Message(partial.context_id, partial.command_set, tuple(partial.data_set))


def p_data_tf(context_id: int, command: bytes, maximum_length: int) -> bytes:
    """A command set as P-DATA-TF PDUs, one PDV each, split so that no PDU's variable field
    exceeds the peer's Maximum Length Received (0: unlimited; PS3.8 D.1)."""
    room = len(command) if maximum_length == 0 else max(maximum_length - 6, 1)
    pdus = []
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        last = start + room >= len(command)
        control = COMMAND_FRAGMENT | (LAST_FRAGMENT if last else 0)
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(PDU_HEADER.pack(PDUType.P_DATA_TF, len(pdv)) + pdv)
    return b"".join(pdus)
