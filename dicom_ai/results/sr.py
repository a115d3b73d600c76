"""A SEG plus its findings -> TID 1500 Imaging Measurement Report (Comprehensive 3D SR).

One TID 1411 Volumetric ROI group per SEG segment: tracking identifier (same UID as the
segment's Tracking UID), finding type (the segment's property type), finding site where the
label implies one, and the segment's volume in ml.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from highdicom.seg import Segmentation
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    ReferencedSegment,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings, SegmentLabel
from dicom_ai.results.codes import SegmentCoding, is_local_code, local_coding_scheme, segment_coding
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.geometry import (
    default_series_number,
    label_voxel_counts,
    order_like_findings,
    present_labels,
    voxel_volume_mm3,
)
from dicom_ai.results.seg import algorithm_family_code
from dicom_ai.results.uids import ResultUIDs, device_observer_uid

__all__ = ["MILLILITER", "SR_SERIES_NUMBER_OFFSET", "build_sr", "procedure_reported"]

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER_OFFSET = 2000
"""Default SR Series Number = source Series Number + this (2000 without a source number)."""

MILLILITER = Code("ml", "UCUM", "milliliter")
"""UCUM unit of the volume measurements (not in pydicom's UCUM dictionary)."""

# CID 100 Quantitative Diagnostic Imaging Procedures, by source Modality.
_PROCEDURES: dict[str, Code] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
}


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
    series_number: int | None = None,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """Encode one volume measurement per segment of ``seg`` as a TID 1500 report.

    ``seg`` must be the SEG that :func:`~dicom_ai.results.seg.build_seg` made from the same
    ``findings`` (segments 1..n = labels with voxels in label-value order); the SR takes
    its patient and study from the source images and lists them and the SEG as evidence.
    """
    ordered = order_like_findings(source_images, findings)
    counts = label_voxel_counts(findings.label_map)
    labels = present_labels(findings, counts)
    _check_segments_match(seg, labels)
    voxel_ml = voxel_volume_mm3(ordered) / 1000.0
    source = ordered[0]
    source_series = SourceSeriesForSegmentation(str(source.SeriesInstanceUID))
    # highdicom capitalises this meaning; PS3.16 (and PixelMed's check) has it in lower case.
    source_series.ConceptNameCodeSequence[0].CodeMeaning = "Source series for segmentation"
    algorithm = AlgorithmIdentification(
        name=findings.algorithm.name[:64],
        version=findings.algorithm.version[:64],
        family=algorithm_family_code(findings.algorithm.family),
    )
    codings = [segment_coding(label.name) for label in labels]
    try:
        groups = [
            _volumetric_group(
                number,
                label,
                coding,
                seg,
                source_series,
                algorithm,
                uids,
                volume_ml=int(counts[label.value]) * voxel_ml,
            )
            for number, (label, coding) in enumerate(zip(labels, codings, strict=True), start=1)
        ]
        report = MeasurementReport(
            observation_context=_observation_context(device),
            procedure_reported=procedure_reported(str(source.get("Modality", ""))),
            imaging_measurements=groups,
        )
        local = any(is_local_code(coding.property_type) for coding in codings)
        sr = Comprehensive3DSR(
            # The source images first: highdicom takes patient, study and the acquisition
            # equipment from evidence[0], which must be the scanner's image, not our SEG.
            evidence=[*ordered, seg],
            content=report[0],
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
            series_description=f"AI SR {findings.algorithm.name}"[:64],
            # Every segment with voxels is reported; nobody has verified it.
            is_complete=True,
            is_final=False,
            is_verified=False,
            coding_schemes=[local_coding_scheme()] if local else None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(
            f"highdicom refused the SR for {findings.algorithm.name}: {exc}"
        ) from exc
    logger.debug("SR %s: %d measurement group(s)", sr.SOPInstanceUID, len(groups))
    return sr


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


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
    source_series: SourceSeriesForSegmentation,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
    *,
    volume_ml: float,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    site = _finding_site(coding)
    tracking = TrackingIdentifier(
        uid=uids.tracking_uid(label.value, label.name), identifier=label.name[:64]
    )
    volume = Measurement(
        name=codes.SCT.Volume,
        value=volume_ml,
        unit=MILLILITER,
        algorithm_id=algorithm,
    )
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_series=source_series,
        ),
        finding_type=coding.property_type,
        # Algorithm identification goes on the measurement (TID 1419): PixelMed's TID 1411
        # does not know it at group level.
        finding_sites=[site] if site is not None else None,
        measurements=[volume],
    )
