"""What SEG and SR both need from the source headers and the label map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_ai.enhanced import frame_macro, number_of_frames
from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings, SegmentLabel

__all__ = [
    "default_series_number",
    "order_like_findings",
    "present_labels",
    "slice_spacing_mm",
    "voxel_volume_mm3",
]


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


def _slice_normal(ds: Dataset) -> npt.NDArray[np.float64]:
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise EncodingError(f"degenerate ImageOrientationPatient in {ds.SOPInstanceUID}")
    return normal / norm


def slice_spacing_mm(ordered: Sequence[Dataset]) -> float:
    """Distance between adjacent slices along the slice normal (median, so one gap in a
    series does not skew it); SliceThickness for a single slice.

    For multi-frame sources (the same header repeated, one per frame) the slices are the
    frames of each distinct instance, positioned by their functional groups.
    """
    if not ordered:
        raise EncodingError("no source images")
    multiframe = _distinct_multiframe(ordered)
    if multiframe is not None:
        return _frames_slice_spacing(multiframe)
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
    return _median_spacing(positions)


def voxel_volume_mm3(ordered: Sequence[Dataset]) -> float:
    """PixelSpacing[0] x PixelSpacing[1] x slice spacing, in mm^3."""
    multiframe = _distinct_multiframe(ordered)
    if multiframe is not None:
        spacings = {
            tuple(
                float(v) for v in _frame_value(ds, index, "PixelMeasuresSequence", "PixelSpacing")
            )
            for ds in multiframe
            for index in range(number_of_frames(ds))
        }
    else:
        spacings = {tuple(float(v) for v in ds.PixelSpacing) for ds in ordered}
    if len(spacings) != 1:
        raise EncodingError(f"source images differ in PixelSpacing: {sorted(spacings)}")
    row_spacing, column_spacing = next(iter(spacings))
    return row_spacing * column_spacing * slice_spacing_mm(ordered)


def _median_spacing(sorted_positions: npt.NDArray[np.float64]) -> float:
    spacing = float(np.median(np.diff(sorted_positions)))
    if spacing <= 0.0:
        raise EncodingError("source images share one position: no slice spacing")
    return spacing


def _distinct_multiframe(ordered: Sequence[Dataset]) -> list[Dataset] | None:
    """The distinct multi-frame (enhanced) instances among ``ordered``; None if there are
    none. Enhanced images keep their geometry in functional groups, not in the top level."""
    enhanced = ["PerFrameFunctionalGroupsSequence" in ds for ds in ordered]
    if not any(enhanced):
        return None
    if not all(enhanced):
        raise EncodingError("the source images mix single-frame and multi-frame instances")
    distinct: dict[str, Dataset] = {}
    for ds in ordered:
        distinct.setdefault(str(ds.SOPInstanceUID), ds)
    return list(distinct.values())


def _frame_value(ds: Dataset, index: int, sequence: str, keyword: str) -> Any:
    """An attribute of frame ``index`` (0-based) of an enhanced image, from its functional
    groups (per-frame, else shared)."""
    item = frame_macro(ds, index + 1, sequence)
    if item is None or item.get(keyword) is None:
        raise EncodingError(
            f"frame {index + 1} of {ds.SOPInstanceUID} has no {keyword} ({sequence}) in its "
            "functional groups"
        )
    return item.get(keyword)


def _frames_slice_spacing(images: Sequence[Dataset]) -> float:
    frames = [(ds, index) for ds in images for index in range(number_of_frames(ds))]
    if len(frames) == 1:
        ds, index = frames[0]
        thickness = _frame_value(ds, index, "PixelMeasuresSequence", "SliceThickness")
        if float(thickness) <= 0.0:
            raise EncodingError("single-frame source without SliceThickness: no voxel depth")
        return float(thickness)
    first, first_index = frames[0]
    orientation = np.asarray(
        _frame_value(first, first_index, "PlaneOrientationSequence", "ImageOrientationPatient"),
        dtype=np.float64,
    )
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise EncodingError(f"degenerate ImageOrientationPatient in {first.SOPInstanceUID}")
    positions = np.sort(
        np.array(
            [
                np.dot(
                    np.asarray(
                        _frame_value(ds, index, "PlanePositionSequence", "ImagePositionPatient"),
                        dtype=np.float64,
                    ),
                    normal / norm,
                )
                for ds, index in frames
            ]
        )
    )
    return _median_spacing(positions)


def default_series_number(source: Dataset, offset: int) -> int:
    """A result's Series Number: the source's plus ``offset``, so results sort after it."""
    number = source.get("SeriesNumber")
    base = int(number) if number is not None and str(number).strip() else 0
    return (base + offset) % 2**31
