"""Segmentation findings -> a BINARY DICOM Segmentation (highdicom).

BINARY, not LABELMAP: the label-map SOP class is rejected by DCMTK 3.6.7 and Orthanc 1.10
(FIELD-NOTES "DICOM objects"). One segment per label with voxels, numbered 1..n in
label-value order; frames without any voxel of a segment are omitted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from highdicom import AlgorithmIdentificationSequence
from highdicom.color import CIELabColor
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results.codes import local_coding_scheme, segment_coding
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.geometry import (
    default_series_number,
    label_voxel_counts,
    order_like_findings,
    present_labels,
)
from dicom_ai.results.uids import ResultUIDs

__all__ = [
    "SEG_SERIES_NUMBER_OFFSET",
    "algorithm_family_code",
    "algorithm_identification",
    "build_seg",
    "content_label",
]

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER_OFFSET = 1000
"""Default SEG Series Number = source Series Number + this (1000 without a source number)."""


def algorithm_family_code(family: AlgorithmFamily) -> CodedConcept:
    """CID 7162 concept for an algorithm family."""
    if family is AlgorithmFamily.ARTIFICIAL_INTELLIGENCE:
        code = codes.cid7162.ArtificialIntelligence
    else:
        # Intensity thresholding is the textbook case of histogram analysis; CID 7162 has
        # no broader "classical image processing" concept.
        code = codes.cid7162.HistogramAnalysis
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def algorithm_identification(algorithm: AlgorithmIdentification) -> AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification Sequence for the model."""
    return AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=algorithm_family_code(algorithm.family),
        version=algorithm.version[:64],
    )


def build_seg(
    source_images: Sequence[Dataset],
    findings: SegmentationFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int | None = None,
    instance_number: int = 1,
) -> Segmentation:
    """Encode ``findings`` as a BINARY SEG referencing ``source_images``.

    ``source_images`` are the source series' headers; Pixel Data is not needed (highdicom
    takes geometry from Image Position/Orientation (Patient), Pixel Spacing, Rows, Columns).
    They may come in any order: frame k of ``findings.label_map`` belongs to the image whose
    SOP Instance UID is ``findings.source_sop_instance_uids[k]``.

    Raises :class:`EncodingError` when the findings and sources disagree, when there is no
    labelled voxel at all (a SEG needs at least one segment), or when highdicom refuses.
    """
    ordered = order_like_findings(source_images, findings)
    counts = label_voxel_counts(findings.label_map)
    labels = present_labels(findings, counts)
    if not labels:
        raise EncodingError("the label map has no labelled voxel: nothing to encode as SEG")
    pixel_array = _segment_number_map(findings.label_map, labels)
    descriptions = [
        _segment_description(number, label, findings.algorithm, uids)
        for number, label in enumerate(labels, start=1)
    ]
    local = any(segment_coding(label.name).is_local for label in labels)
    source = ordered[0]
    name = findings.algorithm.name
    try:
        seg = Segmentation(
            source_images=ordered,
            pixel_array=pixel_array,
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=uids.seg_series_instance_uid,
            series_number=(
                series_number
                if series_number is not None
                else default_series_number(source, SEG_SERIES_NUMBER_OFFSET)
            ),
            sop_instance_uid=uids.seg_sop_instance_uid,
            instance_number=instance_number,
            manufacturer=device.manufacturer,
            manufacturer_model_name=device.model_name,
            software_versions=device.software_version,
            device_serial_number=device.device_serial_number,
            content_label=content_label(name),
            content_description=f"{name} {findings.algorithm.version}"[:64],
            series_description=f"AI SEG {name}"[:64],
            omit_empty_frames=True,
            coding_schemes=[local_coding_scheme()] if local else None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"highdicom refused the SEG for {name}: {exc}") from exc
    logger.debug(
        "SEG %s: %d segment(s), %d frame(s)", seg.SOPInstanceUID, len(labels), seg.NumberOfFrames
    )
    return seg


def content_label(model_name: str) -> str:
    """Content Label (CS, 16 chars of A-Z 0-9 space underscore) from a model name."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", model_name.upper()).strip()[:16].rstrip()
    return label or "SEGMENTATION"


def _segment_number_map(
    label_map: npt.NDArray[np.uint16], labels: Sequence[SegmentLabel]
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """The label map with label values replaced by segment numbers 1..n (0 stays 0).

    When the present values already are 1..n the map is passed through uncopied; otherwise
    a table lookup per frame (``np.take`` on the whole volume is ~20x slower: it goes
    through an intp copy of the indices).
    """
    values = [label.value for label in labels]
    if values == list(range(1, len(values) + 1)) and int(label_map.max()) == len(values):
        return label_map
    dtype = np.uint8 if len(values) < 2**8 else np.uint16
    table = np.zeros(int(label_map.max()) + 1, dtype=dtype)
    table[values] = np.arange(1, len(values) + 1, dtype=dtype)
    segment_numbers = np.empty(label_map.shape, dtype=dtype)
    for plane, out in zip(label_map, segment_numbers, strict=True):
        np.take(table, plane, out=out)
    return segment_numbers


def _segment_description(
    number: int,
    label: SegmentLabel,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> SegmentDescription:
    coding = segment_coding(label.name)
    description = SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=coding.category,
        segmented_property_type=coding.property_type,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=uids.tracking_uid(label.value, label.name),
        tracking_id=label.name[:64],
        anatomic_regions=[coding.anatomic_region] if coding.anatomic_region else None,
        display_color=CIELabColor.from_rgb(*coding.display_rgb),
    )
    # highdicom has no parameters for the modifiers; both nest in their concept's item.
    if coding.property_type_modifier is not None:
        type_item: Dataset = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [coding.property_type_modifier]
    if coding.anatomic_region is not None and coding.anatomic_region_modifier is not None:
        region_item: Dataset = description.AnatomicRegionSequence[0]
        region_item.AnatomicRegionModifierSequence = [coding.anatomic_region_modifier]
    return description
