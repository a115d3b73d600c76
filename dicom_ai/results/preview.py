"""Segmentation findings -> a Secondary Capture preview series for viewers without SEG support.

One RGB Secondary Capture image per source slice that has at least one labelled voxel: the
slice in greyscale (the source's own window) with each segment's outline drawn in its
display colour, the same colours and segment order as the SEG (labels with voxels, in
label-value order). Slices without findings are left out: a whole 300-slice 512x512 RGB
series is ~240 MB to store and send, for pictures of nothing.

The preview is a picture, not data: SEG and SR stay the results of record.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai.enhanced import frame_macro
from dicom_ai.errors import EncodingError
from dicom_ai.inference.findings import SegmentationFindings
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.sources import (
    default_series_number,
    display_colours,
    order_like_findings,
    present_labels,
)
from dicom_ai.results.uids import ResultUIDs, derived_uid

__all__ = [
    "COPIED_FROM_SOURCE",
    "PREVIEW_SERIES_NUMBER_OFFSET",
    "build_preview",
    "copy_body_part_and_laterality",
    "mark_secondary_capture",
    "patient_orientation",
    "preview_instance_uid",
    "preview_series_uid",
    "segment_outlines",
    "source_reference",
    "voi_window",
    "window_to_uint8",
]

logger = logging.getLogger(__name__)

PREVIEW_SERIES_NUMBER_OFFSET = 3000
"""Default preview Series Number = source Series Number + this (3000 without a source number)."""

# (axis letter for +, axis letter for -) of the LPS patient axes x, y, z (PS3.3 C.7.6.1.1.1).
_LPS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
# Direction-cosine components below this are rounding noise, not obliquity.
_ORIENTATION_EPSILON = 1e-4
# Patient and study identity, so the preview files into the source's study.
COPIED_FROM_SOURCE = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_SOURCE_IMAGE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation
_DERIVATION = codes.cid7203.SegmentationImageDerivation


def preview_series_uid(uids: ResultUIDs) -> str:
    """Series Instance UID of the preview: a pure function of the job's SEG UID."""
    return derived_uid(uids.seg_sop_instance_uid, "preview-series")


def preview_instance_uid(
    uids: ResultUIDs, source_sop_instance_uid: str, frame_number: int | None = None
) -> str:
    """SOP Instance UID of the preview of one source slice.

    Keyed by the source slice, not by position in the preview series: a re-run whose
    findings touch other slices never gives slice A's UID to a picture of slice B.
    """
    return derived_uid(
        uids.seg_sop_instance_uid,
        "preview-instance",
        source_sop_instance_uid,
        str(frame_number or 0),
    )


def build_preview(
    frames: npt.NDArray[np.floating[Any]],
    source_images: Sequence[Dataset],
    findings: SegmentationFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int | None = None,
) -> list[SCImage]:
    """One RGB Secondary Capture per source slice with labelled voxels, in slice order.

    ``frames`` are the source pixels after the Modality LUT (e.g. HU), ``(slices, rows,
    columns)``, parallel to ``findings.label_map``; ``source_images`` are the source
    headers in any order (a multi-frame source's one header may be given once or repeated).
    Only slices with at least one labelled voxel get an image (a 300-slice 512x512 RGB series
    would be ~240 MB); they are numbered 1..n in slice order.

    Raises :class:`EncodingError` when there is no labelled voxel, when the frames, label map
    and sources disagree, or when highdicom refuses an image.
    """
    label_map = findings.label_map
    if frames.shape != label_map.shape:
        raise EncodingError(
            f"frames {frames.shape} and label map {label_map.shape} differ in shape"
        )
    ordered = order_like_findings(source_images, findings)
    labels = present_labels(findings)
    if not labels:
        raise EncodingError("the label map has no labelled voxel: no preview to draw")
    colours = _colour_table(findings)
    source = ordered[0]
    number = (
        series_number
        if series_number is not None
        else default_series_number(source, PREVIEW_SERIES_NUMBER_OFFSET)
    )
    # One timestamp for the whole series: its images were made together.
    now = datetime.datetime.now()
    frame_numbers = findings.source_frame_numbers
    drawn = [k for k in range(label_map.shape[0]) if label_map[k].any()]
    images = []
    for instance_number, k in enumerate(drawn, start=1):
        frame_number = frame_numbers[k] if frame_numbers is not None else None
        header = ordered[k]
        rgb = _draw(frames[k], label_map[k], colours, header, frame_number)
        images.append(
            _sc_image(
                rgb,
                header,
                frame_number,
                findings,
                uids,
                device,
                series_number=number,
                instance_number=instance_number,
                now=now,
            )
        )
    logger.debug(
        "preview series %s: %d image(s) of %d slice(s), %d segment(s)",
        preview_series_uid(uids),
        len(images),
        label_map.shape[0],
        len(labels),
    )
    return images


# --- pixels -------------------------------------------------------------------------


def window_to_uint8(
    plane: npt.NDArray[np.floating[Any]],
    center: float | None = None,
    width: float | None = None,
    function: str = "LINEAR",
) -> npt.NDArray[np.uint8]:
    """Map rescaled values to 0..255 through a VOI window (PS3.3 C.11.2.1.2).

    ``LINEAR`` (the default), ``LINEAR_EXACT`` and ``SIGMOID`` as the standard defines them;
    without a usable window (none given, or a width the function does not allow) the
    plane's own 1st..99th percentile range is used, linearly.
    """
    x = np.asarray(plane, dtype=np.float64)  # float64: exact on integer HU, no 0.5 flips
    if not np.isfinite(x).all():
        raise EncodingError("the source frame has non-finite values: cannot window it")
    function = function.strip().upper() or "LINEAR"
    usable = (
        center is not None
        and width is not None
        and np.isfinite(center)
        and np.isfinite(width)
        and (width >= 1.0 if function == "LINEAR" else width > 0.0)
        and function in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
    )
    if not usable or center is None or width is None:
        low, high = (float(v) for v in np.percentile(x, [1.0, 99.0]))
        center, width, function = (low + high) / 2.0, max(high - low, 1e-6), "LINEAR_EXACT"
    if function == "LINEAR":
        if width == 1.0:  # the formula divides by w - 1: a step at c - 0.5
            y = np.where(x <= center - 0.5, 0.0, 1.0)
        else:
            y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    elif function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    else:  # SIGMOID
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def segment_outlines(label_plane: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
    """Boundary pixels of every label region of one plane.

    A labelled pixel is on the outline when one of its 4 neighbours has another value or
    lies outside the image: per label, exactly ``mask & ~binary_erosion(mask)`` with the
    cross structuring element (1 px wide; 2 px where two segments touch, one in each colour).
    """
    padded = np.pad(label_plane, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    outline: npt.NDArray[np.bool_] = edge & (centre != 0)
    return outline


def _colour_table(findings: SegmentationFindings) -> npt.NDArray[np.uint8]:
    """``table[label value]`` = the segment's display RGB, as in the SEG."""
    colours = display_colours(findings)
    table = np.zeros((max(colours) + 1, 3), dtype=np.uint8)
    for value, rgb in colours.items():
        table[value] = rgb
    return table


def _draw(
    plane: npt.NDArray[np.floating[Any]],
    label_plane: npt.NDArray[np.uint16],
    colours: npt.NDArray[np.uint8],
    header: Dataset,
    frame_number: int | None,
) -> npt.NDArray[np.uint8]:
    center, width, function = voi_window(header, frame_number)
    grey = window_to_uint8(plane, center, width, function)
    if str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 255 - grey  # look like the source: bright is low there
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    edge = segment_outlines(label_plane)
    rgb[edge] = colours[label_plane[edge]]
    return rgb


# --- header -------------------------------------------------------------------------


def _frame_value(header: Dataset, frame_number: int | None, macro: str, keyword: str) -> Any | None:
    """``keyword`` of one frame: from functional group ``macro`` (per-frame, else shared)
    of an enhanced multi-frame header, else the top-level attribute."""
    item = frame_macro(header, frame_number or 0, macro)
    if item is not None and keyword in item:
        return item.get(keyword)
    return header.get(keyword)


def _first(value: Any) -> float | None:
    """The first value of a possibly multi-valued DS, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__getitem__"):
        return float(value)
    return float(value[0]) if len(value) else None


def voi_window(header: Dataset, frame_number: int | None) -> tuple[float | None, float | None, str]:
    macro = "FrameVOILUTSequence"
    try:
        center = _first(_frame_value(header, frame_number, macro, "WindowCenter"))
        width = _first(_frame_value(header, frame_number, macro, "WindowWidth"))
    except (TypeError, ValueError):
        center = width = None  # an unreadable window: fall back to the percentiles
    function = _frame_value(header, frame_number, macro, "VOILUTFunction")
    return center, width, str(function or "LINEAR")


def patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) from Image Orientation (Patient): the directions of
    the rows and of the columns, main axis first (``"LP"`` for an oblique row)."""
    if len(orientation) != 6:
        raise EncodingError(f"ImageOrientationPatient needs 6 values, got {len(orientation)}")

    def letters(vector: Sequence[float]) -> str:
        order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
        text = "".join(
            _LPS_LETTERS[axis][0 if vector[axis] > 0 else 1]
            for axis in order
            if abs(vector[axis]) > _ORIENTATION_EPSILON
        )
        if not text:
            raise EncodingError(f"degenerate ImageOrientationPatient {list(orientation)}")
        return text

    values = [float(v) for v in orientation]
    return letters(values[:3]), letters(values[3:])


def mark_secondary_capture(image: Dataset, source: Dataset, device: DeviceIdentity) -> None:
    """What every picture the node draws (preview, card, attribution preview) takes from its
    source and says of itself: patient and study verbatim (a source's odd but accepted
    value must not fail the picture), body part and laterality, DERIVED\\SECONDARY (made
    from the source by this software, not acquired), WSD (drawn by a workstation, not
    digitized from film or video), and the node as the secondary capture device."""
    for keyword in COPIED_FROM_SOURCE:
        if keyword in source:
            image[keyword] = copy.deepcopy(source[keyword])
    copy_body_part_and_laterality(source, image)
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.ConversionType = "WSD"
    image.SecondaryCaptureDeviceManufacturer = device.manufacturer
    image.SecondaryCaptureDeviceManufacturerModelName = device.model_name
    image.SecondaryCaptureDeviceSoftwareVersions = device.software_version
    image.DateOfSecondaryCapture = image.ContentDate
    image.TimeOfSecondaryCapture = image.ContentTime


def source_reference(header: Dataset, frame_number: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    purpose = Dataset()
    purpose.CodeValue = _SOURCE_IMAGE_PURPOSE.value
    purpose.CodingSchemeDesignator = _SOURCE_IMAGE_PURPOSE.scheme_designator
    purpose.CodeMeaning = _SOURCE_IMAGE_PURPOSE.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def copy_body_part_and_laterality(header: Dataset, image: Dataset) -> None:
    """Body Part Examined and Laterality as the source has them.

    Laterality (General Series, Type 2C) is required for a paired body part; a source that
    says neither its body part nor its laterality leaves both unknown, which the standard
    writes as an empty Laterality (dciodvfy: a warning; absent: an error).
    """
    body_part = str(header.get("BodyPartExamined", "") or "")
    laterality = str(header.get("Laterality", "") or "")
    if body_part:
        image.BodyPartExamined = body_part
    if laterality:
        image.Laterality = laterality
    elif not body_part:
        image.Laterality = ""


def _sc_image(
    rgb: npt.NDArray[np.uint8],
    header: Dataset,
    frame_number: int | None,
    findings: SegmentationFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int,
    instance_number: int,
    now: datetime.datetime,
) -> SCImage:
    algorithm = findings.algorithm
    orientation = _frame_value(
        header, frame_number, "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    position = _frame_value(header, frame_number, "PlanePositionSequence", "ImagePositionPatient")
    spacing = _frame_value(header, frame_number, "PixelMeasuresSequence", "PixelSpacing")
    if orientation is None:
        raise EncodingError(f"source image {header.SOPInstanceUID} has no orientation")
    letters = patient_orientation([float(v) for v in orientation])
    try:
        image = SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=header.StudyInstanceUID,
            series_instance_uid=preview_series_uid(uids),
            series_number=series_number,
            sop_instance_uid=preview_instance_uid(uids, str(header.SOPInstanceUID), frame_number),
            instance_number=instance_number,
            **device.equipment(),
            pixel_spacing=((float(spacing[0]), float(spacing[1])) if spacing is not None else None),
            # highdicom takes single letters only; the exact (oblique) ones are set below.
            patient_orientation=(letters[0][0], letters[1][0]),
            series_description=f"AI preview {algorithm.name}"[:64],
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"highdicom refused the preview for {algorithm.name}: {exc}") from exc
    image.PatientOrientation = list(letters)
    mark_secondary_capture(image, header, device)
    image.DerivationDescription = (
        f"Outlines of the segments found by {algorithm.name} {algorithm.version} "
        "drawn over the source image"
    )[:1024]
    derivation = Dataset()
    derivation.CodeValue = _DERIVATION.value
    derivation.CodingSchemeDesignator = _DERIVATION.scheme_designator
    derivation.CodeMeaning = _DERIVATION.meaning
    image.DerivationCodeSequence = [derivation]
    image.SourceImageSequence = [source_reference(header, frame_number)]
    # Burned In Annotation is about text that identifies the patient or date (PS3.3
    # C.7.6.1.1.11); outlines are graphics, so the source's answer carries over unchanged.
    image.BurnedInAnnotation = str(header.get("BurnedInAnnotation", "") or "NO")
    # Image Plane and Frame of Reference are not in the SC Image IOD, but viewers use them
    # to sync the preview with the source series (dciodvfy notes them as non-standard).
    if position is not None:
        image.ImagePositionPatient = list(position)  # the source's DS strings, unrounded
        image.ImageOrientationPatient = list(orientation)
    if "FrameOfReferenceUID" in header:
        image.FrameOfReferenceUID = header.FrameOfReferenceUID
    return image
