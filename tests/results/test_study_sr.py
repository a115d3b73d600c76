"""A study job's SR: the SEG lies on the reference series, the report names every input.

Four header-only MR series of one study and Frame of Reference (T1c, the reference, axial;
T1 sagittal; T2 coronal; FLAIR axial at another slice thickness), a label map on the T1c
frames -> ``build_seg`` -> ``build_sr(..., other_sources=T1 + T2 + FLAIR)``. The evidence
lists every instance of the four series and the SEG; each TID 1411 group names every image
of the four series as a "Source image for segmentation" (row 11: the only TID 1411 row that
can name more than one series); the SR reads back with highdicom and passes dciodvfy and
PixelMed's TID 1500 validator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import MRImageStorage

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import DeviceIdentity, build_seg, build_sr, result_uids
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import Orientation, PhantomSpec, phantom_ct_datasets
from tests.dicom_validation import (
    assert_dciodvfy_clean,
    assert_sr_template_valid,
    not_in_template,
)

STUDY_UID = "1.2.826.0.1.3680043.8.498.5001"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.8.498.5002"
DEVICE = DeviceIdentity.for_node("node-study-sr")
ALGORITHM = AlgorithmIdentification(
    "brats_mri_segmentation", "0.5.3", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE
)
LABELS = (
    SegmentLabel(1, "tumor core"),
    SegmentLabel(2, "whole tumor"),
    SegmentLabel(3, "enhancing tumor"),
)
SOURCE_IMAGE_FOR_SEGMENTATION = ("121233", "DCM")
SOURCE_SERIES_FOR_SEGMENTATION = ("121232", "DCM")
REFERENCED_SEGMENT = ("121191", "DCM")
# role -> (series number, orientation, slices, slice thickness); t1c is the reference.
ROLES: dict[str, tuple[int, Orientation, int, float]] = {
    "t1c": (3, "axial", 6, 2.0),
    "t1": (4, "sagittal", 5, 2.0),
    "t2": (5, "coronal", 4, 3.0),
    "flair": (6, "axial", 3, 5.0),
}


def _series(role: str, study_uid: str = STUDY_UID) -> list[Dataset]:
    """One MR series of the study, header-only, as the pipeline hands the encoders."""
    number, orientation, slices, thickness = ROLES[role]
    spec = PhantomSpec(
        slices=slices,
        rows=16,
        columns=20,
        pixel_spacing_mm=1.5,
        slice_thickness_mm=thickness,
        study_instance_uid=study_uid,
        series_instance_uid=f"1.2.826.0.1.3680043.8.498.50{number}",
        frame_of_reference_uid=FRAME_OF_REFERENCE_UID,
        series_description=role.upper(),
        orientation=orientation,
    )
    headers = []
    for ds in phantom_ct_datasets(spec):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        for keyword in ("KVP", "RescaleIntercept", "RescaleSlope", "RescaleType", "PixelData"):
            delattr(ds, keyword)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500, 10, 1
        ds.MagneticFieldStrength = 3
        ds.BodyPartExamined = "HEAD"
        ds.SeriesNumber = number
        headers.append(ds)
    return headers


@dataclass(frozen=True)
class Study:
    series: dict[str, list[Dataset]]  # role -> headers
    findings: SegmentationFindings
    seg: Dataset
    sr_path: Path

    @property
    def instances_by_series(self) -> dict[str, set[str]]:
        return {
            str(headers[0].SeriesInstanceUID): {str(ds.SOPInstanceUID) for ds in headers}
            for headers in self.series.values()
        }


def _findings(reference: list[Dataset]) -> SegmentationFindings:
    label_map = np.zeros((len(reference), 16, 20), dtype=np.uint16)
    label_map[1:5, 3:12, 4:16] = 2  # whole tumor
    label_map[2:4, 5:10, 6:12] = 1  # tumor core
    label_map[2, 6:8, 7:9] = 3  # enhancing tumor
    return SegmentationFindings(
        label_map=label_map,
        labels=LABELS,
        algorithm=ALGORITHM,
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in reference),
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    series = {role: _series(role) for role in ROLES}
    reference = series["t1c"]
    findings = _findings(reference)
    uids = result_uids(str(reference[0].SeriesInstanceUID), "brats", ALGORITHM.version)
    seg = build_seg(reference, findings, uids, DEVICE)
    others = [ds for role in ("t1", "t2", "flair") for ds in series[role]]
    sr = build_sr(reference, seg, findings, uids, DEVICE, other_sources=others)
    sr_path = tmp_path_factory.mktemp("study") / "sr.dcm"
    sr_path.write_bytes(file_bytes(sr))
    yield Study(series, findings, seg, sr_path)


def _code(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _groups(sr: Dataset) -> list[Dataset]:
    """The TID 1411 groups (one per segment; each is followed by its key-slice outline)."""
    (measurements,) = [i for i in sr.ContentSequence if _code(i) == ("126010", "DCM")]
    return [
        group
        for group in measurements.ContentSequence
        if any(_code(c) == REFERENCED_SEGMENT for c in group.ContentSequence)
    ]


def test_evidence_lists_every_instance_of_every_input_series_and_the_seg(study: Study) -> None:
    sr = pydicom.dcmread(study.sr_path)
    (evidence_study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence_study.StudyInstanceUID == STUDY_UID
    listed = {
        str(series.SeriesInstanceUID): {
            str(item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence
        }
        for series in evidence_study.ReferencedSeriesSequence
    }
    expected = study.instances_by_series
    expected[str(study.seg.SeriesInstanceUID)] = {str(study.seg.SOPInstanceUID)}
    assert listed == expected
    assert "PertinentOtherEvidenceSequence" not in sr
    # Patient, study and the acquisition equipment are the reference series' (evidence[0]).
    reference = study.series["t1c"][0]
    assert sr.StudyInstanceUID == STUDY_UID
    assert sr.PatientID == reference.PatientID
    assert int(sr.SeriesNumber) == int(reference.SeriesNumber) + 2000
    assert sr.ContributingEquipmentSequence[0].Manufacturer == reference.Manufacturer


def test_every_group_names_every_image_of_the_four_series(study: Study) -> None:
    sr = pydicom.dcmread(study.sr_path)
    series_of = {uid: series for series, uids in study.instances_by_series.items() for uid in uids}
    groups = _groups(sr)
    assert len(groups) == len(LABELS)
    for group in groups:
        children = list(group.ContentSequence)
        assert not [c for c in children if _code(c) == SOURCE_SERIES_FOR_SEGMENTATION]
        sources = [c for c in children if _code(c) == SOURCE_IMAGE_FOR_SEGMENTATION]
        assert all(c.ValueType == "IMAGE" and c.RelationshipType == "CONTAINS" for c in sources)
        assert {c.ConceptNameCodeSequence[0].CodeMeaning for c in sources} == {
            "Source image for segmentation"
        }
        named = [str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for c in sources]
        assert len(named) == len(set(named)) == len(series_of)
        assert set(named) == set(series_of)
        # The reference series' images first, in the label map's frame order.
        reference = list(study.findings.source_sop_instance_uids)
        assert named[: len(reference)] == reference
        assert {series_of[uid] for uid in named} == set(study.instances_by_series)
        (classes,) = {str(c.ReferencedSOPSequence[0].ReferencedSOPClassUID) for c in sources}
        assert classes == MRImageStorage


def test_highdicom_reads_it_back(study: Study) -> None:
    document = hd.sr.srread(study.sr_path)
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    report = document.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert [str(group.tracking_identifier) for group in groups] == [label.name for label in LABELS]
    all_images = set().union(*study.instances_by_series.values())
    voxel_ml = 1.5 * 1.5 * 2.0 / 1000.0  # the reference (T1c) grid
    for number, (group, label) in enumerate(zip(groups, LABELS, strict=True), start=1):
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_sop_instance_uid == study.seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [number]
        assert reference.source_series_for_segmentation is None
        named = {
            image.referenced_sop_instance_uid for image in reference.source_images_for_segmentation
        }
        assert named == all_images
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        count = int(np.count_nonzero(study.findings.label_map == label.value))
        assert volume.value == pytest.approx(count * voxel_ml, rel=1e-9)
    # highdicom's own evidence view agrees.
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for series in document.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == all_images | {str(study.seg.SOPInstanceUID)}


@pytest.mark.dciodvfy
def test_sr_passes_dciodvfy(study: Study) -> None:
    assert_dciodvfy_clean(study.sr_path)


@pytest.mark.java
@pytest.mark.slow
def test_sr_passes_pixelmed_tid1500_validation(study: Study) -> None:
    output = assert_sr_template_valid(study.sr_path)
    assert "Found Root Template TID_1500" in output
    assert not not_in_template(output), output


def test_an_input_from_another_study_is_an_encoding_error(study: Study) -> None:
    reference = study.series["t1c"]
    stranger = _series("flair", study_uid="1.2.826.0.1.3680043.8.498.5999")
    uids = result_uids(str(reference[0].SeriesInstanceUID), "brats", ALGORITHM.version)
    with pytest.raises(EncodingError, match=r"of study 1\.2\.826\.0\.1\.3680043\.8\.498\.5999"):
        build_sr(
            reference,
            study.seg,
            study.findings,
            uids,
            DEVICE,
            other_sources=[*study.series["t1"], *stranger],
        )


def test_without_other_series_the_report_names_the_reference_series(study: Study) -> None:
    reference = study.series["t1c"]
    uids = result_uids(str(reference[0].SeriesInstanceUID), "brats", ALGORITHM.version)
    # The reference's own instances again are not other inputs.
    for others in ((), reference):
        sr = build_sr(reference, study.seg, study.findings, uids, DEVICE, other_sources=others)
        for group in _groups(sr):
            (series,) = [
                c for c in group.ContentSequence if _code(c) == SOURCE_SERIES_FOR_SEGMENTATION
            ]
            assert str(series.UID) == str(reference[0].SeriesInstanceUID)
            assert not [
                c for c in group.ContentSequence if _code(c) == SOURCE_IMAGE_FOR_SEGMENTATION
            ]
