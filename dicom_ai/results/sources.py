"""What SEG, SR and the preview all take from the findings and their source: the source
headers in the order of the label map's frames, the labels to report, and a result's
series number. Where the slices lie is :mod:`dicom_ai.geometry`'s."""

from __future__ import annotations

import colorsys
import functools
import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings, SegmentLabel
from dicom_ai.results.codes import segment_coding

__all__ = [
    "MIN_COLOUR_DIFFERENCE",
    "default_series_number",
    "display_colours",
    "order_like_findings",
    "order_like_frames",
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
    return order_like_frames(
        source_images,
        findings.source_sop_instance_uids,
        findings.label_map.shape,
        "the findings",
        "the label map",
    )


def order_like_frames(
    source_images: Sequence[Dataset],
    source_sop_instance_uids: Sequence[str],
    shape: tuple[int, ...],
    owner: str,
    grid: str,
) -> list[Dataset]:
    """The source headers in ``source_sop_instance_uids`` order, each checked to be the
    rows and columns of ``shape`` (frames, rows, columns); ``owner`` and ``grid`` name
    what the frames belong to in the errors."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_images}
    missing = [uid for uid in source_sop_instance_uids if uid not in by_uid]
    if missing:
        raise EncodingError(
            f"{len(missing)} source instance(s) of {owner} are not among the "
            f"{len(source_images)} source images, e.g. {missing[0]}"
        )
    ordered = [by_uid[uid] for uid in source_sop_instance_uids]
    _, rows, columns = shape
    for ds in ordered:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise EncodingError(
                f"source image {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, "
                f"{grid} is {rows}x{columns}"
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


# sRGB (IEC 61966-2-1) to CIE XYZ, and the D65 white point: as skimage.color.rgb2lab.
_RGB_TO_XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_D65 = np.array([0.95047, 1.0, 1.08883])


def _lab(colours: Sequence[tuple[int, int, int]]) -> npt.NDArray[np.float64]:
    """CIE L*a*b* (D65) of 8-bit sRGB colours, shape (n, 3).

    By hand, not skimage.color: its conversion imports scipy, which a bundle's own
    environment (numpy 1.24) cannot import, and results are made there too."""
    rgb = np.asarray(colours, dtype=np.float64).reshape(-1, 3) / 255.0
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _RGB_TO_XYZ.T / _D65
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab: npt.NDArray[np.float64] = np.stack(
        [116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])],
        axis=1,
    )
    return lab


def _nearest(
    candidates: npt.NDArray[np.float64], others: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Each candidate's difference to the closest of ``others`` (CIEDE2000)."""
    pairs = _ciede2000(candidates[:, np.newaxis, :], others[np.newaxis, :, :])
    nearest: npt.NDArray[np.float64] = np.min(pairs, axis=1)
    return nearest


def _ciede2000(
    lab1: npt.NDArray[np.float64], lab2: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """CIEDE2000 colour difference (Sharma, Wu and Dalal 2005; kL = kC = kH = 1), broadcast
    over the leading axes; by hand for the reason of :func:`_lab`."""
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2.0
    g = 0.5 * (1.0 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360.0
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360.0
    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180.0, dh - 360.0, np.where(dh < -180.0, dh + 360.0, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    dhh = 2.0 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2.0)
    l_mean = (l1 + l2) / 2.0
    cp_mean = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    hp_mean = np.where(
        c1p * c2p == 0,
        h_sum,
        np.where(
            np.abs(h1p - h2p) <= 180.0,
            h_sum / 2.0,
            np.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0),
        ),
    )
    t = (
        1.0
        - 0.17 * np.cos(np.radians(hp_mean - 30.0))
        + 0.24 * np.cos(np.radians(2.0 * hp_mean))
        + 0.32 * np.cos(np.radians(3.0 * hp_mean + 6.0))
        - 0.20 * np.cos(np.radians(4.0 * hp_mean - 63.0))
    )
    s_l = 1.0 + 0.015 * (l_mean - 50.0) ** 2 / np.sqrt(20.0 + (l_mean - 50.0) ** 2)
    s_c = 1.0 + 0.045 * cp_mean
    s_h = 1.0 + 0.015 * cp_mean * t
    rotation = -np.sin(np.radians(60.0 * np.exp(-(((hp_mean - 275.0) / 25.0) ** 2)))) * (
        2.0 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    )
    difference: npt.NDArray[np.float64] = np.sqrt(
        (dl / s_l) ** 2 + (dc / s_c) ** 2 + (dhh / s_h) ** 2 + rotation * (dc / s_c) * (dhh / s_h)
    )
    return difference


def _hue_wheel(count: int) -> list[tuple[int, int, int]]:
    """``count`` saturated colours at evenly spread hues, alternately light and dark."""
    colours = []
    for k in range(count):
        red, green, blue = colorsys.hsv_to_rgb(k / count, 0.75, 0.95 if k % 2 == 0 else 0.6)
        colours.append((round(red * 255), round(green * 255), round(blue * 255)))
    return colours
