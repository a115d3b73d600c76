"""Attribution maps (:class:`~dicom_ai.inference.findings.AttributionMap`) -> a Parametric Map
and a colour-overlay Secondary Capture preview.

- :func:`build_parametric_map`: the map as a float DICOM Parametric Map (highdicom), one
  frame per source frame on the source frames' planes, each referencing its source frame;
  values 0..1 without unit (UCUM ``1``). A Parametric Map needs patient geometry (Frame of
  Reference, plane positions): projection images (CR, DX, MG) get the preview only.
- :func:`build_attribution_preview`: the source image in grey with the map over it in colour
  (blue: little, red: most), for the slice(s) where the map is largest: a 2-D model's image
  itself, a 3-D model's top slice.

The map is a picture of what the model looked at, not a finding: SR (and SEG) stay the
results of record. UIDs derive from the job's result UIDs, the method and the source
instance (same input, same ``now``: same bytes).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from highdicom import VOILUTTransformation
from highdicom.pm import ParametricMap, RealWorldValueMapping
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

from dicom_ai import _compat
from dicom_ai.enhanced import is_multiframe
from dicom_ai.errors import EncodingError, GeometryError
from dicom_ai.geometry import plane_value
from dicom_ai.inference.findings import AlgorithmIdentification, AttributionMap
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.preview import (
    copy_body_part_and_laterality,
    mark_secondary_capture,
    patient_orientation,
    source_reference,
    voi_window,
    window_to_uint8,
)
from dicom_ai.results.seg import with_shared_geometry
from dicom_ai.results.sources import default_series_number, order_like_frames
from dicom_ai.results.uids import ResultUIDs, derived_uid

__all__ = [
    "ATTRIBUTION_PREVIEW_SERIES_NUMBER_OFFSET",
    "PARAMETRIC_MAP_SERIES_NUMBER_OFFSET",
    "attribution_colours",
    "build_attribution_preview",
    "build_parametric_map",
    "parametric_map_uids",
    "preview_uids",
]

logger = logging.getLogger(__name__)

PARAMETRIC_MAP_SERIES_NUMBER_OFFSET = 5000
"""Default Parametric Map Series Number = source Series Number + this."""
ATTRIBUTION_PREVIEW_SERIES_NUMBER_OFFSET = 6000
"""Default overlay preview Series Number = source Series Number + this."""

_LUT_LABEL = "ATTRIBUTION"
_CONTENT_LABEL = "ATTRIBUTION"
# The overlay's opacity where the map is 1; it fades with the map, so low values leave the
# image as it is.
_OPACITY = 0.6
# A jet colour map: (value, red, green, blue) anchors, dark blue -> blue -> cyan -> yellow
# -> red -> dark red.
_JET = np.array(
    [
        (0.0, 0.0, 0.0, 0.5),
        (0.125, 0.0, 0.0, 1.0),
        (0.375, 0.0, 1.0, 1.0),
        (0.625, 1.0, 1.0, 0.0),
        (0.875, 1.0, 0.0, 0.0),
        (1.0, 0.5, 0.0, 0.0),
    ]
)
_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "Occlusion sensitivity"}


def parametric_map_uids(uids: ResultUIDs, attribution: AttributionMap) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the map's Parametric Map: one series per method, one
    instance per map (keyed by its first source instance)."""
    base = (uids.sr_sop_instance_uid, "attribution", attribution.method)
    series = derived_uid(*base, "pm-series")
    return series, derived_uid(*base, "pm-instance", attribution.source_sop_instance_uids[0])


def preview_uids(
    uids: ResultUIDs, attribution: AttributionMap, source_uid: str, frame_number: int | None
) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the overlay of one source slice."""
    base = (uids.sr_sop_instance_uid, "attribution", attribution.method)
    series = derived_uid(*base, "preview-series")
    return series, derived_uid(*base, "preview-instance", source_uid, str(frame_number or 0))


def build_parametric_map(
    source_images: Sequence[Dataset],
    attribution: AttributionMap,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    algorithm: AlgorithmIdentification,
    series_number: int | None = None,
    instance_number: int = 1,
    now: datetime.datetime | None = None,
) -> ParametricMap:
    """``attribution`` as a Parametric Map referencing ``source_images`` (the source series'
    headers, any order; pixels not needed).

    Frame k is ``attribution.values[k]`` on the plane of source instance k (frame
    ``source_frame_numbers[k]`` of a multi-frame source, whose frames it then follows in
    order; frames without a value are 0). ``now`` fixes the content and creation times.

    Raises :class:`EncodingError` when the sources lack patient geometry (projection
    images), disagree with the map, or highdicom refuses.
    """
    ordered = _ordered(source_images, attribution)
    for header in ordered:
        if "FrameOfReferenceUID" not in header or not (
            "ImageOrientationPatient" in header or is_multiframe(header)
        ):
            raise EncodingError(
                f"source image {header.SOPInstanceUID} has no patient geometry (a projection "
                "image?): a Parametric Map needs plane positions; the preview shows the map"
            )
    values = attribution.values
    if attribution.source_frame_numbers is not None or is_multiframe(ordered[0]):
        sources, values = _multiframe(ordered, attribution)
    else:
        sources = ordered
    when = now or datetime.datetime.now()
    series_uid, instance_uid = parametric_map_uids(uids, attribution)
    method = _NAMES.get(attribution.method, attribution.method)
    mapping = RealWorldValueMapping(
        lut_label=_LUT_LABEL,
        lut_explanation=f"{method} attribution of {attribution.target}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    _compat.cache_is_attribute_in_iod()
    try:
        pm = ParametricMap(
            source_images=sources,
            pixel_array=values,
            series_instance_uid=series_uid,
            series_number=(
                series_number
                if series_number is not None
                else default_series_number(ordered[0], PARAMETRIC_MAP_SERIES_NUMBER_OFFSET)
            ),
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            **device.equipment(),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label=_CONTENT_LABEL,
            content_description=f"{method} of {attribution.target}, {algorithm.name}"[:64],
            series_description=f"AI attribution {algorithm.name}"[:64],
            series_date=when.date(),
            series_time=when.time(),
            content_date=when.date(),
            content_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise EncodingError(
            f"highdicom refused the Parametric Map for {algorithm.name}: {exc}"
        ) from exc
    copy_body_part_and_laterality(ordered[0], pm)
    _fix_clock_and_random(pm, when, instance_uid)
    logger.debug("Parametric Map %s: %d frame(s)", pm.SOPInstanceUID, pm.NumberOfFrames)
    return pm


def build_attribution_preview(
    frames: npt.NDArray[np.floating[Any]],
    source_images: Sequence[Dataset],
    attribution: AttributionMap,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    algorithm: AlgorithmIdentification,
    slices: int = 1,
    display_values: bool = False,
    series_number: int | None = None,
    first_instance_number: int = 1,
    now: datetime.datetime | None = None,
) -> list[SCImage]:
    """RGB Secondary Captures of the ``slices`` source slices where the map is largest
    (its sum over the slice), in slice order: the slice in grey, the map over it in colour.
    They are numbered from ``first_instance_number`` (several maps of a job, e.g. a 2-D
    model's images, share the preview series).

    ``frames`` are the source pixels parallel to ``attribution.values``, ``(frames, rows,
    columns)``: after the Modality LUT (a volume's ``frames``), shown through the source's
    window; or, with ``display_values``, already higher-is-brighter (a 2-D model's
    :class:`~dicom_ai.inference.planar.PlanarImage`, MONOCHROME1 inverted), shown through
    their own 1st..99th percentiles.

    Raises :class:`EncodingError` when frames, map and sources disagree or highdicom refuses.
    """
    values = attribution.values
    if frames.shape != values.shape:
        raise EncodingError(f"frames {frames.shape} and map {values.shape} differ in shape")
    ordered = _ordered(source_images, attribution)
    mass = values.reshape(values.shape[0], -1).sum(axis=1, dtype=np.float64)
    chosen = sorted(int(k) for k in np.argsort(-mass, kind="stable")[: max(1, slices)])
    when = now or datetime.datetime.now()
    number = (
        series_number
        if series_number is not None
        else default_series_number(ordered[0], ATTRIBUTION_PREVIEW_SERIES_NUMBER_OFFSET)
    )
    numbers = attribution.source_frame_numbers
    images = []
    for instance_number, k in enumerate(chosen, start=first_instance_number):
        frame_number = numbers[k] if numbers is not None else None
        header = ordered[k]
        if display_values:
            grey = window_to_uint8(frames[k])
        else:
            grey = window_to_uint8(frames[k], *voi_window(header, frame_number))
            if str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
                grey = 255 - grey  # look like the source: bright is low there
        rgb = _overlay(grey, values[k])
        images.append(
            _sc_image(
                rgb,
                header,
                frame_number,
                attribution,
                algorithm,
                uids,
                device,
                series_number=number,
                instance_number=instance_number,
                when=when,
            )
        )
    return images


def attribution_colours(values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """The jet colour (RGB, 0..1) of each value 0..1: blue little, red most."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(clipped, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1)


def _overlay(
    grey: npt.NDArray[np.uint8], values: npt.NDArray[np.floating[Any]]
) -> npt.NDArray[np.uint8]:
    alpha = (_OPACITY * np.clip(values, 0.0, 1.0))[..., np.newaxis]
    base = np.repeat(grey[..., np.newaxis].astype(np.float64) / 255.0, 3, axis=2)
    mixed = (1.0 - alpha) * base + alpha * attribution_colours(values)
    rgb: npt.NDArray[np.uint8] = np.rint(mixed * 255.0).astype(np.uint8)
    return rgb


def _ordered(source_images: Sequence[Dataset], attribution: AttributionMap) -> list[Dataset]:
    """The source headers in the map's frame order, each the map's size."""
    return order_like_frames(
        source_images,
        attribution.source_sop_instance_uids,
        attribution.values.shape,
        "the map",
        "the map",
    )


def _multiframe(
    ordered: Sequence[Dataset], attribution: AttributionMap
) -> tuple[list[Dataset], npt.NDArray[np.float32]]:
    """The one multi-frame source and the map in its frame order (as the SEG does it)."""
    numbers = attribution.source_frame_numbers
    instances = {str(ds.SOPInstanceUID) for ds in ordered}
    if numbers is None or len(instances) != 1 or not is_multiframe(ordered[0]):
        raise EncodingError("a Parametric Map derives from one multi-frame source at most")
    source = ordered[0]
    count = int(source.get("NumberOfFrames") or 1)
    index = np.asarray(numbers, dtype=np.int64) - 1
    if len(set(numbers)) != len(numbers) or index.min() < 0 or index.max() >= count:
        raise EncodingError(f"source frame numbers must be distinct and within 1..{count}")
    values = np.zeros((count, *attribution.values.shape[1:]), dtype=np.float32)
    values[index] = attribution.values
    return [with_shared_geometry(source)], values


def _fix_clock_and_random(dataset: Dataset, when: datetime.datetime, instance_uid: str) -> None:
    """What highdicom takes from the clock (creation, contribution times) and at random
    (Dimension Organization UID), made a function of the input: same input, same bytes."""
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    for item in dataset.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    organization = derived_uid(instance_uid, "dimension-organization")
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in dataset.get(keyword) or []:
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = organization


def _plane(header: Dataset, frame_number: int | None, keyword: str) -> Any | None:
    """An Image Plane attribute of one slice, None where it has none (projection images)."""
    try:
        return plane_value(header, frame_number, keyword, "")
    except GeometryError:
        return None


def _sc_image(
    rgb: npt.NDArray[np.uint8],
    header: Dataset,
    frame_number: int | None,
    attribution: AttributionMap,
    algorithm: AlgorithmIdentification,
    uids: ResultUIDs,
    device: DeviceIdentity,
    *,
    series_number: int,
    instance_number: int,
    when: datetime.datetime,
) -> SCImage:
    orientation = _plane(header, frame_number, "ImageOrientationPatient")
    position = _plane(header, frame_number, "ImagePositionPatient")
    spacing = _plane(header, frame_number, "PixelSpacing")
    letters: tuple[str, ...] | list[str]
    if orientation is not None:
        letters = patient_orientation([float(v) for v in orientation])
    else:  # a projection image: its own Patient Orientation, or none
        letters = [str(v) for v in header.get("PatientOrientation") or []]
        if len(letters) != 2 or not all(letters):
            letters = []  # an empty or half value (e.g. "\\") says nothing
    series_uid, instance_uid = preview_uids(
        uids, attribution, str(header.SOPInstanceUID), frame_number
    )
    method = _NAMES.get(attribution.method, attribution.method)
    try:
        image = SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            # highdicom takes single letters only; the exact ones are set below.
            patient_orientation=(
                (letters[0][0], letters[1][0]) if len(letters) == 2 else ("L", "P")
            ),
            study_instance_uid=header.StudyInstanceUID,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            **device.equipment(),
            pixel_spacing=((float(spacing[0]), float(spacing[1])) if spacing is not None else None),
            series_description=f"AI attribution preview {algorithm.name}"[:64],
            series_date=when.date(),
            series_time=when.time(),
            content_date=when.date(),
            content_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(
            f"highdicom refused the attribution preview for {algorithm.name}: {exc}"
        ) from exc
    image.PatientOrientation = list(letters) if len(letters) == 2 else []
    mark_secondary_capture(image, header, device)
    # No CID 7203 concept says "attribution map": the description says it instead.
    image.DerivationDescription = (
        f"{method} map of where {algorithm.name} {algorithm.version} saw "
        f"{attribution.target}, in colour (blue: little, red: most) over the source image"
    )[:1024]
    image.SourceImageSequence = [source_reference(header, frame_number)]
    image.BurnedInAnnotation = str(header.get("BurnedInAnnotation", "") or "NO")
    _fix_clock_and_random(image, when, instance_uid)
    # Not in the SC Image IOD, but viewers sync the picture with the source series by them.
    if position is not None and orientation is not None:
        image.ImagePositionPatient = list(position)
        image.ImageOrientationPatient = list(orientation)
    if "FrameOfReferenceUID" in header:
        image.FrameOfReferenceUID = header.FrameOfReferenceUID
    return image
