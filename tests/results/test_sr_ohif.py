"""SRs that OHIF 3.13 can show, still valid TID 1500.

OHIF's SR loader (extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts) merges
the measurement groups that share a Tracking Unique Identifier, draws each merged group from
its first SCOORD/SCOORD3D of a GraphicType it knows, and fails on the whole report when a
merged group has none. So each TID 1411 volumetric group of a segmentation is followed by a
TID 1410 group of the same finding (same Tracking UID): the segment's outline on its key
slice, a closed SCOORD POLYLINE on that image, and its area; a 3-D detection's box is a
closed SCOORD POLYLINE on the image nearest its centre.

Expected values are computed here from the label map and the headers' geometry, not from
``dicom_ai.results``.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage
from skimage.draw import polygon2mask
from skimage.measure import find_contours

from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    Detection,
    DetectionFindings,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import (
    DeviceIdentity,
    build_detection_sr,
    build_seg,
    build_sr,
    result_uids,
)
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import Orientation, PhantomSpec, phantom_ct_datasets, phantom_enhanced_ct
from tests.dicom_validation import (
    assert_dciodvfy_clean,
    assert_sr_template_valid,
    not_in_template,
)

SLICES, ROWS, COLUMNS = 8, 64, 80
# Rows 0.8 mm apart, columns 0.6 mm: an area that swaps them is wrong.
ROW_SPACING, COLUMN_SPACING = 0.8, 0.6
PIXEL_MM2 = ROW_SPACING * COLUMN_SPACING
DEVICE = DeviceIdentity.for_node("node-ohif-sr")
ALGORITHM = AlgorithmIdentification("ohif check", "1.0", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE)
LABELS = (
    SegmentLabel(1, "liver"),  # discs, largest on slice 4
    SegmentLabel(2, "spleen"),  # on slice 6 a 10 x 12 block and a 3 x 3 one: the block counts
    SegmentLabel(3, "kidney_left"),  # a ring (with a hole) on slice 2
    SegmentLabel(4, "aorta"),  # a large ragged disc on slice 0 only: its outline simplified
)
KEY_SLICES = {1: 4, 2: 6, 3: 2, 4: 0}
SERIES = {"axial": "1", "sagittal": "2", "coronal": "3"}  # series UID suffix by orientation
AORTA = (32.0, 45.0)  # centre (row, column) of label 4's disc
IMAGE_REGION = ("111030", "DCM")
TRACKING_UID = ("112040", "DCM")
TRACKING_IDENTIFIER = ("112039", "DCM")
REFERENCED_SEGMENT = ("121191", "DCM")
FINDING_TYPE = ("121071", "DCM")
FINDING_SITE = ("363698007", "SCT")
# What OHIF 3.13's DICOMSRDisplayTool can draw (extensions/cornerstone-dicom-sr/src/enums.ts).
OHIF_GRAPHIC_TYPES = {"POINT", "MULTIPOINT", "POLYLINE", "CIRCLE", "ELLIPSE"}


def _spec(orientation: Orientation = "axial", series: str = "1") -> PhantomSpec:
    return PhantomSpec(
        slices=SLICES,
        rows=ROWS,
        columns=COLUMNS,
        pixel_spacing_mm=0.5,  # replaced below by ROW_SPACING, COLUMN_SPACING
        slice_thickness_mm=2.0,
        study_instance_uid="1.2.826.0.1.3680043.8.498.8001",
        series_instance_uid=f"1.2.826.0.1.3680043.8.498.80{series}",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.8003",
        orientation=orientation,
    )


def _header_only(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


def _headers(orientation: Orientation = "axial") -> list[Dataset]:
    headers = []
    for ds in phantom_ct_datasets(_spec(orientation, SERIES[orientation])):
        ds.PixelSpacing = [ROW_SPACING, COLUMN_SPACING]
        headers.append(_header_only(ds))
    return headers


def _disc(radius: float, centre: tuple[float, float]) -> npt.NDArray[np.bool_]:
    rows, columns = np.mgrid[0:ROWS, 0:COLUMNS]
    inside = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2
    return np.asarray(inside, dtype=np.bool_)


def _label_map() -> npt.NDArray[np.uint16]:
    label_map = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint16)
    for k, radius in ((3, 7.0), (4, 9.0), (5, 8.0)):
        label_map[k][_disc(radius, (20.0, 20.0))] = 1
    label_map[6, 30:40, 50:62] = 2  # 10 rows x 12 columns
    label_map[6, 50:53, 50:53] = 2  # a smaller part on the same slice
    label_map[5, 30:36, 50:56] = 2  # a smaller cross-section
    ring = _disc(8.0, (45.0, 20.0)) & ~_disc(4.0, (45.0, 20.0))
    label_map[2][ring] = 3
    label_map[1][_disc(3.0, (45.0, 20.0))] = 3
    # A disc with a ragged border: hundreds of outline points, as a model's organ has.
    ragged = np.random.default_rng(11).random((ROWS, COLUMNS)) < 0.5
    label_map[0][_disc(27.0, AORTA) | (_disc(29.0, AORTA) & ragged)] = 4
    return label_map


def _findings(headers: list[Dataset]) -> SegmentationFindings:
    return SegmentationFindings(
        label_map=_label_map(),
        labels=LABELS,
        algorithm=ALGORITHM,
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
    )


@dataclass(frozen=True)
class Built:
    headers: list[Dataset]
    findings: SegmentationFindings
    seg: Dataset
    sr_path: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    headers = _headers()
    findings = _findings(headers)
    uids = result_uids(str(headers[0].SeriesInstanceUID), "ohif", ALGORITHM.version)
    shuffled = list(headers)
    random.Random(3).shuffle(shuffled)
    seg = build_seg(shuffled, findings, uids, DEVICE)
    sr = build_sr(shuffled, seg, findings, uids, DEVICE)
    path = tmp_path_factory.mktemp("ohif") / "sr.dcm"
    path.write_bytes(file_bytes(sr))
    yield Built(headers, findings, seg, path)


def _code(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _groups(sr: Dataset) -> list[Dataset]:
    (measurements,) = [i for i in sr.ContentSequence if _code(i) == ("126010", "DCM")]
    return list(measurements.ContentSequence)


def _child(group: Dataset, concept: tuple[str, str]) -> Dataset:
    (item,) = [i for i in group.ContentSequence if _code(i) == concept]
    child: Dataset = item
    return child


def _region(group: Dataset) -> tuple[npt.NDArray[np.float64], Dataset]:
    """The group's SCOORD as (n, 2) column, row points and its image reference."""
    region = _child(group, IMAGE_REGION)
    assert region.ValueType == "SCOORD" and region.GraphicType == "POLYLINE"
    (image,) = region.ContentSequence
    assert image.ValueType == "IMAGE" and image.RelationshipType == "SELECTED FROM"
    points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
    return points, image.ReferencedSOPSequence[0]


def _area_mm2(group: Dataset) -> float:
    area = _child(group, ("42798000", "SCT"))
    measured = area.MeasuredValueSequence[0]
    assert _code_of(measured.MeasurementUnitsCodeSequence[0]) == ("mm2", "UCUM")
    return float(measured.NumericValue)


def _code_of(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def _shoelace(points: npt.NDArray[np.float64]) -> float:
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def _largest_part(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest 8-connected part of ``mask``, its holes filled."""
    parts, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum(mask, parts, range(1, count + 1))
    largest = parts == 1 + int(np.argmax(sizes))
    return np.asarray(ndimage.binary_fill_holes(largest), dtype=np.bool_)


def _concepts(group: Dataset, concept: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        _code_of(c.ConceptCodeSequence[0]) for c in group.ContentSequence if _code(c) == concept
    ]


def _unclocked(ds: Dataset) -> bytes:
    """The file's bytes with what highdicom takes from the clock (Content and Instance
    Creation Date and Time, Contribution DateTime) set to one value: the rest must not
    depend on the run (build_sr's signature has no clock to pin)."""
    for keyword in ("ContentDate", "InstanceCreationDate"):
        setattr(ds, keyword, "20260101")
    for keyword in ("ContentTime", "InstanceCreationTime"):
        setattr(ds, keyword, "120000")
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20260101120000"
    return bytes(file_bytes(ds))


def _ohif_measurements(sr: Dataset) -> dict[str, list[Dataset]]:
    """OHIF 3.13's _getMeasurements: the groups' items merged by Tracking Unique Identifier
    (getSopClassHandlerModule.ts, _getMergedContentSequencesByTrackingUniqueIdentifiers)."""
    merged: dict[str, list[Dataset]] = {}
    for group in _groups(sr):
        assert _code(group) == ("125007", "DCM")  # Measurement Group
        items = list(group.ContentSequence)
        uid = str(_child(group, TRACKING_UID).UID)
        if uid not in merged:
            merged[uid] = items
        else:
            merged[uid] += [i for i in items if _code(i) != TRACKING_UID]
    return merged


# --- segmentation: the key-slice groups ----------------------------------------------------


def test_each_volumetric_group_follows_its_key_slice_group(built: Built) -> None:
    sr = pydicom.dcmread(built.sr_path)
    groups = _groups(sr)
    assert len(groups) == 2 * len(LABELS)
    for number, label in enumerate(LABELS, start=1):
        planar, volumetric = groups[2 * number - 2], groups[2 * number - 1]
        assert [_code(c) for c in volumetric.ContentSequence].count(REFERENCED_SEGMENT) == 1
        assert REFERENCED_SEGMENT not in [_code(c) for c in planar.ContentSequence]
        segment = built.seg.SegmentSequence[number - 1]
        # One finding: the SEG segment's Tracking UID in both groups; the outline's
        # identifier is the Cornerstone tool OHIF hydrates it with, the volume's the label.
        assert str(_child(planar, TRACKING_UID).UID) == str(segment.TrackingUID)
        assert str(_child(volumetric, TRACKING_UID).UID) == str(segment.TrackingUID)
        assert _child(planar, TRACKING_IDENTIFIER).TextValue == (
            "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
        )
        assert _child(volumetric, TRACKING_IDENTIFIER).TextValue == label.name
        for concept in (FINDING_TYPE, FINDING_SITE):
            assert _concepts(planar, concept) == _concepts(volumetric, concept), label.name
    # kidney_left has a side: its site (with laterality) is in both groups.
    assert len(_concepts(groups[4], FINDING_SITE)) == 1


def test_outline_lies_on_the_key_slice_closed_on_the_segment_border(built: Built) -> None:
    sr = pydicom.dcmread(built.sr_path)
    groups = _groups(sr)
    label_map = built.findings.label_map
    for number, label in enumerate(LABELS, start=1):
        points, image = _region(groups[2 * number - 2])
        counts = [int(np.count_nonzero(plane == label.value)) for plane in label_map]
        key = int(np.argmax(counts))
        assert key == KEY_SLICES[label.value]
        assert str(image.ReferencedSOPInstanceUID) == str(built.headers[key].SOPInstanceUID)
        assert str(image.ReferencedSOPClassUID) == str(built.headers[key].SOPClassUID)
        assert "ReferencedFrameNumber" not in image
        assert len(points) >= 4 and np.array_equal(points[0], points[-1])
        mask = label_map[key] == label.value
        # Every vertex lies between an inside and an outside pixel centre: SCOORD has the
        # first pixel's centre at (0.5, 0.5), so minus 0.5 is pixel index space.
        padded = np.pad(mask, 1)
        for column, row in points - 0.5:
            if float(row).is_integer():
                assert (column * 2) % 2 == 1, (label.name, column, row)
                pair = padded[int(row) + 1, int(np.floor(column)) + 1 : int(np.ceil(column)) + 2]
            else:
                assert float(column).is_integer(), (label.name, column, row)
                pair = padded[int(np.floor(row)) + 1 : int(np.ceil(row)) + 2, int(column) + 1]
            assert sorted(pair.tolist()) == [False, True], (label.name, column, row)
        # The outline encloses the pixel centres of the segment's largest part, and only
        # those (a hole inside is enclosed too).
        inside = polygon2mask(mask.shape, points[:, ::-1] - 0.5)  # type: ignore[no-untyped-call]
        largest = _largest_part(mask)
        if label.value == 4:  # simplified within half a pixel: the border pixels may differ
            assert np.count_nonzero(inside ^ largest) <= 0.05 * np.count_nonzero(largest)
        else:
            assert np.array_equal(inside, largest), label.name


def test_the_largest_part_is_outlined_and_long_outlines_are_simplified(built: Built) -> None:
    groups = _groups(pydicom.dcmread(built.sr_path))
    spleen, _ = _region(groups[2])
    columns, rows = spleen[:, 0], spleen[:, 1]
    # The 10 x 12 block's edges exactly (not the 3 x 3 part's, rows 50..53).
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (30, 40, 50, 62)
    aorta, _ = _region(groups[6])
    mask = np.pad(built.findings.label_map[0] == 4, 1).astype(float)
    contours = find_contours(mask, 0.5, fully_connected="high")  # type: ignore[no-untyped-call]
    raw = max(contours, key=len)[:, ::-1] - 0.5  # padded (row, column) -> SCOORD
    assert len(raw) > 300
    assert 20 <= len(aorta) <= 150  # simplified, not to a polygon
    # Its vertices are border points of the ragged disc (radius 27 to 29 pixels)...
    radii = np.hypot(aorta[:, 1] - 0.5 - AORTA[0], aorta[:, 0] - 0.5 - AORTA[1])
    assert np.all((radii > 26.0) & (radii < 30.0)), radii
    # ...and every point of the full outline is within half a pixel of it.
    starts, ends = aorta[:-1], aorta[1:]
    chords = ends - starts
    gaps = []
    for start, chord in zip(starts, chords, strict=True):
        t = np.clip((raw - start) @ chord / (chord @ chord), 0.0, 1.0)
        gaps.append(np.hypot(*(raw - start - t[:, None] * chord).T))
    assert np.min(gaps, axis=0).max() <= 0.5 + 1e-9


def test_area_is_the_outlined_area_in_mm2(built: Built) -> None:
    groups = _groups(pydicom.dcmread(built.sr_path))
    label_map = built.findings.label_map
    for number, label in enumerate(LABELS, start=1):
        group = groups[2 * number - 2]
        points, _ = _region(group)
        area = _area_mm2(group)
        # The number the group states is the area its polyline encloses...
        assert area == pytest.approx(_shoelace(points) * PIXEL_MM2, rel=1e-6)
        # ...which is about the part's pixel area (holes included): marching squares cuts
        # each convex corner pixel by 1/8, so the 10 x 12 block is 119.5 pixels.
        pixels = np.count_nonzero(_largest_part(label_map[KEY_SLICES[label.value]] == label.value))
        assert area == pytest.approx(pixels * PIXEL_MM2, rel=0.03), label.name
    spleen = _area_mm2(groups[2])
    assert spleen == pytest.approx((10 * 12 - 0.5) * PIXEL_MM2, rel=1e-6)  # 57.36 mm2
    liver = _area_mm2(groups[0])
    assert liver == pytest.approx(np.pi * 9.0**2 * PIXEL_MM2, rel=0.03)


def test_highdicom_reads_back_both_groups_of_each_finding(built: Built) -> None:
    document = hd.sr.srread(built.sr_path)
    report = document.content
    assert isinstance(report, hd.sr.MeasurementReport)
    volumetric = report.get_volumetric_roi_measurement_groups()
    planar = report.get_planar_roi_measurement_groups()
    assert len(volumetric) == len(planar) == len(LABELS)
    for v, p, label in zip(volumetric, planar, LABELS, strict=True):
        assert p.tracking_uid == v.tracking_uid
        assert str(v.tracking_identifier) == label.name
        assert str(p.tracking_identifier) == "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
        assert p.finding_type == v.finding_type
        roi = p.roi
        assert isinstance(roi, hd.sr.ImageRegion)
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        (area,) = p.get_measurements(name=codes.SCT.Area)
        assert area.unit == codes.UCUM.SquareMillimeter
        assert area.value > 0
        # TID 4019 on the area, as on the volume.
        names = [i.TextValue for i in area[0].ContentSequence if _code(i) == ("111001", "DCM")]
        assert names == [ALGORITHM.name]
        # The volume group is still found by its segment, as before.
        (volume,) = v.get_measurements(name=codes.SCT.Volume)
        assert volume.value > 0


def test_every_finding_has_the_coordinates_ohif_needs(built: Built) -> None:
    sr = pydicom.dcmread(built.sr_path)
    merged = _ohif_measurements(sr)
    assert len(merged) == len(LABELS)
    images = {str(ds.SOPInstanceUID) for ds in built.headers}
    for items in merged.values():
        graphics = [i for i in items if i.ValueType in ("SCOORD", "SCOORD3D")]
        assert graphics, "OHIF fails on the report: a group without coordinates"
        first = graphics[0]
        assert first.ValueType == "SCOORD" and first.GraphicType in OHIF_GRAPHIC_TYPES
        # coords.ReferencedSOPSequence = graphicItem.ContentSequence.ReferencedSOPSequence
        reference = first.ContentSequence[0].ReferencedSOPSequence[0]
        assert str(reference.ReferencedSOPInstanceUID) in images
        # Its labels: the NUMs (volume, area), and the identifier from the first group:
        # a Cornerstone tool's, so OHIF offers to track (hydrate) the finding.
        numbers = {_code(i) for i in items if i.ValueType == "NUM"}
        assert numbers == {("118565006", "SCT"), ("42798000", "SCT")}
        identifier = next(i for i in items if _code(i) == TRACKING_IDENTIFIER)
        assert identifier.TextValue.startswith("Cornerstone3DTools@^0.1.0:")
        # Cornerstone's adapters read the coordinates under the first NUM.
        first_number = next(i for i in items if i.ValueType == "NUM")
        (inferred,) = [
            i for i in first_number.ContentSequence if i.ValueType in ("SCOORD", "SCOORD3D")
        ]
        assert inferred.RelationshipType == "INFERRED FROM"
        assert list(inferred.GraphicData) == list(first.GraphicData)


@pytest.mark.dciodvfy
def test_segmentation_sr_passes_dciodvfy(built: Built) -> None:
    assert_dciodvfy_clean(built.sr_path)


@pytest.mark.java
@pytest.mark.slow
def test_segmentation_sr_passes_pixelmed_tid1500_validation(built: Built) -> None:
    output = assert_sr_template_valid(built.sr_path)
    assert "Found Root Template TID_1500" in output
    assert not not_in_template(output), output


def test_segmentation_sr_is_idempotent(built: Built) -> None:
    headers = _headers()
    findings = _findings(headers)
    uids = result_uids(str(headers[0].SeriesInstanceUID), "ohif", ALGORITHM.version)
    seg = build_seg(headers, findings, uids, DEVICE)
    first = _unclocked(build_sr(headers, seg, findings, uids, DEVICE))
    again = _unclocked(build_sr(list(reversed(headers)), seg, _findings(headers), uids, DEVICE))
    assert first == again == _unclocked(pydicom.dcmread(built.sr_path))


# --- segmentation on a multi-frame source ---------------------------------------------------


@pytest.mark.dciodvfy
def test_key_slice_of_a_multiframe_source_names_its_frame(tmp_path: Path) -> None:
    enhanced = phantom_enhanced_ct(_spec(series="4"))
    frames = int(enhanced.NumberOfFrames)
    header = _header_only(enhanced)
    uid = str(header.SOPInstanceUID)
    label_map = np.zeros((frames, ROWS, COLUMNS), dtype=np.uint16)
    label_map[2:5, 10:20, 10:20] = 1
    label_map[3, 8:22, 8:22] = 1  # frame 4 the largest: 14 x 14 pixels
    findings = SegmentationFindings(
        label_map=label_map,
        labels=(SegmentLabel(1, "liver"),),
        algorithm=ALGORITHM,
        source_sop_instance_uids=(uid,) * frames,
        source_frame_numbers=tuple(range(1, frames + 1)),
    )
    uids = result_uids(str(header.SeriesInstanceUID), "ohif-mf", ALGORITHM.version)
    seg = build_seg([header], findings, uids, DEVICE)
    path = tmp_path / "sr.dcm"
    path.write_bytes(file_bytes(build_sr([header], seg, findings, uids, DEVICE)))
    assert_dciodvfy_clean(path)
    (planar, _) = _groups(pydicom.dcmread(path))
    points, image = _region(planar)
    assert str(image.ReferencedSOPInstanceUID) == uid
    assert int(image.ReferencedFrameNumber) == 4
    spacing = [float(v) for v in enhanced.SharedFunctionalGroupsSequence[0]
               .PixelMeasuresSequence[0].PixelSpacing]  # fmt: skip
    assert _area_mm2(planar) == pytest.approx((14 * 14 - 0.5) * spacing[0] * spacing[1])
    assert points[:, 0].min() == 8.0 and points[:, 0].max() == 22.0  # column edges


# --- 3-D detection: the box on its nearest image --------------------------------------------


def _plane(header: Dataset) -> tuple[npt.NDArray[np.float64], ...]:
    origin = np.array([float(v) for v in header.ImagePositionPatient])
    orientation = np.array([float(v) for v in header.ImageOrientationPatient])
    row, column = orientation[:3], orientation[3:]
    return origin, row, column, np.cross(row, column)


def _box(
    headers: list[Dataset], k: float, first: tuple[int, int], last: tuple[int, int]
) -> Detection:
    """A box over pixel rows first[0]..last[0], columns first[1]..last[1] (whole pixels),
    centred at slice position k (fractional: between slices), 3 slices deep."""
    origin, row, column, normal = _plane(headers[0])
    spacing = float(np.dot(_plane(headers[1])[0] - origin, normal))  # signed
    centre_row = (first[0] + last[0]) / 2.0
    centre_column = (first[1] + last[1]) / 2.0
    centre = (
        origin
        + row * centre_column * COLUMN_SPACING
        + column * centre_row * ROW_SPACING
        + normal * k * spacing
    )
    edges = np.array(
        [
            row * (last[1] - first[1] + 1) * COLUMN_SPACING,
            column * (last[0] - first[0] + 1) * ROW_SPACING,
            normal * 3 * abs(spacing),
        ]
    )
    return Detection("lung nodule", 0.87, centre, edges)


def _detection_findings(
    headers: list[Dataset], detections: tuple[Detection, ...]
) -> DetectionFindings:
    return DetectionFindings(
        detections=detections,
        algorithm=ALGORITHM,
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        frame_of_reference_uid=str(headers[0].FrameOfReferenceUID),
    )


@pytest.mark.dciodvfy
@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_detection_box_is_a_rectangle_on_the_nearest_image(
    orientation: Orientation, tmp_path: Path
) -> None:
    headers = _headers(orientation)
    first = _box(headers, 3.3, (20, 10), (27, 19))  # nearest slice 3
    second = _box(headers, 5.6, (40, 50), (45, 70))  # nearest slice 6
    findings = _detection_findings(headers, (first, second))
    uids = result_uids(str(headers[0].SeriesInstanceUID), "boxes", "1.0")
    shuffled = list(headers)
    random.Random(5).shuffle(shuffled)
    sr = build_detection_sr(shuffled, findings, uids, DEVICE)
    path = tmp_path / "sr.dcm"
    path.write_bytes(file_bytes(sr))
    groups = _groups(pydicom.dcmread(path))
    assert len(groups) == 2
    expected = [
        (3, [[10, 20], [20, 20], [20, 28], [10, 28], [10, 20]]),
        (6, [[50, 40], [71, 40], [71, 46], [50, 46], [50, 40]]),
    ]
    for group, detection, (k, corners) in zip(groups, (first, second), expected, strict=True):
        points, image = _region(group)
        assert str(image.ReferencedSOPInstanceUID) == str(headers[k].SOPInstanceUID)
        # The box's edges are whole pixels: left/top at the first pixel's edge, right/bottom
        # after the last (SCOORD: pixel centres at +0.5); 5 points, OHIF's RectangleROI.
        np.testing.assert_allclose(points, corners, atol=1e-3)
        width, height, depth = detection.size_mm
        numbers = {
            _code(c): float(c.MeasuredValueSequence[0].NumericValue)
            for c in group.ContentSequence
            if c.ValueType == "NUM"
        }
        assert numbers[("122157", "DCM")] == pytest.approx(0.87)  # Probability
        assert numbers[("103355008", "SCT")] == pytest.approx(width, abs=1e-6)
        assert numbers[("121207", "DCM")] == pytest.approx(height, abs=1e-6)
        assert numbers[("131197000", "SCT")] == pytest.approx(depth, abs=1e-6)
        assert not [c for c in group.ContentSequence if c.ValueType == "SCOORD3D"]
    merged = _ohif_measurements(pydicom.dcmread(path))
    assert len(merged) == 2
    if orientation == "axial":
        assert_dciodvfy_clean(path)


def test_detection_on_a_multiframe_source_names_the_nearest_frame() -> None:
    enhanced = phantom_enhanced_ct(_spec(series="5"))
    header = _header_only(enhanced)
    frames = int(header.NumberOfFrames)
    # The frames' geometry, as single-frame headers would have it, for the box.
    planes = []
    for number in range(frames):
        item = header.PerFrameFunctionalGroupsSequence[number]
        plane = Dataset()
        plane.ImagePositionPatient = item.PlanePositionSequence[0].ImagePositionPatient
        plane.ImageOrientationPatient = (
            header.SharedFunctionalGroupsSequence[0]
            .PlaneOrientationSequence[0]
            .ImageOrientationPatient
        )
        planes.append(plane)
    pixel = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in pixel] == [0.5, 0.5]
    origin, row, column, normal = _plane(planes[0])
    spacing = float(np.dot(_plane(planes[1])[0] - origin, normal))
    centre = origin + row * 10.0 * 0.5 + column * 12.0 * 0.5 + normal * 4.9 * spacing
    detection = Detection("lung nodule", 0.6, centre, np.diag([4.0, 3.0, 2.0 * abs(spacing)]))
    findings = DetectionFindings(
        detections=(detection,),
        algorithm=ALGORITHM,
        source_sop_instance_uids=(str(header.SOPInstanceUID),) * frames,
        frame_of_reference_uid=str(header.FrameOfReferenceUID),
        source_frame_numbers=tuple(range(1, frames + 1)),
    )
    uids = result_uids(str(header.SeriesInstanceUID), "boxes-mf", "1.0")
    sr = build_detection_sr([header], findings, uids, DEVICE)
    (group,) = _groups(pydicom.dcmread(io.BytesIO(file_bytes(sr))))
    points, image = _region(group)
    assert str(image.ReferencedSOPInstanceUID) == str(header.SOPInstanceUID)
    assert int(image.ReferencedFrameNumber) == 6  # frame index 5: 4.9 slices from the first
    # 4 x 3 mm around pixel (row 12, column 10), 0.5 mm pixels: columns 6.5..14.5 (+0.5).
    np.testing.assert_allclose(points[0], [10.5 - 4.0, 12.5 - 3.0], atol=1e-3)
    np.testing.assert_allclose(points[2], [10.5 + 4.0, 12.5 + 3.0], atol=1e-3)


@pytest.mark.dciodvfy
@pytest.mark.java
@pytest.mark.slow
def test_detection_sr_passes_pixelmed_tid1500_validation(tmp_path: Path) -> None:
    headers = _headers()
    findings = _detection_findings(headers, (_box(headers, 3.3, (20, 10), (27, 19)),))
    uids = result_uids(str(headers[0].SeriesInstanceUID), "boxes", "1.0")
    path = tmp_path / "sr.dcm"
    path.write_bytes(file_bytes(build_detection_sr(headers, findings, uids, DEVICE)))
    assert_dciodvfy_clean(path)
    output = assert_sr_template_valid(path)
    assert "Found Root Template TID_1500" in output
    assert not not_in_template(output), output


def test_detection_sr_is_idempotent() -> None:
    headers = _headers()
    findings = _detection_findings(
        headers,
        (_box(headers, 3.3, (20, 10), (27, 19)), _box(headers, 5.6, (40, 50), (45, 70))),
    )
    uids = result_uids(str(headers[0].SeriesInstanceUID), "boxes", "1.0")
    first = _unclocked(build_detection_sr(headers, findings, uids, DEVICE))
    again = _unclocked(build_detection_sr(list(reversed(headers)), findings, uids, DEVICE))
    assert first == again


@pytest.mark.java
@pytest.mark.slow
def test_a_single_segment_sr_passes_pixelmed(tmp_path: Path) -> None:
    # One outline group and one volumetric group: PixelMed's TID 1500 choice counts one
    # Image Region over the whole report and checks the volumetric group as TID 1410
    # (tests/dicom_validation._pixelmed_1410_quirk); nothing else may fail.
    spec = PhantomSpec(slices=4, rows=24, columns=24, seed=5)
    headers = list(phantom_ct_datasets(spec))
    label_map = np.zeros((4, 24, 24), dtype=np.uint16)
    label_map[1:3, 6:14, 8:16] = 1
    findings = SegmentationFindings(
        label_map,
        (SegmentLabel(1, "spleen"),),
        ALGORITHM,
        tuple(str(h.SOPInstanceUID) for h in headers),
    )
    uids = result_uids(spec.series_instance_uid, "spleen-model", "1")
    seg = build_seg(headers, findings, uids, DEVICE)
    path = tmp_path / "sr.dcm"
    path.write_bytes(file_bytes(build_sr(headers, seg, findings, uids, DEVICE)))
    output = assert_sr_template_valid(path)
    assert "Missing conditional content item" in output  # the quirk is there, let through
    assert not not_in_template(output), output
