"""Findings -> the result card: one RGB Secondary Capture image that shows a job's results
on any PACS, including those that display neither SEG nor SR; optionally the same picture
as an Encapsulated PDF.

The card (1280x1024, white on dark, title 48 px, table 28 px) shows the model's name and
version, the findings as a table, a key image with the findings drawn on it, the series
they were computed from and a disclaimer:

- segmentation: segments with their volumes (the SR's, same formula), largest first; the
  key image is the slice with the largest segmented area, segments filled lightly and
  outlined in their SEG display colours;
- classification: classes with their probabilities, most probable first, those at or above
  the threshold marked; the key image is the classified image (a volume's middle slice);
- detection: boxes with probability, size and image, most probable first; the key image
  is the slice nearest the centre of the most probable box, every box through it drawn;
- landmarks: names and images; the key image is the first landmark's, its points drawn.

Rows that do not fit end in "+k more". Pixels depend on the findings and headers alone
(no clock), so a rerun draws the same card; the UIDs derive from the job's result UIDs, so
it supersedes the earlier one. The card is a picture, not data: SEG and SR stay the results
of record.
"""

from __future__ import annotations

import copy
import datetime
import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from highdicom.base import SOPClass
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import DA, DT, TM

from dicom_ai.enhanced import number_of_frames
from dicom_ai.errors import EncodingError, GeometryError
from dicom_ai.geometry import floats, plane_value, voxel_volume_mm3
from dicom_ai.inference.findings import (
    ClassificationFindings,
    DetectionFindings,
    Findings,
    ImageDetectionFindings,
    LandmarkFindings,
    SegmentationFindings,
)
from dicom_ai.inference.pixels import rescale
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.preview import (
    COPIED_FROM_SOURCE,
    mark_secondary_capture,
    segment_outlines,
    source_reference,
    voi_window,
    window_to_uint8,
)
from dicom_ai.results.sources import (
    default_series_number,
    display_colours,
    order_like_findings,
    present_labels,
)
from dicom_ai.results.uids import ResultUIDs, derived_uid

__all__ = [
    "CARD_SERIES_NUMBER_OFFSET",
    "CARD_SIZE",
    "FONT_DIRECTORY",
    "KEY_IMAGE_BOX",
    "build_card",
    "build_card_pdf",
    "card_pdf_series_uid",
    "card_pdf_sop_instance_uid",
    "card_series_uid",
    "card_sop_instance_uid",
]

logger = logging.getLogger(__name__)

CARD_SERIES_NUMBER_OFFSET = 4000
"""Default card Series Number = source Series Number + this; the PDF's is the card's + 1."""

CARD_SIZE = (1280, 1024)
"""(columns, rows) of the card: a 5:4 screen, read whole at full size."""

KEY_IMAGE_BOX = (32, 144, 672, 784)
"""(left, top, right, bottom) of the key image's area on the card; the image is centred in
it, its aspect ratio kept."""

FONT_DIRECTORY = Path("/usr/share/fonts/truetype/dejavu")
"""Where Debian's fonts-dejavu-core puts DejaVu Sans (./install.sh installs it)."""

_WIDTH, _HEIGHT = CARD_SIZE
_MARGIN = 32
_TABLE_LEFT, _TABLE_RIGHT = 712, _WIDTH - _MARGIN
_BODY_BOTTOM = 824  # the table's and the caption's lower edge
_SERIES_TOP = 836
_NOTICE_LINES = 4  # the disclaimer's lines at most (300 characters fit)

_TITLE_PX, _SUBTITLE_PX, _HEADING_PX, _ROW_PX, _SMALL_PX = 48, 26, 30, 28, 24
_ROW_HEIGHT, _DETAIL_HEIGHT, _NOTE_HEIGHT = 40, 30, 32
_SWATCH_PX = 22
_OUTLINE_PX = 3  # outline width on the key image: still seen on a half-size card
_FILL_TENTHS = 3  # segment fill opacity, in tenths: the anatomy stays visible under it

_BACKGROUND = (16, 20, 24)
_BAND = (20, 46, 80)
_TEXT = (255, 255, 255)
_MUTED = (196, 204, 212)
_ROW_SHADE = (32, 38, 46)
_NOTICE = (255, 196, 0)
_NOTICE_TEXT = (0, 0, 0)
_MARK = (255, 230, 0)  # boxes and points: yellow reads on grey and on colour fills
_FOUND = (60, 210, 110)

_SOURCE_DATE_KEYWORDS = ("SeriesDate", "AcquisitionDate", "ContentDate", "StudyDate")
# What decoding a header's Pixel Data may raise (no decoder, bad length, odd syntax).
_DECODE_ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError, AttributeError)

RGB = tuple[int, int, int]


def card_series_uid(uids: ResultUIDs) -> str:
    """Series Instance UID of the card: a pure function of the job's result UIDs."""
    return derived_uid(uids.sr_sop_instance_uid, "card-series")


def card_sop_instance_uid(uids: ResultUIDs) -> str:
    """SOP Instance UID of the card: the same job gives the same UID, so a rerun supersedes."""
    return derived_uid(uids.sr_sop_instance_uid, "card-instance")


def card_pdf_series_uid(card_sop_instance_uid: str) -> str:
    """Series Instance UID of the card's PDF (Modality DOC: a series of its own)."""
    return derived_uid(card_sop_instance_uid, "card-pdf-series")


def card_pdf_sop_instance_uid(card_sop_instance_uid: str) -> str:
    """SOP Instance UID of the card's PDF."""
    return derived_uid(card_sop_instance_uid, "card-pdf-instance")


# --- what is drawn -------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """One source image (frame): index ``k`` of ``frames``."""

    header: Dataset
    uid: str  # the header's SOP Instance UID: pydicom's attribute access is slow
    frame_number: int | None

    def name(self) -> str:
        """How the card names it: by Instance Number, as viewers list images."""
        number = self.header.get("InstanceNumber")
        text = f"image {number}" if number not in (None, "") else "image"
        return f"{text} frame {self.frame_number}" if self.frame_number is not None else text


@dataclass(frozen=True)
class _Row:
    name: str
    value: str
    detail: str = ""  # a second, smaller line
    swatch: RGB | None = None
    strong: bool = True


@dataclass(frozen=True)
class _Shape:
    """A box (4+ corners) or a point (1) on the key image, in source pixel indices
    (column, row; pixel centres at integers), with its number."""

    points: tuple[tuple[float, float], ...]
    label: str


@dataclass(frozen=True)
class _Key:
    index: int
    caption: str
    labels: npt.NDArray[np.uint16] | None = None  # the slice's label plane
    colours: npt.NDArray[np.uint8] | None = None  # colours[label value]
    shapes: tuple[_Shape, ...] = ()


@dataclass(frozen=True)
class _Content:
    heading: tuple[str, str]
    rows: list[_Row]
    notes: list[str] = field(default_factory=list)
    key: _Key | None = None


# --- public ---------------------------------------------------------------------------


def build_card(
    source_images: Sequence[Dataset],
    frames: npt.NDArray[np.floating[Any]] | None,
    findings: Findings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    disclaimer: str,
    series_number: int | None = None,
    now: datetime.datetime | None = None,
) -> SCImage:
    """The result card of one job: an RGB Secondary Capture of :data:`CARD_SIZE`.

    ``source_images`` are the headers of the images the findings are about, in any order.
    ``frames`` are their pixels after the Modality LUT (e.g. HU, MONOCHROME1 not inverted),
    ``(images, rows, columns)`` in the findings' order (a segmentation's or detection's
    ``source_sop_instance_uids``; a classification's results' images, in turn), as the
    worker's volume has them; None takes a 2-D image's pixels from its header's Pixel
    Data, and without any the card says "No key image". ``disclaimer`` is printed at the
    foot (empty: none). ``now`` (default: the clock) is the Series and Content Date/Time;
    the pixels never depend on it.

    Raises :class:`EncodingError` when the findings name images not among the sources, the
    frames do not match them, DejaVu Sans is missing, or highdicom refuses the image.
    """
    slices = _slices(source_images, findings)
    if frames is not None and (
        frames.ndim != 3
        or frames.shape[0] != len(slices)
        or (isinstance(findings, SegmentationFindings) and frames.shape != findings.label_map.shape)
    ):
        raise EncodingError(
            f"frames {frames.shape} do not match the {len(slices)} source images of the findings"
        )
    content = _content(findings, slices)
    pixels, key_slice = _render(findings, slices, frames, content, disclaimer)
    source = slices[0].header
    number = (
        series_number
        if series_number is not None
        else default_series_number(slices[0].header, CARD_SERIES_NUMBER_OFFSET)
    )
    when = now or datetime.datetime.now()
    algorithm = findings.algorithm
    try:
        image = SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            # highdicom needs an orientation for PATIENT; blanked below.
            coordinate_system="PATIENT",
            patient_orientation=("L", "P"),
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=card_series_uid(uids),
            series_number=number,
            sop_instance_uid=card_sop_instance_uid(uids),
            instance_number=1,
            **device.equipment(),
            series_description=f"AI result card {algorithm.name}"[:64],
            series_date=when.date(),
            series_time=when.time(),
            content_date=when.date(),
            content_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(
            f"highdicom refused the result card for {algorithm.name}: {exc}"
        ) from exc
    _stamp(image, when)
    # A composite of text and an image: its rows and columns point nowhere in the patient.
    image.PatientOrientation = []
    mark_secondary_capture(image, source, device)
    image.DerivationDescription = (
        f"Result card of {algorithm.name} {algorithm.version}: the findings as a table and "
        "drawn over a key image of the source series"
    )[:1024]
    if key_slice is not None:
        image.SourceImageSequence = [source_reference(key_slice.header, key_slice.frame_number)]
    # The card's own text names no patient; its key image keeps what its source has burned in.
    burned_in = key_slice.header.get("BurnedInAnnotation", "") if key_slice else ""
    image.BurnedInAnnotation = str(burned_in or "NO")
    return image


def build_card_pdf(card: Dataset, *, series_number: int | None = None) -> Dataset:
    """The card's picture as an Encapsulated PDF (one page), in a series of its own.

    ``card`` is what :func:`build_card` returned; patient, study, device and dates come
    from it, the UIDs derive from its SOP Instance UID, and its Series Number + 1 is the
    default Series Number. The PDF's image is JPEG (quality 95, no chroma subsampling).
    """
    if (
        card.get("SOPClassUID") != SecondaryCaptureImageStorage
        or card.get("PhotometricInterpretation") != "RGB"
    ):
        raise EncodingError("build_card_pdf needs an RGB Secondary Capture from build_card")
    when = datetime.datetime.combine(DA(card.ContentDate), TM(card.ContentTime))
    title = str(card.get("SeriesDescription", "AI result card"))
    picture = Image.fromarray(np.ascontiguousarray(card.pixel_array), "RGB")
    buffer = io.BytesIO()
    picture.save(
        buffer,
        format="PDF",
        resolution=150.0,
        title=title,
        creator=str(card.get("ManufacturerModelName", "")),
        # The card's time, not the clock's: the same card gives the same bytes.
        creationDate=when.timetuple(),
        modDate=when.timetuple(),
        quality=95,
        subsampling=0,
    )
    document = buffer.getvalue()
    number = series_number if series_number is not None else (int(card.SeriesNumber) + 1) % 2**31
    try:
        pdf = SOPClass(
            study_instance_uid=card.StudyInstanceUID,
            series_instance_uid=card_pdf_series_uid(str(card.SOPInstanceUID)),
            series_number=number,
            sop_instance_uid=card_pdf_sop_instance_uid(str(card.SOPInstanceUID)),
            sop_class_uid=EncapsulatedPDFStorage,
            instance_number=1,
            modality="DOC",
            manufacturer=card.get("Manufacturer"),
            manufacturer_model_name=card.get("ManufacturerModelName"),
            software_versions=card.get("SoftwareVersions"),
            device_serial_number=card.get("DeviceSerialNumber"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=title[:64],
            series_date=when.date(),
            series_time=when.time(),
            content_date=when.date(),
            content_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"highdicom refused the result card PDF: {exc}") from exc
    _stamp(pdf, when)
    for keyword in COPIED_FROM_SOURCE:
        if keyword in card:
            pdf[keyword] = copy.deepcopy(card[keyword])
    pdf.ConversionType = "WSD"
    pdf.BurnedInAnnotation = card.get("BurnedInAnnotation", "NO")
    pdf.AcquisitionDateTime = ""
    pdf.DocumentTitle = title
    pdf.ConceptNameCodeSequence = []
    pdf.SourceInstanceSequence = [_reference(card)]
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocumentLength = len(document)
    pdf.EncapsulatedDocument = document + b"\0" * (len(document) % 2)  # OB: even length
    return pdf


def _stamp(dataset: Dataset, when: datetime.datetime) -> None:
    """``when`` as the instance's creation (and highdicom's contribution) time, which
    highdicom takes from the clock: the same input gives the same bytes."""
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    for item in dataset.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)


def _reference(instance: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item


# --- findings -> content --------------------------------------------------------------


def _slices(source_images: Sequence[Dataset], findings: Findings) -> list[_Slice]:
    """The images (frames) of the findings in their order, as ``frames`` has them."""
    if isinstance(findings, SegmentationFindings):
        ordered = order_like_findings(source_images, findings)
        uids = findings.source_sop_instance_uids
        numbers = findings.source_frame_numbers or (None,) * len(ordered)
        return [_Slice(h, u, n) for h, u, n in zip(ordered, uids, numbers, strict=True)]
    keys: list[tuple[str, int | None]] = []
    if isinstance(findings, ClassificationFindings):
        for result in findings.results:
            numbers = result.source_frame_numbers or (None,) * len(result.source_sop_instance_uids)
            keys += zip(result.source_sop_instance_uids, numbers, strict=True)
        keys = list(dict.fromkeys(keys))  # an image classified twice is one image
    else:
        frame_numbers = (
            findings.source_frame_numbers if isinstance(findings, DetectionFindings) else None
        )
        numbers = frame_numbers or (None,) * len(findings.source_sop_instance_uids)
        keys = list(zip(findings.source_sop_instance_uids, numbers, strict=True))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_images}
    missing = [uid for uid, _ in keys if uid not in by_uid]
    if missing or not keys:
        raise EncodingError(
            f"{len(missing)} source image(s) of the findings are not among the "
            f"{len(source_images)} source images" + (f", e.g. {missing[0]}" if missing else "")
        )
    return [_Slice(by_uid[uid], uid, number) for uid, number in keys]


def _content(findings: Findings, slices: list[_Slice]) -> _Content:
    if isinstance(findings, SegmentationFindings):
        return _segmentation(findings, slices)
    if isinstance(findings, ClassificationFindings):
        return _classification(findings, slices)
    if isinstance(findings, DetectionFindings):
        return _detection(findings, slices)
    if isinstance(findings, ImageDetectionFindings):
        return _image_detection(findings, slices)
    return _landmarks(findings, slices)


def _segmentation(findings: SegmentationFindings, slices: list[_Slice]) -> _Content:
    labels = present_labels(findings)
    counts = findings.voxel_counts
    try:
        # As the SR computes it, so that card and SR agree.
        voxel_ml: float | None = voxel_volume_mm3([s.header for s in slices]) / 1000.0
    except GeometryError:
        voxel_ml = None  # projection images: no volume; the card gives pixels
    # The SEG's and the preview's colours (table colours, touching segments kept apart).
    display = display_colours(findings) if labels else {}
    ranked = sorted(labels, key=lambda label: (-int(counts[label.value]), label.value))
    rows = [
        _Row(
            _display_name(label.name),
            _volume_text(int(counts[label.value]) * voxel_ml)
            if voxel_ml is not None
            else f"{int(counts[label.value])} px",
            swatch=display[label.value],
        )
        for label in ranked
    ]
    label_map = findings.label_map
    if not labels:
        key = _Key(len(slices) // 2, f"Key image: {slices[len(slices) // 2].name()}, no segment")
        return _Content(("Segment", "Volume"), [], ["No segment found."], key)
    # From the per-frame counts SEG and SR share: no pass over the volume of its own.
    areas = findings.frame_voxel_counts[:, 1:].sum(axis=1)
    k = int(np.argmax(areas))
    colours = np.zeros((max(display) + 1, 3), dtype=np.uint8)
    for value, rgb in display.items():
        colours[value] = rgb
    key = _Key(k, f"Key image: {slices[k].name()}, largest segmented area", label_map[k], colours)
    return _Content(("Segment", "Volume"), rows, [], key)


def _classification(findings: ClassificationFindings, slices: list[_Slice]) -> _Content:
    best: dict[str, float] = {}
    for result in findings.results:
        for score in result.scores:
            best[score.name] = max(best.get(score.name, 0.0), score.probability)
    ranked = sorted(best.items(), key=lambda item: -item[1])
    rows = [
        _Row(
            _display_name(name),
            _percent(probability),
            swatch=_FOUND if probability >= findings.threshold else None,
            strong=probability >= findings.threshold,
        )
        for name, probability in ranked
    ]
    notes = [f"Found (marked): probability ≥ {_percent(findings.threshold)}"]
    images = len(findings.results)
    if images > 1:
        notes.append(f"Highest of {images} images")
    # The image whose top class is the most probable; a volume's middle slice.
    result = max(findings.results, key=lambda r: max((s.probability for s in r.scores), default=0))
    index = {(s.uid, s.frame_number): k for k, s in enumerate(slices)}
    numbers = result.source_frame_numbers or (None,) * len(result.source_sop_instance_uids)
    members = [index[key] for key in zip(result.source_sop_instance_uids, numbers, strict=True)]
    k = members[len(members) // 2]
    what = "the classified image" if len(members) == 1 else "middle slice"
    return _Content(
        ("Class", "Probability"), rows, notes, _Key(k, f"Key image: {slices[k].name()}, {what}")
    )


def _detection(findings: DetectionFindings, slices: list[_Slice]) -> _Content:
    geometry = _slice_geometry(slices)
    rows = []
    for number, detection in enumerate(findings.detections, start=1):
        size = " x ".join(f"{v:.1f}" for v in detection.size_mm)
        where = f" · {slices[_nearest(geometry, detection.center)].name()}" if geometry else ""
        rows.append(
            _Row(
                f"{number}. {_display_name(detection.name)}",
                _percent(detection.score),
                detail=f"{size} mm{where}",
            )
        )
    if not findings.detections:
        k = len(slices) // 2
        return _Content(
            ("Detection", "Probability"),
            [],
            ["Nothing detected."],
            _Key(k, f"Key image: {slices[k].name()}, middle of the series"),
        )
    if geometry is None:
        k = len(slices) // 2
        return _Content(
            ("Detection", "Probability"),
            rows,
            [],
            _Key(k, f"Key image: {slices[k].name()}; the series has no geometry for boxes"),
        )
    k = _nearest(geometry, findings.detections[0].center)
    shapes = []
    position, row_cosine, column_cosine, spacing = geometry[k]
    normal = np.cross(row_cosine, column_cosine)
    for number, detection in enumerate(findings.detections, start=1):
        reach = 0.5 * float(np.abs(detection.edges @ normal).sum()) + 0.5 * _slice_step(geometry)
        if number > 1 and abs(float((detection.center - position) @ normal)) > reach:
            continue  # does not cross the key slice
        half_row, half_column = detection.edges[0] / 2, detection.edges[1] / 2
        corners = [
            detection.center + a * half_row + b * half_column
            for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))
        ]
        points = tuple(
            (
                float((p - position) @ row_cosine) / spacing[1],
                float((p - position) @ column_cosine) / spacing[0],
            )
            for p in corners
        )
        shapes.append(_Shape(points, str(number)))
    key = _Key(k, f"Key image: {slices[k].name()}, through detection 1", shapes=tuple(shapes))
    return _Content(("Detection", "Probability"), rows, [], key)


def _image_detection(findings: ImageDetectionFindings, slices: list[_Slice]) -> _Content:
    index = {s.uid: k for k, s in enumerate(slices)}
    rows = []
    for number, detection in enumerate(findings.detections, start=1):
        slice_ = slices[index[detection.source_sop_instance_uid]]
        first_column, first_row, last_column, last_row = detection.box
        width, height = last_column + 1 - first_column, last_row + 1 - first_row
        spacing = _pixel_spacing(slice_.header, None)
        size = (
            f"{width * spacing[1]:.1f} x {height * spacing[0]:.1f} mm"
            if spacing is not None
            else f"{width:.0f} x {height:.0f} px"
        )
        rows.append(
            _Row(
                f"{number}. {_display_name(detection.name)}",
                _percent(detection.score),
                detail=f"{size} · {slice_.name()}",
            )
        )
    if not findings.detections:
        return _Content(
            ("Detection", "Probability"),
            [],
            ["Nothing detected."],
            _Key(0, f"Key image: {slices[0].name()}"),
        )
    top = findings.detections[0]
    k = index[top.source_sop_instance_uid]
    shapes = []
    for number, detection in enumerate(findings.detections, start=1):
        if detection.source_sop_instance_uid != top.source_sop_instance_uid:
            continue
        # The box spans its edge pixels whole: edges half a pixel out from the centres.
        left, top_row, right, bottom = (float(v) for v in detection.box)
        points = (
            (left - 0.5, top_row - 0.5),
            (right + 0.5, top_row - 0.5),
            (right + 0.5, bottom + 0.5),
            (left - 0.5, bottom + 0.5),
        )
        shapes.append(_Shape(points, str(number)))
    key = _Key(k, f"Key image: {slices[k].name()}, detection 1", shapes=tuple(shapes))
    return _Content(("Detection", "Probability"), rows, [], key)


def _landmarks(findings: LandmarkFindings, slices: list[_Slice]) -> _Content:
    index = {(s.uid, s.frame_number): k for k, s in enumerate(slices)}
    index.update({(s.uid, None): k for k, s in enumerate(slices)})
    rows = []
    for number, landmark in enumerate(findings.landmarks, start=1):
        k = index[(landmark.source_sop_instance_uid, landmark.source_frame_number)]
        x, y, z = (float(v) for v in landmark.position)
        rows.append(
            _Row(
                f"{number}. {_display_name(landmark.name)}",
                slices[k].name(),
                detail=f"at ({x:.1f}, {y:.1f}, {z:.1f}) mm (LPS)",
            )
        )
    if not findings.landmarks:
        return _Content(
            ("Landmark", "Image"),
            [],
            ["No landmark found."],
            _Key(0, f"Key image: {slices[0].name()}"),
        )
    first = findings.landmarks[0]
    k = index[(first.source_sop_instance_uid, first.source_frame_number)]
    shapes = []
    try:
        position, row_cosine, column_cosine, spacing = _plane_geometry(slices[k])
    except GeometryError:
        return _Content(("Landmark", "Image"), rows, [], _Key(k, f"Key image: {slices[k].name()}"))
    for number, landmark in enumerate(findings.landmarks, start=1):
        if index[(landmark.source_sop_instance_uid, landmark.source_frame_number)] != k:
            continue
        offset = landmark.position - position
        point = (
            float(offset @ row_cosine) / spacing[1],
            float(offset @ column_cosine) / spacing[0],
        )
        shapes.append(_Shape((point,), str(number)))
    key = _Key(k, f"Key image: {slices[k].name()}, landmark 1", shapes=tuple(shapes))
    return _Content(("Landmark", "Image"), rows, [], key)


_Geometry = tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], tuple[float, float]
]


def _plane_geometry(slice_: _Slice) -> _Geometry:
    """(position of the first pixel, row cosine, column cosine, (row, column) spacing)."""
    where = f"instance {slice_.header.get('SOPInstanceUID', '?')}"
    header, number = slice_.header, slice_.frame_number

    def values(keyword: str, count: int) -> tuple[float, ...]:
        return floats(plane_value(header, number, keyword, where), count, keyword, where)

    orientation = np.array(values("ImageOrientationPatient", 6))
    spacing = values("PixelSpacing", 2)
    return (
        np.array(values("ImagePositionPatient", 3)),
        orientation[:3],
        orientation[3:],
        (spacing[0], spacing[1]),
    )


def _slice_geometry(slices: list[_Slice]) -> list[_Geometry] | None:
    try:
        return [_plane_geometry(s) for s in slices]
    except GeometryError:
        return None


def _nearest(geometry: list[_Geometry], point: npt.NDArray[np.float64]) -> int:
    """The slice whose plane lies nearest ``point`` (LPS, mm)."""
    _, row_cosine, column_cosine, _ = geometry[0]
    normal = np.cross(row_cosine, column_cosine)
    distances = [abs(float((point - g[0]) @ normal)) for g in geometry]
    return int(np.argmin(distances))


def _slice_step(geometry: list[_Geometry]) -> float:
    if len(geometry) < 2:
        return 0.0
    normal = np.cross(geometry[0][1], geometry[0][2])
    heights = np.sort([float(g[0] @ normal) for g in geometry])
    return float(np.median(np.diff(heights)))


def _pixel_spacing(header: Dataset, frame_number: int | None) -> tuple[float, float] | None:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing, as the SR."""
    try:
        value = plane_value(header, frame_number, "PixelSpacing", "")
    except GeometryError:
        value = header.get("ImagerPixelSpacing")
    try:
        spacing = floats(value, 2, "PixelSpacing", "") if value is not None else None
    except GeometryError:
        return None
    if spacing is None or spacing[0] <= 0 or spacing[1] <= 0:
        return None
    return spacing[0], spacing[1]


def _display_name(name: str) -> str:
    """A model's label as people read it: ``kidney_left`` -> ``kidney left``."""
    return " ".join(name.replace("_", " ").split())


def _volume_text(ml: float) -> str:
    return f"{ml:.1f} mL" if ml >= 0.1 else f"{ml:.3f} mL"


def _percent(probability: float) -> str:
    return f"{probability * 100:.1f}%"


# --- drawing --------------------------------------------------------------------------


@functools.cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    path = FONT_DIRECTORY / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    missing = (
        f"the result card needs the font {path} (Debian package fonts-dejavu-core, "
        "./install.sh installs it)"
    )
    # Checked first: Pillow would look for a missing file's name in other font folders.
    if not path.is_file():
        raise EncodingError(missing)
    try:
        # BASIC layout: the same pixels with or without libraqm installed.
        return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)
    except OSError as exc:
        raise EncodingError(f"{missing}: {exc}") from exc


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float, lines: int) -> list[str]:
    out: list[str] = []
    for word in text.split():
        if out and font.getlength(f"{out[-1]} {word}") <= width:
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(_fit(word, font, width))
    if len(out) > lines:
        out = [*out[: lines - 1], _fit(" ".join(out[lines - 1 :]), font, width)]
    return out


def _render(
    findings: Findings,
    slices: list[_Slice],
    frames: npt.NDArray[np.floating[Any]] | None,
    content: _Content,
    disclaimer: str,
) -> tuple[npt.NDArray[np.uint8], _Slice | None]:
    """The card's pixels, and the image its key image shows (None: no key image)."""
    card = Image.new("RGB", CARD_SIZE, _BACKGROUND)
    draw = ImageDraw.Draw(card)
    algorithm = findings.algorithm
    # Title band: the model.
    draw.rectangle((0, 0, _WIDTH, 120), fill=_BAND)
    title = _font(_TITLE_PX, bold=True)
    draw.text(
        (_MARGIN, 20), _fit(algorithm.name, title, _WIDTH - 2 * _MARGIN), font=title, fill=_TEXT
    )
    subtitle = _font(_SUBTITLE_PX)
    draw.text(
        (_MARGIN, 80),
        _fit(f"Model version {algorithm.version} · AI result", subtitle, _WIDTH - 2 * _MARGIN),
        font=subtitle,
        fill=_MUTED,
    )
    key_slice = _draw_key(card, slices, frames, content.key)
    _draw_table(draw, content)
    _draw_series(draw, slices)
    _draw_notice(draw, disclaimer)
    return np.asarray(card, dtype=np.uint8).copy(), key_slice


def _draw_key(
    card: Image.Image,
    slices: list[_Slice],
    frames: npt.NDArray[np.floating[Any]] | None,
    key: _Key | None,
) -> _Slice | None:
    left, top, right, bottom = KEY_IMAGE_BOX
    draw = ImageDraw.Draw(card)
    draw.rectangle((left, top, right - 1, bottom - 1), fill=(0, 0, 0))
    small = _font(_SMALL_PX)
    picture = None
    if key is not None:
        slice_ = slices[key.index]
        plane = frames[key.index] if frames is not None else _stored_plane(slice_)
        if plane is not None:
            picture = _key_picture(plane, slice_, key, right - left, bottom - top)
    if picture is None:
        draw.text(
            ((left + right) / 2, (top + bottom) / 2),
            "No key image",
            font=_font(_ROW_PX),
            fill=_MUTED,
            anchor="mm",
        )
        return None
    x = left + (right - left - picture.width) // 2
    y = top + (bottom - top - picture.height) // 2
    card.paste(picture, (x, y))
    assert key is not None
    draw.text((left, bottom + 10), _fit(key.caption, small, right - left), font=small, fill=_MUTED)
    return slices[key.index]


def _key_picture(
    plane: npt.NDArray[Any], slice_: _Slice, key: _Key, box_width: int, box_height: int
) -> Image.Image:
    """The key plane windowed, scaled into the box (its shape in mm kept), overlays drawn."""
    rows, columns = plane.shape[:2]
    if (rows, columns) != (int(slice_.header.Rows), int(slice_.header.Columns)):
        raise EncodingError(
            f"the key image's pixels are {rows}x{columns}, its header "
            f"{slice_.header.Rows}x{slice_.header.Columns}"
        )
    spacing = _pixel_spacing(slice_.header, slice_.frame_number) or (1.0, 1.0)
    aspect = (rows * spacing[0]) / (columns * spacing[1])
    if aspect >= box_height / box_width:
        height, width = box_height, max(1, round(box_height / aspect))
    else:
        height, width = max(1, round(box_width * aspect)), box_width
    # A large radiograph is thinned before windowing: the window's cost goes with pixels.
    step = max(1, min(rows // height, columns // width) // 2)
    thinned = plane[::step, ::step]
    if thinned.ndim == 3:  # a colour source: shown as it is
        rgb = np.clip(thinned[..., :3], 0, 255).astype(np.uint8)
        picture = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    else:
        center, window, function = voi_window(slice_.header, slice_.frame_number)
        grey = window_to_uint8(np.asarray(thinned, dtype=np.float64), center, window, function)
        if str(slice_.header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            grey = 255 - grey
        picture = Image.fromarray(np.ascontiguousarray(grey), "L")
    # Scaled before the grey becomes RGB: a third of the work.
    picture = picture.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
    if key.labels is not None and key.colours is not None:
        picture = Image.fromarray(_overlay(np.asarray(picture), key.labels, key.colours), "RGB")
    if key.shapes:
        _draw_shapes(picture, key.shapes, width / columns, height / rows)
    return picture


def _overlay(
    rgb: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint16], colours: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """Segments filled lightly and outlined, on the display grid (nearest label)."""
    height, width = rgb.shape[:2]
    rows = ((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.intp)
    columns = ((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.intp)
    shown = labels[rows[:, np.newaxis], columns[np.newaxis, :]]
    out = rgb.copy()
    inside = shown != 0
    tint = colours[shown[inside]].astype(np.uint16)
    out[inside] = (
        ((10 - _FILL_TENTHS) * out[inside].astype(np.uint16) + _FILL_TENTHS * tint + 5) // 10
    ).astype(np.uint8)
    edge = segment_outlines(shown)
    thick = edge.copy()
    for _ in range(_OUTLINE_PX - 1):  # grown inwards: the outline's outer edge stays exact
        grown = thick.copy()
        grown[1:] |= thick[:-1]
        grown[:-1] |= thick[1:]
        grown[:, 1:] |= thick[:, :-1]
        grown[:, :-1] |= thick[:, 1:]
        thick = grown & inside
    out[thick] = colours[shown[thick]]
    return out


def _draw_shapes(
    picture: Image.Image, shapes: Sequence[_Shape], scale_x: float, scale_y: float
) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(_SMALL_PX, bold=True)

    def shown(point: tuple[float, float]) -> tuple[float, float]:
        return ((point[0] + 0.5) * scale_x - 0.5, (point[1] + 0.5) * scale_y - 0.5)

    for shape in shapes:
        points = [shown(p) for p in shape.points]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 9, y - 9, x + 9, y + 9), outline=_MARK, width=3)
            draw.line((x - 15, y, x + 15, y), fill=_MARK, width=1)
            draw.line((x, y - 15, x, y + 15), fill=_MARK, width=1)
            anchor = (x + 12, y - 12)
        else:
            draw.polygon(points, outline=_MARK, width=3)
            anchor = (min(p[0] for p in points), min(p[1] for p in points) - 4)
        # The number on a dark chip: readable over bright bone and over air alike.
        bounds = draw.textbbox(anchor, shape.label, font=font, anchor="lb")
        draw.rectangle((bounds[0] - 3, bounds[1] - 2, bounds[2] + 3, bounds[3] + 2), fill=(0, 0, 0))
        draw.text(anchor, shape.label, font=font, fill=_MARK, anchor="lb")


def _draw_table(draw: ImageDraw.ImageDraw, content: _Content) -> None:
    left, right = _TABLE_LEFT, _TABLE_RIGHT
    heading = _font(_HEADING_PX, bold=True)
    y = KEY_IMAGE_BOX[1]
    draw.text((left, y), "Findings", font=heading, fill=_TEXT)
    y += 48
    small = _font(_SMALL_PX)
    draw.text((left, y), content.heading[0], font=small, fill=_MUTED)
    draw.text((right, y), content.heading[1], font=small, fill=_MUTED, anchor="ra")
    y += 34
    draw.line((left, y, right, y), fill=_MUTED, width=2)
    y += 8
    notes_height = _NOTE_HEIGHT * len(content.notes)
    rows = content.rows
    for number, row in enumerate(rows):
        height = _ROW_HEIGHT + (_DETAIL_HEIGHT if row.detail else 0)
        left_over = len(rows) - number - 1
        reserve = notes_height + (_NOTE_HEIGHT if left_over else 0)
        if y + height + reserve > _BODY_BOTTOM:
            draw.text((left, y + 4), f"+{len(rows) - number} more", font=small, fill=_MUTED)
            y += _NOTE_HEIGHT
            break
        _draw_row(draw, row, y, height, shaded=number % 2 == 1)
        y += height
    y += 6
    for note in content.notes:
        draw.text((left, y), _fit(note, small, right - left), font=small, fill=_MUTED)
        y += _NOTE_HEIGHT


def _draw_row(draw: ImageDraw.ImageDraw, row: _Row, y: int, height: int, *, shaded: bool) -> None:
    left, right = _TABLE_LEFT, _TABLE_RIGHT
    if shaded:
        draw.rectangle((left - 8, y, right + 8, y + height - 1), fill=_ROW_SHADE)
    font = _font(_ROW_PX, bold=row.strong)
    middle = y + _ROW_HEIGHT // 2
    name_left = left
    if row.swatch is not None:
        half = _SWATCH_PX // 2
        draw.rectangle((left, middle - half, left + _SWATCH_PX, middle + half), fill=row.swatch)
        name_left = left + _SWATCH_PX + 12
    colour = _TEXT if row.strong else _MUTED
    value_width = font.getlength(row.value)
    draw.text((right, middle), row.value, font=font, fill=colour, anchor="rm")
    name = _fit(row.name, font, right - name_left - value_width - 20)
    draw.text((name_left, middle), name, font=font, fill=colour, anchor="lm")
    if row.detail:
        small = _font(_SMALL_PX)
        detail = _fit(row.detail, small, right - name_left)
        draw.text(
            (name_left, y + _ROW_HEIGHT + _DETAIL_HEIGHT // 2 - 4),
            detail,
            font=small,
            fill=_MUTED,
            anchor="lm",
        )


def _draw_series(draw: ImageDraw.ImageDraw, slices: list[_Slice]) -> None:
    """The series the findings come from: what identifies it in a viewer, not the patient."""
    header = slices[0].header
    number = header.get("SeriesNumber")
    description = str(header.get("SeriesDescription", "") or "").strip()
    name = f"series {number}" if number not in (None, "") else "series"
    line = f"Computed from {name}" + (f": {description}" if description else "")
    images = len({s.uid for s in slices})
    facts = [str(header.get("Modality", "") or "").strip()]
    facts.append(_date_text(header))
    if images == 1 and len(slices) > 1:
        facts.append(f"1 image of {len(slices)} frames")
    else:
        facts.append(f"{images} image" + ("s" if images != 1 else ""))
    width = _WIDTH - 2 * _MARGIN
    font = _font(_SUBTITLE_PX, bold=True)
    draw.text((_MARGIN, _SERIES_TOP), _fit(line, font, width), font=font, fill=_TEXT)
    small = _font(_SUBTITLE_PX)
    details = " · ".join(f for f in facts if f)
    draw.text((_MARGIN, _SERIES_TOP + 34), _fit(details, small, width), font=small, fill=_MUTED)


def _date_text(header: Dataset) -> str:
    for keyword in _SOURCE_DATE_KEYWORDS:
        value = str(header.get(keyword, "") or "").strip()
        if len(value) == 8 and value.isdigit():
            return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return ""


def _draw_notice(draw: ImageDraw.ImageDraw, disclaimer: str) -> None:
    if not disclaimer.strip():
        return
    font = _font(_SMALL_PX)
    lines = _wrap(disclaimer, font, _WIDTH - 2 * _MARGIN, _NOTICE_LINES)
    line_height = 28
    top = _HEIGHT - len(lines) * line_height - 16
    draw.rectangle((0, top - 8, _WIDTH, _HEIGHT), fill=_NOTICE)
    for number, line in enumerate(lines):
        draw.text((_MARGIN, top + number * line_height), line, font=font, fill=_NOTICE_TEXT)


def _stored_plane(slice_: _Slice) -> npt.NDArray[Any] | None:
    """The image's own pixels after the Modality LUT, from its Pixel Data; None without."""
    header = slice_.header
    if "PixelData" not in header:
        return None
    try:
        pixels = header.pixel_array
        if number_of_frames(header) > 1:
            pixels = pixels[(slice_.frame_number or 1) - 1]
        if pixels.ndim == 3:
            return np.asarray(pixels)
        if slice_.frame_number is None and "ModalityLUTSequence" in header:
            return np.asarray(apply_modality_lut(pixels, header), dtype=np.float64)
        # A multi-frame image keeps its rescale per frame, where pydicom does not look.
        slope, intercept = rescale(header, slice_.frame_number)
        return np.asarray(pixels, dtype=np.float64) * slope + intercept
    except _DECODE_ERRORS as exc:
        logger.warning("result card: no key image, %s not decoded: %s", header.SOPInstanceUID, exc)
        return None
