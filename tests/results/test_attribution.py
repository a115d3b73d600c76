"""Attribution maps -> Parametric Map and colour-overlay preview: validity (dciodvfy), round
trip through highdicom, references to the source frames, determinism; and the whole path
from a bundle's ``explain`` to the files."""

from __future__ import annotations

import datetime
import io
import re
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_ai.errors import EncodingError
from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    AttributionMap,
    ClassificationFindings,
)
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.results import DeviceIdentity, result_uids
from dicom_ai.results.attribution import (
    attribution_colours,
    build_attribution_preview,
    build_parametric_map,
)
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct, write_phantom_enhanced_ct
from tests.dicom_validation import assert_dciodvfy_clean, dciodvfy_output
from tests.explain_bundles import box_classifier_bundle
from tests.inference.test_explain import _box_2d
from tests.task_bundles import chest_radiograph

pytestmark = [pytest.mark.dciodvfy]

SPEC = PhantomSpec(
    slices=6,
    rows=40,
    columns=32,
    pixel_spacing_mm=8.0,
    slice_thickness_mm=5.0,
    study_instance_uid="1.2.826.0.1.3680043.8.498.3001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.3002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3003",
)
DEVICE = DeviceIdentity.for_node("node-attribution-1")
ALGORITHM = AlgorithmIdentification("nodule model", "1.2", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE)
UIDS = result_uids(SPEC.series_instance_uid, "nodule-model", ALGORITHM.version)
NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, 890000)
PEAK = (4, 12, 20)  # (slice, row, column) of the blob's centre
# What dciodvfy may say beyond errors: PM's QUANTITY (a defined term it does not know), the
# preview's Image Plane / Frame of Reference attributes (beyond the SC IOD, for viewers), an
# empty Laterality where the source names no body part (the enhanced phantom).
ALLOWED_WARNINGS = re.compile(
    r"Unrecognized defined term <QUANTITY>"
    r"|should be absent \(not empty\) if an unpaired body part.*<Laterality>"
    r"|not present in standard DICOM IOD - \(0x0020,0x00(32|37|52)\)"
    r"|contains attributes not present in standard DICOM IOD"
)


def _blob(shape: tuple[int, int, int], centre: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    grid = np.indices(shape, dtype=np.float64)
    squared = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    values = np.exp(-squared / (2 * 3.0**2))
    blob: npt.NDArray[np.float32] = (values / values.max()).astype(np.float32)
    return blob


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    return load_series(write_phantom_ct(tmp_path_factory.mktemp("ct"), SPEC))


@pytest.fixture(scope="module")
def attribution(volume: SeriesVolume) -> AttributionMap:
    return AttributionMap(
        values=_blob((SPEC.slices, SPEC.rows, SPEC.columns), PEAK),
        source_sop_instance_uids=volume.sop_instance_uids,
        method="gradcam",
        target="nodule",
    )


def _frames_by_source(pm: hd.pm.ParametricMap) -> list[tuple[str, int | None]]:
    """The source (SOP Instance UID, frame number) each frame of ``pm`` derives from:
    highdicom orders the frames along the volume, not in the order it got them."""
    keys = []
    for frame in pm.PerFrameFunctionalGroupsSequence:
        reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
        number = reference.get("ReferencedFrameNumber")
        keys.append(
            (str(reference.ReferencedSOPInstanceUID), None if number is None else int(number))
        )
    return keys


def _values_in_pm_order(
    pm: hd.pm.ParametricMap, attribution: AttributionMap
) -> npt.NDArray[np.float32]:
    numbers = attribution.source_frame_numbers or (None,) * len(
        attribution.source_sop_instance_uids
    )
    index = {
        key: k
        for k, key in enumerate(zip(attribution.source_sop_instance_uids, numbers, strict=True))
    }
    return attribution.values[[index[key] for key in _frames_by_source(pm)]]


def _write(directory: Path, dataset: Dataset, name: str) -> Path:
    path = directory / name
    path.write_bytes(file_bytes(dataset))
    return path


def _assert_valid(path: Path) -> None:
    assert_dciodvfy_clean(path)
    warnings = [
        line
        for line in dciodvfy_output(path).splitlines()
        if line.startswith("Warning") and not ALLOWED_WARNINGS.search(line)
    ]
    assert not warnings, "\n".join(warnings)


def test_parametric_map_is_valid_and_lies_on_the_source_frames(
    tmp_path: Path, volume: SeriesVolume, attribution: AttributionMap
) -> None:
    headers = list(reversed(volume.headers))  # any order: matched by SOP Instance UID
    pm = build_parametric_map(headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM, now=NOW)
    path = _write(tmp_path, pm, "pm.dcm")
    _assert_valid(path)
    read = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    assert read.NumberOfFrames == SPEC.slices
    assert np.array_equal(read.pixel_array, _values_in_pm_order(read, attribution))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.headers}
    sources = _frames_by_source(read)
    assert {uid for uid, _ in sources} == set(by_uid)
    for frame, (uid, _) in zip(read.PerFrameFunctionalGroupsSequence, sources, strict=True):
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], by_uid[uid].ImagePositionPatient)
    mapping = read.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    first = mapping.DoubleFloatRealWorldValueFirstValueMapped
    assert (first, mapping.DoubleFloatRealWorldValueLastValueMapped) == (0.0, 1.0)
    assert "Grad-CAM" in mapping.LUTExplanation and "nodule" in mapping.LUTExplanation
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert read[keyword].value == volume.headers[0][keyword].value
    assert int(read.SeriesNumber) == int(volume.headers[0].SeriesNumber) + 5000


def test_same_input_same_bytes_other_method_other_uids(
    volume: SeriesVolume, attribution: AttributionMap
) -> None:
    def build(attribution: AttributionMap) -> Dataset:
        return build_parametric_map(
            volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM, now=NOW
        )

    first, second = build(attribution), build(attribution)
    assert bytes(file_bytes(first)) == bytes(file_bytes(second))
    other = build(replace(attribution, method="occlusion"))
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    previews = [
        build_attribution_preview(
            volume.frames, volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM, now=NOW
        )[0]
        for _ in range(2)
    ]
    assert bytes(file_bytes(previews[0])) == bytes(file_bytes(previews[1]))
    assert previews[0].SeriesInstanceUID not in (
        first.SeriesInstanceUID,
        UIDS.sr_series_instance_uid,
    )


def test_multi_frame_source_frames_are_referenced(tmp_path: Path) -> None:
    path = write_phantom_enhanced_ct(tmp_path / "ect", SPEC)
    volume = load_series([path])
    assert volume.frame_numbers is not None
    attribution = AttributionMap(
        values=_blob((SPEC.slices, SPEC.rows, SPEC.columns), PEAK),
        source_sop_instance_uids=volume.sop_instance_uids,
        method="occlusion",
        target="nodule",
        source_frame_numbers=volume.frame_numbers,
    )
    pm = build_parametric_map(volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM)
    written = _write(tmp_path, pm, "pm.dcm")
    _assert_valid(written)
    read = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(written))
    assert np.array_equal(read.pixel_array, _values_in_pm_order(read, attribution))
    numbers = sorted(number or 0 for _, number in _frames_by_source(read))
    assert numbers == list(range(1, SPEC.slices + 1))
    (image,) = build_attribution_preview(
        volume.frames, volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM
    )
    _assert_valid(_write(tmp_path, image, "preview.dcm"))
    peak_frame = volume.frame_numbers[PEAK[0]]
    assert int(image.SourceImageSequence[0].ReferencedFrameNumber) == peak_frame
    assert image.ImageOrientationPatient is not None


def test_preview_shows_the_top_slice_in_colour(
    tmp_path: Path, volume: SeriesVolume, attribution: AttributionMap
) -> None:
    (image,) = build_attribution_preview(
        volume.frames, volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM
    )
    _assert_valid(_write(tmp_path, image, "preview.dcm"))
    source = volume.headers[PEAK[0]]
    reference = image.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.ImagePositionPatient == source.ImagePositionPatient
    rgb = image.pixel_array
    assert rgb.shape == (SPEC.rows, SPEC.columns, 3)
    red, green, blue = (int(v) for v in rgb[PEAK[1], PEAK[2]])
    assert red > green + 40 and red > blue + 40  # the map's peak: red over grey
    far = rgb[SPEC.rows - 1, 0]
    assert abs(int(far[0]) - int(far[2])) <= 2  # no attribution there: grey
    several = build_attribution_preview(
        volume.frames, volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM, slices=3
    )
    referenced = [i.SourceImageSequence[0].ReferencedSOPInstanceUID for i in several]
    assert referenced == [volume.headers[k].SOPInstanceUID for k in (3, 4, 5)]


def test_colours_run_from_blue_to_red() -> None:
    low, high = attribution_colours(np.array([0.0, 1.0]))
    assert low[2] > low[0] and high[0] > high[2]


def test_disagreeing_inputs_raise(volume: SeriesVolume, attribution: AttributionMap) -> None:
    with pytest.raises(EncodingError, match="not among"):
        build_parametric_map(volume.headers[1:], attribution, UIDS, DEVICE, algorithm=ALGORITHM)
    with pytest.raises(EncodingError, match="differ in shape"):
        build_attribution_preview(
            volume.frames[:, :8], volume.headers, attribution, UIDS, DEVICE, algorithm=ALGORITHM
        )


def test_box_classifier_explained_end_to_end(tmp_path: Path, volume: SeriesVolume) -> None:
    """A 3-D bundle with ``explain: occlusion``: its findings' map becomes a valid PM and
    preview of the series it ran on."""
    model = BundleModel(box_classifier_bundle(tmp_path, 3), "cpu", explain="occlusion")
    findings = model(volume)
    assert isinstance(findings, ClassificationFindings)
    (attribution,) = findings.attributions
    pm = build_parametric_map(
        volume.headers, attribution, UIDS, DEVICE, algorithm=findings.algorithm
    )
    _assert_valid(_write(tmp_path, pm, "pm.dcm"))
    read = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(io.BytesIO(file_bytes(pm))))
    assert np.array_equal(read.pixel_array, _values_in_pm_order(read, attribution))
    images = build_attribution_preview(
        volume.frames, volume.headers, attribution, UIDS, DEVICE, algorithm=findings.algorithm
    )
    _assert_valid(_write(tmp_path, images[0], "preview.dcm"))


def test_projection_image_gets_a_preview_not_a_parametric_map(tmp_path: Path) -> None:
    path = tmp_path / "dx.dcm"
    chest_radiograph(modality="DX", photometric="MONOCHROME1", rows=128, columns=96).save_as(
        path, enforce_file_format=True
    )
    images = load_planar_images([path])
    model = BundleModel(box_classifier_bundle(tmp_path, 2), "cpu", explain="gradcam")
    findings = model(images)
    assert isinstance(findings, ClassificationFindings)
    (attribution,) = findings.attributions
    headers = [image.header for image in images]
    with pytest.raises(EncodingError, match="no patient geometry"):
        build_parametric_map(headers, attribution, UIDS, DEVICE, algorithm=findings.algorithm)
    # A PlanarImage holds display values (MONOCHROME1 inverted), (1, columns, rows).
    frames = np.stack([image.image[0].numpy().T for image in images])
    (preview,) = build_attribution_preview(
        frames,
        headers,
        attribution,
        UIDS,
        DEVICE,
        algorithm=findings.algorithm,
        display_values=True,
    )
    _assert_valid(_write(tmp_path, preview, "preview.dcm"))
    assert list(preview.PatientOrientation) == list(headers[0].PatientOrientation)
    rgb = preview.pixel_array.astype(np.int64)
    tinted = np.abs(rgb[..., 0] - rgb[..., 2]) > 10
    inside = _box_2d(128, 96)
    assert tinted[inside].mean() > 0.5 and not tinted[~inside].any()


@pytest.mark.parametrize("orientation", [["", ""], ["A"]])
def test_a_projection_with_an_empty_patient_orientation_gets_a_preview(
    orientation: list[str],
) -> None:
    from pydicom.uid import ComputedRadiographyImageStorage

    from dicom_ai.inference.findings import AttributionMap

    rows, columns = 40, 30
    header = Dataset()
    header.SOPClassUID = ComputedRadiographyImageStorage
    header.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.9301"
    header.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.9302"
    header.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.9303"
    header.Modality = "CR"
    header.PatientName, header.PatientID = "TEST^CR", "CR-1"
    header.Rows, header.Columns = rows, columns
    header.PhotometricInterpretation = "MONOCHROME2"
    header.PatientOrientation = orientation
    attribution = AttributionMap(
        np.linspace(0, 1, rows * columns, dtype=np.float32).reshape(1, rows, columns),
        (str(header.SOPInstanceUID),),
        "gradcam",
        "pneumonia",
    )
    (image,) = build_attribution_preview(
        np.zeros((1, rows, columns), np.float32),
        [header],
        attribution,
        result_uids("1.2.3", "cxr", "1"),
        DEVICE,
        algorithm=ALGORITHM,
        display_values=True,
    )
    assert list(image.PatientOrientation or []) == []
