"""Classification and detection bundles -> findings -> TID 1500 SR, item by item.

The expected numbers come from the test bundles' construction (softmax of the stored logits,
boxes mapped to patient space by hand), not from the code under test. Every SR is checked by
dciodvfy and PixelMed and read back strictly with highdicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.apps.detection.transforms.box_ops import apply_affine_to_boxes
from monai.transforms.spatial.array import Orientation
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai.errors import ModelError
from dicom_ai.inference.bundle import BundleModel, read_bundle_task
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    ClassificationFindings,
    DetectionFindings,
    TaskKind,
)
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.inference.volume import load_series
from dicom_ai.results import (
    DeviceIdentity,
    build_classification_sr,
    build_detection_sr,
    build_seg,
    build_sr,
    link_related_series,
    result_uids,
    segment_coding,
)
from dicom_ai.results.sr import box_polygon
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.bundles import shared_bundle
from tests.dicom_validation import (
    assert_dciodvfy_clean,
    assert_sr_template_valid,
    dciodvfy_output,
)
from tests.results_check import sr_evidence_uids
from tests.task_bundles import (
    CXR_CLASSES,
    DETECTOR_BOXES,
    DETECTOR_SCORES,
    chest_radiograph,
    cxr_probabilities,
    expected_box_lps,
    make_box_detector_bundle,
    make_cxr_classifier_bundle,
)

pytestmark = [pytest.mark.dciodvfy, pytest.mark.java, pytest.mark.slow]

DEVICE = DeviceIdentity.for_node("node-kinds")
SPEC = PhantomSpec(slices=8, rows=64, columns=64, pixel_spacing_mm=5.0, slice_thickness_mm=4.0)


@pytest.fixture(scope="module")
def cxr_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cxr_classifier_bundle(tmp_path_factory.mktemp("cxr"))


@pytest.fixture(scope="module")
def detector_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_box_detector_bundle(tmp_path_factory.mktemp("det"))


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _validated(sr: Dataset, path: Path) -> hd.sr.Comprehensive3DSR:
    sr.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    assert_sr_template_valid(path)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def _items(container: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    return [
        item
        for item in container.ContentSequence
        if (
            item.ConceptNameCodeSequence[0].CodeValue,
            item.ConceptNameCodeSequence[0].CodingSchemeDesignator,
        )
        == concept
    ]


def _groups(sr: Dataset) -> list[Dataset]:
    (measurements,) = _items(sr, ("126010", "DCM"))
    return list(measurements.ContentSequence)


def _check_report_header(sr: Dataset, source: Dataset, intended_use: str) -> None:
    """IHE AI Results items of the document: title, language, observer device, procedure,
    intended use, same study as the source."""
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    (language,) = _items(sr, ("121049", "DCM"))
    assert language.ConceptCodeSequence[0].CodeValue == "en-US"
    (device_uid,) = _items(sr, ("121012", "DCM"))
    assert device_uid.UID
    (manufacturer,) = _items(sr, ("121013", "DCM"))  # Device Observer Name: the node id
    assert manufacturer.TextValue == DEVICE.device_serial_number
    assert _items(sr, ("121014", "DCM"))[0].TextValue == DEVICE.manufacturer
    assert _items(sr, ("121015", "DCM"))[0].TextValue == DEVICE.model_name
    assert _items(sr, ("121016", "DCM"))[0].TextValue == DEVICE.device_serial_number
    assert len(_items(sr, ("121058", "DCM"))) == 1  # procedure reported
    (qualitative,) = _items(sr, ("C0034375", "UMLS"))
    comment = qualitative.ContentSequence[0]
    assert intended_use in comment.TextValue
    assert sr.SoftwareVersions == DEVICE.software_version


def _num(group: Dataset, concept: tuple[str, str]) -> float:
    (item,) = _items(group, concept)
    return float(item.MeasuredValueSequence[0].NumericValue)


# -- task kind from metadata ---------------------------------------------------------------


def test_task_kind_is_read_from_bundle_metadata() -> None:
    import json

    spleen = json.loads(
        (shared_bundle("spleen_ct_segmentation") / "configs/metadata.json").read_text()
    )
    assert read_bundle_task(spleen) is TaskKind.SEGMENTATION
    classes = {
        "network_data_format": {"outputs": {"pred": {"type": "probabilities", "format": "classes"}}}
    }
    assert read_bundle_task(classes) is TaskKind.CLASSIFICATION
    # The zoo's lung_nodule_ct_detection says this of its output.
    boxes = {"network_data_format": {"outputs": {"pred": {"type": "object", "format": "dict"}}}}
    assert read_bundle_task(boxes) is TaskKind.DETECTION
    unknown = {"network_data_format": {"outputs": {"pred": {"type": "image", "format": "rgb"}}}}
    with pytest.raises(ModelError, match="task"):
        read_bundle_task(unknown)


# -- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "photometric"), [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2")]
)
def test_cxr_classifier_gives_softmax_probabilities_and_sr_items(
    cxr_bundle: Path, tmp_path: Path, modality: str, photometric: str
) -> None:
    path = _write(
        chest_radiograph(modality=modality, photometric=photometric), tmp_path / "cxr.dcm"
    )
    model = BundleModel(cxr_bundle, "cpu", model_id="cxr", threshold=0.3)
    assert (model.task, model.spatial_dims) == (TaskKind.CLASSIFICATION, 2)
    images = load_planar_images([path])
    findings = model(images)
    assert isinstance(findings, ClassificationFindings)
    (result,) = findings.results
    expected = cxr_probabilities()
    assert [s.name for s in result.scores] == list(CXR_CLASSES)
    np.testing.assert_allclose([s.probability for s in result.scores], expected, atol=1e-6)
    # Threshold 0.3: pneumonia (0.59) and pleural effusion (0.36), not normal (0.05).
    found = findings.found(result)
    assert [s.name for s in found] == ["pneumonia", "pleural effusion"]

    header = _header(path)
    uids = result_uids(str(header.SeriesInstanceUID), "cxr", findings.algorithm.version)
    sr = build_classification_sr([header], findings, uids, DEVICE)
    reread = _validated(sr, tmp_path / "sr.dcm")
    assert reread.SOPInstanceUID == uids.sr_sop_instance_uid
    _check_report_header(reread, header, "chest radiograph triage")
    groups = _groups(reread)
    assert len(groups) == len(found)
    for group, score in zip(groups, found, strict=True):
        finding = segment_coding(score.name).property_type
        (finding_type,) = _items(group, ("121071", "DCM"))
        assert finding_type.ConceptCodeSequence[0].CodeValue == finding.value
        # The qualitative evaluation: concept = the class, value = Present.
        (evaluation,) = _items(group, (finding.value, finding.scheme_designator))
        assert evaluation.ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value
        assert _num(group, ("122157", "DCM")) == pytest.approx(score.probability, abs=1e-6)
        (image,) = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        reference = image.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == header.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == header.SOPClassUID


def test_classification_below_threshold_still_reports_the_image(
    cxr_bundle: Path, tmp_path: Path
) -> None:
    path = _write(chest_radiograph(), tmp_path / "cxr.dcm")
    findings = BundleModel(cxr_bundle, "cpu", threshold=0.95)(load_planar_images([path]))
    assert isinstance(findings, ClassificationFindings)
    header = _header(path)
    uids = result_uids(str(header.SeriesInstanceUID), "cxr", "1")
    reread = _validated(
        build_classification_sr([header], findings, uids, DEVICE), tmp_path / "sr.dcm"
    )
    (group,) = _groups(reread)
    assert not _items(group, ("121071", "DCM"))  # no finding type: nothing found
    assert not _items(group, ("122157", "DCM"))
    assert [i.ValueType for i in group.ContentSequence].count("IMAGE") == 1


def test_2d_classifier_refuses_a_volume(cxr_bundle: Path, tmp_path: Path) -> None:
    volume = load_series(write_phantom_ct(tmp_path, SPEC))
    with pytest.raises(ModelError, match="2-D"):
        BundleModel(cxr_bundle, "cpu")(volume)


# -- detection -------------------------------------------------------------------------------


def test_detector_boxes_land_in_patient_space_and_in_the_sr(
    detector_bundle: Path, tmp_path: Path
) -> None:
    paths = write_phantom_ct(tmp_path / "ct", SPEC)
    volume = load_series(paths)
    model = BundleModel(detector_bundle, "cpu", model_id="boxes", threshold=0.5)
    assert (model.task, model.spatial_dims) == (TaskKind.DETECTION, 3)
    findings = model(volume)
    assert isinstance(findings, DetectionFindings)
    kept = [(b, s) for b, s in zip(DETECTOR_BOXES, DETECTOR_SCORES, strict=True) if s >= 0.5]
    assert [d.score for d in findings.detections] == pytest.approx([s for _, s in kept])
    first = volume.headers[0]
    for detection, (box, _) in zip(findings.detections, kept, strict=True):
        centre, size = expected_box_lps(
            box,
            columns=SPEC.columns,
            rows=SPEC.rows,
            first_ipp=tuple(float(v) for v in first.ImagePositionPatient),  # type: ignore[arg-type]
            pixel_spacing=SPEC.pixel_spacing_mm,
            slice_spacing=SPEC.slice_thickness_mm,
        )
        np.testing.assert_allclose(detection.center, centre, atol=1e-6)
        np.testing.assert_allclose(detection.size_mm, size, atol=1e-6)
        assert detection.name == "lung nodule"
        # The same corners through MONAI's own box transform (RAS world), flipped to LPS.
        oriented = Orientation(axcodes="RAS", labels=None)(volume.image)
        world = apply_affine_to_boxes(torch.tensor([box], dtype=torch.float64), oriented.affine)
        corners = world[0].numpy().reshape(2, 3) * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(detection.center, corners.mean(axis=0), atol=1e-6)

    headers = [_header(p) for p in paths]
    uids = result_uids(SPEC.series_instance_uid, "boxes", findings.algorithm.version)
    reread = _validated(build_detection_sr(headers, findings, uids, DEVICE), tmp_path / "sr.dcm")
    _check_report_header(reread, headers[0], "stored boxes")
    groups = _groups(reread)
    assert len(groups) == len(kept)
    for group, detection in zip(groups, findings.detections, strict=True):
        # The box's cross-section through its centre, drawn on the source image nearest it
        # (OHIF draws no SCOORD3D POLYGON): a closed 5-point SCOORD POLYLINE.
        (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        assert region.GraphicType == "POLYLINE"
        (image,) = region.ContentSequence[0].ReferencedSOPSequence
        nearest = min(
            headers, key=lambda h: abs(float(h.ImagePositionPatient[2]) - detection.center[2])
        )
        assert image.ReferencedSOPInstanceUID == nearest.SOPInstanceUID
        points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
        assert len(points) == 5 and np.allclose(points[0], points[-1])
        extent = (points.max(axis=0) - points.min(axis=0)) * SPEC.pixel_spacing_mm
        np.testing.assert_allclose(extent, detection.size_mm[:2], atol=1e-3)
        width, height, depth = detection.size_mm
        assert _num(group, ("122157", "DCM")) == pytest.approx(detection.score, abs=1e-6)
        assert _num(group, ("103355008", "SCT")) == pytest.approx(width, abs=1e-6)
        assert _num(group, ("121207", "DCM")) == pytest.approx(height, abs=1e-6)
        assert _num(group, ("131197000", "SCT")) == pytest.approx(depth, abs=1e-6)
        (finding_type,) = _items(group, ("121071", "DCM"))
        assert finding_type.ConceptCodeSequence[0].CodeMeaning.lower().startswith("lung nodule")


def test_detector_without_findings_gives_an_empty_report(
    detector_bundle: Path, tmp_path: Path
) -> None:
    paths = write_phantom_ct(tmp_path / "ct", SPEC)
    findings = BundleModel(detector_bundle, "cpu", threshold=0.99)(load_series(paths))
    assert isinstance(findings, DetectionFindings) and not findings.detections
    headers = [_header(p) for p in paths]
    uids = result_uids(SPEC.series_instance_uid, "boxes", "0")
    reread = _validated(build_detection_sr(headers, findings, uids, DEVICE), tmp_path / "sr.dcm")
    (group,) = _groups(reread)
    assert "nothing found" in _items(group, ("112039", "DCM"))[0].TextValue
    assert not _items(group, ("122157", "DCM"))
    images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == {
        h.SOPInstanceUID for h in headers
    }


# -- segmentation: IHE AI Results header and SEG <-> SR links ----------------------------------


def test_segmentation_sr_has_the_ihe_header_and_seg_and_sr_reference_each_other(
    tmp_path: Path,
) -> None:
    from dicom_ai.inference.builtin.ct_body import CTBodyModel

    paths = write_phantom_ct(tmp_path / "ct", SPEC)
    volume = load_series(paths)
    findings = CTBodyModel()(volume)
    algorithm = findings.algorithm
    assert algorithm == AlgorithmIdentification(
        algorithm.name, algorithm.version, AlgorithmFamily.CLASSICAL, algorithm.intended_use
    )
    uids = result_uids(SPEC.series_instance_uid, "ct-body", algorithm.version)
    seg = build_seg(list(volume.headers), findings, uids, DEVICE)
    sr = build_sr(list(volume.headers), seg, findings, uids, DEVICE)
    link_related_series(seg, sr)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert_dciodvfy_clean(tmp_path / "seg.dcm")
    reread = _validated(sr, tmp_path / "sr.dcm")
    _check_report_header(reread, volume.headers[0], algorithm.intended_use)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == SPEC.study_instance_uid
    (related,) = seg.RelatedSeriesSequence
    assert related.SeriesInstanceUID == sr.SeriesInstanceUID
    assert "RelatedSeriesSequence" not in reread  # not in the SR Document Series Module
    assert "not present in standard DICOM IOD" not in dciodvfy_output(tmp_path / "sr.dcm")
    assert seg.SOPInstanceUID in sr_evidence_uids(reread)


def test_detection_on_a_sagittal_series_is_drawn_in_its_image_plane(
    detector_bundle: Path, tmp_path: Path
) -> None:
    """Orientationd(RAS) turns a sagittal stack's slice axis into the box's first axis; the
    finding's edges and polygon still follow the series' rows, columns and slices."""
    spec = PhantomSpec(
        slices=8,
        rows=64,
        columns=64,
        pixel_spacing_mm=5.0,
        slice_thickness_mm=4.0,
        orientation="sagittal",
    )
    paths = write_phantom_ct(tmp_path / "sag", spec)
    findings = BundleModel(detector_bundle, "cpu", threshold=0.5)(load_series(paths))
    assert isinstance(findings, DetectionFindings)
    first = findings.detections[0]  # DETECTOR_BOXES[0]: 20 x 16 x 4 voxels on the RAS grid
    # RAS axis 0 (R-L) is the slice direction, axis 1 (A-P) the rows, axis 2 (S-I) columns.
    np.testing.assert_allclose(first.size_mm, (16 * 5.0, 4 * 5.0, 20 * 4.0), atol=1e-6)
    polygon = box_polygon(first)
    assert np.allclose(polygon[:, 0], first.center[0])  # one sagittal plane: constant x


def test_bundles_with_their_own_scripts_load_one_after_the_other(tmp_path: Path) -> None:
    """A worker keeps loaded bundles; the second bundle's `scripts` package must not be the
    first one's, cached by Python under the same name."""
    import json

    first = make_box_detector_bundle(tmp_path / "a")
    second = make_box_detector_bundle(tmp_path / "b")
    (second / "scripts" / "stored_boxes.py").rename(second / "scripts" / "other_boxes.py")
    config = json.loads((second / "configs" / "inference.json").read_text())
    config["imports"] = ["$import scripts.other_boxes"]
    config["network_def"]["_target_"] = "scripts.other_boxes.StoredBoxes"
    (second / "configs" / "inference.json").write_text(json.dumps(config))
    assert BundleModel(first, "cpu").task is TaskKind.DETECTION
    assert BundleModel(second, "cpu").task is TaskKind.DETECTION
