"""What SEG, SR and the preview all take from the findings and their source: the source
headers in the order of the label map's frames, the labels to report, and a result's
series number. Where the slices lie is :mod:`dicom_ai.geometry`'s."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from skimage.color import deltaE_ciede2000, rgb2lab

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings, SegmentLabel
from dicom_ai.results.codes import segment_coding

__all__ = [
    "MIN_COLOUR_DIFFERENCE",
    "default_series_number",
    "display_colours",
    "order_like_findings",
    "present_labels",
]

MIN_COLOUR_DIFFERENCE = 15.0
"""Least CIEDE2000 difference between two segments' display colours in one result; a
segment whose table colour is closer to an earlier segment's gets another colour."""

# Kelly's colours of maximum contrast (less black and white), tried in order for a segment
# whose own colour is too close to another's; then an even spread of hues.
_SPARE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32),
    (206, 162, 98), (129, 112, 102), (0, 125, 52), (246, 118, 142), (0, 83, 138),
    (255, 122, 92), (83, 55, 122), (255, 142, 0), (179, 40, 81), (244, 200, 0),
    (127, 24, 13), (147, 170, 0), (89, 51, 21), (241, 58, 19), (35, 44, 22),
)  # fmt: skip


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


def display_colours(findings: SegmentationFindings) -> dict[int, tuple[int, int, int]]:
    """Label value -> display RGB of the present segments: each segment's coding colour,
    unless it is within :data:`MIN_COLOUR_DIFFERENCE` of an earlier segment it touches
    somewhere; then the first spare colour far enough from every earlier segment's (the
    farthest, when none is). SEG, preview and card all take their colours from here.

    Only touching segments must differ: a whole-body model's 104 table colours cannot all
    be far apart, and two ribs far from each other may share the table's colour.
    """
    labels = present_labels(findings)
    cached = _last_colours.get("key")
    key = (id(findings.label_map), labels)
    if cached is not None and cached[0] == key and cached[1]() is findings.label_map:
        return cached[2]
    wanted = tuple(segment_coding(label.name).display_rgb for label in labels)
    touching = _touching(findings.label_map, tuple(label.value for label in labels))
    chosen = _distinct(wanted, touching)
    colours = {label.value: rgb for label, rgb in zip(labels, chosen, strict=True)}
    _last_colours["key"] = (key, weakref.ref(findings.label_map), colours)
    return colours


# The last result's colours: SEG, SR's preview and card ask for the same label map in turn.
_last_colours: dict[
    str,
    tuple[
        tuple[int, tuple[SegmentLabel, ...]],
        weakref.ref[npt.NDArray[np.uint16]],
        dict[int, tuple[int, int, int]],
    ],
] = {}
# Frames sampled for which segments touch: neighbours touch over many frames.
_TOUCH_SAMPLE_FRAMES = 32


def _touching(
    label_map: npt.NDArray[np.uint16], values: tuple[int, ...]
) -> frozenset[tuple[int, int]]:
    """Pairs (i, j), i < j, of indexes into ``values`` whose labels are next to each other in
    a row or column of a sample of the frames."""
    if len(values) < 2:
        return frozenset()
    step = max(1, label_map.shape[0] // _TOUCH_SAMPLE_FRAMES)
    sample = label_map[::step]
    index = np.zeros(int(max(values)) + 1, dtype=np.int64)
    index[list(values)] = np.arange(1, len(values) + 1)
    pairs: set[tuple[int, int]] = set()
    for a, b in (
        (sample[:, :, 1:], sample[:, :, :-1]),
        (sample[:, 1:, :], sample[:, :-1, :]),
    ):
        edge = a != b
        first, second = index[a[edge]], index[b[edge]]
        both = (first > 0) & (second > 0)
        low = np.minimum(first[both], second[both]) - 1
        high = np.maximum(first[both], second[both]) - 1
        codes_ = np.unique(low * len(values) + high)
        pairs.update((int(c) // len(values), int(c) % len(values)) for c in codes_)
    return frozenset(pairs)


@functools.cache
def _distinct(
    wanted: tuple[tuple[int, int, int], ...], touching: frozenset[tuple[int, int]]
) -> tuple[tuple[int, int, int], ...]:
    spares = _SPARE_COLOURS + tuple(_hue_wheel(36))
    spare_lab = _lab(spares)
    wanted_lab = _lab(wanted)
    chosen: list[tuple[int, int, int]] = []
    chosen_lab = np.empty_like(wanted_lab)
    for k, rgb in enumerate(wanted):
        lab = wanted_lab[k]
        neighbours = [i for i in range(k) if (i, k) in touching]
        if neighbours and min(_nearest(lab[np.newaxis], chosen_lab[neighbours])) < (
            MIN_COLOUR_DIFFERENCE
        ):
            distances = _nearest(spare_lab, chosen_lab[:k])
            far_enough = np.flatnonzero(distances >= MIN_COLOUR_DIFFERENCE)
            pick = int(far_enough[0]) if far_enough.size else int(np.argmax(distances))
            rgb, lab = spares[pick], spare_lab[pick]
        chosen.append(rgb)
        chosen_lab[k] = lab
    return tuple(chosen)


def _lab(colours: Sequence[tuple[int, int, int]]) -> npt.NDArray[np.float64]:
    rgb = np.asarray(colours, dtype=np.float64).reshape(-1, 1, 3) / 255.0
    lab: npt.NDArray[np.float64] = rgb2lab(rgb)[:, 0, :]
    return lab


def _nearest(
    candidates: npt.NDArray[np.float64], others: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Each candidate's difference to the closest of ``others`` (CIEDE2000)."""
    pairs = deltaE_ciede2000(  # type: ignore[no-untyped-call]
        candidates[:, np.newaxis, :], others[np.newaxis, :, :], channel_axis=-1
    )
    nearest: npt.NDArray[np.float64] = np.min(pairs, axis=1)
    return nearest


def _hue_wheel(count: int) -> list[tuple[int, int, int]]:
    """``count`` saturated colours at evenly spread hues, alternately light and dark."""
    from skimage.color import hsv2rgb

    hsv = np.array(
        [[(k / count, 0.75, 0.95 if k % 2 == 0 else 0.6)] for k in range(count)], dtype=float
    )
    rgb = np.rint(hsv2rgb(hsv)[:, 0, :] * 255).astype(int)
    return [(int(r), int(g), int(b)) for r, g, b in rgb]
