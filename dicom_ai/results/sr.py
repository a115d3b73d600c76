"""Findings -> TID 1500 Imaging Measurement Report (Comprehensive 3D SR).

- Segmentation (:func:`build_sr`): one TID 1411 Volumetric ROI group per SEG segment:
  tracking identifier (same UID as the segment's Tracking UID), finding type (the segment's
  property type), finding site where the label implies one, and the segment's volume in ml.
  A study job's report names every image of every series the model read (see
  :func:`build_sr`); the SEG lies on the reference series alone.
- Classification (:func:`build_classification_sr`): per classified image (or series) and
  class at or above the threshold, one TID 1501 group referencing the source images: the
  class as finding type, a qualitative evaluation "<class>: Present" and the probability
  as a numeric measurement (one bare group for an image where no class reaches it).
- Detection (:func:`build_detection_sr`): one TID 1410 Planar ROI group per finding: the
  bounding box's cross-section through its centre as a closed SCOORD3D POLYGON, its score
  (probability) and its size (width, height, depth in mm).
- 2-D detection (:func:`build_image_detection_sr`): one TID 1410 Planar ROI group per box:
  a closed SCOORD POLYLINE in the pixels of the image it was found on (projection images
  have no frame of reference), its probability, and its width and height in mm where the
  image has a pixel spacing.
- Landmarks (:func:`build_landmark_sr`): one TID 1410 Planar ROI group per landmark: its
  name as finding type, its position as a SCOORD3D POINT in the series' frame of reference,
  and the image (frame) it was found on as the group's "Illustration of ROI" (a SCOORD3D
  region names no image; TID 1410 has no other row for one).

Every report follows the IHE AI Results profile's header: title "Imaging Measurement
Report", procedure reported, language (English, US), the node as observer device
(manufacturer, model name, serial number = node id; the software version is in Software
Versions and the algorithm's in each group's algorithm identification), and the model's
intended use as a TEXT comment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_ai import _compat
from dicom_ai.errors import EncodingError, GeometryError
from dicom_ai.geometry import voxel_volume_mm3
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

SR_SERIES_NUMBER_OFFSET = 2000
"""Default SR Series Number = source Series Number + this (2000 without a source number)."""

MILLILITER = Code("ml", "UCUM", "milliliter")
"""UCUM unit of the volume measurements (not in pydicom's UCUM dictionary)."""

_LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")

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
    """Encode one volume measurement per segment of ``seg`` as a TID 1500 report.

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
        groups = [
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
            for number, (label, coding) in enumerate(zip(labels, codings, strict=True), start=1)
        ]
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
    centre (SCOORD3D POLYGON in the series' frame of reference), its probability and size.

    Without any detection the report holds one group that names the images and nothing
    else: the model ran on them and found nothing.
    """
    algorithm = _algorithm_item(findings.algorithm)
    with _refused_by_highdicom(findings.algorithm):
        referenced = _referenced(source_images, list(findings.source_sop_instance_uids))
        groups: list[
            PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
        ] = [
            _detection_group(number, detection, findings, algorithm, uids)
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
    return PlanarROIMeasurementsAndQualitativeEvaluations(
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
    return Comprehensive3DSR(
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
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        device_serial_number=device.device_serial_number,
        series_description=f"AI SR {algorithm.name}"[:64],
        # Everything the model found is reported; nobody has verified it.
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[local_coding_scheme()] if local else None,
    )


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
    findings: DetectionFindings,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    coding = segment_coding(detection.name)
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
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(uids.sr_sop_instance_uid, "detection", str(number)),
            identifier=f"{detection.name} {number}"[:64],
        ),
        referenced_region=ImageRegion3D(
            graphic_type=GraphicTypeValues3D.POLYGON,
            graphic_data=box_polygon(detection),
            frame_of_reference_uid=findings.frame_of_reference_uid,
        ),
        finding_type=coding.property_type,
        finding_sites=[FindingSite(coding.anatomic_region)] if coding.anatomic_region else None,
        measurements=measurements,
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
