"""Result datasets -> the bytes of their DICOM file.

The bytes are what pydicom's ``save_as`` writes (tests compare them byte for byte). Two
things make it faster for a SEG, whose Per-Frame Functional Groups hold some twenty
elements for each of its hundreds of frames:

- pydicom encodes one element at a time through several layers, and for a SEG that is
  most of the write. Top-level sequences whose items hold only the plain value
  representations highdicom puts in them are encoded here (:func:`_encode_items`) and
  handed to pydicom as raw elements, which it writes as they are. A sequence with anything
  else in it (another VR, a raw element, non-ASCII text, a character set, an undefined
  length) is left to pydicom.
- pydicom runs its ambiguous-VR correction again at every nesting level, each run
  recursing through the whole subtree. It is run once here, and every dataset is marked
  as already in explicit VR little endian so that pydicom does not run it again.

Both lean on pydicom's writer internals (:mod:`dicom_ai._compat`); on another pydicom
version the dataset is written by plain ``save_as``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai import _compat

__all__ = ["file_bytes"]

_CHARACTER_SET = BaseTag(0x00080005)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_NUMBERS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}
_STRINGS = {"UI": b"\0", "CS": b" ", "SH": b" ", "LO": b" "}  # VR -> padding byte
_NUMBER_STRINGS = ("DS", "IS")


class _NotPlain(Exception):
    """Something :func:`_encode_items` leaves to pydicom."""


def file_bytes(dataset: Dataset) -> memoryview:
    """``dataset`` as a DICOM file (Part 10), encoded in its file meta's transfer syntax."""
    if (
        dataset.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
        or not _compat.pydicom_write_shortcuts()
    ):
        return _saved(dataset)
    written = Dataset()
    written.file_meta = dataset.file_meta
    written.preamble = getattr(dataset, "preamble", None)
    for element in dataset.elements():
        written[element.tag] = _plain_sequence(element) or element
    # In place on the elements shared with ``dataset``; the raw sequences have no
    # ambiguous VR in them.
    _compat.pydicom_correct_ambiguous_vr(written)
    _compat.pydicom_mark_explicit_little_endian(written)
    return _saved(written)


def _saved(dataset: Dataset) -> memoryview:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getbuffer()


def _plain_sequence(element: DataElement | RawDataElement) -> RawDataElement | None:
    """A sequence of plain items as a raw element holding their bytes; None otherwise."""
    if not isinstance(element, DataElement) or element.VR != "SQ":
        return None
    try:
        value = _encode_sequence(element)
    except _NotPlain:
        return None
    return RawDataElement(element.tag, "SQ", len(value), value, 0, False, True)


def _encode_sequence(element: DataElement) -> bytes:
    """The value of an SQ element: its items, if it has a defined length."""
    if element.is_undefined_length:
        raise _NotPlain
    return _encode_items(element.value)


def _encode_items(items: Sequence[Dataset]) -> bytes:
    """The items as explicit VR little endian, each with its defined length, as pydicom
    writes them."""
    out = bytearray()
    for item in items:
        if getattr(item, "is_undefined_length_sequence_item", False):
            raise _NotPlain
        body = _encode_elements(item)
        out += _ITEM + struct.pack("<L", len(body)) + body
    return bytes(out)


def _encode_elements(dataset: Dataset) -> bytes:
    out = bytearray()
    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths: pydicom does not write them either
        element = dataset.get_item(tag)
        if not isinstance(element, DataElement) or tag == _CHARACTER_SET:
            raise _NotPlain
        vr = element.VR
        out += struct.pack("<HH", tag.group, tag.element)
        if vr == "SQ":
            value = _encode_sequence(element)
            out += b"SQ\0\0" + struct.pack("<L", len(value)) + value
            continue
        value = b"" if element.is_empty else _value(vr, element.value)
        if len(value) > 0xFFFF:
            raise _NotPlain  # pydicom would write it as UN
        out += vr.encode("ascii") + struct.pack("<H", len(value)) + value
    return bytes(out)


def _value(vr: str, value: Any) -> bytes:
    multiple = isinstance(value, MultiValue | list)
    if vr in _NUMBERS:
        values = list(value) if multiple else [value]
        return struct.pack(f"<{len(values)}{_NUMBERS[vr]}", *values)
    if vr in _NUMBER_STRINGS:
        text = "\\".join(map(_number_string, value)) if multiple else _number_string(value)
        padding = b" "
    elif vr in _STRINGS:
        text = "\\".join(value) if multiple else value
        padding = _STRINGS[vr]
    else:
        raise _NotPlain
    if not isinstance(text, str) or not text.isascii():
        raise _NotPlain  # other encodings are pydicom's to apply
    encoded = text.encode("ascii")
    return encoded + padding if len(encoded) % 2 else encoded


def _number_string(value: Any) -> str:
    original = getattr(value, "original_string", None)
    return original if isinstance(original, str) else str(value)
