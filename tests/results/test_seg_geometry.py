"""SEG frames lie exactly on their source frames, whatever the orientation or the source's
layout: series -> ``load_series`` -> label map -> ``build_seg`` -> bytes -> read back.

Sources: single-frame CT and MR series, axial, sagittal and coronal; enhanced multi-frame
CT and MR (highdicom's legacy conversion of the phantom, frames stored superior to
inferior, so slice order and frame order differ), one with orientation and pixel measures
per frame instead of shared; and pydicom-data's ``eCT_Supplemental.dcm``.

For every SEG frame: its Plane Position is the referenced source frame's Image Position
(Patient) and the volume's voxel (0, 0, k) position, its orientation and pixel spacing the
source's, its Derivation Image references the right SOP instance (and frame number for a
multi-frame source), and its pixels are that source frame's mask. Every SEG passes dciodvfy;
the SR built on it passes dciodvfy (and PixelMed, for the multi-frame sources), its
volumes computed from the source spacing.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import MRImageStorage, generate_uid

from dicom_ai.errors import EncodingError
from dicom_ai.geometry import slice_spacing_mm, voxel_volume_mm3
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.results import DeviceIdentity, build_seg, build_sr, result_uids
from dicom_ai.synthetic import (
    Orientation,
    PhantomSpec,
    phantom_ct_datasets,
    phantom_enhanced_ct,
)
from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.results_check import sr_evidence_uids

pytestmark = [pytest.mark.dciodvfy, pytest.mark.java]

DEVICE = DeviceIdentity.for_node("node-geometry-1")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LABELS = (SegmentLabel(1, "body"), SegmentLabel(2, "bone"), SegmentLabel(3, "Marker"))
ALGORITHM = AlgorithmIdentification("geometry check", "1.0", AlgorithmFamily.CLASSICAL)


def _spec(orientation: Orientation = "axial") -> PhantomSpec:
    # Non-square, pixel size exact in binary (positions stay short decimal strings).
    return PhantomSpec(
        slices=5,
        rows=24,
        columns=32,
        pixel_spacing_mm=0.75,
        slice_thickness_mm=2.5,
        study_instance_uid="1.2.826.0.1.3680043.8.498.4001",
        series_instance_uid=generate_uid(entropy_srcs=["geometry", orientation]),
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.4003",
        orientation=orientation,
    )


def _as_mr(ds: Dataset) -> Dataset:
    """The phantom slice as an MR Image Storage instance (stored values, no rescale)."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    for keyword in ("KVP", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        delattr(ds, keyword)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500, 10, 1
    ds.MagneticFieldStrength = 3
    ds.BodyPartExamined = "HEAD"
    return ds


def _write(directory: Path, datasets: list[Dataset]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = directory / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _single_frame(modality: str, orientation: Orientation) -> Callable[[Path], list[Path]]:
    def make(directory: Path) -> list[Path]:
        datasets = list(phantom_ct_datasets(_spec(orientation)))
        if modality == "MR":
            datasets = [_as_mr(ds) for ds in datasets]
        return _write(directory, datasets)

    return make


def _enhanced_ct(per_frame: bool) -> Callable[[Path], list[Path]]:
    def make(directory: Path) -> list[Path]:
        ds = phantom_enhanced_ct(_spec())
        if per_frame:  # as Philips writes them: repeated in every frame
            shared = ds.SharedFunctionalGroupsSequence[0]
            for sequence in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
                value = shared[sequence].value
                for item in ds.PerFrameFunctionalGroupsSequence:
                    item.add_new(sequence, "SQ", [_copy(value[0])])
                delattr(shared, sequence)
        return _write(directory, [ds])

    return make


def _copy(item: Dataset) -> Dataset:
    copy = Dataset()
    for element in item:
        copy.add_new(element.tag, element.VR, element.value)
    return copy


def _enhanced_mr(directory: Path) -> list[Path]:
    spec = _spec("sagittal")
    ds = LegacyConvertedEnhancedMRImage(
        [_as_mr(ds) for ds in phantom_ct_datasets(spec)],
        series_instance_uid=generate_uid(entropy_srcs=[spec.series_instance_uid, "mr"]),
        series_number=6,
        sop_instance_uid=generate_uid(entropy_srcs=[spec.series_instance_uid, "mr", "1"]),
        instance_number=1,
    )
    return _write(directory, [ds])


def _ect_supplemental(directory: Path) -> list[Path]:
    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None
    return [Path(path)]


SOURCES: dict[str, Callable[[Path], list[Path]]] = {
    "ct-axial": _single_frame("CT", "axial"),
    "ct-sagittal": _single_frame("CT", "sagittal"),
    "ct-coronal": _single_frame("CT", "coronal"),
    "mr-axial": _single_frame("MR", "axial"),
    "mr-sagittal": _single_frame("MR", "sagittal"),
    "mr-coronal": _single_frame("MR", "coronal"),
    "enhanced-ct": _enhanced_ct(per_frame=False),
    "enhanced-ct-per-frame-geometry": _enhanced_ct(per_frame=True),
    "enhanced-mr-sagittal": _enhanced_mr,
    "eCT_Supplemental": _ect_supplemental,
}


@dataclass(frozen=True)
class Case:
    name: str
    volume: SeriesVolume
    findings: SegmentationFindings
    seg_path: Path
    full_headers: Mapping[str, Dataset]  # SOP Instance UID -> header as in the file


def _label_volume(volume: SeriesVolume) -> torch.Tensor:
    """Two threshold labels plus a marker block that moves with k, on the model's grid
    (1, columns, rows, slices): a slice mapped to the wrong frame cannot go unnoticed."""
    image = volume.image.as_tensor()
    low, high = np.percentile(volume.frames, [60, 97])
    labels = (image > float(low)).to(torch.int32) + (image > float(high)).to(torch.int32)
    for k in range(image.shape[3]):
        labels[0, 2 + 3 * k : 6 + 3 * k, 1 : 3 + k, k] = 3
    return labels


@pytest.fixture(scope="module", params=sorted(SOURCES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name: str = request.param
    directory = tmp_path_factory.mktemp(name)
    paths = SOURCES[name](directory / "source")
    volume = load_series(paths)
    findings = SegmentationFindings(
        label_map=volume.frames_from_volume(_label_volume(volume)),
        labels=LABELS,
        algorithm=ALGORITHM,
        source_sop_instance_uids=volume.sop_instance_uids,
        source_frame_numbers=volume.frame_numbers,
    )
    uids = result_uids(str(volume.headers[0].SeriesInstanceUID), "geometry", "1.0")
    seg = build_seg(volume.headers, findings, uids, DEVICE)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    seg_path = directory / "seg.dcm"
    seg_path.write_bytes(buffer.getvalue())
    full = {str(h.SOPInstanceUID): h for h in (pydicom.dcmread(p) for p in paths)}
    return Case(name, volume, findings, seg_path, full)


def _floats(values: object) -> list[float]:
    return [float(v) for v in values]  # type: ignore[attr-defined]


def _source_geometry(case: Case, k: int) -> tuple[list[float], list[float], list[float]]:
    """IPP, IOP and PixelSpacing of slice k's source frame, read from the file as written."""
    header = case.full_headers[case.volume.sop_instance_uids[k]]
    if case.volume.frame_numbers is None:
        return (
            _floats(header.ImagePositionPatient),
            _floats(header.ImageOrientationPatient),
            _floats(header.PixelSpacing),
        )
    item = header.PerFrameFunctionalGroupsSequence[case.volume.frame_numbers[k] - 1]
    shared = header.SharedFunctionalGroupsSequence[0]

    def value(sequence: str, keyword: str) -> list[float]:
        group = item if sequence in item else shared
        return _floats(group[sequence].value[0][keyword].value)

    return (
        value("PlanePositionSequence", "ImagePositionPatient"),
        value("PlaneOrientationSequence", "ImageOrientationPatient"),
        value("PixelMeasuresSequence", "PixelSpacing"),
    )


def _lps(volume: SeriesVolume, k: int) -> npt.NDArray[np.float64]:
    ras = np.asarray(volume.image.affine, dtype=float) @ np.array([0.0, 0.0, float(k), 1.0])
    lps: npt.NDArray[np.float64] = (LPS_TO_RAS @ ras)[:3]
    return lps


def test_seg_passes_dciodvfy(case: Case) -> None:
    assert_dciodvfy_clean(case.seg_path)


def test_every_seg_frame_lies_on_its_source_frame(case: Case) -> None:
    seg = pydicom.dcmread(case.seg_path)
    volume = case.volume
    slice_of = {
        (uid, None if volume.frame_numbers is None else volume.frame_numbers[k]): k
        for k, uid in enumerate(volume.sop_instance_uids)
    }
    shared = seg.SharedFunctionalGroupsSequence[0]
    seg_iop = _floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
    seg_spacing = _floats(shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    label_map = case.findings.label_map
    seen: set[tuple[int, int]] = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        (derivation,) = item.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        uid = str(source.ReferencedSOPInstanceUID)
        if volume.frame_numbers is None:
            assert "ReferencedFrameNumber" not in source
            k = slice_of[(uid, None)]
        else:
            k = slice_of[(uid, int(source.ReferencedFrameNumber))]
        assert str(source.ReferencedSOPClassUID) == str(case.full_headers[uid].SOPClassUID)
        ipp, iop, spacing = _source_geometry(case, k)
        seg_ipp = _floats(item.PlanePositionSequence[0].ImagePositionPatient)
        np.testing.assert_allclose(seg_ipp, ipp, rtol=0, atol=1e-6)
        np.testing.assert_allclose(seg_ipp, _lps(volume, k), rtol=0, atol=1e-6)
        np.testing.assert_allclose(seg_iop, iop, rtol=0, atol=1e-6)
        np.testing.assert_allclose(seg_spacing, spacing, rtol=0, atol=1e-9)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        label = LABELS[number - 1]
        assert (k, number) not in seen, "two SEG frames for one slice and segment"
        seen.add((k, number))
        np.testing.assert_array_equal(frame.astype(bool), label_map[k] == label.value)
    expected = {
        (k, label.value)
        for k in range(label_map.shape[0])
        for label in LABELS
        if (label_map[k] == label.value).any()
    }
    assert seen == expected  # segment numbers are the label values here: 1, 2, 3 all present


def test_seg_references_the_source_instances(case: Case) -> None:
    seg = pydicom.dcmread(case.seg_path, stop_before_pixels=True)
    (series,) = seg.ReferencedSeriesSequence
    assert str(series.SeriesInstanceUID) == str(case.volume.headers[0].SeriesInstanceUID)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence}
    assert referenced == set(case.volume.sop_instance_uids)
    assert str(seg.FrameOfReferenceUID) == str(case.volume.headers[0].FrameOfReferenceUID)


def test_highdicom_reads_the_masks_back_per_source_frame(case: Case) -> None:
    seg = hd.seg.segread(case.seg_path)
    volume = case.volume
    label_map = case.findings.label_map
    if volume.frame_numbers is None:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids),
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
        np.testing.assert_array_equal(pixels, label_map)
    else:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=volume.sop_instance_uids[0],
            source_frame_numbers=list(volume.frame_numbers),
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
        np.testing.assert_array_equal(pixels, label_map)


@pytest.mark.slow
def test_sr_volumes_use_the_source_spacing(case: Case, tmp_path: Path) -> None:
    volume = case.volume
    # voxel volume from the headers (functional groups for multi-frame) = the loader's
    column_spacing, row_spacing, depth = volume.spacing_mm
    assert slice_spacing_mm(volume.headers) == pytest.approx(depth)
    assert voxel_volume_mm3(volume.headers) == pytest.approx(column_spacing * row_spacing * depth)
    seg = hd.seg.segread(case.seg_path)
    uids = result_uids(str(volume.headers[0].SeriesInstanceUID), "geometry", "1.0")
    sr = build_sr(volume.headers, seg, case.findings, uids, DEVICE)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    # PixelMed takes ~10 s a run; test_results.py already runs it on single-frame sources.
    if volume.frame_numbers is not None:
        assert "Found Root Template TID_1500" in assert_sr_template_valid(path)
    evidence = sr_evidence_uids(sr)
    assert sorted(evidence) == sorted({*volume.sop_instance_uids, str(seg.SOPInstanceUID)})
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    voxel_ml = column_spacing * row_spacing * depth / 1000.0
    for group, label in zip(report.get_volumetric_roi_measurement_groups(), LABELS, strict=True):
        (measured,) = group.get_measurements(name=codes.SCT.Volume)
        count = int(np.count_nonzero(case.findings.label_map == label.value))
        assert measured.value == pytest.approx(count * voxel_ml, rel=1e-9)


# --- errors and the source header -------------------------------------------------------


def _enhanced_volume(tmp_path: Path, per_frame: bool = False) -> SeriesVolume:
    return load_series(_enhanced_ct(per_frame)(tmp_path))


def _findings(
    volume: SeriesVolume, uids: tuple[str, ...], numbers: tuple[int, ...] | None
) -> SegmentationFindings:
    return SegmentationFindings(
        volume.frames_from_volume(_label_volume(volume)), LABELS, ALGORITHM, uids, numbers
    )


def test_multiframe_findings_must_carry_valid_frame_numbers(tmp_path: Path) -> None:
    volume = _enhanced_volume(tmp_path)
    uids = result_uids("1.2.3", "geometry", "1.0")
    assert volume.frame_numbers is not None
    without = _findings(volume, volume.sop_instance_uids, None)
    with pytest.raises(EncodingError, match="no source_frame_numbers"):
        build_seg(volume.headers, without, uids, DEVICE)
    too_far = _findings(volume, volume.sop_instance_uids, (99, *volume.frame_numbers[1:]))
    with pytest.raises(EncodingError, match=r"within 1\.\.5"):
        build_seg(volume.headers, too_far, uids, DEVICE)
    twice = _findings(
        volume, volume.sop_instance_uids, (volume.frame_numbers[1], *volume.frame_numbers[1:])
    )
    with pytest.raises(EncodingError, match="distinct"):
        build_seg(volume.headers, twice, uids, DEVICE)


def test_findings_over_two_multiframe_instances_are_refused(tmp_path: Path) -> None:
    volume = _enhanced_volume(tmp_path / "a")
    other = pydicom.dcmread(volume.paths[0], stop_before_pixels=True)
    other.SOPInstanceUID = generate_uid()
    assert volume.frame_numbers is not None
    mixed_uids = (str(other.SOPInstanceUID), *volume.sop_instance_uids[1:])
    findings = _findings(volume, mixed_uids, volume.frame_numbers)
    with pytest.raises(EncodingError, match="span 2 multi-frame source instances"):
        build_seg([volume.headers[0], other], findings, result_uids("1.2", "g", "1"), DEVICE)


def test_per_frame_geometry_is_not_written_back_into_the_source_header(tmp_path: Path) -> None:
    volume = _enhanced_volume(tmp_path, per_frame=True)
    header = volume.headers[0]
    shared = header.SharedFunctionalGroupsSequence[0]
    before = header.to_json_dict()
    findings = _findings(volume, volume.sop_instance_uids, volume.frame_numbers)
    seg = build_seg(volume.headers, findings, result_uids("1.2", "g", "1"), DEVICE)
    assert "PlaneOrientationSequence" not in shared
    assert header.to_json_dict() == before
    assert "PlaneOrientationSequence" in seg.SharedFunctionalGroupsSequence[0]
