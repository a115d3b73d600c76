"""Segment colours a reader can tell apart: touching segments differ by at least
MIN_COLOUR_DIFFERENCE (CIEDE2000); the SEG recommends the colours the preview draws."""

from __future__ import annotations

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

from dicom_ai.inference.builtin.ct_body import CT_BODY_LABELS
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import segment_coding
from dicom_ai.results.sources import MIN_COLOUR_DIFFERENCE, display_colours

ALGORITHM = AlgorithmIdentification("test", "1", AlgorithmFamily.CLASSICAL)


def _difference(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    lab = rgb2lab(np.array([[a, b]], dtype=float) / 255.0)[0]
    return float(deltaE_ciede2000(lab[0], lab[1]))


def _findings(label_map: np.ndarray, labels: tuple[SegmentLabel, ...]) -> SegmentationFindings:
    return SegmentationFindings(
        label_map=label_map.astype(np.uint16),
        labels=labels,
        algorithm=ALGORITHM,
        source_sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(label_map.shape[0])),
    )


def test_ct_body_table_colours_are_far_apart() -> None:
    rgb = [segment_coding(label.name).display_rgb for label in CT_BODY_LABELS]
    for i in range(len(rgb)):
        for j in range(i + 1, len(rgb)):
            assert _difference(rgb[i], rgb[j]) >= MIN_COLOUR_DIFFERENCE, (rgb[i], rgb[j])
    # Label 1 is what it is: soft tissue, not the entire body.
    coding = segment_coding(CT_BODY_LABELS[0].name)
    assert (coding.property_type.value, coding.property_type.meaning) == ("87784001", "Soft tissue")


def test_touching_segments_with_close_colours_get_distinct_ones() -> None:
    # Liver and spleen: two greens in the table (about 8 apart).
    liver, spleen = segment_coding("liver").display_rgb, segment_coding("spleen").display_rgb
    assert _difference(liver, spleen) < MIN_COLOUR_DIFFERENCE
    touching = np.zeros((4, 8, 8))
    touching[:, :, :4], touching[:, :, 4:] = 1, 2
    colours = display_colours(
        _findings(touching, (SegmentLabel(1, "spleen"), SegmentLabel(2, "liver")))
    )
    assert colours[1] == spleen  # the first keeps its table colour
    assert _difference(colours[1], colours[2]) >= MIN_COLOUR_DIFFERENCE


def test_segments_apart_keep_their_table_colours() -> None:
    apart = np.zeros((4, 8, 8))
    apart[:, :, :2], apart[:, :, 6:] = 1, 2
    colours = display_colours(
        _findings(apart, (SegmentLabel(1, "spleen"), SegmentLabel(2, "liver")))
    )
    assert colours == {
        1: segment_coding("spleen").display_rgb,
        2: segment_coding("liver").display_rgb,
    }


def test_many_touching_segments_all_differ_from_their_neighbours() -> None:
    # 30 stripes, each touching the next, all with the lung's table colour: neighbours must
    # still differ.
    stripes = np.repeat(np.arange(1, 31), 2)[np.newaxis, np.newaxis, :].repeat(4, axis=1)
    labels = tuple(SegmentLabel(v, "lung" if v % 2 else "lungs") for v in range(1, 31))
    colours = display_colours(_findings(np.repeat(stripes, 3, axis=0), labels))
    for v in range(1, 30):
        assert _difference(colours[v], colours[v + 1]) >= MIN_COLOUR_DIFFERENCE, v
