"""Named DIMSE status codes (PS3.4 Annex B for Storage, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["VERIFICATION_SOP_CLASS", "Status"]

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"  # PS3.4 A.4


class Status(IntEnum):
    SUCCESS = 0x0000
    # Storage service class (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    # General (PS3.7 C)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110
