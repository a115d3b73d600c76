"""Findings -> TID 1500 Imaging Measurement Report (Comprehensive 3D SR).

- Segmentation (:func:`build_sr`): one TID 1411 Volumetric ROI group per SEG segment:
  tracking identifier (same UID as the segment's Tracking UID), finding type (the segment's
  property type), finding site where the label implies one, and the segment's volume in ml;
  before it a TID 1410 Planar ROI group of the same finding (same tracking UID): the
  segment's outline on its key slice (the source image of its largest cross-section) as a
  closed SCOORD POLYLINE, and the area it encloses in mm2. A study job's report names every
  image of every series the model read (see :func:`build_sr`); the SEG lies on the
  reference series alone.
- Classification (:func:`build_classification_sr`): per classified image (or series) and
  class at or above the threshold, one TID 1501 group referencing the source images: the
  class as finding type, a qualitative evaluation "<class>: Present" and the probability
  as a numeric measurement (one bare group for an image where no class reaches it).
- Detection (:func:`build_detection_sr`): one TID 1410 Planar ROI group per finding: the
  bounding box's cross-section through its centre, drawn on the source image nearest that
  centre as a closed SCOORD POLYLINE, its score (probability) and its size (width, height,
  depth in mm).
- 2-D detection (:func:`build_image_detection_sr`): one TID 1410 Planar ROI group per box:
  a closed SCOORD POLYLINE in the pixels of the image it was found on (projection images
  have no frame of reference), its probability, and its width and height in mm where the
  image has a pixel spacing.
- Landmarks (:func:`build_landmark_sr`): one TID 1410 Planar ROI group per landmark: its
  name as finding type, its position as a SCOORD3D POINT in the series' frame of reference,
  and the image (frame) it was found on as the group's "Illustration of ROI" (a SCOORD3D
  region names no image; TID 1410 has no other row for one).

OHIF (3.13, extensions/cornerstone-dicom-sr) draws a group only from a SCOORD or SCOORD3D
of a GraphicType it knows (POINT, MULTIPOINT, POLYLINE, CIRCLE, ELLIPSE; no POLYGON), merges
groups that share a Tracking Unique Identifier, and fails on the whole report when a merged
group has no coordinates: hence the planar companion of each volumetric group, and 2-D
boxes. Classification groups have no coordinates; OHIF cannot show them. OHIF lists a
finding as a tracked measurement only when Cornerstone's adapters can hydrate it: a
Tracking Identifier naming a Cornerstone tool (an outline is "PlanarFreehandROI"; a 4- or
5-point polyline is taken for a rectangle whatever its identifier), and the coordinates
also under the group's first measurement ("INFERRED FROM", TID 300), where the adapters
look for them. So each planar group carries its SCOORD twice: as TID 1410's Image Region
and under its first measurement.

Every report follows the IHE AI Results profile's header: title "Imaging Measurement
Report", procedure reported, language (English, US), the node as observer device
(manufacturer, model name, serial number = node id; the software version is in Software
Versions and the algorithm's in each group's algorithm identification), and the model's
intended use as a TEXT comment.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from highdicom.seg import Segmentation
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    ImageRegion3D,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    SourceImageForSegmentation,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from highdicom.sr.enum import GraphicTypeValues, GraphicTypeValues3D, RelationshipTypeValues
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from skimage.measure import find_contours

from dicom_ai import _compat
from dicom_ai.enhanced import is_multiframe, number_of_frames
from dicom_ai.errors import EncodingError, GeometryError
from dicom_ai.geometry import floats, plane_value, voxel_volume_mm3
from dicom_ai.inference.findings import (
    AlgorithmIdentification as FindingsAlgorithm,
)
from dicom_ai.inference.findings import (
    ClassificationFindings,
    Detection,
    DetectionFindings,
    ImageClassification,
    ImageDetection,
    ImageDetectionFindings,
    Landmark,
    LandmarkFindings,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results.codes import SegmentCoding, is_local_code, local_coding_scheme, segment_coding
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.seg import algorithm_family_code
from dicom_ai.results.sources import (
    default_series_number,
    order_like_findings,
    present_labels,
)
from dicom_ai.results.uids import ResultUIDs, derived_uid, device_observer_uid

__all__ = [
    "MILLILITER",
    "SR_SERIES_NUMBER_OFFSET",
    "box_polygon",
    "build_classification_sr",
    "build_detection_sr",
    "build_landmark_sr",
    "build_sr",
    "procedure_reported",
]

logger = logging.getLogger(__name__)

# Cornerstone3D's tracking identifier of a freehand outline (@cornerstonejs/adapters
# cornerstone3DTag and PlanarFreehandROI), what OHIF writes and hydrates.
_FREEHAND_OUTLINE = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
_SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")
_CONCEPT_NAME = 0x0040A043  # Concept Name Code Sequence
_CONTENT_SEQUENCE = 0x0040A730
_IMAGING_MEASUREMENTS = ("126010", "DCM")

SR_SERIES_NUMBER_OFFSET = 2000
"""Default SR Series Number = source Series Number + this (2000 without a source number)."""

MILLILITER = Code("ml", "UCUM", "milliliter")
"""UCUM unit of the volume measurements (not in pydicom's UCUM dictionary)."""

_LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")

# An outline with more points than this (after the straight runs' inner points go) is
# simplified within half a pixel: a ragged organ outline on a 512 x 512 slice has hundreds.
_MAX_OUTLINE_POINTS = 100
_OUTLINE_TOLERANCE_PIXELS = 0.5
_OUTLINE_POINT_CAP = 400

# CID 100 Quantitative Diagnostic Imaging Procedures, by source Modality.
_PROCEDURES: dict[str, Code] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
}
# "XR unspecified body region" is in CID 100 since 2023, but PixelMed (2022) refuses it:
# radiographs report "Imaging procedure".


def procedure_reported(modality: str) -> CodedConcept:
    """TID 1500 Procedure Reported for a source Modality; "Imaging procedure" otherwise."""
    code = _PROCEDURES.get(modality.strip().upper(), codes.cid100.ImagingProcedure)
    return _concept(code)


def build_sr(
    source_images: Sequence[Dataset],
    seg: Segmentation,
    findings: SegmentationFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    other_sources: Sequence[Dataset] = (),
    series_number: int | None = None,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """Encode one volume measurement per segment of ``seg`` as a TID 1500 report, each
    followed by the segment's outline and area on its key slice (see the module's notes).

    ``seg`` must be the SEG that :func:`~dicom_ai.results.seg.build_seg` made from the same
    ``findings`` (segments 1..n = labels with voxels in label-value order); the SR takes
    its patient and study from the source images and lists them and the SEG as evidence.

    ``other_sources`` are the headers of every instance of the other series a study job's
    model read besides ``source_images`` (the reference series, which the SEG lies on); they
    must be of the same study. With them the evidence lists them too, and each group names
    every image of every input series as a "Source image for segmentation".
    """
    ordered = order_like_findings(source_images, findings)
    counts = findings.voxel_counts
    labels = present_labels(findings)
    _check_segments_match(seg, labels)
    try:
        voxel_ml: float | None = voxel_volume_mm3(ordered) / 1000.0
    except GeometryError:
        # Projection images (CR, DX, MG) have no voxel volume: the segments are reported
        # without a volume measurement.
        voxel_ml = None
    source = ordered[0]
    others = _other_inputs(source, ordered, other_sources)
    algorithm = _algorithm_item(findings.algorithm)
    codings = [segment_coding(label.name) for label in labels]
    with _refused_by_highdicom(findings.algorithm):
        segmented_from = _segmentation_sources(ordered, others)
        groups: list[
            VolumetricROIMeasurementsAndQualitativeEvaluations
            | PlanarROIMeasurementsAndQualitativeEvaluations
        ] = []
        for number, (label, coding) in enumerate(zip(labels, codings, strict=True), start=1):
            # The outline first: OHIF takes a merged finding's tracking identifier from it.
            groups.append(_key_slice_group(label, coding, findings, ordered, algorithm, uids))
            groups.append(
                _volumetric_group(
                    number,
                    label,
                    coding,
                    seg,
                    segmented_from,
                    algorithm,
                    uids,
                    volume_ml=None if voxel_ml is None else int(counts[label.value]) * voxel_ml,
                )
            )
        sr = _document(
            ordered,
            [seg],
            groups,
            findings.algorithm,
            uids,
            device,
            [label.name for label in labels],
            series_number,
            instance_number,
            other_inputs=others,
        )
    logger.debug("SR %s: %d measurement group(s)", sr.SOPInstanceUID, len(groups))
    return sr


def build_classification_sr(
    source_images: Sequence[Dataset],
    findings: ClassificationFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int | None = None,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """TID 1501 groups referencing the source images: per class at or above the threshold,
    one with that class as finding type, "<class>: Present" and its probability.

    A result with no class above the threshold still gets a group (tracking identifier
    and source images, nothing else): the report then says the model ran and found none.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_images}
    algorithm = _algorithm_item(findings.algorithm)
    with _refused_by_highdicom(findings.algorithm):
        groups = [
            group
            for number, result in enumerate(findings.results, start=1)
            for group in _classification_groups(number, result, findings, by_uid, algorithm, uids)
        ]
        if not groups:
            raise EncodingError("classification findings without a result")
        referenced = _referenced(
            source_images,
            [uid for result in findings.results for uid in result.source_sop_instance_uids],
        )
        names = [score.name for result in findings.results for score in findings.found(result)]
        return _document(
            referenced,
            [],
            groups,
            findings.algorithm,
            uids,
            device,
            names,
            series_number,
            instance_number,
        )


def build_detection_sr(
    source_images: Sequence[Dataset],
    findings: DetectionFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int | None = None,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """One TID 1410 Planar ROI group per detection: the box's cross-section through its
    centre as a closed SCOORD POLYLINE on the source image (frame) nearest that centre, its
    probability and size.

    Without any detection the report holds one group that names the images and nothing
    else: the model ran on them and found nothing.
    """
    algorithm = _algorithm_item(findings.algorithm)
    with _refused_by_highdicom(findings.algorithm):
        referenced = _referenced(source_images, list(findings.source_sop_instance_uids))
        slices = _detection_slices(referenced, findings) if findings.detections else []
        groups: list[
            PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
        ] = [
            _detection_group(number, detection, slices, algorithm, uids)
            for number, detection in enumerate(findings.detections, start=1)
        ]
        names = [detection.name for detection in findings.detections]
        return _planar_report(
            referenced,
            groups,
            findings.algorithm,
            algorithm,
            uids,
            device,
            names,
            series_number,
            instance_number,
        )


def build_image_detection_sr(
    source_images: Sequence[Dataset],
    findings: ImageDetectionFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int | None = None,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """One TID 1410 Planar ROI group per 2-D detection: the box as a closed SCOORD
    POLYLINE on its image, its probability and (where the image has a pixel spacing) its
    width and height. Without any detection, one group names the images."""
    algorithm = _algorithm_item(findings.algorithm)
    with _refused_by_highdicom(findings.algorithm):
        referenced = _referenced(source_images, list(findings.source_sop_instance_uids))
        by_uid = {str(ds.SOPInstanceUID): ds for ds in referenced}
        groups: list[
            PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
        ] = [
            _image_detection_group(
                number, detection, by_uid[detection.source_sop_instance_uid], algorithm, uids
            )
            for number, detection in enumerate(findings.detections, start=1)
        ]
        names = [detection.name for detection in findings.detections]
        return _planar_report(
            referenced,
            groups,
            findings.algorithm,
            algorithm,
            uids,
            device,
            names,
            series_number,
            instance_number,
        )


def _pixel_spacing(image: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: Pixel Spacing, else a projection image's Imager
    Pixel Spacing; None when the image has neither."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = image.get(keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    return None


def _image_detection_group(
    number: int,
    detection: ImageDetection,
    image: Dataset,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    coding = segment_coding(detection.name)
    # SCOORD puts the centre of the first pixel at (0.5, 0.5); the box's pixel indices
    # have it at 0, and the box spans its edge pixels whole.
    first_column, first_row, last_column, last_row = detection.box
    left, top, right, bottom = first_column, first_row, last_column + 1, last_row + 1
    polyline = np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        dtype=np.float64,
    )
    measurements = [
        Measurement(
            codes.DCM.Probability, detection.score, codes.UCUM.NoUnits, algorithm_id=algorithm
        )
    ]
    spacing = _pixel_spacing(image)
    if spacing is not None:
        millimeter = codes.UCUM.Millimeter
        measurements += [
            Measurement(
                codes.SCT.Width, (right - left) * spacing[1], millimeter, algorithm_id=algorithm
            ),
            Measurement(
                codes.DCM.Height, (bottom - top) * spacing[0], millimeter, algorithm_id=algorithm
            ),
        ]
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(uids.sr_sop_instance_uid, "detection", str(number)),
            identifier=f"{detection.name} {number}"[:64],
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=polyline,
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=str(image.SOPClassUID),
                referenced_sop_instance_uid=str(image.SOPInstanceUID),
            ),
        ),
        finding_type=coding.property_type,
        finding_sites=[FindingSite(coding.anatomic_region)] if coding.anatomic_region else None,
        measurements=measurements,
    )
    return group


def build_landmark_sr(
    source_images: Sequence[Dataset],
    findings: LandmarkFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int | None = None,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """One TID 1410 Planar ROI group per landmark: its name as finding type, its position
    as a SCOORD3D POINT in the series' frame of reference, its image (and frame, for a
    multi-frame source) as the group's Illustration of ROI.

    Without any landmark the report holds one group that names the images and nothing
    else: the model ran on them and found nothing.
    """
    algorithm = _algorithm_item(findings.algorithm)
    frames_of_reference = {
        str(ds.FrameOfReferenceUID) for ds in source_images if "FrameOfReferenceUID" in ds
    }
    if frames_of_reference - {findings.frame_of_reference_uid}:
        # A point is only meaningful in the frame of reference the images are in.
        raise EncodingError(
            f"landmarks are in frame of reference {findings.frame_of_reference_uid}, the "
            f"source images in {sorted(frames_of_reference)}"
        )
    with _refused_by_highdicom(findings.algorithm):
        # The landmarks' own images first (the evidence), then the rest the model saw.
        referenced = _referenced(
            source_images,
            [
                *(landmark.source_sop_instance_uid for landmark in findings.landmarks),
                *findings.source_sop_instance_uids,
            ],
        )
        by_uid = {str(ds.SOPInstanceUID): ds for ds in referenced}
        groups: list[
            PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
        ] = [
            _landmark_group(
                number,
                landmark,
                by_uid[landmark.source_sop_instance_uid],
                findings,
                algorithm,
                uids,
            )
            for number, landmark in enumerate(findings.landmarks, start=1)
        ]
        names = [landmark.name for landmark in findings.landmarks]
        return _planar_report(
            referenced,
            groups,
            findings.algorithm,
            algorithm,
            uids,
            device,
            names,
            series_number,
            instance_number,
        )


def box_polygon(detection: Detection) -> npt.NDArray[np.float64]:
    """The box's cross-section through its centre, spanned by its row and column edges:
    a closed polygon of 5 points (first = last), in patient coordinates (mm)."""
    half_row, half_column = detection.edges[0] / 2, detection.edges[1] / 2
    corners = [
        detection.center - half_row - half_column,
        detection.center + half_row - half_column,
        detection.center + half_row + half_column,
        detection.center - half_row + half_column,
    ]
    return np.array([*corners, corners[0]], dtype=np.float64)


def _document(
    source_images: Sequence[Dataset],
    derived: Sequence[Dataset],
    groups: Sequence[
        VolumetricROIMeasurementsAndQualitativeEvaluations
        | PlanarROIMeasurementsAndQualitativeEvaluations
        | MeasurementsAndQualitativeEvaluations
    ],
    algorithm: FindingsAlgorithm,
    uids: ResultUIDs,
    device: DeviceIdentity,
    finding_names: Sequence[str],
    series_number: int | None,
    instance_number: int,
    *,
    other_inputs: Sequence[Dataset] = (),
) -> Comprehensive3DSR:
    """The TID 1500 document around ``groups`` (IHE AI Results header items included);
    ``finding_names`` tell whether the local coding scheme must be declared; the evidence
    lists ``source_images``, ``other_inputs`` (a study job's other series), ``derived``."""
    source = source_images[0]
    local = any(is_local_code(segment_coding(name).property_type) for name in finding_names)
    report = MeasurementReport(
        observation_context=_observation_context(device),
        procedure_reported=procedure_reported(str(source.get("Modality", ""))),
        imaging_measurements=list(groups),
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(_LANGUAGE),
    )
    content = report[0]
    if algorithm.intended_use.strip():
        content.ContentSequence.append(
            _qualitative_evaluations(
                [f"Intended use of {algorithm.name} {algorithm.version}: {algorithm.intended_use}"]
            )
        )
    # Each instance once (a multi-frame source repeats per frame).
    unique = {str(ds.SOPInstanceUID): ds for ds in [*source_images, *other_inputs, *derived]}
    document = Comprehensive3DSR(
        # The source images first: highdicom takes patient, study and the acquisition
        # equipment from evidence[0], which must be the scanner's image, not our SEG.
        evidence=list(unique.values()),
        content=content,
        series_instance_uid=uids.sr_series_instance_uid,
        series_number=(
            series_number
            if series_number is not None
            else default_series_number(source, SR_SERIES_NUMBER_OFFSET)
        ),
        sop_instance_uid=uids.sr_sop_instance_uid,
        instance_number=instance_number,
        **device.equipment(),
        series_description=f"AI SR {algorithm.name}"[:64],
        # Everything the model found is reported; nobody has verified it.
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[local_coding_scheme()] if local else None,
    )
    for container in document.ContentSequence:
        if _code_of(container) == _IMAGING_MEASUREMENTS:
            for group in container.ContentSequence:
                _coordinates_under_first_measurement(group)
    return document


def _coordinates_under_first_measurement(group: Dataset) -> None:
    """A planar group's Image Region again, as "INFERRED FROM" of its first measurement
    (TID 300 row 8, via TID 320): where Cornerstone's SR adapters, and so OHIF's tracked
    measurements, look for a measurement's coordinates."""
    items = group.get("ContentSequence", [])
    region = next((item for item in items if item.ValueType in ("SCOORD", "SCOORD3D")), None)
    measurement = next((item for item in items if item.ValueType == "NUM"), None)
    if region is None or measurement is None:
        return
    # TID 320's names: the region is the "Source of Measurement", its image unnamed.
    inferred = _plain(region)
    inferred.RelationshipType = RelationshipTypeValues.INFERRED_FROM.value
    inferred.ConceptNameCodeSequence = [_concept(_SOURCE_OF_MEASUREMENT)]
    images = [_plain(item) for item in region.get("ContentSequence", [])]
    for image in images:
        if _CONCEPT_NAME in image:
            del image[_CONCEPT_NAME]
    inferred.ContentSequence = images
    # As a plain element: highdicom's items check each item of a content sequence set on
    # them, and take no unnamed image.
    children = [*measurement.get("ContentSequence", []), inferred]
    measurement[_CONTENT_SEQUENCE] = DataElement(_CONTENT_SEQUENCE, "SQ", DicomSequence(children))


def _code_of(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodeValue), str(name.CodingSchemeDesignator)


@contextmanager
def _refused_by_highdicom(algorithm: FindingsAlgorithm) -> Iterator[None]:
    """highdicom's constructors validate and raise plain errors: they become EncodingError.

    Every SR build runs in here; highdicom's IOD lookup, which its content items make for
    each source image, is cached for it as for the SEG.
    """
    _compat.cache_is_attribute_in_iod()
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"highdicom refused the SR for {algorithm.name}: {exc}") from exc


def _qualitative_evaluations(comments: Sequence[str]) -> ContainerContentItem:
    # PS3.16 has no concept for a model's intended use (nor for "nothing found"): they go as
    # TEXT comments into the report's Qualitative Evaluations container (TID 1500 row 14).
    container = ContainerContentItem(
        name=CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=codes.DCM.Comment,
                value=comment,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
            for comment in comments
        ]
    )
    return container


def _algorithm_item(algorithm: FindingsAlgorithm) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name[:64],
        version=algorithm.version[:64],
        family=algorithm_family_code(algorithm.family),
    )


def _referenced(
    source_images: Sequence[Dataset], sop_instance_uids: Sequence[str]
) -> list[Dataset]:
    """The source headers named by ``sop_instance_uids``, each once, in first-named order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_images}
    missing = [uid for uid in sop_instance_uids if uid not in by_uid]
    if missing or not sop_instance_uids:
        raise EncodingError(
            f"{len(missing)} source instance(s) of the findings are not among the "
            f"{len(source_images)} source images"
        )
    return [by_uid[uid] for uid in dict.fromkeys(sop_instance_uids)]


def _classification_groups(
    number: int,
    result: ImageClassification,
    findings: ClassificationFindings,
    by_uid: dict[str, Dataset],
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One group per class found (its finding type, "<class>: Present", its probability);
    one bare group, naming the images, when no class reaches the threshold."""
    frames = result.source_frame_numbers
    sources = [
        SourceImageForMeasurementGroup.from_source_image(
            by_uid[uid], referenced_frame_numbers=[frames[k]] if frames else None
        )
        for k, uid in enumerate(result.source_sop_instance_uids)
    ]
    groups = []
    for score in findings.found(result) or (None,):
        name = "no class above threshold" if score is None else score.name
        tracking = TrackingIdentifier(
            uid=derived_uid(uids.sr_sop_instance_uid, "classification", str(number), name),
            identifier=f"{number}: {name}"[:64],
        )
        if score is None:
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking, algorithm_id=algorithm, source_images=sources
                )
            )
            continue
        finding = segment_coding(score.name).property_type
        probability = Measurement(
            name=codes.DCM.Probability,
            value=score.probability,
            unit=codes.UCUM.NoUnits,
            algorithm_id=algorithm,
        )
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[probability],
                qualitative_evaluations=[QualitativeEvaluation(finding, codes.SCT.Present)],
                source_images=sources,
            )
        )
    return groups


def _planar_report(
    referenced: Sequence[Dataset],
    groups: list[
        PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    ],
    findings_algorithm: FindingsAlgorithm,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
    device: DeviceIdentity,
    names: Sequence[str],
    series_number: int | None,
    instance_number: int,
) -> Comprehensive3DSR:
    """The report of planar groups (boxes, points); with none, one group that names the
    images and nothing else: the model ran on them and found nothing."""
    if not groups:
        groups.append(_nothing_found(referenced, algorithm, uids))
    return _document(
        referenced,
        [],
        groups,
        findings_algorithm,
        uids,
        device,
        names,
        series_number,
        instance_number,
    )


def _nothing_found(
    images: Sequence[Dataset], algorithm: AlgorithmIdentification, uids: ResultUIDs
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(uids.sr_sop_instance_uid, "nothing found"),
            identifier="nothing found at or above the threshold",
        ),
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in images],
    )


def _detection_group(
    number: int,
    detection: Detection,
    slices: Sequence[_Plane],
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    coding = segment_coding(detection.name)
    # OHIF draws no SCOORD3D POLYGON (and a SCOORD3D only on a series of its frame of
    # reference); a SCOORD POLYLINE of 5 points on an image it draws, and also hydrates as a
    # RectangleROI measurement.
    plane = min(slices, key=lambda s: s.distance(detection.center))
    width, height, depth = detection.size_mm
    millimeter = codes.UCUM.Millimeter
    measurements = [
        Measurement(
            codes.DCM.Probability, detection.score, codes.UCUM.NoUnits, algorithm_id=algorithm
        ),
        Measurement(codes.SCT.Width, width, millimeter, algorithm_id=algorithm),
        Measurement(codes.DCM.Height, height, millimeter, algorithm_id=algorithm),
        Measurement(codes.SCT.Depth, depth, millimeter, algorithm_id=algorithm),
    ]
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(uids.sr_sop_instance_uid, "detection", str(number)),
            identifier=f"{detection.name} {number}"[:64],
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=plane.scoord(box_polygon(detection)),
            source_image=plane.source_image(),
        ),
        finding_type=coding.property_type,
        finding_sites=[FindingSite(coding.anatomic_region)] if coding.anatomic_region else None,
        measurements=measurements,
    )
    return group


@dataclass(frozen=True)
class _Plane:
    """One source image (or frame of one) and where its pixels lie in patient space."""

    image: Dataset
    frame_number: int | None
    origin: npt.NDArray[np.float64]  # ImagePositionPatient: the centre of the first pixel
    row_cosines: npt.NDArray[np.float64]  # along a row: the column index grows
    column_cosines: npt.NDArray[np.float64]  # along a column: the row index grows
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns

    def distance(self, point: npt.NDArray[np.float64]) -> float:
        normal = np.cross(self.row_cosines, self.column_cosines)
        return abs(float((point - self.origin) @ normal))

    def scoord(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Patient points (n, 3) projected onto the image, as SCOORD (column, row) pixel
        coordinates: PS3.3 C.18.6.1.2 puts the first pixel's centre at (0.5, 0.5)."""
        offset = points - self.origin
        column = offset @ self.row_cosines / self.spacing[1] + 0.5
        row = offset @ self.column_cosines / self.spacing[0] + 0.5
        return np.column_stack([column, row]).astype(np.float64)

    def source_image(self) -> SourceImageForRegion:
        return SourceImageForRegion(
            referenced_sop_class_uid=str(self.image.SOPClassUID),
            referenced_sop_instance_uid=str(self.image.SOPInstanceUID),
            referenced_frame_numbers=[self.frame_number] if self.frame_number else None,
        )


def _detection_slices(referenced: Sequence[Dataset], findings: DetectionFindings) -> list[_Plane]:
    """Every source image (frame) the detector read, placed in patient space."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in referenced}
    numbers = findings.source_frame_numbers
    wanted: dict[tuple[str, int | None], Dataset] = {}
    for k, uid in enumerate(findings.source_sop_instance_uids):
        image = by_uid[uid]
        if numbers is not None:
            wanted[(uid, numbers[k])] = image
        elif is_multiframe(image):
            for number in range(1, number_of_frames(image) + 1):
                wanted[(uid, number)] = image
        else:
            wanted[(uid, None)] = image
    try:
        return [_plane(image, frame) for (_, frame), image in wanted.items()]
    except GeometryError as exc:
        raise EncodingError(f"cannot draw the detections on their images: {exc}") from exc


def _plane(image: Dataset, frame_number: int | None) -> _Plane:
    where = f"instance {image.SOPInstanceUID}" + (f" frame {frame_number}" if frame_number else "")

    def values(keyword: str, count: int) -> tuple[float, ...]:
        return floats(plane_value(image, frame_number, keyword, where), count, keyword, where)

    orientation = np.array(values("ImageOrientationPatient", 6), dtype=np.float64)
    row_spacing, column_spacing = values("PixelSpacing", 2)
    return _Plane(
        image=image,
        frame_number=frame_number,
        origin=np.array(values("ImagePositionPatient", 3), dtype=np.float64),
        row_cosines=orientation[:3],
        column_cosines=orientation[3:],
        spacing=(row_spacing, column_spacing),
    )


def _landmark_group(
    number: int,
    landmark: Landmark,
    source: Dataset,
    findings: LandmarkFindings,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    if not np.all(np.isfinite(landmark.position)):
        raise EncodingError(f"landmark {landmark.name!r} has no finite position")
    coding = segment_coding(landmark.name)
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(uids.sr_sop_instance_uid, "landmark", str(number), landmark.name),
            identifier=f"{landmark.name} {number}"[:64],
        ),
        referenced_region=ImageRegion3D(
            graphic_type=GraphicTypeValues3D.POINT,
            graphic_data=np.asarray(landmark.position, dtype=np.float64).reshape(1, 3),
            frame_of_reference_uid=findings.frame_of_reference_uid,
        ),
        finding_type=coding.property_type,
        algorithm_id=algorithm,
        finding_sites=[site] if (site := _finding_site(coding)) is not None else None,
    )
    frame = landmark.source_frame_number
    group[0].ContentSequence.append(
        ImageContentItem(
            name=codes.DCM.IllustrationOfROI,
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            referenced_frame_numbers=[frame] if frame is not None else None,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def _other_inputs(
    source: Dataset, ordered: Sequence[Dataset], other_sources: Sequence[Dataset]
) -> list[Dataset]:
    """A study job's other input instances, each once and none of the reference series'
    frames again; all of the reference's study (the SR and its evidence stay in it)."""
    seen = {str(ds.SOPInstanceUID) for ds in ordered}
    others: list[Dataset] = []
    study = str(source.StudyInstanceUID)
    for ds in other_sources:
        if str(ds.get("StudyInstanceUID")) != study:
            raise EncodingError(
                f"input series {ds.get('SeriesInstanceUID')} is of study "
                f"{ds.get('StudyInstanceUID')}, the reference series {source.SeriesInstanceUID} "
                f"of study {study}: a study job's inputs must all be of one study"
            )
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            others.append(ds)
    return others


def _segmentation_sources(
    ordered: Sequence[Dataset], others: Sequence[Dataset]
) -> SourceSeriesForSegmentation | list[SourceImageForSegmentation]:
    """What each TID 1411 group says its segment was made from: the reference series, or,
    for a study job, every image of every series the model read.

    TID 1411 names a segment's source as one "Source series for segmentation" (row 12,
    UIDREF, VM 1) or as "Source image for segmentation" items (row 11, IMAGE, 1-n), not
    both: PixelMed's validator refuses both or two series, highdicom's reader likewise. So
    only row 11 can name several series, through their images (their series UIDs are in
    the evidence). TID 4019 (algorithm identification) has no row for inputs; an Image
    Library (TID 1600) would list the images without saying the segments came from them.
    """
    if not others:
        series = SourceSeriesForSegmentation(str(ordered[0].SeriesInstanceUID))
        # highdicom capitalises this meaning; PS3.16 (and PixelMed's check) has it in lower case.
        series.ConceptNameCodeSequence[0].CodeMeaning = "Source series for segmentation"
        return series
    images = []
    for ds in {str(ds.SOPInstanceUID): ds for ds in [*ordered, *others]}.values():
        image = SourceImageForSegmentation.from_source_image(ds)
        image.ConceptNameCodeSequence[0].CodeMeaning = "Source image for segmentation"
        images.append(image)
    return images


def _check_segments_match(seg: Segmentation, labels: Sequence[SegmentLabel]) -> None:
    segments = list(seg.SegmentSequence)
    seg_labels = [(int(item.SegmentNumber), str(item.SegmentLabel)) for item in segments]
    expected = [(number, label.name[:64]) for number, label in enumerate(labels, start=1)]
    if seg_labels != expected:
        raise EncodingError(
            f"SEG {seg.SOPInstanceUID} segments {seg_labels} do not match the findings' "
            f"labels {expected}"
        )


def _observation_context(device: DeviceIdentity) -> ObservationContext:
    observer = DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(device.device_serial_number),
        name=device.device_serial_number,
        manufacturer_name=device.manufacturer,
        model_name=device.model_name,
        serial_number=device.device_serial_number,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=_concept(codes.cid270.Device),
            observer_identifying_attributes=observer,
        )
    )


def _finding_site(coding: SegmentCoding) -> FindingSite | None:
    # A lesion's site is its anatomic region; an organ's is the organ, when it has a side.
    if coding.anatomic_region is not None:
        return FindingSite(coding.anatomic_region, laterality=coding.laterality)
    if coding.laterality is not None:
        return FindingSite(coding.property_type, laterality=coding.laterality)
    return None


def _volumetric_group(
    number: int,
    label: SegmentLabel,
    coding: SegmentCoding,
    seg: Segmentation,
    segmented_from: SourceSeriesForSegmentation | list[SourceImageForSegmentation],
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
    *,
    volume_ml: float | None,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    site = _finding_site(coding)
    tracking = TrackingIdentifier(
        uid=uids.tracking_uid(label.value, label.name), identifier=label.name[:64]
    )
    volume = (
        None
        if volume_ml is None
        else Measurement(
            name=codes.SCT.Volume, value=volume_ml, unit=MILLILITER, algorithm_id=algorithm
        )
    )
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_series=(
                segmented_from if isinstance(segmented_from, SourceSeriesForSegmentation) else None
            ),
            source_images=segmented_from if isinstance(segmented_from, list) else None,
        ),
        finding_type=coding.property_type,
        # Algorithm identification goes on the measurement (TID 1419): PixelMed's TID 1411
        # does not know it at group level.
        finding_sites=[site] if site is not None else None,
        measurements=[volume] if volume is not None else None,
    )


def _key_slice_group(
    label: SegmentLabel,
    coding: SegmentCoding,
    findings: SegmentationFindings,
    ordered: Sequence[Dataset],
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """The segment's outline on its key slice (the frame of its largest cross-section, the
    first of equals) and the area the outline encloses."""
    k = int(np.argmax(findings.frame_voxel_counts[:, label.value]))
    image = ordered[k]
    frame = findings.source_frame_numbers[k] if findings.source_frame_numbers else None
    outline = _segment_outline(findings.label_map[k] == label.value)
    spacing = _frame_pixel_spacing(image, frame)
    measurements = None
    if spacing is not None:
        area = _enclosed_area(outline) * spacing[0] * spacing[1]
        measurements = [
            Measurement(codes.SCT.Area, area, codes.UCUM.SquareMillimeter, algorithm_id=algorithm)
        ]
    site = _finding_site(coding)
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        # The volumetric group's UID (the SEG segment's Tracking UID): both groups are about
        # one finding. OHIF merges groups by this UID; a volumetric group left alone,
        # without coordinates, makes its SR loader fail on the whole report. The identifier
        # is the Cornerstone tool OHIF hydrates an outline with; the finding type names it.
        tracking_identifier=TrackingIdentifier(
            uid=uids.tracking_uid(label.value, label.name), identifier=_FREEHAND_OUTLINE
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=str(image.SOPClassUID),
                referenced_sop_instance_uid=str(image.SOPInstanceUID),
                referenced_frame_numbers=[frame] if frame is not None else None,
            ),
        ),
        finding_type=coding.property_type,
        # Algorithm identification on the area, as on the volume: PixelMed's TID 1410 does
        # not know it at group level either.
        finding_sites=[site] if site is not None else None,
        measurements=measurements,
    )
    return group


def _plain(item: Dataset) -> Dataset:
    plain = Dataset()
    for element in item:
        plain.add(copy.deepcopy(element))
    return plain


def _segment_outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The outline of ``mask``'s largest part as a closed polyline (first point = last) in
    SCOORD pixel coordinates (column, row; the first pixel's centre at 0.5, 0.5).

    The outline runs between the pixel centres inside and outside (marching squares at
    0.5, diagonal neighbours connected); of several outlines (parts, holes) the one that
    encloses the largest area: TID 1410 has one region a group, and an outer outline
    encloses its holes. Long outlines are simplified within half a pixel.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise EncodingError("a segment has no voxel on its key slice")
    top, left = int(rows[0]), int(columns[0])
    # Cropped to the part's bounding box, with a background margin so every outline closes.
    crop = np.pad(mask[top : int(rows[-1]) + 1, left : int(columns[-1]) + 1], 1)
    contours = find_contours(  # type: ignore[no-untyped-call]
        crop.astype(np.float32), 0.5, fully_connected="high"
    )
    largest = _without_straight_points(max(contours, key=_enclosed_area))
    if len(largest) > _MAX_OUTLINE_POINTS:
        largest = _simplified(largest, _OUTLINE_TOLERANCE_PIXELS)
    tolerance = _OUTLINE_TOLERANCE_PIXELS
    while len(largest) > _OUTLINE_POINT_CAP:
        # A ragged outline (an untrained model's speckle) would make an SR of megabytes
        # that readers and validators choke on: coarser until it is not.
        tolerance *= 2.0
        largest = _simplified(largest, tolerance)
    # Crop index (row, column) -> pixel index (less the margin) -> SCOORD (+0.5).
    return np.column_stack([largest[:, 1] + left - 0.5, largest[:, 0] + top - 0.5])


def _without_straight_points(ring: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A closed polyline less the points in the middle of a straight run: lossless, one
    vectorised step (Douglas-Peucker takes one per point kept); the coordinates are
    multiples of 0.5, so the cross products are exact."""
    points = ring[:-1]
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turns = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0
    kept = points[turns]
    return np.concatenate([kept, kept[:1]])


def _simplified(polyline: npt.NDArray[np.float64], tolerance: float) -> npt.NDArray[np.float64]:
    """Douglas-Peucker: the polyline's points that keep every dropped point within
    ``tolerance`` of the simplified line (its first and last points kept).

    skimage's ``approximate_polygon`` does the same, but with sin and cos (whose last bit
    differs between maths libraries, and outline points often lie exactly half a pixel
    from a chord), and is slower. Here the comparisons are of squared distances
    times the chord's squared length, exact for coordinates in halves of a pixel.
    """
    keep = np.zeros(len(polyline), dtype=np.bool_)
    keep[[0, -1]] = True
    pending = [(0, len(polyline) - 1)]
    while pending:
        start, end = pending.pop()
        if end - start < 2:
            continue
        inner = polyline[start + 1 : end] - polyline[start]
        chord = polyline[end] - polyline[start]
        length2 = float(chord @ chord)
        to_start = np.einsum("ij,ij->i", inner, inner)
        if length2 == 0.0:  # a closed outline's first chord: distance to its point
            scaled, limit = to_start, tolerance**2
        else:
            along = inner @ chord
            beyond = inner - chord
            cross = inner[:, 0] * chord[1] - inner[:, 1] * chord[0]
            scaled = np.where(
                along <= 0.0,
                to_start * length2,
                np.where(
                    along >= length2, np.einsum("ij,ij->i", beyond, beyond) * length2, cross**2
                ),
            )
            limit = tolerance**2 * length2
        farthest = int(np.argmax(scaled))
        if scaled[farthest] > limit:
            middle = start + 1 + farthest
            keep[middle] = True
            pending += [(start, middle), (middle, end)]
    return polyline[keep]


def _enclosed_area(polyline: npt.NDArray[np.float64]) -> float:
    """Area enclosed by a closed polyline (shoelace), in squared coordinate units."""
    x, y = polyline[:, 0], polyline[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def _frame_pixel_spacing(image: Dataset, frame_number: int | None) -> tuple[float, float] | None:
    """(row, column) spacing in mm of one image or frame (an enhanced image's from its
    functional groups); None when it has none."""
    if frame_number is None:
        return _pixel_spacing(image)
    where = f"instance {image.SOPInstanceUID} frame {frame_number}"
    try:
        row, column = floats(
            plane_value(image, frame_number, "PixelSpacing", where), 2, "PixelSpacing", where
        )
    except GeometryError:
        return None
    return row, column
