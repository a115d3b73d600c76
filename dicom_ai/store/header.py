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

import re
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.multival import MultiValue

from dicom_ai.errors import InputError

__all__ = ["InstanceHeader", "MissingAttributeError", "UnreadableDatasetError", "parse_header"]

_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TAGS = [*_UIDS, "Modality"]
# PS3.5 9.1: digits and dots, at most 64 characters, components without leading zeros
# are not checked here (senders get that wrong often and it harms nothing).
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
_UID_MAX = 64


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
    """Parse a Part 10 byte stream up to Pixel Data; raises InputError if it is not usable."""
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_TAGS)
        values = {k: _text(ds.get(k)) for k in _TAGS}
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


def _text(value: object) -> str:
    """One element's value as stripped text; "" when absent or empty. A multi-valued UID
    (``1.2\\1.3``) keeps its backslash, so it fails the UID check rather than passing as
    its first value."""
    if value is None or value == "":
        return ""
    if isinstance(value, bytes | bytearray):
        raise ValueError("value is not text")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip().strip("\x00").strip()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
