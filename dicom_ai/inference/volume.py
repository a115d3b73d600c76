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

The slices and their grid are :mod:`dicom_ai.geometry`'s: single-frame instances, or the
frames of enhanced multi-frame instances (``frame_numbers`` records which frame each slice
is); a series is either all single-frame or all multi-frame instances. Refused, with
:class:`~dicom_ai.errors.GeometryError`: fewer than two slices (no slice spacing can be
measured and no 3-D model applies), mixed orientation, size or pixel spacing, gantry tilt,
duplicate positions (several stacks, echoes or temporal positions in one series), gaps and
non-uniform spacing, and multi-frame images without per-frame geometry. Colour images are
refused with :class:`~dicom_ai.errors.InputError`.

Given the worker's :class:`~dicom_ai.inference.arena.PrefetchArena`, :func:`load_series`
takes the instances prefetched there instead of reading them again.
A MONAI bundle gets ``image`` through :mod:`dicom_ai.inference.loader`, which hands its
chain what the bundle's own ``LoadImage(d)`` gives for the same voxels as a NIfTI file (no
channel axis, ``original_channel_dim`` "no_channel").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.data.meta_tensor import MetaTensor
from pydicom.dataset import Dataset

from dicom_ai.errors import GeometryError, InputError
from dicom_ai.geometry import Slice, SliceGrid, series_slices
from dicom_ai.inference.arena import PrefetchArena
from dicom_ai.inference.pixels import (
    apply_rescale,
    check_shape,
    decode_frames,
    decode_single,
    read_ahead,
    read_header,
    rescale,
    strip_pixels,
)

__all__ = ["SeriesVolume", "load_series"]

logger = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def load_series(paths: Sequence[Path], arena: PrefetchArena | None = None) -> SeriesVolume:
    """Read one series' instances into a :class:`SeriesVolume` (see the module docstring),
    taking those prefetched into ``arena`` from it."""
    try:
        return _load_series(paths, arena)
    finally:
        if arena is not None:
            arena.forget_taken()


def _load_series(paths: Sequence[Path], arena: PrefetchArena | None) -> SeriesVolume:
    if not paths:
        raise InputError("no instances given")
    files = [Path(p) for p in paths]
    if arena is None:
        read_ahead(files)
    else:
        arena.read_ahead(files)
        if arena:  # a prefetched series: the rest joins it in the arena, one volume
            arena.prefetch(files)
    headers = [_header(p, arena) for p in files]
    _check_same_series(headers)
    slices = series_slices(headers, [p.name for p in files])
    grid = SliceGrid.from_slices(slices)

    rows, columns = grid.rows, grid.columns
    # Frames as stored: (slices, rows, columns), C-contiguous; the MetaTensor is a view.
    ordered = [slices[k] for k in grid.order]
    shape = (len(slices), rows, columns)
    frames = None if arena is None else arena.take_volume([s.header for s in ordered], shape)
    if frames is None:
        frames = np.empty(shape, dtype=np.float32)
        _decode(frames, ordered, files, arena)
    for header in headers:
        strip_pixels(header)

    affine = torch.as_tensor(_LPS_TO_RAS @ grid.affine_lps(), dtype=torch.float64)
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
        grid.column_spacing,
        grid.row_spacing,
        grid.slice_spacing,
    )
    frame_numbers = tuple(s.frame_number for s in ordered if s.frame_number is not None)
    return SeriesVolume(
        image=image,
        sop_instance_uids=tuple(str(s.header.SOPInstanceUID) for s in ordered),
        headers=tuple(s.header for s in ordered),
        paths=tuple(files[s.instance] for s in ordered),
        frame_numbers=frame_numbers or None,
    )


def _header(path: Path, arena: PrefetchArena | None) -> Dataset:
    """The prefetched header (pixels in the arena), else the file's with its pixel data
    deferred."""
    cached = None if arena is None else arena.take_header(path)
    return cached if cached is not None else read_header(path)


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


def _decode(
    frames: npt.NDArray[np.float32],
    ordered: Sequence[Slice],
    files: Sequence[Path],
    arena: PrefetchArena | None,
) -> None:
    """Decode every instance once, each frame into its slice of ``frames``, rescaled; a
    plane prefetched into ``arena`` is copied from there."""
    by_instance: dict[int, list[tuple[int, Slice]]] = {}
    for k, piece in enumerate(ordered):
        by_instance.setdefault(piece.instance, []).append((k, piece))
    for instance, pieces in by_instance.items():
        path = files[instance]
        k, first = pieces[0]
        plane = None if arena is None else arena.take_plane(first.header)
        if plane is not None:
            check_shape(frames[k], plane, path.name)
            frames[k] = plane
        elif first.frame_number is None:
            stored = decode_single(first.header, path)
            check_shape(frames[k], stored, path.name)
            apply_rescale(frames[k], stored, *rescale(first.header))
        else:
            targets = {
                s.frame_number: (i, *rescale(s.header, s.frame_number))
                for i, s in pieces
                if s.frame_number is not None
            }
            decode_frames(frames, path, targets)
