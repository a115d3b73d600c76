"""What SEG, SR and the preview all take from the findings and their source: the source
headers in the order of the label map's frames, the labels to report, and a result's
series number. Where the slices lie is :mod:`dicom_ai.geometry`'s."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings, SegmentLabel

__all__ = ["default_series_number", "order_like_findings", "present_labels"]


def order_like_findings(
    source_images: Sequence[Dataset], findings: SegmentationFindings
) -> list[Dataset]:
    """The source headers in ``findings.source_sop_instance_uids`` order (frame k <-> image k).

    For a multi-frame source the same header repeats, once per frame of the label map.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_images}
    missing = [uid for uid in findings.source_sop_instance_uids if uid not in by_uid]
    if missing:
        raise EncodingError(
            f"{len(missing)} source instance(s) of the findings are not among the "
            f"{len(source_images)} source images, e.g. {missing[0]}"
        )
    ordered = [by_uid[uid] for uid in findings.source_sop_instance_uids]
    _, rows, columns = findings.label_map.shape
    for ds in ordered:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise EncodingError(
                f"source image {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, "
                f"the label map is {rows}x{columns}"
            )
    return ordered


def present_labels(findings: SegmentationFindings) -> tuple[SegmentLabel, ...]:
    """Labels with voxels, in label-value order; every non-zero value must have a label."""
    values = [label.value for label in findings.labels]
    if len(set(values)) != len(values):
        raise EncodingError(f"label values are not unique: {sorted(values)}")
    counts = findings.voxel_counts
    named = set(values)
    unnamed = [v for v in np.flatnonzero(counts).tolist() if v != 0 and v not in named]
    if unnamed:
        raise EncodingError(f"label map has values without a label: {unnamed}")
    return tuple(
        sorted(
            (
                label
                for label in findings.labels
                if 0 < label.value < len(counts) and counts[label.value] > 0
            ),
            key=lambda label: label.value,
        )
    )


def default_series_number(source: Dataset, offset: int) -> int:
    """A result's Series Number: the source's plus ``offset``, so results sort after it."""
    number = source.get("SeriesNumber")
    base = int(number) if number is not None and str(number).strip() else 0
    return (base + offset) % 2**31
