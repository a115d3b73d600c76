"""Where the slices of a series lie in patient space: the one geometry engine.

A slice is a single-frame instance (CT, MR, PET Image Storage, ...), placed by its top-level
Image Plane attributes, or one frame of an enhanced multi-frame instance, placed by its
Per-Frame Functional Groups item, else the Shared one (Plane Position, Plane Orientation,
Pixel Measures). The loader builds a volume on the grid the slices lie on
(:class:`SliceGrid`, which refuses series with no single grid); the results measure the
voxel size of their volumes from the same slices (:func:`voxel_volume_mm3`).

Positions are in DICOM patient space (LPS), along the slice normal ``row cosines x column
cosines``. numpy and pydicom only: results/ imports this, and the node's process never
loads torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_ai.enhanced import frame_macro, is_multiframe, number_of_frames
from dicom_ai.errors import GeometryError, InputError

__all__ = [
    "SAME_PLANE_TOLERANCE",
    "Slice",
    "SliceGrid",
    "floats",
    "plane_value",
    "series_slices",
    "slice_spacing_mm",
    "voxel_volume_mm3",
]

# Two slices share an orientation (direction cosines, about 0.006°) and a PixelSpacing (mm)
# within this.
SAME_PLANE_TOLERANCE = 1e-4
# In-plane drift along the stack (gantry tilt) tolerated, as a fraction of the pixel spacing.
_TILT_TOLERANCE = 0.1
# Largest deviation of a slice from the uniform grid, as a fraction of the slice spacing.
_SPACING_TOLERANCE = 0.2
# The functional group an enhanced image keeps each plane attribute in.
_FUNCTIONAL_GROUP = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
}
_PLANE_KEYWORDS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")


@dataclass(frozen=True, eq=False)
class Slice:
    """One slice: a single-frame instance, or one frame of a multi-frame instance."""

    header: Dataset
    instance: int  # index of its instance among the headers it was read from
    frame_number: int | None  # 1-based; None for a single-frame instance
    orientation: tuple[float, ...]  # ImageOrientationPatient: row, then column cosines
    position: tuple[float, ...]  # ImagePositionPatient: the centre of the first pixel
    pixel_spacing: tuple[float, ...]  # PixelSpacing: between rows, between columns


def plane_value(header: Dataset, frame_number: int | None, keyword: str, where: str) -> Any:
    """``keyword`` (an Image Plane attribute) of one slice: the top-level attribute of a
    single-frame instance (``frame_number`` None), else from frame ``frame_number``'s
    functional groups. :class:`~dicom_ai.errors.GeometryError` when there is none."""
    if frame_number is None:
        value = header.get(keyword)
        if value is None or value == "":
            raise GeometryError(f"{where}: no {keyword}")
        return value
    sequence = _FUNCTIONAL_GROUP[keyword]
    group = frame_macro(header, frame_number, sequence)
    if group is None or not group.get(keyword):
        raise GeometryError(
            f"{where}: no {keyword} ({sequence}) in the Per-Frame or Shared Functional Groups"
        )
    return group.get(keyword)


def floats(value: Any, count: int, keyword: str, where: str) -> tuple[float, ...]:
    """A multi-valued numeric attribute as ``count`` floats, or a GeometryError."""
    sequence = isinstance(value, Sequence | np.ndarray) and not isinstance(value, str)
    values = list(value) if sequence else [value]
    if len(values) != count:
        raise GeometryError(f"{where}: {keyword} must have {count} values, got {len(values)}")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{where}: {keyword} is not numeric: {values}") from exc


def series_slices(headers: Sequence[Dataset], where: Sequence[str]) -> list[Slice]:
    """The slices of one series' instances for a volume, instance by instance: each
    single-frame instance, or every frame of each multi-frame one. ``where`` names each
    instance in messages."""
    multiframe = [is_multiframe(h) for h in headers]
    if any(multiframe) and not all(multiframe):
        raise InputError("the series mixes single-frame and multi-frame instances")
    count = sum(number_of_frames(h) for h in headers)
    if count < 2:
        raise GeometryError(
            f"a volume needs at least 2 slices to measure the slice spacing; got {count}"
        )
    if all(multiframe):
        return [
            piece
            for instance, header in enumerate(headers)
            for piece in _frame_slices(header, instance, where[instance])
        ]
    missing = [
        keyword
        for keyword in _PLANE_KEYWORDS
        if any(h.get(keyword) is None or len(h.get(keyword)) == 0 for h in headers)
    ]
    if missing:
        raise GeometryError(f"some instances have no {', '.join(missing)}")
    return [
        _slice(header, instance, None, where[instance]) for instance, header in enumerate(headers)
    ]


def _frame_slices(header: Dataset, instance: int, where: str) -> list[Slice]:
    count = number_of_frames(header)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise GeometryError(
            f"{where}: a multi-frame image of {count} frames without Per-Frame Functional "
            "Groups: no position for each frame, so no volume can be built from it"
        )
    if len(per_frame) != count:
        raise GeometryError(
            f"{where}: {len(per_frame)} Per-Frame Functional Groups items for "
            f"NumberOfFrames {count}"
        )
    return [
        _slice(header, instance, number, f"{where} frame {number}")
        for number in range(1, count + 1)
    ]


def _slice(header: Dataset, instance: int, frame_number: int | None, where: str) -> Slice:
    return Slice(
        header=header,
        instance=instance,
        frame_number=frame_number,
        orientation=_plane_floats(header, frame_number, "ImageOrientationPatient", 6, where),
        position=_plane_floats(header, frame_number, "ImagePositionPatient", 3, where),
        pixel_spacing=_plane_floats(header, frame_number, "PixelSpacing", 2, where),
    )


def _plane_floats(
    header: Dataset, frame_number: int | None, keyword: str, count: int, where: str
) -> tuple[float, ...]:
    return floats(plane_value(header, frame_number, keyword, where), count, keyword, where)


def _axes(
    orientation: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row cosines, column cosines and slice normal of an ImageOrientationPatient,
    re-normalised so that an affine built on them is exactly orthonormal."""
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    norms = np.linalg.norm(orientation.reshape(2, 3), axis=1)
    if np.abs(norms - 1).max() > 1e-3 or abs(float(row_cosines @ column_cosines)) > 1e-3:
        raise GeometryError("ImageOrientationPatient is not two orthogonal unit vectors")
    row_cosines = row_cosines / np.linalg.norm(row_cosines)
    column_cosines = column_cosines / np.linalg.norm(column_cosines)
    return row_cosines, column_cosines, np.cross(row_cosines, column_cosines)


@dataclass(frozen=True)
class SliceGrid:
    """The regular grid a series' slices lie on, checked: one orientation, image size and
    pixel spacing; no two slices at one position, no gaps or uneven spacing, no in-plane
    drift along the stack (gantry tilt). Slice ``k`` of the grid is ``slices[order[k]]``,
    ascending along the normal."""

    row_cosines: npt.NDArray[np.float64]
    column_cosines: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]
    row_spacing: float  # PixelSpacing[0]: between rows (along a column)
    column_spacing: float  # PixelSpacing[1]: between columns (along a row)
    slice_spacing: float
    rows: int
    columns: int
    origin: npt.NDArray[np.float64]  # ImagePositionPatient of slice 0
    order: tuple[int, ...]

    @classmethod
    def from_slices(cls, slices: Sequence[Slice]) -> SliceGrid:
        iops = np.array([s.orientation for s in slices])
        if np.abs(iops - iops[0]).max() > SAME_PLANE_TOLERANCE:
            raise GeometryError(
                "mixed orientations in one series (ImageOrientationPatient differs)"
            )
        sizes = {(int(s.header.Rows), int(s.header.Columns)) for s in slices}
        if len(sizes) > 1:
            raise GeometryError(f"mixed image sizes in one series: {sorted(sizes)}")
        spacings = np.array([s.pixel_spacing for s in slices])
        if np.abs(spacings - spacings[0]).max() > SAME_PLANE_TOLERANCE:
            raise GeometryError("mixed PixelSpacing in one series")
        if (spacings[0] <= 0).any():
            raise GeometryError(f"PixelSpacing must be positive, got {spacings[0].tolist()}")
        row_cosines, column_cosines, normal = _axes(iops[0])
        ipps = np.array([s.position for s in slices])
        positions = ipps @ normal
        order = np.argsort(positions, kind="stable")
        slice_spacing = _uniform_spacing(positions[order])
        ipps = ipps[order]
        row_spacing, column_spacing = float(spacings[0, 0]), float(spacings[0, 1])
        _check_tilt(ipps, normal, min(row_spacing, column_spacing))
        rows, columns = sizes.pop()
        return cls(
            row_cosines=row_cosines,
            column_cosines=column_cosines,
            normal=normal,
            row_spacing=row_spacing,
            column_spacing=column_spacing,
            slice_spacing=slice_spacing,
            rows=rows,
            columns=columns,
            origin=ipps[0],
            order=tuple(int(k) for k in order),
        )

    def affine_lps(self) -> npt.NDArray[np.float64]:
        """Voxel ``(i, j, k)`` (along a row, down a column, along the normal) -> LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_cosines * self.column_spacing
        affine[:3, 1] = self.column_cosines * self.row_spacing
        affine[:3, 2] = self.normal * self.slice_spacing
        affine[:3, 3] = self.origin
        return affine


def _uniform_spacing(positions: npt.NDArray[np.float64]) -> float:
    """Mean slice spacing of sorted positions; refuses duplicates, gaps and uneven spacing."""
    steps = np.diff(positions)
    if (steps <= 1e-3).any():
        raise GeometryError(
            "two or more slices share a position (several stacks, acquisitions, echoes or "
            "temporal positions in one series?)"
        )
    spacing = float(positions[-1] - positions[0]) / (len(positions) - 1)
    grid = positions[0] + spacing * np.arange(len(positions))
    worst = float(np.abs(positions - grid).max())
    if worst > _SPACING_TOLERANCE * spacing:
        raise GeometryError(
            f"slices are not evenly spaced (a slice is {worst:.3f} mm off a {spacing:.3f} mm grid:"
            " missing slices or variable spacing)"
        )
    return spacing


def _check_tilt(
    ipps: npt.NDArray[np.float64], normal: npt.NDArray[np.float64], pixel_spacing: float
) -> None:
    """Refuse stacks whose slices shift in-plane (gantry tilt): the grid would be sheared."""
    offsets = ipps - ipps[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    if drift > _TILT_TOLERANCE * pixel_spacing:
        length = float(np.linalg.norm(offsets[-1]))
        sine = min(1.0, float(np.linalg.norm(in_plane[-1])) / length)
        angle = float(np.degrees(np.arcsin(sine)))
        raise GeometryError(
            f"slice positions drift {drift:.2f} mm in-plane over the stack (gantry tilt about "
            f"{angle:.1f} degrees); tilted series are not supported"
        )


def slice_spacing_mm(headers: Sequence[Dataset]) -> float:
    """Distance between adjacent slices along the slice normal (the median, so that one gap
    does not skew it); SliceThickness for a single slice.

    ``headers`` may repeat a multi-frame instance (once per frame, as results list their
    sources): the slices are then the frames of each distinct instance.
    """
    planes = _planes(headers)
    if len(planes) == 1:
        header, number, where = planes[0]
        thickness = float(plane_value(header, number, "SliceThickness", where))
        if thickness <= 0.0:
            raise GeometryError(f"{where}: SliceThickness {thickness}: no voxel depth")
        return thickness
    header, number, where = planes[0]
    orientation = _plane_floats(header, number, "ImageOrientationPatient", 6, where)
    *_, normal = _axes(np.array(orientation))
    positions = np.sort(
        np.array(
            [
                np.dot(np.array(_plane_floats(h, n, "ImagePositionPatient", 3, w)), normal)
                for h, n, w in planes
            ]
        )
    )
    spacing = float(np.median(np.diff(positions)))
    if spacing <= 0.0:
        raise GeometryError("the slices share one position: no slice spacing")
    return spacing


def voxel_volume_mm3(headers: Sequence[Dataset]) -> float:
    """PixelSpacing[0] x PixelSpacing[1] x slice spacing (:func:`slice_spacing_mm`), in
    mm^3."""
    spacings = {_plane_floats(h, n, "PixelSpacing", 2, w) for h, n, w in _planes(headers)}
    if len(spacings) != 1:
        raise GeometryError(f"the slices differ in PixelSpacing: {sorted(spacings)}")
    row_spacing, column_spacing = next(iter(spacings))
    return row_spacing * column_spacing * slice_spacing_mm(headers)


def _planes(headers: Sequence[Dataset]) -> list[tuple[Dataset, int | None, str]]:
    """Each slice of ``headers`` as (header, frame number or None, its name in messages)."""
    if not headers:
        raise GeometryError("no source images")
    multiframe = [is_multiframe(h) for h in headers]
    if not any(multiframe):
        return [(h, None, _name(h)) for h in headers]
    if not all(multiframe):
        raise GeometryError("the source images mix single-frame and multi-frame instances")
    distinct: dict[str, Dataset] = {}
    for header in headers:
        distinct.setdefault(str(header.SOPInstanceUID), header)
    return [
        (header, number, f"{_name(header)} frame {number}")
        for header in distinct.values()
        for number in range(1, number_of_frames(header) + 1)
    ]


def _name(header: Dataset) -> str:
    return f"instance {header.get('SOPInstanceUID', '(no SOPInstanceUID)')}"
