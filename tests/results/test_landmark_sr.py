"""Landmarks -> TID 1500 SR: one Planar ROI group (TID 1410) per landmark, a SCOORD3D POINT
at its position, its name as the finding, its image (frame) as the Illustration of ROI.

The source is a small header-only MR series (the phantom's geometry with MR identity) and,
for frame references, the phantom as one enhanced multi-frame image. Every SR is checked by
dciodvfy (and PixelMed, slow) and read back with pydicom and highdicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    Landmark,
    LandmarkFindings,
)
from dicom_ai.results import (
    LOCAL_CODING_SCHEME_DESIGNATOR,
    DeviceIdentity,
    build_landmark_sr,
    result_uids,
)
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, phantom_enhanced_ct
from tests.dicom_validation import (
    assert_dciodvfy_clean,
    assert_sr_template_valid,
    dciodvfy_output,
    not_in_template,
)
from tests.results_check import sr_evidence_uids

pytestmark = [pytest.mark.dciodvfy]

SPEC = PhantomSpec(
    slices=6,
    rows=32,
    columns=32,
    pixel_spacing_mm=2.0,
    slice_thickness_mm=3.0,
    study_instance_uid="1.2.826.0.1.3680043.8.498.2001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.2002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2003",
)
DEVICE = DeviceIdentity.for_node("node-landmarks")
ALGORITHM = AlgorithmIdentification(
    "valve_landmarks", "0.5.1", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE, "cardiac valve points"
)
IMAGE_REGION = ("111030", "DCM")
ILLUSTRATION_OF_ROI = ("121200", "DCM")


def _mr_headers() -> list[Dataset]:
    headers = []
    for ds in phantom_ct_datasets(SPEC):
        del ds.PixelData
        for keyword in ("KVP", "RescaleIntercept", "RescaleSlope", "RescaleType"):
            delattr(ds, keyword)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.Manufacturer = "dicom-ai phantom MR"
        headers.append(ds)
    return headers


def _landmarks(headers: list[Dataset]) -> tuple[Landmark, ...]:
    # On slices 1, 3 and 4: z = -300 + k * 3 mm; x, y anywhere on the slice.
    return (
        Landmark("spleen", np.array([10.5, -20.25, -297.0]), str(headers[1].SOPInstanceUID)),
        Landmark("left kidney", np.array([-12.0, 4.0, -291.0]), str(headers[3].SOPInstanceUID)),
        Landmark(
            "mitral annulus anterior", np.array([0.0, 0.0, -288.0]), str(headers[4].SOPInstanceUID)
        ),
    )


def _findings(headers: list[Dataset], landmarks: tuple[Landmark, ...]) -> LandmarkFindings:
    return LandmarkFindings(
        landmarks=landmarks,
        algorithm=ALGORITHM,
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        frame_of_reference_uid=SPEC.frame_of_reference_uid,
    )


def _written(sr: Dataset, path: Path) -> Path:
    path.write_bytes(file_bytes(sr))
    return path


def _reread(path: Path) -> hd.sr.Comprehensive3DSR:
    document = hd.sr.srread(io.BytesIO(path.read_bytes()))
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    return document


def _code(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def _items(container: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    return [
        item
        for item in container.ContentSequence
        if _code(item.ConceptNameCodeSequence[0]) == concept
    ]


def _groups(sr: Dataset) -> list[Dataset]:
    (measurements,) = _items(sr, ("126010", "DCM"))  # Imaging Measurements
    return list(measurements.ContentSequence)


@pytest.fixture(scope="module")
def headers() -> list[Dataset]:
    return _mr_headers()


@pytest.fixture(scope="module")
def landmark_sr(headers: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    findings = _findings(headers, _landmarks(headers))
    uids = result_uids(SPEC.series_instance_uid, "valve_landmarks", ALGORITHM.version)
    return _written(
        build_landmark_sr(headers, findings, uids, DEVICE),
        tmp_path_factory.mktemp("landmarks") / "sr.dcm",
    )


@pytest.fixture(scope="module")
def empty_sr(headers: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    findings = _findings(headers, ())
    uids = result_uids(SPEC.series_instance_uid, "valve_landmarks", ALGORITHM.version)
    return _written(
        build_landmark_sr(headers, findings, uids, DEVICE),
        tmp_path_factory.mktemp("no-landmarks") / "sr.dcm",
    )


def test_landmark_sr_passes_dciodvfy(landmark_sr: Path, empty_sr: Path) -> None:
    for path in (landmark_sr, empty_sr):
        assert_dciodvfy_clean(path)
        assert "not present in standard DICOM IOD" not in dciodvfy_output(path)


@pytest.mark.java
@pytest.mark.slow
def test_landmark_sr_passes_pixelmed_tid1500_validation(landmark_sr: Path, empty_sr: Path) -> None:
    for path in (landmark_sr, empty_sr):
        output = assert_sr_template_valid(path)
        assert "Found Root Template TID_1500" in output
        assert not not_in_template(output), output


def test_one_point_per_landmark_in_the_frame_of_reference(
    landmark_sr: Path, headers: list[Dataset]
) -> None:
    landmarks = _landmarks(headers)
    report = _reread(landmark_sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == len(landmarks)
    for group, landmark in zip(groups, landmarks, strict=True):
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion3D)
        assert region.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert region.ReferencedFrameOfReferenceUID == SPEC.frame_of_reference_uid
        np.testing.assert_allclose(region.value, landmark.position.reshape(1, 3), atol=1e-4)
    uids = {group.tracking_uid for group in groups}
    assert len(uids) == len(landmarks)


def test_finding_is_the_landmark_name_and_the_image_is_referenced(
    landmark_sr: Path, headers: list[Dataset]
) -> None:
    landmarks = _landmarks(headers)
    sr = pydicom.dcmread(landmark_sr)
    groups = _groups(sr)
    assert len(groups) == len(landmarks)
    findings = [_items(group, ("121071", "DCM"))[0].ConceptCodeSequence[0] for group in groups]
    assert _code(findings[0]) == ("78961009", "SCT")  # Spleen
    assert _code(findings[1]) == ("64033007", "SCT")  # Kidney, ...
    (site,) = _items(groups[1], ("363698007", "SCT"))  # ... finding site Kidney, Left
    (laterality,) = site.ContentSequence
    assert _code(laterality.ConceptNameCodeSequence[0]) == ("272741003", "SCT")
    assert _code(laterality.ConceptCodeSequence[0]) == ("7771000", "SCT")
    assert findings[2].CodingSchemeDesignator == LOCAL_CODING_SCHEME_DESIGNATOR
    assert findings[2].CodeMeaning == "mitral annulus anterior"
    schemes = [str(s.CodingSchemeDesignator) for s in sr.CodingSchemeIdentificationSequence]
    assert LOCAL_CODING_SCHEME_DESIGNATOR in schemes
    for group, landmark in zip(groups, landmarks, strict=True):
        (region,) = _items(group, IMAGE_REGION)
        assert region.ValueType == "SCOORD3D" and region.GraphicType == "POINT"
        (image,) = _items(group, ILLUSTRATION_OF_ROI)
        (reference,) = image.ReferencedSOPSequence
        assert reference.ReferencedSOPInstanceUID == landmark.source_sop_instance_uid
        assert reference.ReferencedSOPClassUID == MRImageStorage
        assert "ReferencedFrameNumber" not in reference
        algorithm = {
            _code(i.ConceptNameCodeSequence[0]): i.TextValue
            for i in group.ContentSequence
            if i.ValueType == "TEXT"
        }
        assert algorithm[("111001", "DCM")] == ALGORITHM.name
        assert algorithm[("111003", "DCM")] == ALGORITHM.version


def test_header_procedure_and_evidence(landmark_sr: Path, headers: list[Dataset]) -> None:
    sr = pydicom.dcmread(landmark_sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == SPEC.study_instance_uid
    assert sr.PatientID == SPEC.patient_id
    assert sr.SeriesDescription == f"AI SR {ALGORITHM.name}"
    (procedure,) = _items(sr, ("121058", "DCM"))
    assert procedure.ConceptCodeSequence[0].CodeMeaning == "MRI unspecified body region"
    assert set(sr_evidence_uids(sr)) == {str(ds.SOPInstanceUID) for ds in headers}


def test_no_landmarks_still_names_the_images(empty_sr: Path, headers: list[Dataset]) -> None:
    sr = pydicom.dcmread(empty_sr)
    (group,) = _groups(sr)
    assert not _items(group, IMAGE_REGION)
    assert not _items(group, ("121071", "DCM"))  # no finding
    sources = _items(group, ("121112", "DCM"))  # Source of Measurement (TID 1501)
    assert {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in sources} == {
        str(ds.SOPInstanceUID) for ds in headers
    }
    schemes = [s.CodingSchemeDesignator for s in sr.get("CodingSchemeIdentificationSequence", [])]
    assert LOCAL_CODING_SCHEME_DESIGNATOR not in schemes  # no local code to declare
    report = _reread(empty_sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_planar_roi_measurement_groups() == []


def test_multi_frame_source_references_the_frame(tmp_path: Path) -> None:
    enhanced = phantom_enhanced_ct(SPEC)
    del enhanced.PixelData
    uid = str(enhanced.SOPInstanceUID)
    findings = LandmarkFindings(
        landmarks=(
            Landmark("aorta", np.array([1.0, 2.0, -294.0]), uid, source_frame_number=3),
            Landmark("liver", np.array([-5.0, 2.0, -285.0]), uid, source_frame_number=6),
        ),
        algorithm=ALGORITHM,
        source_sop_instance_uids=(uid,),
        frame_of_reference_uid=SPEC.frame_of_reference_uid,
    )
    uids = result_uids(str(enhanced.SeriesInstanceUID), "valve_landmarks", ALGORITHM.version)
    path = _written(build_landmark_sr([enhanced], findings, uids, DEVICE), tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    frames = []
    for group in _groups(pydicom.dcmread(path)):
        (image,) = _items(group, ILLUSTRATION_OF_ROI)
        (reference,) = image.ReferencedSOPSequence
        assert reference.ReferencedSOPInstanceUID == uid
        frames.append(int(reference.ReferencedFrameNumber))
    assert frames == [3, 6]


def test_landmark_on_an_unknown_image_or_frame_of_reference_is_an_encoding_error(
    headers: list[Dataset],
) -> None:
    uids = result_uids(SPEC.series_instance_uid, "valve_landmarks", ALGORITHM.version)
    stray = Landmark("spleen", np.zeros(3), "1.2.826.0.1.3680043.8.498.2999")
    with pytest.raises(EncodingError, match="not among"):
        build_landmark_sr(headers, _findings(headers, (stray,)), uids, DEVICE)
    elsewhere = LandmarkFindings(
        landmarks=_landmarks(headers),
        algorithm=ALGORITHM,
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2998",
    )
    with pytest.raises(EncodingError, match="frame of reference"):
        build_landmark_sr(headers, elsewhere, uids, DEVICE)
    nowhere = Landmark("spleen", np.array([0.0, np.nan, 0.0]), str(headers[0].SOPInstanceUID))
    with pytest.raises(EncodingError, match="finite"):
        build_landmark_sr(headers, _findings(headers, (nowhere,)), uids, DEVICE)
