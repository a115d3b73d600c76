"""Findings -> the result card (RGB Secondary Capture) and its Encapsulated PDF: the text read
back by OCR, the key image and its overlay, dciodvfy, round trip, deterministic UIDs and bytes.

Expected values are computed here, independently of ``dicom_ai.results.card``: volumes
from the phantom's spec, the key slice from the label map, colours from the SEG's.
The text is read with Debian's tesseract (``tesseract-ocr``, installed by ./install.sh).
"""

from __future__ import annotations

import datetime
import io
import random
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from highdicom.color import CIELabColor
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    ClassificationFindings,
    ClassScore,
    Detection,
    DetectionFindings,
    Findings,
    ImageClassification,
    ImageDetection,
    ImageDetectionFindings,
    Landmark,
    LandmarkFindings,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import DeviceIdentity, ResultUIDs, build_seg, result_uids
from dicom_ai.results import card as card_module
from dicom_ai.results.card import (
    CARD_SIZE,
    KEY_IMAGE_BOX,
    build_card,
    build_card_pdf,
    card_pdf_series_uid,
    card_pdf_sop_instance_uid,
    card_series_uid,
    card_sop_instance_uid,
)
from dicom_ai.results.encoding import file_bytes
from dicom_ai.results.sources import display_colours
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, phantom_hu_volume
from tests.dicom_validation import assert_dciodvfy_clean
from tests.ocr import card_text

pytestmark = [pytest.mark.dciodvfy, pytest.mark.tesseract]

SPEC = PhantomSpec(
    slices=12,
    rows=96,
    columns=96,
    pixel_spacing_mm=0.8,
    slice_thickness_mm=2.5,
    study_instance_uid="1.2.826.0.1.3680043.8.498.3001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.3002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3003",
)
VOXEL_ML = SPEC.pixel_spacing_mm**2 * SPEC.slice_thickness_mm / 1000.0
DEVICE = DeviceIdentity.for_node("node-card-1")
DISCLAIMER = "Research use only: not for diagnosis. Check every finding."
NOW = datetime.datetime(2026, 2, 3, 4, 5, 6)
LIVER, SPLEEN, KIDNEY, GALLBLADDER = 5, 2, 3, 4
LABELS = (
    SegmentLabel(SPLEEN, "spleen"),
    SegmentLabel(KIDNEY, "kidney_left"),
    SegmentLabel(GALLBLADDER, "gallbladder"),  # declared, no voxels: not on the card
    SegmentLabel(LIVER, "liver"),
)
KEY_SLICE = 6  # the liver is widest here
CLASSES = (("pneumonia", 0.873), ("pleural effusion", 0.412), ("normal", 0.05))


def _algorithm(name: str) -> AlgorithmIdentification:
    return AlgorithmIdentification(name, "3.2", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE)


@dataclass(frozen=True)
class CT:
    headers: list[Dataset]  # in slice order, with Pixel Data
    frames: npt.NDArray[np.float32]

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(str(h.SOPInstanceUID) for h in self.headers)

    def shuffled(self) -> list[Dataset]:
        headers = list(self.headers)
        random.Random(5).shuffle(headers)  # any order: matched by SOP Instance UID
        return headers


@dataclass(frozen=True)
class Made:
    findings: Findings
    card: Dataset
    path: Path
    uids: ResultUIDs


@pytest.fixture(scope="module")
def ct() -> CT:
    return CT(list(phantom_ct_datasets(SPEC)), phantom_hu_volume(SPEC).astype(np.float32))


def _label_map() -> npt.NDArray[np.uint16]:
    label_map = np.zeros((SPEC.slices, SPEC.rows, SPEC.columns), dtype=np.uint16)
    yy, xx = np.mgrid[0 : SPEC.rows, 0 : SPEC.columns]
    for k, radius in ((3, 8), (4, 12), (5, 16), (6, 20), (7, 14), (8, 6)):
        label_map[k][((yy - 45) / radius) ** 2 + ((xx - 30) / radius) ** 2 <= 1] = LIVER
    label_map[4:9, 40:52, 62:70] = SPLEEN
    label_map[2:4, 60:66, 20:28] = KIDNEY  # not on the key slice
    return label_map


def _made(findings: Findings, card: Dataset, directory: Path, uids: ResultUIDs) -> Made:
    path = directory / "card.dcm"
    path.write_bytes(file_bytes(card))
    return Made(findings, card, path, uids)


@pytest.fixture(scope="module")
def segmentation(ct: CT, tmp_path_factory: pytest.TempPathFactory) -> Made:
    findings = SegmentationFindings(_label_map(), LABELS, _algorithm("Organ Atlas"), ct.uids)
    uids = result_uids(SPEC.series_instance_uid, "organ-atlas", "3.2")
    card = build_card(ct.shuffled(), ct.frames, findings, uids, DEVICE, disclaimer=DISCLAIMER)
    return _made(findings, card, tmp_path_factory.mktemp("seg-card"), uids)


def _radiograph() -> Dataset:
    """A CR chest image with Pixel Data (MONOCHROME1), as a 2-D model's source."""
    rows, columns = 240, 200
    yy, xx = np.mgrid[0:rows, 0:columns]
    display = np.full((rows, columns), 300.0)
    display[((xx - 100) / 90.0) ** 2 + ((yy - 120) / 115.0) ** 2 < 1] = 2000.0
    for side in (-1, 1):
        display[((xx - 100 - side * 40) / 28.0) ** 2 + ((yy - 108) / 70.0) ** 2 < 1] = 800.0
    stored = (4095 - display).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    uid = generate_uid(entropy_srcs=["card-cr"])
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["card-cr-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["card-cr-series"])
    ds.Modality = "CR"
    ds.PatientName, ds.PatientID = "CHEST^CARD", "CARD-0001"
    ds.PatientBirthDate, ds.PatientSex = "19800101", "F"
    ds.StudyDate = ds.SeriesDate = "20260105"
    ds.StudyTime = ds.SeriesTime = "090000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "ACC-CARD", "", "1"
    ds.SeriesNumber, ds.InstanceNumber = 7, 1
    ds.SeriesDescription = "Chest PA"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.4, 0.4]
    ds.PixelData = stored.tobytes()
    return ds


@pytest.fixture(scope="module")
def radiograph() -> Dataset:
    return _radiograph()


@pytest.fixture(scope="module")
def classification(radiograph: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Made:
    scores = tuple(ClassScore(name, p) for name, p in CLASSES)
    findings = ClassificationFindings(
        (ImageClassification(scores, (str(radiograph.SOPInstanceUID),)),),
        _algorithm("Chest Triage"),
        threshold=0.3,
    )
    uids = result_uids(str(radiograph.SeriesInstanceUID), "chest-triage", "3.2")
    # frames None: a 2-D job; the key image comes from the header's Pixel Data.
    card = build_card([radiograph], None, findings, uids, DEVICE, disclaimer=DISCLAIMER)
    return _made(findings, card, tmp_path_factory.mktemp("cls-card"), uids)


def _slice_z(k: int) -> float:
    return -300.0 + k * SPEC.slice_thickness_mm


DETECTIONS = (
    # name, score, centre (LPS mm), edges (mm) along rows, columns, slices
    ("lung nodule", 0.91, (-10.0, -8.0, _slice_z(9) + 0.4), (12.0, 10.0, 7.5)),
    ("mass", 0.64, (12.0, 6.0, _slice_z(9)), (16.0, 14.0, 5.0)),
    ("lung nodule", 0.52, (0.0, 20.0, _slice_z(2)), (6.0, 6.0, 5.0)),
)


@pytest.fixture(scope="module")
def detection(ct: CT, tmp_path_factory: pytest.TempPathFactory) -> Made:
    findings = DetectionFindings(
        tuple(
            Detection(name, score, np.array(centre), np.diag(edges))
            for name, score, centre, edges in DETECTIONS
        ),
        _algorithm("Nodule Finder"),
        ct.uids,
        SPEC.frame_of_reference_uid,
    )
    uids = result_uids(SPEC.series_instance_uid, "nodule-finder", "3.2")
    card = build_card(ct.shuffled(), ct.frames, findings, uids, DEVICE, disclaimer=DISCLAIMER)
    return _made(findings, card, tmp_path_factory.mktemp("det-card"), uids)


# --- OCR ------------------------------------------------------------------------------


def _line_with(lines: list[str], *parts: str) -> str:
    """The OCR line holding every part, or a failure that shows what was read."""
    for line in lines:
        if all(part.lower() in line for part in parts):
            return line
    raise AssertionError(f"no line with {parts!r} in the card's text:\n" + "\n".join(lines))


def _key_area(card: Dataset) -> npt.NDArray[np.uint8]:
    left, top, right, bottom = KEY_IMAGE_BOX
    return np.asarray(card.pixel_array[top:bottom, left:right])


# --- segmentation ---------------------------------------------------------------------


def test_segmentation_card_reads_model_segments_and_volumes(segmentation: Made) -> None:
    lines = card_text(segmentation.card.pixel_array)
    _line_with(lines, "organ atlas")
    _line_with(lines, "version 3.2")
    label_map = _label_map()
    for value, name in ((LIVER, "liver"), (SPLEEN, "spleen"), (KIDNEY, "kidney left")):
        volume = np.count_nonzero(label_map == value) * VOXEL_ML
        _line_with(lines, name, f"{volume:.1f} ml")
    assert not any("gallbladder" in line for line in lines), lines
    # The series, by what a viewer shows of it; the disclaimer as given.
    _line_with(lines, "series 2", SPEC.series_description)
    _line_with(lines, "ct", "2026-01-01", "12 images")
    _line_with(lines, "research use only")
    assert not any(SPEC.patient_id.lower() in line for line in lines)


def test_key_image_is_the_largest_segmented_slice_outlined_in_segment_colours(
    segmentation: Made, ct: CT
) -> None:
    card = segmentation.card
    (reference,) = card.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == ct.uids[KEY_SLICE]
    assert reference.ReferencedSOPClassUID == ct.headers[KEY_SLICE].SOPClassUID
    findings = segmentation.findings
    assert isinstance(findings, SegmentationFindings)
    # The colours the SEG recommends for its segments (1..n: present labels by value).
    seg = build_seg(ct.shuffled(), findings, segmentation.uids, DEVICE)
    recommended = {
        int(item.SegmentNumber): tuple(item.RecommendedDisplayCIELabValue)
        for item in seg.SegmentSequence
    }
    colours = display_colours(findings)
    for number, value in enumerate((SPLEEN, KIDNEY, LIVER), start=1):
        assert recommended[number] == tuple(CIELabColor.from_rgb(*colours[value]).value)
    area = _key_area(card).reshape(-1, 3)
    drawn = {tuple(int(v) for v in row) for row in np.unique(area, axis=0)}
    for value in (LIVER, SPLEEN):  # both on the key slice
        rgb = colours[value]
        count = int(np.all(area == np.array(rgb, dtype=np.uint8), axis=1).sum())
        # The outline: at least the scaled perimeter, a few pixels wide.
        assert count >= 100, (value, rgb, count)
    assert colours[KIDNEY] not in drawn  # not on this slice


def test_segmentation_card_header(segmentation: Made, ct: CT) -> None:
    card, uids = segmentation.card, segmentation.uids
    assert card.SOPClassUID == SecondaryCaptureImageStorage
    assert card.SOPInstanceUID == card_sop_instance_uid(uids)
    assert card.SeriesInstanceUID == card_series_uid(uids)
    assert card.SeriesInstanceUID not in {
        uids.seg_series_instance_uid,
        uids.sr_series_instance_uid,
    }
    assert int(card.SeriesNumber) == 2 + 4000
    assert card.SeriesDescription == "AI result card Organ Atlas"
    assert (card.Rows, card.Columns) == (CARD_SIZE[1], CARD_SIZE[0])
    assert (card.PhotometricInterpretation, card.SamplesPerPixel) == ("RGB", 3)
    assert list(card.ImageType) == ["DERIVED", "SECONDARY"]
    source = ct.headers[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        assert card[keyword].value == source[keyword].value, keyword
    assert "FrameOfReferenceUID" not in card and "PixelSpacing" not in card
    assert card.BurnedInAnnotation == "NO"


# --- classification and detection -----------------------------------------------------


def test_classification_card_reads_classes_with_probabilities(classification: Made) -> None:
    lines = card_text(classification.card.pixel_array)
    _line_with(lines, "chest triage")
    for name, probability in CLASSES:
        _line_with(lines, name, f"{probability * 100:.1f}%")
    _line_with(lines, "series 7", "chest pa")


def test_classification_key_image_is_the_radiograph_from_its_pixel_data(
    classification: Made, radiograph: Dataset
) -> None:
    card = classification.card
    (reference,) = card.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == radiograph.SOPInstanceUID
    grey = _key_area(card).astype(np.int16)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # MONOCHROME1 shown as a viewer shows it: lungs dark inside a bright body.
    height, width = grey.shape[:2]
    lung = grey[height // 2 - 20, width // 2 - 54, 0]  # in the left lung of the picture
    body = grey[height // 2 + 150, width // 2, 0]
    assert body > lung + 60, (body, lung)


def test_detection_card_reads_detections_and_draws_the_top_box(detection: Made, ct: CT) -> None:
    lines = card_text(detection.card.pixel_array)
    _line_with(lines, "nodule finder")
    for number, (name, score, centre, edges) in enumerate(DETECTIONS, start=1):
        _line_with(lines, f"{number}. {name}", f"{score * 100:.1f}%")
        # Where: the Instance Number of the slice nearest the centre (slice k is k + 1).
        nearest = round((centre[2] - _slice_z(0)) / SPEC.slice_thickness_mm)
        _line_with(lines, " x ".join(f"{v:.1f}" for v in edges), "mm", f"image {nearest + 1}")
    # The key image is the slice nearest the top box's centre, with the box on it.
    (reference,) = detection.card.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == ct.uids[9]
    area = _key_area(detection.card).astype(np.int16)
    yellow = (area[..., 0] > 200) & (area[..., 1] > 180) & (area[..., 2] < 80)
    assert yellow.sum() > 200, yellow.sum()


def test_image_detection_and_landmark_cards(radiograph: Dataset, ct: CT, tmp_path: Path) -> None:
    uids = result_uids(str(radiograph.SeriesInstanceUID), "boxes-2d", "1")
    boxes = ImageDetectionFindings(
        (
            ImageDetection(
                "pneumothorax",
                0.8,
                str(radiograph.SOPInstanceUID),
                np.array([20.0, 30.0, 59.0, 79.0]),
            ),
        ),
        _algorithm("Box 2D"),
        (str(radiograph.SOPInstanceUID),),
    )
    card = build_card([radiograph], None, boxes, uids, DEVICE, disclaimer="")
    area = _key_area(card).astype(np.int16)
    assert ((area[..., 0] > 200) & (area[..., 2] < 80)).sum() > 200
    assert_dciodvfy_clean(_made(boxes, card, tmp_path, uids).path)

    points = LandmarkFindings(
        (Landmark("apex", np.array([5.0, -4.0, _slice_z(4)]), ct.uids[4]),),
        _algorithm("Points"),
        ct.uids,
        SPEC.frame_of_reference_uid,
    )
    card = build_card(ct.headers, ct.frames, points, uids, DEVICE, disclaimer="")
    assert card.SourceImageSequence[0].ReferencedSOPInstanceUID == ct.uids[4]
    area = _key_area(card).astype(np.int16)
    assert ((area[..., 0] > 200) & (area[..., 2] < 80)).sum() > 30


# --- DICOM ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification", "detection"])
def test_card_is_valid_dicom_and_round_trips(kind: str, request: pytest.FixtureRequest) -> None:
    made: Made = request.getfixturevalue(kind)
    assert_dciodvfy_clean(made.path)
    reread = pydicom.dcmread(made.path)
    assert reread.SOPInstanceUID == made.card.SOPInstanceUID
    np.testing.assert_array_equal(reread.pixel_array, made.card.pixel_array)
    image = hd.imread(made.path)
    assert image.SOPClassUID == SecondaryCaptureImageStorage
    np.testing.assert_array_equal(image.get_frame(1), made.card.pixel_array)


def test_same_job_gives_the_same_card(ct: CT, segmentation: Made) -> None:
    findings = segmentation.findings
    assert isinstance(findings, SegmentationFindings)
    uids = segmentation.uids

    def made(now: datetime.datetime | None) -> Dataset:
        return build_card(
            ct.shuffled(), ct.frames, findings, uids, DEVICE, disclaimer=DISCLAIMER, now=now
        )

    assert bytes(file_bytes(made(NOW))) == bytes(file_bytes(made(NOW)))
    later = made(None)  # the clock: another Content Time, the same picture and UIDs
    assert later.SOPInstanceUID == segmentation.card.SOPInstanceUID
    np.testing.assert_array_equal(later.pixel_array, segmentation.card.pixel_array)
    other = result_uids(SPEC.series_instance_uid, "organ-atlas", "3.3")
    assert card_sop_instance_uid(other) != card_sop_instance_uid(uids)
    assert card_series_uid(other) != card_series_uid(uids)


def test_pdf_holds_the_card_picture(segmentation: Made, tmp_path: Path) -> None:
    card = segmentation.card
    pdf = build_card_pdf(card)
    path = tmp_path / "card-pdf.dcm"
    path.write_bytes(file_bytes(pdf))
    assert_dciodvfy_clean(path)
    reread = pydicom.dcmread(path)
    assert reread.SOPClassUID == EncapsulatedPDFStorage
    assert reread.SOPInstanceUID == card_pdf_sop_instance_uid(str(card.SOPInstanceUID))
    assert reread.SeriesInstanceUID == card_pdf_series_uid(str(card.SOPInstanceUID))
    assert reread.SeriesInstanceUID != card.SeriesInstanceUID
    assert (reread.Modality, reread.MIMETypeOfEncapsulatedDocument) == ("DOC", "application/pdf")
    assert int(reread.SeriesNumber) == int(card.SeriesNumber) + 1
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        assert reread[keyword].value == card[keyword].value, keyword
    (source,) = reread.SourceInstanceSequence
    assert source.ReferencedSOPInstanceUID == card.SOPInstanceUID
    document = bytes(reread.EncapsulatedDocument)[: int(reread.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF-") and document.rstrip().endswith(b"%%EOF")
    # The page's one image is the card, JPEG-compressed.
    start, end = document.index(b"\xff\xd8\xff"), document.rindex(b"\xff\xd9") + 2
    page = np.asarray(Image.open(io.BytesIO(document[start:end])).convert("RGB"))
    assert page.shape == card.pixel_array.shape
    assert np.abs(page.astype(np.int16) - card.pixel_array).mean() < 2.0
    assert bytes(file_bytes(build_card_pdf(card))) == bytes(file_bytes(pdf))


# --- edges ----------------------------------------------------------------------------


def test_long_list_ends_in_more_and_no_pixels_say_no_key_image(ct: CT) -> None:
    greek = (
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
        "rho sigma tau upsilon phi chi psi omega"
    )
    names = [f"segment {letter}" for letter in greek.split()]
    label_map = np.zeros((SPEC.slices, SPEC.rows, SPEC.columns), dtype=np.uint16)
    for value in range(1, len(names) + 1):  # label v has 2 v voxels: omega the most
        label_map[value % SPEC.slices, 2 * value : 2 * value + 2, 10 : 10 + value] = value
    findings = SegmentationFindings(
        label_map,
        tuple(SegmentLabel(v, name) for v, name in enumerate(names, start=1)),
        _algorithm("Many Parts"),
        ct.uids,
    )
    uids = result_uids(SPEC.series_instance_uid, "many", "1")
    headers = []
    for header in ct.headers:
        bare = Dataset(header)  # a shallow copy without the pixels, as the worker has
        del bare.PixelData
        headers.append(bare)
    card = build_card(headers, None, findings, uids, DEVICE, disclaimer="")
    assert "SourceImageSequence" not in card
    lines = card_text(card.pixel_array)
    rows = [line for line in lines if " ml" in line]
    assert 5 <= len(rows) < len(names), lines
    # The largest first: the rows shown are the top ones, in volume order.
    for line, name in zip(rows, reversed(names), strict=False):
        _line_with([line], name, f"{2 * (names.index(name) + 1) * VOXEL_ML:.3f} ml")
    _line_with(lines, f"+{len(names) - len(rows)} more")
    left, top, right, bottom = KEY_IMAGE_BOX
    _line_with(
        card_text(card.pixel_array[top:bottom, left:right], blank_key_image=False), "no key image"
    )


def test_frames_that_do_not_match_are_refused(ct: CT, segmentation: Made) -> None:
    with pytest.raises(EncodingError, match="frames"):
        build_card(
            ct.headers,
            ct.frames[:-1],
            segmentation.findings,
            segmentation.uids,
            DEVICE,
            disclaimer="",
        )


def test_missing_font_is_an_encoding_error(
    ct: CT, segmentation: Made, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card_module._font.cache_clear()
    monkeypatch.setattr(card_module, "FONT_DIRECTORY", tmp_path)
    try:
        with pytest.raises(EncodingError, match="fonts-dejavu-core"):
            build_card(
                ct.headers,
                ct.frames,
                segmentation.findings,
                segmentation.uids,
                DEVICE,
                disclaimer="",
            )
    finally:
        card_module._font.cache_clear()
