"""Findings -> Secondary Capture preview: pixels, outlines, header, UIDs, dciodvfy, round trip.

Expected pixels are computed here independently of ``dicom_ai.results.preview``: the
greyscale from the PS3.3 C.11.2.1.2.1 formula written out, the outlines from scipy's
``binary_erosion`` per label, the colours from ``segment_coding``.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from highdicom.color import CIELabColor
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage
from scipy.ndimage import binary_erosion, generate_binary_structure

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.results import DeviceIdentity, build_seg, result_uids, segment_coding
from dicom_ai.results.preview import (
    build_preview,
    patient_orientation,
    preview_series_uid,
    segment_outlines,
    window_to_uint8,
)
from dicom_ai.results.sources import display_colours
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.dicom_validation import assert_dciodvfy_clean, dciodvfy_output

pytestmark = [pytest.mark.dciodvfy]

SPEC = PhantomSpec(
    slices=8,
    rows=64,
    columns=64,
    study_instance_uid="1.2.826.0.1.3680043.8.498.2001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.2002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2003",
)
DEVICE = DeviceIdentity.for_node("node-preview-1")
ALGORITHM = AlgorithmIdentification("organ model", "2.1", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE)
LIVER, SPLEEN, KIDNEY = 5, 2, 3  # not 1..n on purpose: colours go by label, not by value
LABELS = (
    SegmentLabel(SPLEEN, "spleen"),
    SegmentLabel(KIDNEY, "kidney_left"),  # declared, no voxels: nothing drawn
    SegmentLabel(LIVER, "liver"),
)
LABELLED_SLICES = [2, 3, 4, 5]
UIDS = result_uids(SPEC.series_instance_uid, "organ-model", ALGORITHM.version)
CROSS = generate_binary_structure(2, 1)
# The only findings dciodvfy may report: the Image Plane / Frame of Reference attributes
# the preview carries beyond the SC Image IOD so that viewers can sync it with the source.
ALLOWED_WARNINGS = re.compile(
    r"not present in standard DICOM IOD - \(0x0020,0x00(32|37|52)\)"
    r"|contains attributes not present in standard DICOM IOD"
)


@dataclass(frozen=True)
class Preview:
    volume: SeriesVolume
    findings: SegmentationFindings
    shuffled: list[Dataset]
    images: list[Dataset]
    paths: list[Path]


def _label_map() -> npt.NDArray[np.uint16]:
    label_map = np.zeros((SPEC.slices, SPEC.rows, SPEC.columns), dtype=np.uint16)
    yy, xx = np.mgrid[0 : SPEC.rows, 0 : SPEC.columns]
    label_map[2, 0:20, 8:30] = LIVER  # touches the image's top edge
    label_map[3:5, 10:30, 8:30] = LIVER
    spleen = ((yy - 40) / 10.0) ** 2 + ((xx - 42) / 8.0) ** 2 <= 1.0
    label_map[3:6][:, spleen] = SPLEEN
    label_map[4, 30:36, 20:30] = SPLEEN  # shares a border with the liver on slice 4
    return label_map


@pytest.fixture(scope="module")
def preview(tmp_path_factory: pytest.TempPathFactory) -> Preview:
    directory = tmp_path_factory.mktemp("preview")
    volume = load_series(write_phantom_ct(directory / "ct", SPEC))
    findings = SegmentationFindings(
        label_map=_label_map(),
        labels=LABELS,
        algorithm=ALGORITHM,
        source_sop_instance_uids=volume.sop_instance_uids,
    )
    shuffled = list(volume.headers)
    random.Random(3).shuffle(shuffled)  # headers in any order: matched by SOP Instance UID
    images = build_preview(volume.frames, shuffled, findings, UIDS, DEVICE)
    paths = []
    for image in images:
        path = directory / f"sc{int(image.InstanceNumber):03d}.dcm"
        image.save_as(path, enforce_file_format=True)
        paths.append(path)
    return Preview(volume, findings, shuffled, list(images), paths)


def _grey(plane: npt.NDArray[np.floating], center: float, width: float) -> npt.NDArray[np.uint8]:
    """PS3.3 C.11.2.1.2.1 (LINEAR), to 0..255."""
    x = plane.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    y[x <= center - 0.5 - (width - 1.0) / 2.0] = 0.0
    y[x > center - 0.5 + (width - 1.0) / 2.0] = 255.0
    return np.rint(y).astype(np.uint8)


def _boundaries(label_plane: npt.NDArray[np.uint16]) -> dict[int, npt.NDArray[np.bool_]]:
    out = {}
    for value in (LIVER, SPLEEN):
        mask = label_plane == value
        out[value] = mask & ~binary_erosion(mask, structure=CROSS, border_value=0)
    return out


# --- series ---------------------------------------------------------------------------


def test_seg_recommends_the_colours_the_preview_draws(preview: Preview) -> None:
    seg = build_seg(preview.shuffled, preview.findings, UIDS, DEVICE)
    colours = display_colours(preview.findings)
    recommended = [tuple(item.RecommendedDisplayCIELabValue) for item in seg.SegmentSequence]
    assert recommended == [
        tuple(CIELabColor.from_rgb(*colours[value]).value) for value in (SPLEEN, LIVER)
    ]


def test_one_image_per_labelled_slice_in_slice_order(preview: Preview) -> None:
    assert len(preview.images) == len(LABELLED_SLICES)
    uids = preview.findings.source_sop_instance_uids
    for number, (image, k) in enumerate(zip(preview.images, LABELLED_SLICES, strict=True), 1):
        assert int(image.InstanceNumber) == number
        (reference,) = image.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == uids[k]
        assert reference.ReferencedSOPClassUID == CTImageStorage
        assert "ReferencedFrameNumber" not in reference
        purpose = reference.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")


def test_pixels_are_windowed_slice_with_exact_segment_outlines(preview: Preview) -> None:
    frames, label_map = preview.volume.frames, preview.findings.label_map
    # The SEG's colours: the table's, or another where two touching segments' are close.
    # The spleen (label 2) comes first and keeps the table's green; the liver touches it
    # and the table's liver green is too close to it.
    colours = display_colours(preview.findings)
    assert colours[SPLEEN] == segment_coding("spleen").display_rgb
    assert colours[LIVER] != segment_coding("liver").display_rgb
    for image, k in zip(preview.images, LABELLED_SLICES, strict=True):
        rgb = image.pixel_array
        assert rgb.shape == (SPEC.rows, SPEC.columns, 3) and rgb.dtype == np.uint8
        grey = _grey(frames[k], 40.0, 400.0)  # the phantom's own window
        boundaries = _boundaries(label_map[k])
        outline = boundaries[LIVER] | boundaries[SPLEEN]
        assert outline.any()
        plain = (rgb == grey[:, :, np.newaxis]).all(axis=2)
        # Off the outline: the windowed slice, R = G = B; on it: never the slice.
        assert np.array_equal(~plain, outline), f"slice {k}"
        for value, boundary in boundaries.items():
            assert (rgb[boundary] == colours[value]).all(), f"slice {k} label {value}"
    # The liver touches the top edge on slice 2: its edge row is outline.
    top = preview.images[0].pixel_array[0, 8:30]
    assert (top == colours[LIVER]).all()
    # Touching segments on slice 4: a 2-px line, one pixel in each colour.
    slice4 = preview.images[LABELLED_SLICES.index(4)].pixel_array
    assert (slice4[29, 20:30] == colours[LIVER]).all()
    assert (slice4[30, 20:30] == colours[SPLEEN]).all()


def test_headers_follow_the_source(preview: Preview) -> None:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in preview.volume.headers}
    for image in preview.images:
        source = by_uid[str(image.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert image.SOPClassUID == SecondaryCaptureImageStorage
        assert image.Modality == "OT"
        assert image.StudyInstanceUID == SPEC.study_instance_uid
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyDescription",
            "BodyPartExamined",
            "SpecificCharacterSet",
        ):
            assert image[keyword].value == source[keyword].value, keyword
        assert int(image.SeriesNumber) == int(source.SeriesNumber) + 3000
        assert image.SeriesDescription == "AI preview organ model"
        assert image.Manufacturer == "dicom-ai"
        assert image.ManufacturerModelName == "dicom-ai"
        assert image.SoftwareVersions == DEVICE.software_version
        assert image.DeviceSerialNumber == "node-preview-1"
        assert image.SecondaryCaptureDeviceManufacturer == "dicom-ai"
        assert image.ConversionType == "WSD"
        assert list(image.ImageType) == ["DERIVED", "SECONDARY"]
        assert image.BurnedInAnnotation == "NO"
        assert "organ model 2.1" in image.DerivationDescription
        assert image.DerivationCodeSequence[0].CodeValue == "113076"
        assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
        assert [float(v) for v in image.PixelSpacing] == [SPEC.pixel_spacing_mm] * 2
        assert list(image.PatientOrientation) == ["L", "P"]
        assert image.ImagePositionPatient == source.ImagePositionPatient
        assert image.ImageOrientationPatient == source.ImageOrientationPatient
        assert image.FrameOfReferenceUID == SPEC.frame_of_reference_uid
    assert len({image.SeriesInstanceUID for image in preview.images}) == 1


def test_uids_are_deterministic_and_distinct_from_seg_and_sr(preview: Preview) -> None:
    again = build_preview(
        preview.volume.frames,
        list(reversed(preview.shuffled)),
        preview.findings,
        UIDS,
        DEVICE,
    )
    first = [(i.SeriesInstanceUID, i.SOPInstanceUID) for i in preview.images]
    assert [(i.SeriesInstanceUID, i.SOPInstanceUID) for i in again] == first
    for a, b in zip(preview.images, again, strict=True):
        assert np.array_equal(a.pixel_array, b.pixel_array)
    series = preview.images[0].SeriesInstanceUID
    assert series == preview_series_uid(UIDS)
    instances = {i.SOPInstanceUID for i in preview.images}
    assert len(instances) == len(preview.images)
    results = {
        UIDS.seg_series_instance_uid,
        UIDS.seg_sop_instance_uid,
        UIDS.sr_series_instance_uid,
        UIDS.sr_sop_instance_uid,
    }
    assert not ({series} | instances) & results
    assert series not in instances
    other = result_uids(SPEC.series_instance_uid, "organ-model", "2.2")
    assert (
        build_preview(preview.volume.frames, preview.shuffled, preview.findings, other, DEVICE)[
            0
        ].SeriesInstanceUID
        != series
    )


def test_files_pass_dciodvfy_and_read_back(preview: Preview) -> None:
    for image, path in zip(preview.images, preview.paths, strict=True):
        assert_dciodvfy_clean(path)
        warnings = [
            line
            for line in dciodvfy_output(path).splitlines()
            if line.startswith("Warning") and not ALLOWED_WARNINGS.search(line)
        ]
        assert not warnings, "\n".join(warnings)
        read = pydicom.dcmread(path)
        assert read.SOPInstanceUID == image.SOPInstanceUID
        assert np.array_equal(read.pixel_array, image.pixel_array)


def test_series_number_can_be_given(preview: Preview) -> None:
    images = build_preview(
        preview.volume.frames, preview.shuffled, preview.findings, UIDS, DEVICE, series_number=77
    )
    assert {int(i.SeriesNumber) for i in images} == {77}


# --- inputs ---------------------------------------------------------------------------


def test_nothing_to_draw_or_disagreeing_inputs_raise(preview: Preview) -> None:
    frames, findings, headers = preview.volume.frames, preview.findings, preview.shuffled
    empty = replace(findings, label_map=np.zeros_like(findings.label_map))
    with pytest.raises(EncodingError, match="no labelled voxel"):
        build_preview(frames, headers, empty, UIDS, DEVICE)
    with pytest.raises(EncodingError, match="differ in shape"):
        build_preview(frames[:, :32], headers, findings, UIDS, DEVICE)
    with pytest.raises(EncodingError, match="not among"):
        build_preview(frames, headers[1:], findings, UIDS, DEVICE)
    unnamed = replace(findings, labels=(SegmentLabel(SPLEEN, "spleen"),))
    with pytest.raises(EncodingError, match="without a label"):
        build_preview(frames, headers, unnamed, UIDS, DEVICE)


def test_multi_frame_source_references_frames(preview: Preview) -> None:
    # One header standing for an 8-frame instance: the same UID repeats, frames 1..8.
    header = copy.deepcopy(preview.volume.headers[0])
    header.NumberOfFrames = SPEC.slices
    uid = str(header.SOPInstanceUID)
    findings = replace(
        preview.findings,
        source_sop_instance_uids=(uid,) * SPEC.slices,
        source_frame_numbers=tuple(range(1, SPEC.slices + 1)),
    )
    images = build_preview(preview.volume.frames, [header], findings, UIDS, DEVICE)
    refs = [image.SourceImageSequence[0] for image in images]
    assert [r.ReferencedSOPInstanceUID for r in refs] == [uid] * len(LABELLED_SLICES)
    assert [int(r.ReferencedFrameNumber) for r in refs] == [k + 1 for k in LABELLED_SLICES]
    assert len({image.SOPInstanceUID for image in images}) == len(LABELLED_SLICES)


def test_without_a_window_the_slice_percentiles_are_used(preview: Preview) -> None:
    headers = [copy.deepcopy(ds) for ds in preview.shuffled]
    for ds in headers:
        del ds.WindowCenter, ds.WindowWidth
    images = build_preview(preview.volume.frames, headers, preview.findings, UIDS, DEVICE)
    k = LABELLED_SLICES[0]
    plane = preview.volume.frames[k].astype(np.float64)
    low, high = np.percentile(plane, [1, 99])
    expected = np.rint(np.clip((plane - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    rgb = images[0].pixel_array
    outline = segment_outlines(preview.findings.label_map[k])
    assert np.array_equal(rgb[~outline], np.repeat(expected[~outline][:, None], 3, axis=1))


def test_monochrome1_source_is_shown_inverted(preview: Preview) -> None:
    headers = [copy.deepcopy(ds) for ds in preview.shuffled]
    for ds in headers:
        ds.PhotometricInterpretation = "MONOCHROME1"
    images = build_preview(preview.volume.frames, headers, preview.findings, UIDS, DEVICE)
    k = LABELLED_SLICES[0]
    outline = segment_outlines(preview.findings.label_map[k])
    grey = 255 - _grey(preview.volume.frames[k], 40.0, 400.0)
    assert np.array_equal(images[0].pixel_array[~outline][:, 0], grey[~outline])


# --- helpers --------------------------------------------------------------------------


def test_window_linear_formula_ends_and_first_of_multiple_values() -> None:
    c, w = 40.0, 400.0
    x = np.array([c - 0.5 - (w - 1) / 2, c - 0.5 - (w - 1) / 2 + 1e-9, c - 0.5, 1e6, -1e6])
    assert window_to_uint8(x, c, w).tolist() == [0, 0, 128, 255, 0]
    assert window_to_uint8(np.array([0.0, 1.0]), 1.0, 1.0).tolist() == [0, 255]  # w = 1: step
    assert window_to_uint8(np.array([40.0]), 40.0, 400.0, "LINEAR_EXACT").tolist() == [128]
    assert window_to_uint8(np.array([40.0]), 40.0, 400.0, "SIGMOID").tolist() == [128]
    with pytest.raises(EncodingError):
        window_to_uint8(np.array([np.nan]), 40.0, 400.0)


def test_first_window_of_a_multi_valued_header_is_used(preview: Preview) -> None:
    headers = [copy.deepcopy(ds) for ds in preview.shuffled]
    for ds in headers:
        ds.WindowCenter = [40, 500]
        ds.WindowWidth = [400, 2000]
    images = build_preview(preview.volume.frames, headers, preview.findings, UIDS, DEVICE)
    for a, b in zip(images, preview.images, strict=True):
        assert np.array_equal(a.pixel_array, b.pixel_array)


def test_outlines_equal_mask_minus_erosion_per_label() -> None:
    rng = np.random.default_rng(5)
    plane = rng.integers(0, 4, size=(40, 50)).astype(np.uint16)
    plane[5:20, 5:30] = 2
    expected = np.zeros(plane.shape, dtype=bool)
    for value in (1, 2, 3):
        mask = plane == value
        expected |= mask & ~binary_erosion(mask, structure=CROSS, border_value=0)
    assert np.array_equal(segment_outlines(plane), expected)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ((1, 0, 0, 0, 1, 0), ("L", "P")),  # axial
        ((0, 1, 0, 0, 0, -1), ("P", "F")),  # sagittal
        ((1, 0, 0, 0, 0, -1), ("L", "F")),  # coronal
        ((-1, 0, 0, 0, -1, 0), ("R", "A")),  # axial, feet first prone
        ((0.8, 0.6, 0, 0, 0, -1), ("LP", "F")),  # oblique
    ],
)
def test_patient_orientation(orientation: tuple[float, ...], expected: tuple[str, str]) -> None:
    assert patient_orientation(orientation) == expected
