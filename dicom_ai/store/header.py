"""The few header fields the index needs, parsed from encoded bytes without pixel data."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_ai.errors import InputError

__all__ = ["InstanceHeader", "parse_header"]

_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]


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
        values = {k: str(ds.get(k, "") or "").strip() for k in _TAGS}
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, TypeError) as exc:
        raise InputError(f"dataset does not parse: {exc}") from exc
    missing = [k for k in _TAGS if k != "Modality" and not values[k]]
    if missing:
        raise InputError(f"dataset lacks {', '.join(missing)}")
    return InstanceHeader(
        values["SOPClassUID"],
        values["SOPInstanceUID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
        values["Modality"] or "OT",
    )
