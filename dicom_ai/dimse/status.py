"""Named DIMSE status codes (PS3.4 Annex B for Storage, PS3.7 Annex C)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

__all__ = ["VERIFICATION_SOP_CLASS", "SendResult", "Status"]

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


@dataclass(frozen=True)
class SendResult:
    """One file's outcome at a destination, whatever the transport (C-STORE, STOW-RS)."""

    path: Path
    status: int | None  # None: not sent (association lost, no context, no answer)

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS
