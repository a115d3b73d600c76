"""Deterministic result UIDs (DESIGN.md "Idempotent results").

The same (source series, model, model version) always gives the same SEG and SR UIDs, so
a retried or re-run job replaces its earlier result in the PACS instead of adding a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

__all__ = ["ResultUIDs", "derived_uid", "device_observer_uid", "result_uids"]

# Part of every hash input: changing the derivation must not reuse old UIDs.
_SCHEME = "dicom-ai/result-uid/v1"


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of one job's SEG and SR (separate series: their Modality differs)."""

    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str

    def tracking_uid(self, label_value: int, label_name: str) -> str:
        """Tracking UID of a label's segment, shared by the SEG segment and its SR group."""
        return derived_uid(self.seg_sop_instance_uid, "tracking", str(label_value), label_name)


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts``.

    ``generate_uid`` hashes ``"".join(entropy_srcs)``, so ``("ab", "c")`` and ``("a", "bc")``
    would collide; the parts go in as one JSON array instead. A ``prefix`` is required:
    with ``prefix=None`` pydicom ignores the entropy and returns a random UUID UID.
    """
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[json.dumps([_SCHEME, *parts])]))


def result_uids(source_series_uid: str, model_id: str, model_version: str) -> ResultUIDs:
    """The SEG and SR UIDs for ``model_id`` at ``model_version`` run on a source series."""
    base = (source_series_uid, model_id, model_version)
    return ResultUIDs(
        seg_series_instance_uid=derived_uid(*base, "seg-series"),
        seg_sop_instance_uid=derived_uid(*base, "seg-instance"),
        sr_series_instance_uid=derived_uid(*base, "sr-series"),
        sr_sop_instance_uid=derived_uid(*base, "sr-instance"),
    )


def device_observer_uid(device_serial_number: str) -> str:
    """Device Observer UID of the node: stable for a node id across restarts."""
    return derived_uid("device-observer", device_serial_number)
