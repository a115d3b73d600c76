"""What an enhanced (multi-frame) image header says about one of its frames.

Shared by inference/ (loading frames as slices) and results/ (encoding on those frames):
functional group macros live per frame or, when all frames agree, in the shared group.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

__all__ = ["frame_macro", "is_multiframe", "number_of_frames"]


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames; 1 when absent or empty."""
    return int(ds.get("NumberOfFrames") or 1)


def is_multiframe(ds: Dataset) -> bool:
    """More than one frame, or an enhanced instance with one frame: either way its geometry
    is in functional groups, not in the top-level attributes."""
    return number_of_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def frame_macro(ds: Dataset, frame_number: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` (e.g. ``PlanePositionSequence``) for frame
    ``frame_number`` (1-based): the frame's own, else the shared one, else None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    groups = []
    if 0 < frame_number <= len(per_frame):
        groups.append(per_frame[frame_number - 1])
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            item: Dataset = items[0]
            return item
    return None
