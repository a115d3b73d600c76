"""Segmentation findings -> a BINARY DICOM Segmentation (highdicom).

BINARY, not LABELMAP: the label-map SOP class is rejected by DCMTK 3.6.7 and Orthanc 1.10
(FIELD-NOTES "DICOM objects"). One segment per label with voxels, numbered 1..n in
label-value order; frames without any voxel of a segment are omitted.

Sources are single-frame images (any number) or one enhanced multi-frame image; for the
latter the findings' ``source_frame_numbers`` say which source frame each label-map plane
belongs to, and highdicom gets the planes in source frame order (frame 1..N), so each SEG
frame references its source frame by Referenced Frame Number.
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
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from dicom_ai import _compat
from dicom_ai.enhanced import is_multiframe
from dicom_ai.errors import EncodingError
from dicom_ai.geometry import SAME_PLANE_TOLERANCE
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results.codes import local_coding_scheme, segment_coding
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.sources import (
    default_series_number,
    display_colours,
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
    "with_shared_geometry",
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
    takes geometry from Image Position/Orientation (Patient), Pixel Spacing, Rows, Columns,
    or for a multi-frame image from its functional groups). They may come in any order, and
    may repeat: frame k of ``findings.label_map`` belongs to the image whose SOP Instance UID
    is ``findings.source_sop_instance_uids[k]`` (its frame ``source_frame_numbers[k]`` for a
    multi-frame source).

    Raises :class:`EncodingError` when the findings and sources disagree, when there is no
    labelled voxel at all (a SEG needs at least one segment), or when highdicom refuses.
    """
    ordered = order_like_findings(source_images, findings)
    labels = present_labels(findings)
    if not labels:
        raise EncodingError("the label map has no labelled voxel: nothing to encode as SEG")
    pixel_array = _segment_number_map(findings.label_map, labels)
    if findings.source_frame_numbers is not None or is_multiframe(ordered[0]):
        sources, pixel_array = _multiframe_source(ordered, findings, pixel_array)
    else:
        sources = ordered
    colours = display_colours(findings)
    descriptions = [
        _segment_description(number, label, findings.algorithm, uids, colours[label.value])
        for number, label in enumerate(labels, start=1)
    ]
    local = any(segment_coding(label.name).is_local for label in labels)
    source = ordered[0]
    name = findings.algorithm.name
    # The node writes and sends the SEG, never queries it: highdicom's lookup tables are
    # skipped, and its IOD lookups for the sources cached (both fall back when highdicom
    # is not the version they were written for).
    _compat.cache_is_attribute_in_iod()
    try:
        seg = _compat.segmentation_without_luts()(
            source_images=sources,
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
            **device.equipment(),
            content_label=content_label(name),
            content_description=f"{name} {findings.algorithm.version}"[:64],
            series_description=f"AI SEG {name}"[:64],
            omit_empty_frames=True,
            coding_schemes=[local_coding_scheme()] if local else None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"highdicom refused the SEG for {name}: {exc}") from exc
    if "ImageOrientationPatient" not in ordered[0] and "PatientOrientation" not in seg:
        # A projection image (CR, DX, MG) has no patient frame: General Image then needs
        # the source's Patient Orientation (type 2C), which highdicom leaves out.
        seg.PatientOrientation = ordered[0].get("PatientOrientation", "")
    logger.debug(
        "SEG %s: %d segment(s), %d frame(s)", seg.SOPInstanceUID, len(labels), seg.NumberOfFrames
    )
    return seg


def content_label(model_name: str) -> str:
    """Content Label (CS, 16 chars of A-Z 0-9 space underscore) from a model name."""
    # highdicom refuses a code string that ends in a space or an underscore.
    label = re.sub(r"[^A-Z0-9_ ]", "_", model_name.upper()).strip(" _")[:16].rstrip(" _")
    return label or "SEGMENTATION"


def _multiframe_source(
    ordered: Sequence[Dataset],
    findings: SegmentationFindings,
    planes: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
) -> tuple[list[Dataset], npt.NDArray[np.uint8] | npt.NDArray[np.uint16]]:
    """The one multi-frame source, and the planes reordered to its frames 1..N.

    highdicom derives a SEG from one multi-frame image only, with one input plane per
    source frame in frame order; source frames without a plane get an empty one (omitted
    from the SEG as empty frames).
    """
    numbers = findings.source_frame_numbers
    if numbers is None:
        raise EncodingError(
            f"source {ordered[0].SOPInstanceUID} is a multi-frame image but the findings "
            "carry no source_frame_numbers"
        )
    if not all(is_multiframe(ds) for ds in ordered):
        raise EncodingError("findings with source_frame_numbers need multi-frame source images")
    instances = {str(ds.SOPInstanceUID) for ds in ordered}
    if len(instances) != 1:
        raise EncodingError(
            f"the findings span {len(instances)} multi-frame source instances; a SEG is "
            "derived from one multi-frame image"
        )
    source = ordered[0]
    count = int(source.get("NumberOfFrames") or 1)
    index = np.asarray(numbers, dtype=np.int64) - 1
    if len(set(numbers)) != len(numbers) or index.min() < 0 or index.max() >= count:
        raise EncodingError(
            f"source frame numbers must be distinct and within 1..{count} "
            f"(NumberOfFrames of {source.SOPInstanceUID})"
        )
    if len(index) == count and bool((index == np.arange(count)).all()):
        frames = planes
    else:
        frames = np.zeros((count, *planes.shape[1:]), dtype=planes.dtype)
        frames[index] = planes
    return [with_shared_geometry(source)], frames


# Functional groups highdicom reads from the Shared Functional Groups of a multi-frame source.
_SHARED_FOR_HIGHDICOM = ("PlaneOrientationSequence", "PixelMeasuresSequence")


def with_shared_geometry(source: Dataset) -> Dataset:
    """``source``, or a copy of its header with orientation and pixel measures moved into
    the Shared Functional Groups where they are per-frame but equal in every frame.

    highdicom takes both from the shared groups only; scanners (Philips MR among them) often
    repeat them per frame. The copy shares the element objects with ``source`` and is only
    handed to highdicom; the SEG references the source by its UIDs, which are unchanged.
    """
    shared_sequence = source.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else Dataset()
    missing = [name for name in _SHARED_FOR_HIGHDICOM if not shared.get(name)]
    if not missing:
        return source
    per_frame = source.PerFrameFunctionalGroupsSequence
    hoisted = Dataset()
    for element in shared:
        hoisted.add(element)
    for name in missing:
        items = [item.get(name) for item in per_frame]
        if not all(items):
            raise EncodingError(f"source {source.SOPInstanceUID} has no {name} for every frame")
        if any(not _same_item(items[0][0], other[0]) for other in items[1:]):
            raise EncodingError(
                f"source {source.SOPInstanceUID}: {name} differs between frames; a SEG needs "
                "one orientation and pixel spacing"
            )
        hoisted[name] = DataElement(Tag(name), "SQ", [items[0][0]])
    view = Dataset()
    for element in source:
        if element.keyword != "SharedFunctionalGroupsSequence":
            view.add(element)
    view.SharedFunctionalGroupsSequence = [hoisted]
    if hasattr(source, "file_meta"):
        view.file_meta = source.file_meta
    return view


def _same_item(first: Dataset, other: Dataset) -> bool:
    """Orientation and pixel spacing equal within the volume loader's tolerance."""
    for keyword in ("ImageOrientationPatient", "PixelSpacing"):
        a, b = first.get(keyword), other.get(keyword)
        if (a is None) != (b is None):
            return False
        if a is not None and (
            len(a) != len(b)
            or np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max()
            > SAME_PLANE_TOLERANCE
        ):
            return False
    return True


def _segment_number_map(
    label_map: npt.NDArray[np.uint16], labels: Sequence[SegmentLabel]
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """The label map with label values replaced by segment numbers 1..n (0 stays 0).

    When the present values already are 1..n the map is passed through uncopied; otherwise
    a table lookup per frame (``np.take`` on the whole volume is much slower: it goes
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
    rgb: tuple[int, int, int],
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
        display_color=CIELabColor.from_rgb(*rgb),
    )
    # highdicom has no parameters for the modifiers; both nest in their concept's item.
    if coding.property_type_modifier is not None:
        type_item: Dataset = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [coding.property_type_modifier]
    if coding.anatomic_region is not None and coding.anatomic_region_modifier is not None:
        region_item: Dataset = description.AnatomicRegionSequence[0]
        region_item.AnatomicRegionModifierSequence = [coding.anatomic_region_modifier]
    return description
