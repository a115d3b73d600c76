"""Instances decoded ahead of their job, while their series still arrives.

A worker process owns one :class:`PrefetchArena` and hands it to what it does: prefetches
(:meth:`~PrefetchArena.prefetch`), idle time (:meth:`~PrefetchArena.warm`) and jobs, whose
loaders take each instance from it, if its file is unchanged, instead of reading it again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_ai.enhanced import is_multiframe
from dicom_ai.errors import InputError
from dicom_ai.inference.pixels import apply_rescale, decode_single, read_ahead, read_header, rescale

__all__ = ["PrefetchArena"]

# Read by the geometry checks: prefetch converts them once, ahead of the job.
_GEOMETRY_KEYWORDS = (
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "SliceThickness",
)
_ITEMSIZE = np.dtype(np.float32).itemsize


@dataclass(frozen=True)
class _Plane:
    """Where a prefetched plane lies in the arena (rescaled float32), and its shape."""

    offset: int
    shape: tuple[int, int]


class PrefetchArena:
    """Single-frame instances decoded ahead of their job, by path: the header, and the plane
    rescaled to float32 in one arena of ``capacity_bytes``.

    Planes are appended to the arena in arrival order. The arena is allocated once (address
    space only, until written) and reused by every job (:meth:`release` after each), so a
    series that arrives in slice order already is its volume: the job makes no copy and
    touches no fresh memory, where touching a page for the first time costs more than
    decoding into it. An idle worker touches the arena ahead of the planes (:meth:`warm`),
    so that even its first large series decodes into resident memory.

    An entry is used once, and only while its file is the one it was read from (same inode,
    size and mtime). What does not fit is left for the job to read.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes // _ITEMSIZE  # float32 elements
        self._entries: OrderedDict[Path, tuple[tuple[int, int, int], Dataset, _Plane]]
        self._entries = OrderedDict()
        self._taken: dict[int, _Plane] = {}  # id(header) -> its plane, during a load
        self._arena: npt.NDArray[np.float32] | None = None
        self._used = 0  # arena elements handed out since the last release
        self._touched = 0  # arena elements written at least once: resident pages

    def __contains__(self, path: Path) -> bool:
        return path in self._entries

    def __bool__(self) -> bool:
        """Something prefetched, or taken by the load under way."""
        return bool(self._entries or self._taken)

    # --- the worker's side -------------------------------------------------------------

    def prefetch(self, paths: Sequence[Path]) -> int:
        """Read, decode and rescale the single-frame instances among ``paths`` that are not
        here yet; how many were added. Anything unreadable is left for the job to report."""
        added = 0
        for path in paths:
            path = Path(path)
            if path in self._entries:
                continue
            try:
                stamp = _stamp(path)
                header = read_header(path)
                if is_multiframe(header):
                    continue  # decoded frame by frame in the job, from the file
                stored = decode_single(header, path)
                for keyword in _GEOMETRY_KEYWORDS:  # their text becomes numbers now
                    header.get(keyword)
            except (InputError, OSError):
                continue
            if not self._add(path, stamp, header, stored):
                break  # the arena is full: the job reads the rest
            added += 1
        return added

    def read_ahead(self, paths: Iterable[Path]) -> None:
        """:func:`~dicom_ai.inference.pixels.read_ahead` for the files not prefetched."""
        read_ahead(p for p in paths if p not in self._entries)

    def warm(self, size_bytes: int, step_bytes: int = 8 << 20) -> bool:
        """Write the next ``step_bytes`` of the first ``size_bytes`` of the arena, past the
        planes in it; True while more is left. An idle worker calls this until a message
        comes, so that the large series it decodes next finds its memory resident."""
        target = min(size_bytes // _ITEMSIZE, self.capacity)
        step = max(step_bytes // _ITEMSIZE, 1)
        start = max(self._touched, self._used)
        if start >= target or not self._allocate():
            return False
        assert self._arena is not None
        end = min(start + step, target)
        self._arena[start:end] = 0.0  # only past _used: no plane lies there
        self._touched = end
        return end < target

    def keep_only(self, paths: Iterable[Path]) -> None:
        """A job starts: what was prefetched for other series is not coming here."""
        keep = {Path(p) for p in paths}
        for path in [p for p in self._entries if p not in keep]:
            del self._entries[path]

    def release(self) -> None:
        """The job is done with its volume (which may lie here): the arena is free for the
        next series."""
        self._entries.clear()
        self._taken.clear()
        self._touched = max(self._touched, self._used)
        self._used = 0

    # --- the loaders' side -------------------------------------------------------------

    def take_header(self, path: Path) -> Dataset | None:
        """The prefetched header of ``path`` (its plane is then :meth:`take_plane`'s), or
        None when it was not prefetched or its file changed since."""
        entry = self._entries.pop(path, None)
        if entry is None:
            return None
        stamp, header, plane = entry
        if _stamp(path) != stamp:  # received again since: read it afresh
            return None
        self._taken[id(header)] = plane
        return header

    def take_plane(self, header: Dataset) -> npt.NDArray[np.float32] | None:
        """The rescaled plane of a header from :meth:`take_header`, if it has one."""
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

    def forget_taken(self) -> None:
        """After a load, finished or failed: planes not used by now are not used."""
        self._taken.clear()

    def _add(
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
        apply_rescale(self._view(plane), stored, *rescale(header))
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

    def _view(self, plane: _Plane) -> npt.NDArray[np.float32]:
        assert self._arena is not None
        size = plane.shape[0] * plane.shape[1]
        return self._arena[plane.offset : plane.offset + size].reshape(plane.shape)


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


def _stamp(path: Path) -> tuple[int, int, int]:
    """Which version of the file: a re-sent instance is a new inode (written, renamed)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
