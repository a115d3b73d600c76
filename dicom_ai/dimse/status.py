"""Named DIMSE status codes (PS3.4 Annex B for Storage, PS3.7 Annex C).

What the C-STORE SCP answers, and why (the mapping itself is ``scp._status_for``):

- ``0x0000`` Success: the instance's bytes are fsynced in the spool and indexed.
- ``0xA700`` Refused, out of resources (PS3.4 B.2.3): free space on the spool's filesystem
  is below ``node.min_free_bytes``, the disk filled during the write (ENOSPC), or the
  spool cannot be written. Nothing partial is kept; a later send succeeds once space
  returns, without a restart.
- ``0xA900`` Error, data set does not match SOP class (PS3.4 B.2.3): the data set parses
  but does not conform to the SOP class it was sent as: its SOP Class UID differs from the
  presentation context's abstract syntax, its SOP Instance UID differs from the
  command's Affected SOP Instance UID (as DCMTK's storescp answers it), or it lacks a
  Type 1 identifying UID that every composite IOD requires (SOP Class / SOP Instance /
  Study Instance / Series Instance UID). The SCP understood the data set; it is the
  wrong or an incomplete object.
- ``0xC210`` Error, cannot understand (PS3.4 B.2.3, C000-CFFF): the bytes do not parse
  as a data set, or a UID in it (or in the command) is not a UID.
- ``0x0122`` Refused, SOP class not supported (PS3.7 C.5.20): the presentation context's
  abstract syntax is not a storage SOP class.
- ``0x0110`` Processing failure (PS3.7 C.5.10): anything unexpected (a bug); logged with
  its traceback.

A connection that breaks off or goes silent gets no status: the acceptor aborts it (network
timeout, ARTIM) and logs how the connection ended (``acceptor.py``).
"""

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
