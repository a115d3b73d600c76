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

A slice is a single-frame instance (CT, MR, PET Image Storage, ...) or one frame of an
enhanced multi-frame instance (Enhanced CT/MR Image, Legacy Converted Enhanced ...). A
frame's geometry and rescale come from its Per-Frame Functional Groups item, else from the
Shared Functional Groups: Plane Position (Patient), Plane Orientation (Patient), Pixel
Measures and Pixel Value Transformation. Frames are then sorted and checked exactly like
single-frame slices; ``frame_numbers`` records which frame each slice is. A series is either
all single-frame or all multi-frame instances.

Refused, with :class:`~dicom_ai.errors.GeometryError`: fewer than two slices (no slice
spacing can be measured and no 3-D model applies), mixed orientation, size or pixel spacing,
gantry tilt (slices shifted in-plane along the stack), duplicate positions (several stacks,
echoes or temporal positions in one series), gaps and non-uniform spacing, and multi-frame
images without per-frame geometry. Colour images are refused with
:class:`~dicom_ai.errors.InputError`.

:func:`load_planar_images` reads 2-D images (CR, DX, MG, single-frame SC/US, ...) one by one,
for 2-D models.

:func:`prefetch` reads and decodes single-frame instances ahead of their job (while the
series is still arriving); the loaders then take each one from that cache, if its file is
unchanged, instead of reading it again.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import torch
from monai.data.meta_tensor import MetaTensor
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_ai.enhanced import frame_macro, is_multiframe, number_of_frames
from dicom_ai.errors import GeometryError, InputError

__all__ = [
    "PlanarImage",
    "SeriesVolume",
    "forget_prefetched_except",
    "load_planar_images",
    "load_series",
    "prefetch",
    "read_ahead",
    "release_prefetched",
]

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
# Read by the geometry checks: prefetch converts them once, ahead of the job.
_GEOMETRY_KEYWORDS = (
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "SliceThickness",
)
# Values larger than this (pixel data) are read when used, not when the header is parsed.
_DEFER_BYTES = 64 * 1024
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


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
    # For multi-frame sources: slice k is frame ``frame_numbers[k]`` (1-based) of
    # ``sop_instance_uids[k]``; None when every instance is single-frame.
    frame_numbers: tuple[int, ...] | None = None

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


@dataclass(frozen=True, eq=False)
class PlanarImage:
    """One 2-D image (CR, DX, MG, a single-frame SC/US...) for a 2-D model.

    ``image`` is ``(1, columns, rows)`` float32: rescaled (Modality LUT) values, with
    MONOCHROME1 inverted so that higher is brighter, as for MONOCHROME2. Projection images
    have no patient frame of reference: the 3x3 ``affine`` carries only the pixel size
    (``i`` along a row, ``j`` down a column, as displayed), so orientation transforms leave
    the image as it is shown.
    """

    image: MetaTensor
    sop_instance_uid: str
    header: Dataset  # pixels dropped
    path: Path


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Read one series' instances into a :class:`SeriesVolume` (see the module docstring)."""
    try:
        return _load_series(paths)
    finally:
        _prefetched.forget_taken()


def _load_series(paths: Sequence[Path]) -> SeriesVolume:
    if not paths:
        raise InputError("no instances given")
    files = [Path(p) for p in paths]
    read_ahead(files)
    if _prefetched:  # a prefetched series: the rest joins it in the arena, one volume
        prefetch(files)
    headers = [_read_header(p) for p in files]
    _check_same_series(headers)
    multiframe = [is_multiframe(h) for h in headers]
    if any(multiframe) and not all(multiframe):
        raise InputError("the series mixes single-frame and multi-frame instances")
    count = sum(number_of_frames(h) for h in headers)
    if count < 2:
        raise GeometryError(
            f"a volume needs at least 2 slices to measure the slice spacing; got {count}"
        )
    if all(multiframe):
        slices = [s for h, p in zip(headers, files, strict=True) for s in _frame_slices(h, p)]
    else:
        slices = _single_frame_slices(headers, files)
    geometry = _Geometry.from_slices(slices)
    order = np.argsort(geometry.positions, kind="stable")
    positions = geometry.positions[order]
    slice_spacing = _check_spacing(positions)
    ipps = geometry.ipps[order]
    _check_tilt(ipps, geometry, slice_spacing)

    rows, columns = geometry.rows, geometry.columns
    # Frames as stored: (slices, rows, columns), C-contiguous; the MetaTensor is a view.
    ordered = [slices[int(n)] for n in order]
    shape = (len(slices), rows, columns)
    frames = _prefetched.take_volume([s.header for s in ordered], shape)
    if frames is None:
        frames = np.empty(shape, dtype=np.float32)
        _decode(frames, ordered)
    for header in headers:
        _strip_pixels(header)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = geometry.row_cosines * geometry.column_spacing
    affine_lps[:3, 1] = geometry.column_cosines * geometry.row_spacing
    affine_lps[:3, 2] = geometry.normal * slice_spacing
    affine_lps[:3, 3] = ipps[0]
    affine = torch.as_tensor(_LPS_TO_RAS @ affine_lps, dtype=torch.float64)
    spatial_shape = np.array([columns, rows, len(slices)])
    meta: dict[str, Any] = {
        "original_affine": affine.clone(),
        "spatial_shape": spatial_shape,
        # Already channel-first: EnsureChannelFirst(d) leaves it as it is.
        "original_channel_dim": 0,
        "space": "RAS",
        # Savers and Invertd expect a source name; no path leaves the process through it.
        "filename_or_obj": str(ordered[0].header.get("SeriesInstanceUID", "series")),
    }
    data = torch.from_numpy(frames).permute(2, 1, 0).unsqueeze(0)
    image = MetaTensor(data, affine=affine, meta=meta)
    logger.debug(
        "loaded %d slices %dx%d from %d instance(s), spacing %.3f/%.3f/%.3f mm",
        len(slices),
        rows,
        columns,
        len(headers),
        geometry.column_spacing,
        geometry.row_spacing,
        slice_spacing,
    )
    frame_numbers = tuple(s.frame_number for s in ordered if s.frame_number is not None)
    return SeriesVolume(
        image=image,
        sop_instance_uids=tuple(str(s.header.SOPInstanceUID) for s in ordered),
        headers=tuple(s.header for s in ordered),
        paths=tuple(s.path for s in ordered),
        frame_numbers=frame_numbers if all(multiframe) else None,
    )


def load_planar_images(paths: Sequence[Path]) -> tuple[PlanarImage, ...]:
    """Read 2-D grayscale images, each on its own, in the order given (see
    :class:`PlanarImage`); colour, multi-frame and undecodable images are refused with
    :class:`~dicom_ai.errors.InputError`."""
    if not paths:
        raise InputError("no instances given")
    files = [Path(p) for p in paths]
    read_ahead(files)
    try:
        return tuple(_load_planar(p) for p in files)
    finally:
        _prefetched.forget_taken()


@dataclass(frozen=True)
class _Plane:
    """Where a prefetched plane lies in the arena (rescaled float32), and its shape."""

    offset: int
    shape: tuple[int, int]


class _Prefetched:
    """Single-frame instances decoded ahead of their job, by path: the header, and the plane
    rescaled to float32 in an arena.

    Planes are appended to the arena in arrival order. The arena is allocated once per
    worker and reused by every job (``release`` after each), so a series that arrives in
    slice order already is its volume. The job then makes no copy and touches no fresh
    memory: on these VMs a page touched for the first time costs more than decoding into
    it (perf: the prefetching worker spent ~45% of its time in ``clear_page_erms`` with
    per-instance arrays and a separate volume). An idle worker touches the arena ahead of
    the planes (``warm``), so even its first large series decodes into resident memory.
    An entry is used once, and only while its file has the size and mtime it was read
    with.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # float32 elements
        self._entries: OrderedDict[Path, tuple[tuple[int, int, int], Dataset, _Plane]]
        self._entries = OrderedDict()
        self._taken: dict[int, _Plane] = {}  # id(header) -> its plane, during a load
        self._arena: npt.NDArray[np.float32] | None = None
        self._used = 0  # arena elements handed out since the last release
        self._touched = 0  # arena elements written at least once: resident pages

    def __contains__(self, path: Path) -> bool:
        return path in self._entries

    def __bool__(self) -> bool:
        return bool(self._entries or self._taken)

    def add(
        self,
        path: Path,
        stamp: tuple[int, int, int],
        header: Dataset,
        stored: npt.NDArray[Any],
    ) -> bool:
        """Rescale ``stored`` into the arena and keep it for ``path``; False when full."""
        if stored.ndim != 2 or self._used + stored.size > self.capacity:
            return False
        if not self._allocate():
            return False
        plane = _Plane(self._used, (int(stored.shape[0]), int(stored.shape[1])))
        _apply_rescale(self._view(plane), stored, *_rescale(header))
        self._used += stored.size
        self._entries[path] = (stamp, header, plane)
        return True

    def _allocate(self) -> bool:
        if self._arena is None:
            try:
                # Address space only: pages are touched as planes are written.
                self._arena = np.empty(self.capacity, dtype=np.float32)
            except MemoryError:
                return False
        return True

    def warm(self, elements: int, step: int) -> bool:
        """Touch up to ``step`` more of the arena's first ``elements``, past the planes in
        it; True while there is more to touch."""
        target = min(elements, self.capacity)
        start = max(self._touched, self._used)
        if start >= target or not self._allocate():
            return False
        assert self._arena is not None
        end = min(start + step, target)
        self._arena[start:end] = 0.0  # only past _used: no plane lies there
        self._touched = end
        return end < target

    def _view(self, plane: _Plane) -> npt.NDArray[np.float32]:
        assert self._arena is not None
        size = plane.shape[0] * plane.shape[1]
        return self._arena[plane.offset : plane.offset + size].reshape(plane.shape)

    def take_header(self, path: Path) -> Dataset | None:
        entry = self._entries.pop(path, None)
        if entry is None:
            return None
        stamp, header, plane = entry
        if _stamp(path) != stamp:  # received again since: read it afresh
            return None
        self._taken[id(header)] = plane
        return header

    def take_plane(self, header: Dataset) -> npt.NDArray[np.float32] | None:
        """The rescaled plane of a header from ``take_header``, if it has one."""
        plane = self._taken.pop(id(header), None)
        return None if plane is None else self._view(plane)

    def take_volume(
        self, headers: Sequence[Dataset], shape: tuple[int, int, int]
    ) -> npt.NDArray[np.float32] | None:
        """The volume of ``shape`` whose slice k is the plane of ``headers[k]``, made in
        place in the arena, where the planes fill one stretch of it (they do when the
        series was prefetched on its own); None otherwise."""
        count, rows, columns = shape
        size = rows * columns
        planes = [self._taken.get(id(h)) for h in headers]
        if self._arena is None or any(p is None or p.shape != (rows, columns) for p in planes):
            return None
        offsets = [p.offset for p in planes if p is not None]
        base = min(offsets)
        order = [(offset - base) // size for offset in offsets]
        if any((o - base) % size for o in offsets) or sorted(order) != list(range(count)):
            return None
        volume = self._arena[base : base + count * size].reshape(shape)
        _permute(volume, order)
        for header in headers:
            del self._taken[id(header)]
        return volume

    def keep_only(self, paths: set[Path]) -> None:
        for path in [p for p in self._entries if p not in paths]:
            del self._entries[path]

    def forget_taken(self) -> None:
        """After a load, finished or failed: planes not used by now are not used."""
        self._taken.clear()

    def release(self) -> None:
        """The job is done with its volume: the arena is free for the next series."""
        self._entries.clear()
        self._taken.clear()
        self._touched = max(self._touched, self._used)
        self._used = 0


def _permute(volume: npt.NDArray[np.float32], order: Sequence[int]) -> None:
    """In place: slice k becomes the slice that was at ``order[k]`` (a permutation), with
    one plane of scratch. Arrival in slice order moves nothing; reversed, half the planes
    swap."""
    done = [False] * len(order)
    scratch: npt.NDArray[np.float32] | None = None
    for start, source in enumerate(order):
        if done[start] or source == start:
            continue
        if scratch is None:
            scratch = np.empty_like(volume[0])
        scratch[...] = volume[start]
        k = start
        while True:
            done[k] = True
            source = order[k]
            if source == start:
                volume[k] = scratch
                break
            volume[k] = volume[source]
            k = source


# Three 300-slice 512x512 CT series; virtual until written (see _Prefetched).
_prefetched = _Prefetched(capacity=256 << 20)


def _stamp(path: Path) -> tuple[int, int, int]:
    """Which version of the file: a re-sent instance is a new inode (written, renamed)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def forget_prefetched_except(paths: Sequence[Path]) -> None:
    """Drop what was prefetched for other series: a job starts, and this worker's cache is
    for its series only from now on."""
    _prefetched.keep_only({Path(p) for p in paths})


def release_prefetched() -> None:
    """After a job: its volume (which may lie in the prefetch arena) is no longer used."""
    _prefetched.release()


def warm_prefetch_arena(size_bytes: int, step_bytes: int = 8 << 20) -> bool:
    """Write the next ``step_bytes`` of the first ``size_bytes`` of the prefetch arena,
    ahead of the planes in it; True while more is left. An idle worker calls this so that
    the large series it decodes next finds its memory resident: on these VMs, touching
    320 MB for the first time took 0.13-0.47 s (0.015 s the second time), and a first
    300-slice CT's load 0.85-0.99 s instead of 0.2-0.5 s."""
    itemsize = np.dtype(np.float32).itemsize
    return _prefetched.warm(size_bytes // itemsize, max(step_bytes // itemsize, 1))


def prefetch(paths: Sequence[Path]) -> int:
    """Read, decode and rescale the single-frame instances among ``paths`` that are not
    cached yet; how many were added. Anything unreadable is left for the job to report."""
    added = 0
    for path in paths:
        path = Path(path)
        if path in _prefetched:
            continue
        try:
            stamp = _stamp(path)
            header = _read_header(path)
            if is_multiframe(header):
                continue  # decoded frame by frame in the job, from the file
            stored = _decode_single(header, path)
            for keyword in _GEOMETRY_KEYWORDS:  # their text becomes numbers now, not in the job
                header.get(keyword)
        except (InputError, OSError):
            continue
        if not _prefetched.add(path, stamp, header, stored):
            break  # the arena is full: the job reads the rest
        added += 1
    return added


def read_ahead(paths: Sequence[Path]) -> None:
    """Ask the kernel to start reading these files now, all at once. The spool writes
    instances with O_DIRECT, so they are on disk but not in the page cache; read one by
    one, each costs a ~1-3 ms wait for the disk, where the batch streams at disk speed."""
    if not hasattr(os, "posix_fadvise"):  # not on every platform; only advice
        return
    for path in paths:
        if path in _prefetched:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the reader reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advice only
        finally:
            os.close(fd)


def _read_header(path: Path, prefetched: bool = True) -> Dataset:
    """The instance's data set with its pixel data not yet read (deferred): it is parsed
    once, and decoding later reads just the pixel bytes (``_decode_single``), or (with
    ``prefetched``) both come from what :func:`prefetch` read."""
    cached = _prefetched.take_header(path) if prefetched else None
    if cached is not None:
        return cached
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    for keyword in ("SOPInstanceUID", "Rows", "Columns"):
        if keyword not in ds:
            raise InputError(f"{path.name}: no {keyword}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path.name}: only single-sample (grayscale) images are supported")
    return ds


def _strip_pixels(header: Dataset) -> None:
    """Headers travel on without pixel data (to SEG, SR): only the decoded volume keeps it."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in header:
            delattr(header, keyword)


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


@dataclass(frozen=True, eq=False)
class _Slice:
    """One slice to be: a single-frame instance, or one frame of a multi-frame instance."""

    header: Dataset
    path: Path
    frame_number: int | None  # 1-based; None for a single-frame instance
    orientation: tuple[float, ...]  # ImageOrientationPatient
    position: tuple[float, ...]  # ImagePositionPatient
    pixel_spacing: tuple[float, ...]  # PixelSpacing: between rows, between columns
    slope: float
    intercept: float


def _floats(value: Any, count: int, keyword: str, where: str) -> tuple[float, ...]:
    sequence = isinstance(value, Sequence | np.ndarray) and not isinstance(value, str)
    values = list(value) if sequence else [value]
    if len(values) != count:
        raise GeometryError(f"{where}: {keyword} must have {count} values, got {len(values)}")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{where}: {keyword} is not numeric: {values}") from exc


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _single_frame_slices(headers: Sequence[Dataset], paths: Sequence[Path]) -> list[_Slice]:
    missing = [
        kw
        for kw in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
        if any(kw not in h or h.get(kw) is None or len(h.get(kw)) == 0 for h in headers)
    ]
    if missing:
        raise GeometryError(f"some instances have no {', '.join(missing)}")
    slices = []
    for header, path in zip(headers, paths, strict=True):
        slope, intercept = _rescale(header)
        slices.append(
            _Slice(
                header=header,
                path=path,
                frame_number=None,
                orientation=_floats(
                    header.ImageOrientationPatient, 6, "ImageOrientationPatient", path.name
                ),
                position=_floats(header.ImagePositionPatient, 3, "ImagePositionPatient", path.name),
                pixel_spacing=_floats(header.PixelSpacing, 2, "PixelSpacing", path.name),
                slope=slope,
                intercept=intercept,
            )
        )
    return slices


def _frame_slices(header: Dataset, path: Path) -> list[_Slice]:
    """One slice per frame of an enhanced multi-frame instance, geometry from its
    functional groups."""
    count = number_of_frames(header)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise GeometryError(
            f"{path.name}: a multi-frame image of {count} frames without Per-Frame Functional "
            "Groups: no position for each frame, so no volume can be built from it"
        )
    if len(per_frame) != count:
        raise GeometryError(
            f"{path.name}: {len(per_frame)} Per-Frame Functional Groups items for "
            f"NumberOfFrames {count}"
        )
    top_slope, top_intercept = _rescale(header)
    slices = []
    for number in range(1, count + 1):
        where = f"{path.name} frame {number}"
        found: dict[str, Dataset] = {}
        for sequence, keyword in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            group = frame_macro(header, number, sequence)
            if group is None or not group.get(keyword):
                raise GeometryError(
                    f"{where}: no {keyword} ({sequence}) in the Per-Frame or Shared "
                    "Functional Groups"
                )
            found[keyword] = group
        transformation = frame_macro(header, number, "PixelValueTransformationSequence")
        slope, intercept = (
            _rescale(transformation) if transformation is not None else (top_slope, top_intercept)
        )
        slices.append(
            _Slice(
                header=header,
                path=path,
                frame_number=number,
                orientation=_floats(
                    found["ImageOrientationPatient"].ImageOrientationPatient,
                    6,
                    "ImageOrientationPatient",
                    where,
                ),
                position=_floats(
                    found["ImagePositionPatient"].ImagePositionPatient,
                    3,
                    "ImagePositionPatient",
                    where,
                ),
                pixel_spacing=_floats(found["PixelSpacing"].PixelSpacing, 2, "PixelSpacing", where),
                slope=slope,
                intercept=intercept,
            )
        )
    return slices


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
    def from_slices(cls, slices: Sequence[_Slice]) -> _Geometry:
        iops = np.array([s.orientation for s in slices])
        if np.abs(iops - iops[0]).max() > _COSINE_TOLERANCE:
            raise GeometryError(
                "mixed orientations in one series (ImageOrientationPatient differs)"
            )
        sizes = {(int(s.header.Rows), int(s.header.Columns)) for s in slices}
        if len(sizes) > 1:
            raise GeometryError(f"mixed image sizes in one series: {sorted(sizes)}")
        spacings = np.array([s.pixel_spacing for s in slices])
        if np.abs(spacings - spacings[0]).max() > 1e-4:
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
        ipps = np.array([s.position for s in slices])
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


def _decode(frames: npt.NDArray[np.float32], ordered: Sequence[_Slice]) -> None:
    """Decode every instance once, each frame into its slice of ``frames``, rescaled."""
    by_instance: dict[Path, list[tuple[int, _Slice]]] = {}
    for k, piece in enumerate(ordered):
        by_instance.setdefault(piece.path, []).append((k, piece))
    for path, pieces in by_instance.items():
        k, first = pieces[0]
        plane = _prefetched.take_plane(first.header)
        if plane is not None:
            _check_shape(frames[k], plane, first)
            frames[k] = plane
        elif first.frame_number is None:
            _rescale_into(frames[k], _decode_single(first.header, path), first)
        else:
            targets = {s.frame_number: (i, s) for i, s in pieces if s.frame_number is not None}
            _decode_frames(frames, path, targets)


def _decode_single(header: Dataset, path: Path) -> npt.NDArray[Any]:
    """Decode from the header read by ``_read_header`` (no second parse of the file), then
    drop its pixel data."""
    try:
        native = _native_pixels(header, path)
        stored: npt.NDArray[Any] = header.pixel_array if native is None else native
    except Exception as exc:  # decoders raise many types; the boundary is "cannot decode"
        raise InputError(f"{path.name}: pixel data cannot be decoded: {exc}") from exc
    finally:
        _strip_pixels(header)
    return stored


def _native_pixels(header: Dataset, path: Path) -> npt.NDArray[Any] | None:
    """The stored values of an uncompressed little-endian single-frame image, read straight
    from the file with one ``np.fromfile``; None where pydicom's decoder is needed.

    pydicom's ``pixel_array`` gives the same array (tests compare them) but costs ~0.9 ms
    per 512x512 slice in option handling and copies; this is ~0.1 ms, and prefetch has to
    keep pace with the receiver on two cores.
    """
    element = header.get_item("PixelData", keep_deferred=True)
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if element is None or syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    allocated = int(header.get("BitsAllocated") or 0)
    stored_bits = int(header.get("BitsStored") or 0)
    representation = header.get("PixelRepresentation")
    rows, columns = int(header.Rows), int(header.Columns)
    if (
        allocated not in (8, 16, 32)
        or not 0 < stored_bits <= allocated
        or representation not in (0, 1)
        or number_of_frames(header) != 1
        or rows <= 0
        or columns <= 0
    ):
        return None
    dtype = np.dtype(f"<{'i' if representation else 'u'}{allocated // 8}")
    count = rows * columns
    value = element.value
    if isinstance(value, bytes):
        length = len(value)
    elif value is None and isinstance(element, RawDataElement):  # deferred: still in the file
        length = element.length
    else:
        return None
    # An odd length carries one pad byte; any other size is for pydicom to judge.
    if length not in (count * dtype.itemsize, count * dtype.itemsize + 1):
        return None
    if isinstance(value, bytes):
        pixels = np.frombuffer(value, dtype=dtype, count=count).copy()
    else:
        pixels = np.fromfile(path, dtype=dtype, count=count, offset=element.value_tell)
        if pixels.size != count:  # the file is shorter than its header says
            return None
    if stored_bits < allocated:
        # As pydicom does: the unused high bits carry no meaning (PS3.5 8.1.1).
        shift = allocated - stored_bits
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels.reshape(rows, columns)


def _decode_frames(
    frames: npt.NDArray[np.float32], path: Path, targets: dict[int, tuple[int, _Slice]]
) -> None:
    """Frame by frame (``iter_pixels``): one decode of the instance, one frame in memory."""
    decoded = 0
    try:
        for number, stored in enumerate(iter_pixels(path), start=1):
            decoded = number
            target = targets.get(number)
            if target is not None:
                k, piece = target
                _rescale_into(frames[k], stored, piece)
    except InputError:
        raise
    except Exception as exc:  # decoders raise many types; the boundary is "cannot decode"
        raise InputError(f"{path.name}: pixel data cannot be decoded: {exc}") from exc
    if decoded < max(targets):
        raise InputError(f"{path.name}: pixel data holds {decoded} frames, fewer than the header")


def _rescale_into(out: npt.NDArray[np.float32], stored: npt.NDArray[Any], piece: _Slice) -> None:
    """Write ``stored`` into ``out`` with its own rescale applied (values in output units)."""
    _check_shape(out, stored, piece)
    _apply_rescale(out, stored, piece.slope, piece.intercept)


def _check_shape(out: npt.NDArray[np.float32], stored: npt.NDArray[Any], piece: _Slice) -> None:
    if stored.shape != out.shape:
        where = piece.path.name + (f" frame {piece.frame_number}" if piece.frame_number else "")
        raise InputError(f"{where}: pixel data is {stored.shape}, header says {out.shape}")


def _apply_rescale(
    out: npt.NDArray[np.float32], stored: npt.NDArray[Any], slope: float, intercept: float
) -> None:
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept:
        out += np.float32(intercept)


def _load_planar(path: Path) -> PlanarImage:
    # Not the prefetched plane: it is rescaled, and this path applies the modality LUT.
    header = _read_header(path, prefetched=False)
    if is_multiframe(header):
        raise InputError(
            f"{path.name}: a multi-frame image ({number_of_frames(header)} frames) is not "
            "one 2-D image"
        )
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GRAYSCALE:
        raise InputError(
            f"{path.name}: PhotometricInterpretation {photometric or 'missing'}; only "
            "MONOCHROME1 and MONOCHROME2 images are supported"
        )
    stored = _decode_single(header, path)
    shape = (int(header.Rows), int(header.Columns))
    if stored.shape != shape:
        raise InputError(f"{path.name}: pixel data is {stored.shape}, header says {shape}")
    values, low, high = _modality_values(stored, header)
    if photometric == "MONOCHROME1":
        # Mirror within the representable range, not the data's: an image's own min/max
        # would make its brightness depend on its content.
        np.subtract(np.float32(low + high), values, out=values)
    row_spacing, column_spacing = _planar_spacing(header, path)
    affine = torch.diag(torch.tensor([column_spacing, row_spacing, 1.0], dtype=torch.float64))
    meta: dict[str, Any] = {
        "original_affine": affine.clone(),
        "spatial_shape": np.array([shape[1], shape[0]]),
        "original_channel_dim": 0,
        "filename_or_obj": str(header.SOPInstanceUID),
    }
    data = torch.from_numpy(values).permute(1, 0).unsqueeze(0)
    return PlanarImage(
        image=MetaTensor(data, affine=affine, meta=meta),
        sop_instance_uid=str(header.SOPInstanceUID),
        header=header,
        path=path,
    )


def _modality_values(
    stored: npt.NDArray[Any], header: Dataset
) -> tuple[npt.NDArray[np.float32], float, float]:
    """Rescaled (or Modality LUT) values as float32, plus the lowest and highest value the
    stored bits can represent after that transformation."""
    bits = int(header.get("BitsStored") or stored.dtype.itemsize * 8)
    if int(header.get("PixelRepresentation", 0)) == 1:
        stored_range = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1], dtype=np.int64)
    else:
        stored_range = np.array([0, (1 << bits) - 1], dtype=np.int64)
    if header.get("ModalityLUTSequence"):
        try:
            values = np.asarray(apply_modality_lut(stored, header), dtype=np.float32)
            table = apply_modality_lut(np.arange(stored_range[0], stored_range[1] + 1), header)
        except Exception as exc:  # a malformed LUT raises many types
            raise InputError(f"Modality LUT cannot be applied: {exc}") from exc
        return values, float(table.min()), float(table.max())
    slope, intercept = _rescale(header)
    values = np.empty(stored.shape, dtype=np.float32)
    np.multiply(stored, np.float32(slope), out=values, casting="unsafe")
    if intercept:
        values += np.float32(intercept)
    ends = stored_range * slope + intercept
    return values, float(ends.min()), float(ends.max())


def _planar_spacing(header: Dataset, path: Path) -> tuple[float, float]:
    """(between rows, between columns) in mm: PixelSpacing, else ImagerPixelSpacing, else 1."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if header.get(keyword):
            row, column = _floats(header.get(keyword), 2, keyword, path.name)
            if row > 0 and column > 0:
                return row, column
    logger.debug("%s: no PixelSpacing or ImagerPixelSpacing; assuming 1 mm pixels", path.name)
    return 1.0, 1.0
