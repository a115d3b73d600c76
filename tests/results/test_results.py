"""Findings -> SEG and TID 1500 SR, validated by dciodvfy and PixelMed and read back strictly.

The source images are header-only (read with ``stop_before_pixels``), as in the pipeline.
Expected values are computed here independently of ``dicom_ai.results`` (voxel volume from
the phantom's spec, masks from the label map), so the tests fail when the encoders err.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from dicom_ai.errors import EncodingError
from dicom_ai.geometry import slice_spacing_mm
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import (
    LOCAL_CODING_SCHEME_DESIGNATOR,
    DeviceIdentity,
    build_seg,
    build_sr,
    normalize_label_name,
    result_uids,
    segment_coding,
)
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, phantom_hu_volume
from tests.dicom_validation import (
    assert_dciodvfy_clean,
    assert_sr_template_valid,
    not_in_template,
)
from tests.results_check import sr_evidence_uids

pytestmark = [pytest.mark.dciodvfy, pytest.mark.java]

SLICES = 24
SPEC = PhantomSpec(
    slices=SLICES,
    study_instance_uid="1.2.826.0.1.3680043.8.498.1001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.1002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1003",
)
VOXEL_MM3 = SPEC.pixel_spacing_mm * SPEC.pixel_spacing_mm * SPEC.slice_thickness_mm
DEVICE = DeviceIdentity.for_node("node-test-1")
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")

# The MONAI wholeBody_ct_segmentation bundle's 104 labels (TotalSegmentator v1 classes).
WHOLE_BODY_LABELS = (
    "spleen kidney_right kidney_left gallbladder liver stomach aorta inferior_vena_cava "
    "portal_vein_and_splenic_vein pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right "
    "lung_lower_lobe_right "
    + " ".join(f"vertebrae_L{i}" for i in range(5, 0, -1))
    + " "
    + " ".join(f"vertebrae_T{i}" for i in range(12, 0, -1))
    + " "
    + " ".join(f"vertebrae_C{i}" for i in range(7, 0, -1))
    + " esophagus trachea heart_myocardium heart_atrium_left heart_ventricle_left "
    "heart_atrium_right heart_ventricle_right pulmonary_artery brain iliac_artery_left "
    "iliac_artery_right iliac_vena_left iliac_vena_right small_bowel duodenum colon "
    + " ".join(f"rib_left_{i}" for i in range(1, 13))
    + " "
    + " ".join(f"rib_right_{i}" for i in range(1, 13))
    + " humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right "
    "femur_left femur_right hip_left hip_right sacrum face gluteus_maximus_left "
    "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left "
    "gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right "
    "urinary_bladder"
).split()


@dataclass(frozen=True)
class Case:
    """One encoded result and everything needed to check it."""

    name: str
    findings: SegmentationFindings
    headers: list[Dataset]  # shuffled, header-only
    seg_path: Path
    sr_path: Path

    @property
    def present(self) -> list[SegmentLabel]:
        values = set(np.unique(self.findings.label_map).tolist())
        return sorted(
            (label for label in self.findings.labels if label.value in values),
            key=lambda label: label.value,
        )


def _header_only(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    header = pydicom.dcmread(buffer, stop_before_pixels=True)
    assert "PixelData" not in header
    return header


@pytest.fixture(scope="module")
def phantom() -> tuple[list[Dataset], npt.NDArray[np.int16]]:
    headers = [_header_only(ds) for ds in phantom_ct_datasets(SPEC)]
    return headers, phantom_hu_volume(SPEC)


def _ct_threshold_findings(
    headers: list[Dataset], hu: npt.NDArray[np.int16]
) -> SegmentationFindings:
    label_map = np.zeros(hu.shape, dtype=np.uint16)
    label_map[hu > -500] = 1  # body
    label_map[(hu > -950) & (hu <= -500)] = 2  # lung
    label_map[hu > 200] = 3  # bone
    return SegmentationFindings(
        label_map=label_map,
        labels=(SegmentLabel(1, "body"), SegmentLabel(2, "lung"), SegmentLabel(3, "bone")),
        algorithm=AlgorithmIdentification("CT threshold", "1.0", AlgorithmFamily.CLASSICAL),
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
    )


def _whole_body_findings(headers: list[Dataset], hu: npt.NDArray[np.int16]) -> SegmentationFindings:
    label_map = np.zeros(hu.shape, dtype=np.uint16)
    label_map[(hu >= 46) & (hu < 55)] = 1  # spleen: noisy HU window, speckled on purpose
    label_map[(hu >= 55) & (hu < 80)] = 5  # liver
    label_map[(hu > -900) & (hu <= -700)] = 13  # lung_upper_lobe_left: a Left modifier
    label_map[hu > 200] = 22  # vertebrae_L1
    label_map[3:6, 250:262, 250:262] = 150  # a label with no standard code
    return SegmentationFindings(
        label_map=label_map,
        labels=(
            SegmentLabel(1, "spleen"),
            SegmentLabel(3, "kidney_left"),  # declared, no voxels: no segment
            SegmentLabel(5, "liver"),
            SegmentLabel(13, "lung_upper_lobe_left"),
            SegmentLabel(22, "vertebrae_L1"),
            SegmentLabel(150, "Mystery Blob"),
        ),
        algorithm=AlgorithmIdentification(
            "wholeBody_ct_segmentation", "0.2.0", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE
        ),
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
    )


@pytest.fixture(scope="module", params=["ct_threshold", "whole_body"])
def case(
    request: pytest.FixtureRequest,
    phantom: tuple[list[Dataset], npt.NDArray[np.int16]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Case]:
    headers, hu = phantom
    make = _ct_threshold_findings if request.param == "ct_threshold" else _whole_body_findings
    findings = make(headers, hu)
    shuffled = list(headers)
    random.Random(7).shuffle(shuffled)  # the encoders must order by the findings' UIDs
    uids = result_uids(SPEC.series_instance_uid, request.param, findings.algorithm.version)
    seg = build_seg(shuffled, findings, uids, DEVICE)
    sr = build_sr(shuffled, seg, findings, uids, DEVICE)
    directory = tmp_path_factory.mktemp(request.param)
    seg_path, sr_path = directory / "seg.dcm", directory / "sr.dcm"
    for dataset, path in ((seg, seg_path), (sr, sr_path)):
        path.write_bytes(file_bytes(dataset))  # as the worker writes it; then pydicom's own
        dataset.save_as(path.with_suffix(".save_as"), enforce_file_format=True)
    yield Case(request.param, findings, shuffled, seg_path, sr_path)


# --- validators ---------------------------------------------------------------------


def test_seg_passes_dciodvfy(case: Case) -> None:
    assert_dciodvfy_clean(case.seg_path)


def test_sr_passes_dciodvfy(case: Case) -> None:
    assert_dciodvfy_clean(case.sr_path)


@pytest.mark.slow
def test_sr_passes_pixelmed_tid1500_validation(case: Case) -> None:
    output = assert_sr_template_valid(case.sr_path)
    assert "Found Root Template TID_1500" in output
    assert not not_in_template(output), output


def test_results_are_written_as_pydicom_writes_them(case: Case) -> None:
    for path in (case.seg_path, case.sr_path):
        assert path.read_bytes() == path.with_suffix(".save_as").read_bytes()


def test_dciodvfy_helper_fails_on_a_broken_object(case: Case, tmp_path: Path) -> None:
    broken = pydicom.dcmread(case.seg_path)
    del broken.SeriesInstanceUID
    path = tmp_path / "broken.dcm"
    broken.save_as(path)
    with pytest.raises(AssertionError, match="SeriesInstanceUID"):
        assert_dciodvfy_clean(path)


# --- SEG ----------------------------------------------------------------------------


def test_seg_segments_are_the_present_labels_with_their_codes(case: Case) -> None:
    seg = hd.seg.segread(case.seg_path)
    assert seg.SegmentationType == "BINARY"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    present = case.present
    assert len(seg.SegmentSequence) == len(present) >= 3
    family = (
        codes.cid7162.ArtificialIntelligence
        if case.findings.algorithm.family is AlgorithmFamily.ARTIFICIAL_INTELLIGENCE
        else codes.cid7162.HistogramAnalysis
    )
    for number, (item, label) in enumerate(zip(seg.SegmentSequence, present, strict=True), 1):
        coding = segment_coding(label.name)
        assert item.SegmentNumber == number
        assert item.SegmentLabel == label.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == case.findings.algorithm.name
        assert algorithm.AlgorithmVersion == case.findings.algorithm.version
        assert _code(algorithm.AlgorithmFamilyCodeSequence[0]) == (family.value, "DCM")
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert _code(category) == (coding.category.value, coding.category.scheme_designator)
        assert category.CodeValue != "123037004"  # the CSV's retired "Body structure"
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert _code(prop) == (coding.property_type.value, coding.property_type.scheme_designator)
        if coding.property_type_modifier is not None:
            modifier = prop.SegmentedPropertyTypeModifierCodeSequence[0]
            assert modifier.CodeMeaning == coding.property_type_modifier.meaning
        assert len(item.RecommendedDisplayCIELabValue) == 3
    expected_types = {
        "ct_threshold": [("38266002", "SCT"), ("39607008", "SCT"), ("3138006", "SCT")],
        "whole_body": [
            ("78961009", "SCT"),  # spleen
            ("10200004", "SCT"),  # liver
            ("45653009", "SCT"),  # upper lobe of lung (+ Left)
            ("66794005", "SCT"),  # L1 vertebra
            ("MYSTERY_BLOB", LOCAL_CODING_SCHEME_DESIGNATOR),
        ],
    }[case.name]
    assert [_code(i.SegmentedPropertyTypeCodeSequence[0]) for i in seg.SegmentSequence] == (
        expected_types
    )


def test_seg_header(case: Case) -> None:
    seg = pydicom.dcmread(case.seg_path)
    source = case.headers[0]
    assert seg.StudyInstanceUID == SPEC.study_instance_uid
    assert seg.FrameOfReferenceUID == SPEC.frame_of_reference_uid
    assert seg.SeriesDescription == f"AI SEG {case.findings.algorithm.name}"
    assert seg.Manufacturer == "dicom-ai"
    assert seg.ManufacturerModelName == "dicom-ai"
    assert seg.DeviceSerialNumber == "node-test-1"
    assert seg.SoftwareVersions == DEVICE.software_version
    assert int(seg.SeriesNumber) == int(source.SeriesNumber) + 1000
    assert int(seg.InstanceNumber) == 1
    assert seg.ContentLabel
    assert seg.PatientID == source.PatientID
    local = any(segment_coding(label.name).is_local for label in case.present)
    schemes = [i.CodingSchemeDesignator for i in seg.get("CodingSchemeIdentificationSequence", [])]
    assert (LOCAL_CODING_SCHEME_DESIGNATOR in schemes) == local


def test_seg_references_every_source_with_segment_voxels_at_its_position(case: Case) -> None:
    seg = pydicom.dcmread(case.seg_path)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in case.headers}
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for instance in series.ReferencedInstanceSequence
    }
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {
        SPEC.series_instance_uid
    }
    label_map = case.findings.label_map
    non_empty = {
        case.findings.source_sop_instance_uids[k]
        for k in range(label_map.shape[0])
        if label_map[k].any()
    }
    assert non_empty <= referenced <= set(by_uid)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        assert frame.any(), "an empty frame was not omitted"
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == [float(v) for v in by_uid[uid].ImagePositionPatient]


def test_seg_decodes_back_to_the_label_masks_exactly(case: Case) -> None:
    present = case.present
    label_map = case.findings.label_map
    uids = case.findings.source_sop_instance_uids
    # Independent of highdicom's reader: rebuild each segment from the raw frames.
    raw = pydicom.dcmread(case.seg_path)
    frames = raw.pixel_array.reshape(-1, raw.Rows, raw.Columns)
    index = {uid: k for k, uid in enumerate(uids)}
    decoded = np.zeros((len(present), *label_map.shape), dtype=bool)
    for frame, item in zip(frames, raw.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert not decoded[number - 1, index[uid]].any(), "two frames for one segment and slice"
        decoded[number - 1, index[uid]] = frame.astype(bool)
    for number, label in enumerate(present, 1):
        assert np.array_equal(decoded[number - 1], label_map == label.value), label.name
    # And through highdicom's reader, combined into segment numbers.
    seg = hd.seg.segread(case.seg_path)
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(uids),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    expected = np.zeros(label_map.shape, dtype=np.int64)
    for number, label in enumerate(present, 1):
        expected[label_map == label.value] = number
    assert np.array_equal(combined, expected)


# --- SR -----------------------------------------------------------------------------


def test_sr_volumes_are_voxel_count_times_voxel_volume(case: Case) -> None:
    sr = hd.sr.srread(case.sr_path)
    seg = pydicom.dcmread(case.seg_path)
    groups = _report(sr).get_volumetric_roi_measurement_groups()
    assert len(groups) == len(case.present) == len(seg.SegmentSequence)
    raw = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seg_counts: dict[int, int] = {}
    for frame, item in zip(raw, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        seg_counts[number] = seg_counts.get(number, 0) + int(np.count_nonzero(frame))
    for group, label in zip(groups, case.present, strict=True):
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_sop_class_uid == seg.SOPClassUID
        numbers = reference.referenced_segment_numbers
        assert numbers is not None and len(numbers) == 1
        number = numbers[0]
        source_series = reference.source_series_for_segmentation
        assert source_series is not None and source_series.value == SPEC.series_instance_uid
        segment = seg.SegmentSequence[number - 1]
        assert segment.SegmentLabel == label.name
        assert group.tracking_uid == segment.TrackingUID
        assert group.finding_type is not None
        assert group.finding_type.value == segment.SegmentedPropertyTypeCodeSequence[0].CodeValue
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "ml" and volume.unit.scheme_designator == "UCUM"
        expected = seg_counts[number] * VOXEL_MM3 / 1000.0
        assert seg_counts[number] == int(np.count_nonzero(case.findings.label_map == label.value))
        assert volume.value == pytest.approx(expected, rel=1e-9)
        texts = {
            _code(i.ConceptNameCodeSequence[0]): i.TextValue
            for i in volume[0].ContentSequence
            if i.ValueType == "TEXT"
        }
        assert texts[("111001", "DCM")] == case.findings.algorithm.name  # Algorithm Name
        assert texts[("111003", "DCM")] == case.findings.algorithm.version  # Algorithm Version


def test_sr_finding_site_only_where_the_label_has_a_side(case: Case) -> None:
    sr = hd.sr.srread(case.sr_path)
    sites = {
        group.finding_type.value: group.finding_sites
        for group in _report(sr).get_volumetric_roi_measurement_groups()
        if group.finding_type is not None
    }
    assert len(sites) == len(case.present)
    lobe = "45653009"  # upper lobe of lung, labelled ..._left
    for finding, found in sites.items():
        if finding != lobe:
            assert found == [], finding
    if case.name == "whole_body":
        (site,) = sites[lobe]
        assert site.value.value == lobe
        assert site.laterality is not None and site.laterality.value == "7771000"  # Left


def test_sr_header_observer_and_evidence(case: Case) -> None:
    sr = pydicom.dcmread(case.sr_path)
    seg = pydicom.dcmread(case.seg_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == SPEC.study_instance_uid
    assert sr.SeriesInstanceUID != seg.SeriesInstanceUID
    assert sr.SeriesDescription == f"AI SR {case.findings.algorithm.name}"
    assert sr.PatientID == SPEC.patient_id
    assert sr.Manufacturer == "dicom-ai"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert _code(sr.ConceptNameCodeSequence[0]) == ("126000", "DCM")
    top = {_code(item.ConceptNameCodeSequence[0]): item for item in sr.ContentSequence}
    assert top[("121005", "DCM")].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert top[("121016", "DCM")].TextValue == "node-test-1"  # Device Observer Serial Number
    assert UID_RE.match(top[("121012", "DCM")].UID)  # Device Observer UID
    assert _code(top[("121058", "DCM")].ConceptCodeSequence[0]) == ("25045-6", "LN")
    evidence = set(sr_evidence_uids(sr))
    assert str(seg.SOPInstanceUID) in evidence
    assert set(case.findings.source_sop_instance_uids) <= evidence
    # Acquisition equipment is the scanner's, not this node's.
    assert sr.ContributingEquipmentSequence[0].Manufacturer == "dicom-ai phantom"


# --- UIDs ---------------------------------------------------------------------------


def test_result_uids_are_deterministic_and_distinct() -> None:
    first = result_uids("1.2.3", "wholebody", "0.2.0")
    again = result_uids("1.2.3", "wholebody", "0.2.0")
    newer = result_uids("1.2.3", "wholebody", "0.2.1")
    other_series = result_uids("1.2.4", "wholebody", "0.2.0")
    assert first == again
    values = [
        first.seg_series_instance_uid,
        first.seg_sop_instance_uid,
        first.sr_series_instance_uid,
        first.sr_sop_instance_uid,
    ]
    assert len(set(values)) == 4
    for uid in values:
        assert len(uid) <= 64 and UID_RE.match(uid), uid
    for changed in (newer, other_series):
        assert not set(values) & {
            changed.seg_series_instance_uid,
            changed.seg_sop_instance_uid,
            changed.sr_series_instance_uid,
            changed.sr_sop_instance_uid,
        }
    # generate_uid concatenates its entropy sources: ("ab","c") must differ from ("a","bc").
    assert result_uids("1.2.3", "ab", "c") != result_uids("1.2.3", "a", "bc")
    assert first.tracking_uid(5, "liver") == again.tracking_uid(5, "liver")
    assert first.tracking_uid(5, "liver") != first.tracking_uid(1, "spleen")
    assert first.tracking_uid(5, "liver") != newer.tracking_uid(5, "liver")


def test_rebuilding_gives_the_same_uids(
    phantom: tuple[list[Dataset], npt.NDArray[np.int16]],
) -> None:
    headers, hu = phantom
    findings = _ct_threshold_findings(headers, hu)
    uids = result_uids(SPEC.series_instance_uid, "ct", "1.0")
    first = build_seg(headers, findings, uids, DEVICE)
    second = build_seg(list(reversed(headers)), findings, uids, DEVICE)
    assert first.SOPInstanceUID == second.SOPInstanceUID == uids.seg_sop_instance_uid
    assert first.SeriesInstanceUID == uids.seg_series_instance_uid
    assert [s.TrackingUID for s in first.SegmentSequence] == [
        s.TrackingUID for s in second.SegmentSequence
    ]
    sr = build_sr(headers, first, findings, uids, DEVICE)
    assert sr.SOPInstanceUID == uids.sr_sop_instance_uid
    assert sr.SeriesInstanceUID == uids.sr_series_instance_uid


# --- codes --------------------------------------------------------------------------


def test_every_whole_body_label_has_a_snomed_code() -> None:
    assert len(WHOLE_BODY_LABELS) == len(set(WHOLE_BODY_LABELS)) == 104
    for name in [*WHOLE_BODY_LABELS, "spleen", "body", "lung", "lungs", "bone"]:
        coding = segment_coding(name)
        assert not coding.is_local, name
        assert coding.property_type.scheme_designator == "SCT", name
        assert coding.category.value in {"91723000", "85756007", "49755003", "260787004"}, name


def test_label_codes_and_normalization() -> None:
    assert normalize_label_name("  Kidney Left ") == "kidney_left"
    assert normalize_label_name("Vertebrae-L5") == "vertebrae_l5"
    left = segment_coding("Kidney Left")
    assert left.property_type.value == "64033007"
    assert left.property_type_modifier is not None
    assert left.property_type_modifier.value == "7771000"
    assert segment_coding("vertebrae_L5").property_type.value == "49668003"
    assert segment_coding("body").property_type.value == codes.SCT.EntireBody.value
    assert segment_coding("LUNGS").property_type.value == codes.SCT.Lung.value
    assert segment_coding("bone").category.value == codes.SCT.Tissue.value
    # CSV erratum: gluteus minimus was coded as gluteus medius, meaning misspelt.
    assert segment_coding("gluteus_minimus").property_type.value == "75297007"
    assert segment_coding("gluteus_minimus_left").property_type.meaning == (
        "Gluteus minimus muscle"
    )
    unknown = segment_coding("Mystery Blob")
    assert unknown.is_local
    assert unknown.property_type.scheme_designator == LOCAL_CODING_SCHEME_DESIGNATOR
    assert unknown.property_type.meaning == "Mystery Blob"
    assert unknown.category.value == codes.SCT.AnatomicalStructure.value
    assert segment_coding("lesion_of_something").category.value == "49755003"
    long_name = segment_coding("a very long label name that does not fit a code value")
    assert len(long_name.property_type.value) <= 16
    assert segment_coding("Mystery Blob") == unknown


# --- errors and geometry ------------------------------------------------------------


def test_missing_source_instance_is_an_encoding_error(
    phantom: tuple[list[Dataset], npt.NDArray[np.int16]],
) -> None:
    headers, hu = phantom
    findings = _ct_threshold_findings(headers, hu)
    uids = result_uids(SPEC.series_instance_uid, "ct", "1.0")
    with pytest.raises(EncodingError, match="not among"):
        build_seg(headers[1:], findings, uids, DEVICE)


def test_empty_and_unnamed_label_maps_are_encoding_errors(
    phantom: tuple[list[Dataset], npt.NDArray[np.int16]],
) -> None:
    headers, hu = phantom
    findings = _ct_threshold_findings(headers, hu)
    uids = result_uids(SPEC.series_instance_uid, "ct", "1.0")
    empty = SegmentationFindings(
        np.zeros_like(findings.label_map),
        findings.labels,
        findings.algorithm,
        findings.source_sop_instance_uids,
    )
    with pytest.raises(EncodingError, match="no labelled voxel"):
        build_seg(headers, empty, uids, DEVICE)
    unnamed_map = findings.label_map.copy()
    unnamed_map[0, 0, 0] = 9
    unnamed = SegmentationFindings(
        unnamed_map, findings.labels, findings.algorithm, findings.source_sop_instance_uids
    )
    with pytest.raises(EncodingError, match=r"without a label: \[9\]"):
        build_seg(headers, unnamed, uids, DEVICE)


def test_sr_refuses_a_seg_of_other_findings(
    phantom: tuple[list[Dataset], npt.NDArray[np.int16]],
) -> None:
    headers, hu = phantom
    ct = _ct_threshold_findings(headers, hu)
    body = _whole_body_findings(headers, hu)
    uids = result_uids(SPEC.series_instance_uid, "ct", "1.0")
    seg = build_seg(headers, ct, uids, DEVICE)
    with pytest.raises(EncodingError, match="do not match"):
        build_sr(headers, seg, body, uids, DEVICE)


def test_single_slice_uses_slice_thickness(
    phantom: tuple[list[Dataset], npt.NDArray[np.int16]],
) -> None:
    headers, hu = phantom
    k = SLICES - 3  # a chest slice: body, lung and bone
    label_map = _ct_threshold_findings(headers, hu).label_map[k : k + 1]
    findings = SegmentationFindings(
        label_map,
        (SegmentLabel(1, "body"), SegmentLabel(2, "lung"), SegmentLabel(3, "bone")),
        AlgorithmIdentification("CT threshold", "1.0", AlgorithmFamily.CLASSICAL),
        (str(headers[k].SOPInstanceUID),),
    )
    uids = result_uids(SPEC.series_instance_uid, "ct-one", "1.0")
    seg = build_seg([headers[k]], findings, uids, DEVICE)
    sr = _reread_sr(build_sr([headers[k]], seg, findings, uids, DEVICE))
    groups = _report(sr).get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    for group, value in zip(groups, (1, 2, 3), strict=True):
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        count = int(np.count_nonzero(label_map == value))
        assert volume.value == pytest.approx(count * VOXEL_MM3 / 1000.0, rel=1e-9)


def test_slice_spacing_is_measured_along_the_normal() -> None:
    # Oblique slices 2 mm apart along their normal, given out of order.
    row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.8, -0.6])
    normal = np.cross(row, column)
    images = []
    for k in (2, 0, 1, 3):
        ds = Dataset()
        ds.ImageOrientationPatient = [*row.tolist(), *column.tolist()]
        ds.ImagePositionPatient = (np.array([10.0, 20.0, 30.0]) + 2.0 * k * normal).tolist()
        images.append(ds)
    assert slice_spacing_mm(images) == pytest.approx(2.0)


def _code(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def _reread_sr(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    document = hd.sr.srread(buffer)
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    return document


def _report(
    sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of a document read back with ``srread``."""
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport), type(report)
    return report


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_file_bytes_match_pydicom_for_plain_and_other_sequences() -> None:
    """Plain items are encoded by dicom-ai, the others by pydicom; the file is the same."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import DSfloat

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 1
    plain = [
        _item(
            ReferencedSOPInstanceUID="1.2.3",  # odd length: padded with a NUL
            CodeMeaning="odd",  # LO: padded with a space
            ImagePositionPatient=[DSfloat("-0.50"), 1.25, 3],  # DS: a string kept, floats
            DimensionIndexValues=[1, 70000],  # UL, multiple
            ReferencedSegmentNumber=3,  # US
            SeriesDescription="",  # empty
            PlanePositionSequence=[_item(ImagePositionPatient=[0, 0, 2.5])],
        )
        for _ in range(3)
    ]
    ds.PerFrameFunctionalGroupsSequence = plain
    ds.ReferencedSeriesSequence = [_item(SeriesInstanceUID="1.2", StudyDate="20260101")]  # DA
    ds.ContentSequence = [_item(CodeMeaning="Überlauf")]  # not ASCII: pydicom encodes it
    undefined = DicomSequence([_item(CodeValue="X1")])
    ds.SourceImageSequence = undefined
    ds["SourceImageSequence"].is_undefined_length = True
    ds.RealWorldValueMappingSequence = [_item(SmallestImagePixelValue=-3)]  # 'US or SS'
    ds.PixelData = np.arange(4, dtype=np.int16).tobytes()  # 'OB or OW', from Bits Allocated

    from dicom_ai.results.encoding import _plain_sequence

    plain_ones = [e.keyword for e in ds if e.VR == "SQ" and _plain_sequence(e) is not None]
    assert plain_ones == ["PerFrameFunctionalGroupsSequence"]
    written = bytes(file_bytes(ds))
    reference = io.BytesIO()
    ds.save_as(reference, enforce_file_format=True)
    assert written == reference.getvalue()
    back = pydicom.dcmread(io.BytesIO(written))
    assert back.PerFrameFunctionalGroupsSequence[2].DimensionIndexValues == [1, 70000]
    assert back.ContentSequence[0].CodeMeaning == "Überlauf"
    assert back.RealWorldValueMappingSequence[0].SmallestImagePixelValue == -3
