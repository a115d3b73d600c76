"""The two fixed byte layouts the receive path writes for every instance, encoded directly.

pydicom builds a Dataset and walks it to encode, a large share of each received
instance's cost for the seven elements of a C-STORE-RSP and the eight of a file meta
group. Both layouts are fixed by the standard (PS3.7 E.1, PS3.10 7.1); the unit tests
compare every byte with pydicom's encoding.
"""

from __future__ import annotations

import struct

from dicom_ai.errors import InputError

__all__ = ["UnencodableValueError", "command_response", "part10_header"]

_PREAMBLE = b"\x00" * 128 + b"DICM"
_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")
_NO_DATA_SET = 0x0101
_MAX_UID = 64


class UnencodableValueError(InputError):
    """A peer's value that cannot go into the element it is meant for."""


def _uid(value: str, strict: bool = True) -> bytes:
    if not strict:  # echoing a peer's own value back: as it was, made ASCII
        raw = value.encode("ascii", "replace")
        return raw + b"\x00" if len(raw) % 2 else raw
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise UnencodableValueError(f"UID is not ASCII: {value[:80]!r}") from None
    if not raw or len(raw) > _MAX_UID:
        raise UnencodableValueError(f"UID must be 1 to {_MAX_UID} characters: {value[:80]!r}")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str, limit: int) -> bytes:
    raw = value.encode("ascii", "replace")[:limit]
    return raw + b" " if len(raw) % 2 else raw


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return _IMPLICIT.pack(group, element, len(value)) + value


def command_response(
    command_field: int, message_id: int, sop_class: str, sop_instance: str, status: int
) -> bytes:
    """A DIMSE response command set, Implicit VR Little Endian (PS3.7 9.3, 6.3.1), with its
    group length first; Affected SOP Instance UID only when the request had one."""
    body = b"".join(
        [
            _implicit(0x0000, 0x0002, _uid(sop_class, strict=False)),
            _implicit(0x0000, 0x0100, struct.pack("<H", command_field)),
            _implicit(0x0000, 0x0120, struct.pack("<H", message_id)),
            _implicit(0x0000, 0x0800, struct.pack("<H", _NO_DATA_SET)),
            _implicit(0x0000, 0x0900, struct.pack("<H", status)),
            _implicit(0x0000, 0x1000, _uid(sop_instance, strict=False)) if sop_instance else b"",
        ]
    )
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def part10_header(
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae_title: str,
) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 7.1), Explicit VR
    Little Endian; the data set bytes follow as they were received."""

    def short(element: int, vr: bytes, value: bytes) -> bytes:
        return _EXPLICIT_SHORT.pack(0x0002, element, vr, len(value)) + value

    body = b"".join(
        [
            _EXPLICIT_LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
            short(0x0002, b"UI", _uid(sop_class)),
            short(0x0003, b"UI", _uid(sop_instance)),
            short(0x0010, b"UI", _uid(transfer_syntax)),
            short(0x0012, b"UI", _uid(implementation_class_uid)),
            short(0x0013, b"SH", _text(implementation_version_name, 16)),
            short(0x0016, b"AE", _text(source_ae_title, 16)) if source_ae_title else b"",
        ]
    )
    return _PREAMBLE + short(0x0000, b"UL", struct.pack("<I", len(body))) + body
