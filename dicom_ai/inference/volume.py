"""DICOM series -> MONAI ``MetaTensor`` with a RAS affine, and back to per-frame planes.

Layout (the one MONAI's ``LoadImage`` gives a DICOM series): the image is channel-first,
``(1, columns, rows, slices)``; index ``i`` runs along a row (column index), ``j`` along a
column (row index), ``k`` over the slices sorted by position along the slice normal
(``row cosines x column cosines``). Voxel ``(i, j, k)`` sits, in DICOM patient space (LPS), at

    IPP_0 + i * PixelSpacing[1] * row_cosines + j * PixelSpacing[0] * column_cosines
          + k * slice_spacing * normal

and the ``affine`` maps it to RAS (MONAI's convention: LPS -> RAS flips x and y).

The pixels are stored once, as a C-contiguous ``(slices, rows, columns)`` float32 array (the
frames as they are in the files); the ``MetaTensor`` is a transposed view of it, so loading
costs one float32 volume and no copies.

Refused, with :class:`~dicom_ai.errors.GeometryError`: fewer than two slices (no slice
spacing can be measured and no 3-D model applies), mixed orientation, size or pixel spacing,
gantry tilt (slices shifted in-plane along the stack), duplicate positions, gaps and
non-uniform spacing. Multi-frame and colour images are refused with
:class:`~dicom_ai.errors.InputError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import torch
from monai.data.meta_tensor import MetaTensor
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import pixel_array

from dicom_ai.errors import GeometryError, InputError

__all__ = ["SeriesVolume", "load_series"]

logger = logging.getLogger(__name__)

# Direction cosines of two slices count as the same orientation within this (about 0.006°).
_COSINE_TOLERANCE = 1e-4
# In-plane drift along the stack (gantry tilt) tolerated, as a fraction of the pixel spacing.
_TILT_TOLERANCE = 0.1
# Largest deviation of a slice from the uniform grid, as a fraction of the slice spacing.
_SPACING_TOLERANCE = 0.2
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Elements dropped from the kept headers: the pixels live in the volume.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """One series as a volume, plus what is needed to map results back onto its frames.

    ``image`` is ``(1, columns, rows, slices)`` float32 (rescaled values, e.g. HU) with a RAS
    ``affine``; ``sop_instance_uids``, ``headers`` and ``paths`` are in slice order (index
    ``k`` of the image), ascending along the slice normal.
    """

    image: MetaTensor
    sop_instance_uids: tuple[str, ...]
    headers: tuple[Dataset, ...]
    paths: tuple[Path, ...]

    @property
    def frames(self) -> npt.NDArray[np.float32]:
        """The pixels as ``(slices, rows, columns)``: a view of ``image``, no copy."""
        return np.asarray(self.image.as_tensor()[0].numpy().transpose(2, 1, 0))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (i, j, k): column spacing, row spacing, slice spacing."""
        lengths = np.linalg.norm(np.asarray(self.image.affine)[:3, :3], axis=0)
        return (float(lengths[0]), float(lengths[1]), float(lengths[2]))

    def frames_from_volume(self, pred: torch.Tensor | npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
        """Turn a label volume on this grid into per-frame planes, ``(slices, rows, columns)``.

        ``pred`` is ``(1, columns, rows, slices)`` or ``(columns, rows, slices)`` with integer
        label values (floats are rounded); the result is the exact inverse of the load layout,
        so ``result[k]`` is the mask of ``sop_instance_uids[k]``.
        """
        array = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        if array.ndim == 4:
            if array.shape[0] != 1:
                raise ValueError(
                    f"label volume must have one channel (argmax first), got {array.shape[0]}"
                )
            array = array[0]
        expected = tuple(self.image.shape[1:])
        if array.shape != expected:
            raise ValueError(
                f"label volume shape {array.shape} is not the series grid {expected} "
                "(columns, rows, slices)"
            )
        if np.issubdtype(array.dtype, np.floating):
            array = np.rint(array)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            raise ValueError("label values must lie in 0..65535")
        return np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.uint16)


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Read one series' instances into a :class:`SeriesVolume` (see the module docstring)."""
    if not paths:
        raise InputError("no instances given")
    headers = [_read_header(Path(p)) for p in paths]
    _check_same_series(headers)
    if len(headers) < 2:
        raise GeometryError(
            f"a volume needs at least 2 slices to measure the slice spacing; got {len(headers)}"
        )
    geometry = _Geometry.from_headers(headers)
    order = np.argsort(geometry.positions, kind="stable")
    positions = geometry.positions[order]
    slice_spacing = _check_spacing(positions)
    ipps = geometry.ipps[order]
    _check_tilt(ipps, geometry, slice_spacing)

    rows, columns = geometry.rows, geometry.columns
    # Frames as stored: (slices, rows, columns), C-contiguous; the MetaTensor is a view.
    frames = np.empty((len(headers), rows, columns), dtype=np.float32)
    sorted_headers = [headers[int(n)] for n in order]
    sorted_paths = [Path(paths[int(n)]) for n in order]
    for k, (header, path) in enumerate(zip(sorted_headers, sorted_paths, strict=True)):
        _decode_into(frames[k], path, header)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = geometry.row_cosines * geometry.column_spacing
    affine_lps[:3, 1] = geometry.column_cosines * geometry.row_spacing
    affine_lps[:3, 2] = geometry.normal * slice_spacing
    affine_lps[:3, 3] = ipps[0]
    affine = torch.as_tensor(_LPS_TO_RAS @ affine_lps, dtype=torch.float64)
    spatial_shape = np.array([columns, rows, len(headers)])
    meta: dict[str, Any] = {
        "original_affine": affine.clone(),
        "spatial_shape": spatial_shape,
        # Already channel-first: EnsureChannelFirst(d) leaves it as it is.
        "original_channel_dim": 0,
        "space": "RAS",
        # Savers and Invertd expect a source name; no path leaves the process through it.
        "filename_or_obj": str(sorted_headers[0].get("SeriesInstanceUID", "series")),
    }
    data = torch.from_numpy(frames).permute(2, 1, 0).unsqueeze(0)
    image = MetaTensor(data, affine=affine, meta=meta)
    logger.debug(
        "loaded %d slices %dx%d, spacing %.3f/%.3f/%.3f mm",
        len(headers),
        rows,
        columns,
        geometry.column_spacing,
        geometry.row_spacing,
        slice_spacing,
    )
    return SeriesVolume(
        image=image,
        sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in sorted_headers),
        headers=tuple(sorted_headers),
        paths=tuple(sorted_paths),
    )


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    for keyword in ("SOPInstanceUID", "Rows", "Columns"):
        if keyword not in ds:
            raise InputError(f"{path.name}: no {keyword}")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"{path.name}: multi-frame images are not supported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path.name}: only single-sample (grayscale) images are supported")
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _check_same_series(headers: Sequence[Dataset]) -> None:
    uids = [str(h.SOPInstanceUID) for h in headers]
    if len(set(uids)) != len(uids):
        raise InputError("the same SOP instance is given more than once")
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise InputError(f"instances of {len(series)} different series given as one")
    frames_of_reference = {str(h.get("FrameOfReferenceUID", "")) for h in headers}
    if len(frames_of_reference) > 1:
        raise GeometryError("the instances have different frames of reference")


@dataclass(frozen=True)
class _Geometry:
    """What every slice must share, plus the per-slice positions."""

    row_cosines: npt.NDArray[np.float64]
    column_cosines: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]
    row_spacing: float  # PixelSpacing[0]: between rows (along a column)
    column_spacing: float  # PixelSpacing[1]: between columns (along a row)
    rows: int
    columns: int
    ipps: npt.NDArray[np.float64]  # (n, 3), input order
    positions: npt.NDArray[np.float64]  # (n,), IPP . normal

    @classmethod
    def from_headers(cls, headers: Sequence[Dataset]) -> _Geometry:
        missing = [
            kw
            for kw in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
            if any(kw not in h or h.get(kw) is None or len(h.get(kw)) == 0 for h in headers)
        ]
        if missing:
            raise GeometryError(f"some instances have no {', '.join(missing)}")
        iops = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        if iops.shape[1] != 6:
            raise GeometryError("ImageOrientationPatient must have 6 values")
        if np.abs(iops - iops[0]).max() > _COSINE_TOLERANCE:
            raise GeometryError(
                "mixed orientations in one series (ImageOrientationPatient differs)"
            )
        sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
        if len(sizes) > 1:
            raise GeometryError(f"mixed image sizes in one series: {sorted(sizes)}")
        spacings = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
        if spacings.shape[1] != 2 or np.abs(spacings - spacings[0]).max() > 1e-4:
            raise GeometryError("mixed PixelSpacing in one series")
        if (spacings[0] <= 0).any():
            raise GeometryError(f"PixelSpacing must be positive, got {spacings[0].tolist()}")
        row_cosines, column_cosines = iops[0, :3], iops[0, 3:]
        norms = np.linalg.norm(iops[0].reshape(2, 3), axis=1)
        if np.abs(norms - 1).max() > 1e-3 or abs(float(row_cosines @ column_cosines)) > 1e-3:
            raise GeometryError("ImageOrientationPatient is not two orthogonal unit vectors")
        # Re-normalise so the affine is exactly orthonormal.
        row_cosines = row_cosines / np.linalg.norm(row_cosines)
        column_cosines = column_cosines / np.linalg.norm(column_cosines)
        normal = np.cross(row_cosines, column_cosines)
        ipps = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        if ipps.shape[1] != 3:
            raise GeometryError("ImagePositionPatient must have 3 values")
        rows, columns = sizes.pop()
        return cls(
            row_cosines=row_cosines,
            column_cosines=column_cosines,
            normal=normal,
            row_spacing=float(spacings[0, 0]),
            column_spacing=float(spacings[0, 1]),
            rows=rows,
            columns=columns,
            ipps=ipps,
            positions=ipps @ normal,
        )


def _check_spacing(positions: npt.NDArray[np.float64]) -> float:
    """Mean slice spacing of sorted positions; refuses duplicates, gaps and uneven spacing."""
    steps = np.diff(positions)
    if (steps <= 1e-3).any():
        raise GeometryError(
            "two or more slices share a position (several acquisitions or echoes in one series?)"
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


def _check_tilt(ipps: npt.NDArray[np.float64], geometry: _Geometry, slice_spacing: float) -> None:
    """Refuse stacks whose slices shift in-plane (gantry tilt): the grid would be sheared."""
    offsets = ipps - ipps[0]
    in_plane = offsets - np.outer(offsets @ geometry.normal, geometry.normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    tolerance = _TILT_TOLERANCE * min(geometry.row_spacing, geometry.column_spacing)
    if drift > tolerance:
        length = float(np.linalg.norm(offsets[-1]))
        sine = min(1.0, float(np.linalg.norm(in_plane[-1])) / length)
        angle = float(np.degrees(np.arcsin(sine)))
        raise GeometryError(
            f"slice positions drift {drift:.2f} mm in-plane over the stack (gantry tilt about "
            f"{angle:.1f} degrees); tilted series are not supported"
        )


def _decode_into(out: npt.NDArray[np.float32], path: Path, header: Dataset) -> None:
    """Decode one frame into ``out`` and apply its own rescale (values in output units)."""
    try:
        stored = pixel_array(path)
    except Exception as exc:  # decoders raise many types; the boundary is "cannot decode"
        raise InputError(f"{path.name}: pixel data cannot be decoded: {exc}") from exc
    if stored.shape != out.shape:
        raise InputError(f"{path.name}: pixel data is {stored.shape}, header says {out.shape}")
    slope = float(header.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept:
        out += np.float32(intercept)
