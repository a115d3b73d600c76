"""Result datasets -> the bytes of their DICOM file."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

__all__ = ["file_bytes"]


def file_bytes(dataset: Dataset) -> memoryview:
    """``dataset`` as a DICOM file (Part 10), encoded in its file meta's transfer syntax.

    The bytes are pydicom's ``save_as``. Before writing, each sequence item is marked as
    already in explicit VR little endian (``set_original_encoding``). pydicom otherwise
    runs its ambiguous-VR correction again at every nesting level, each run recursing
    through the whole subtree. The top-level run still corrects every item, so the bytes
    are the same. For a 765-frame SEG this takes ~0.05-0.1 s off ~0.35 s.
    """
    if dataset.file_meta.TransferSyntaxUID.is_implicit_VR is False:
        _mark_items(dataset)
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getbuffer()


def _mark_items(dataset: Dataset) -> None:
    for element in dataset.elements():
        if not isinstance(element, DataElement) or element.VR != "SQ":
            continue  # a raw element is written as read
        items: Sequence[Dataset] = element.value
        for item in items:
            item.set_original_encoding(False, True, item._character_set)
            _mark_items(item)
