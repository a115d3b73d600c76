"""What SEG and SR both need from the source headers and the label map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings, SegmentLabel

__all__ = [
    "default_series_number",
    "label_voxel_counts",
    "order_like_findings",
    "present_labels",
    "slice_spacing_mm",
    "voxel_volume_mm3",
]


def order_like_findings(
    source_images: Sequence[Dataset], findings: SegmentationFindings
) -> list[Dataset]:
    """The source headers in ``findings.source_sop_instance_uids`` order (frame k <-> image k)."""
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


def label_voxel_counts(label_map: npt.NDArray[np.uint16]) -> npt.NDArray[np.int64]:
    """``counts[v]`` = number of voxels with label value ``v``.

    One ``bincount`` per frame: a whole-volume ``bincount`` would first copy the volume to
    intp (8 bytes a voxel), and ``np.unique`` sorts it; both are far slower.
    """
    if label_map.size == 0:
        return np.zeros(1, dtype=np.int64)
    length = int(label_map.max()) + 1
    counts = np.zeros(length, dtype=np.int64)
    for plane in label_map:
        counts += np.bincount(plane.ravel(), minlength=length)
    return counts


def present_labels(
    findings: SegmentationFindings, counts: npt.NDArray[np.int64]
) -> tuple[SegmentLabel, ...]:
    """Labels with voxels, in label-value order; every non-zero value must have a label."""
    values = [label.value for label in findings.labels]
    if len(set(values)) != len(values):
        raise EncodingError(f"label values are not unique: {sorted(values)}")
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


def _slice_normal(ds: Dataset) -> npt.NDArray[np.float64]:
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise EncodingError(f"degenerate ImageOrientationPatient in {ds.SOPInstanceUID}")
    return normal / norm


def slice_spacing_mm(ordered: Sequence[Dataset]) -> float:
    """Distance between adjacent slices along the slice normal (median, so one gap in a
    series does not skew it); SliceThickness for a single slice."""
    if not ordered:
        raise EncodingError("no source images")
    if len(ordered) == 1:
        thickness = ordered[0].get("SliceThickness")
        if thickness is None or float(thickness) <= 0.0:
            raise EncodingError("single-slice source without SliceThickness: no voxel depth")
        return float(thickness)
    normal = _slice_normal(ordered[0])
    positions = np.sort(
        np.array(
            [
                np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)
                for ds in ordered
            ]
        )
    )
    spacing = float(np.median(np.diff(positions)))
    if spacing <= 0.0:
        raise EncodingError("source images share one position: no slice spacing")
    return spacing


def voxel_volume_mm3(ordered: Sequence[Dataset]) -> float:
    """PixelSpacing[0] x PixelSpacing[1] x slice spacing, in mm^3."""
    spacings = {tuple(float(v) for v in ds.PixelSpacing) for ds in ordered}
    if len(spacings) != 1:
        raise EncodingError(f"source images differ in PixelSpacing: {sorted(spacings)}")
    row_spacing, column_spacing = next(iter(spacings))
    return row_spacing * column_spacing * slice_spacing_mm(ordered)


def default_series_number(source: Dataset, offset: int) -> int:
    """A result's Series Number: the source's plus ``offset``, so results sort after it."""
    number = source.get("SeriesNumber")
    base = int(number) if number is not None and str(number).strip() else 0
    return (base + offset) % 2**31
