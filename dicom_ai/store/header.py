"""The few header fields the index needs, parsed from encoded bytes without pixel data.

The bytes come from a peer and may be anything: whatever pydicom raises on them, and whatever
is wrong with the values, comes out as :class:`~dicom_ai.errors.InputError` (the C-STORE
handler turns it into a status), never as another exception:

- :class:`UnreadableDatasetError`: the bytes do not parse as a Part 10 data set, or a UID
  is not a UID (the SCP answers 0xC210, cannot understand);
- :class:`MissingAttributeError`: the data set parses but lacks an identifying UID that
  every composite IOD requires, Type 1 (the SCP answers 0xA900, does not match the SOP
  class). When it has none of them it is not taken for an instance at all: pydicom reads
  most garbage as a few odd elements, and that is unreadable, not incomplete.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom_ai.errors import InputError

Buffer = bytes | bytearray | memoryview

__all__ = [
    "InstanceHeader",
    "MissingAttributeError",
    "UnreadableDatasetError",
    "parse_data_set",
    "parse_header",
]

_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LAST_TAG = max(_TAGS)
# PS3.5 9.1: digits and dots, at most 64 characters, components without leading zeros
# are not checked here (senders get that wrong often and it harms nothing).
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
_UID_MAX = 64
# The elements wanted come before (0020,000E); in a CT slice that is ~2 KB in. The first
# 64 KiB are parsed, and the whole data set only when they do not reach that far.
_PREFIX = 64 << 10
_PART10_PREFIX = b"DICM"
_PREAMBLE = 128


class UnreadableDatasetError(InputError):
    """The bytes are not a data set that can be read, or a UID in it is malformed."""


class MissingAttributeError(InputError):
    """The data set lacks a Type 1 identifying attribute (SOP, study or series UID)."""


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str


def parse_header(data: bytes) -> InstanceHeader:
    """The header of a Part 10 file (preamble, file meta, data set); raises InputError if
    it is not usable."""
    if data[_PREAMBLE : _PREAMBLE + 4] != _PART10_PREFIX:
        raise UnreadableDatasetError("dataset does not parse: no DICM prefix (not a Part 10 file)")
    try:
        meta, end = _read_elements(
            data[_PREAMBLE + 4 :],
            implicit_vr=False,
            little_endian=True,
            stop=lambda tag: tag >> 16 != 0x0002,
            wanted={0x00020010},
        )
        transfer_syntax = _text(meta.get(0x00020010))
    except Exception as exc:  # pydicom raises a zoo of types on malformed input
        raise UnreadableDatasetError(f"dataset does not parse: {_describe(exc)}") from exc
    return parse_data_set([memoryview(data)[_PREAMBLE + 4 + end :]], transfer_syntax)


def parse_data_set(data_set: Sequence[Buffer], transfer_syntax: str) -> InstanceHeader:
    """The header of a data set encoded in ``transfer_syntax`` (as a C-STORE-RQ carries it:
    no file meta, in the fragments it came in), read up to (0020,000E) only; raises
    InputError if it is not usable."""
    try:
        values = _header_values(data_set, transfer_syntax)
    except Exception as exc:  # pydicom raises a zoo of types on malformed input
        raise UnreadableDatasetError(f"dataset does not parse: {_describe(exc)}") from exc
    missing = [k for k in _UIDS if not values[k]]
    if len(missing) == len(_UIDS):
        # Nothing that identifies an instance: bytes that pydicom read as some elements
        # (it is lenient), not an instance with a gap.
        raise UnreadableDatasetError(
            f"dataset does not parse as a DICOM instance: no {', '.join(_UIDS)}"
        )
    if missing:
        raise MissingAttributeError(f"dataset lacks {', '.join(missing)}")
    for keyword in _UIDS:
        uid = values[keyword]
        if len(uid) > _UID_MAX or not _UID.fullmatch(uid):
            raise UnreadableDatasetError(f"{keyword} is not a valid UID: {uid[:80]!r}")
    return InstanceHeader(
        values["SOPClassUID"],
        values["SOPInstanceUID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
        values["Modality"] or "OT",
    )


def _header_values(data_set: Sequence[Buffer], transfer_syntax: str) -> dict[str, str]:
    implicit_vr, little_endian, deflated = _encoding(transfer_syntax)
    if deflated:
        compressed = b"".join(data_set)
        prefix = zlib.decompressobj(-zlib.MAX_WBITS).decompress(compressed, _PREFIX)
    else:
        prefix = _first_bytes(data_set, _PREFIX)

    def whole() -> bytes:
        if deflated:
            return zlib.decompress(compressed, -zlib.MAX_WBITS)
        return b"".join(data_set)

    whole_in_prefix = len(prefix) < _PREFIX

    def read(data: bytes) -> tuple[dict[int, bytes | None], int]:
        return _read_elements(
            data, implicit_vr, little_endian, lambda tag: tag > _LAST_TAG, set(_TAGS)
        )

    if whole_in_prefix:
        parsed, _ = read(prefix)
    else:
        try:
            parsed, end = read(prefix)
            if end >= len(prefix):  # ran out before passing (0020,000E)
                parsed, _ = read(whole())
        except Exception:  # an element cut off by the prefix's end, or a broken data set
            parsed, _ = read(whole())
    return {keyword: _text(parsed.get(tag)) for tag, keyword in _TAGS.items()}


def _first_bytes(fragments: Sequence[Buffer], count: int) -> bytes:
    pieces: list[memoryview] = []
    for fragment in fragments:
        if count <= 0:
            break
        pieces.append(memoryview(fragment)[:count])
        count -= len(pieces[-1])
    return b"".join(pieces)


@functools.lru_cache(maxsize=64)  # pydicom's UID validates itself, once per instance
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax. Every one PS3.5 does
    not name otherwise (the encapsulated ones, private ones) is Explicit VR Little Endian."""
    uid = UID(transfer_syntax.strip())
    if not uid.is_valid or not uid.is_transfer_syntax:
        return False, True, False
    return uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated


def _read_elements(
    data: bytes,
    implicit_vr: bool,
    little_endian: bool,
    stop: Callable[[int], bool],
    wanted: set[int],
) -> tuple[dict[int, bytes | None], int]:
    """The raw values of the ``wanted`` top-level elements before the first tag that
    ``stop`` accepts, and the offset where reading ended (len(data) when it ran out)."""
    stream = BytesIO(data)
    values: dict[int, bytes | None] = {}

    def stop_when(tag: BaseTag, vr: str | None, length: int) -> bool:
        return stop(int(tag))

    for element in data_element_generator(
        stream, implicit_vr, little_endian, stop_when=stop_when, specific_tags=list(wanted)
    ):
        if element.tag in wanted:
            value = element.value
            if value is not None and not isinstance(value, bytes):
                raise ValueError(f"element {element.tag} is not a text value")
            values[int(element.tag)] = value
    return values, stream.tell()


def _text(value: bytes | None) -> str:
    """One raw value as stripped text; "" when absent or empty. A multi-valued UID
    (``1.2\\1.3``) keeps its backslash, so it fails the UID check rather than passing as
    its first value."""
    if not value:
        return ""
    return value.decode("latin-1").strip(" \x00")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
