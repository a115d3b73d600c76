"""Checks of the SEG and SR the node delivers, read back from what the PACS stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai.synthetic import PhantomSpec
from tests.dicom_validation import assert_dciodvfy_clean

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
VOLUME = ("118565006", "SCT")
REFERENCED_SEGMENT = ("121191", "DCM")


@dataclass
class Delivered:
    seg: Dataset
    sr: Dataset
    seg_path: Path
    sr_path: Path


def split_results(paths: list[Path]) -> Delivered:
    by_class: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in paths:
        ds = dcmread(path)
        by_class.setdefault(str(ds.SOPClassUID), []).append((path, ds))
    assert sorted(by_class) == sorted([SEG_SOP_CLASS, COMPREHENSIVE_3D_SR]), by_class.keys()
    assert len(by_class[SEG_SOP_CLASS]) == 1 and len(by_class[COMPREHENSIVE_3D_SR]) == 1
    (seg_path, seg), (sr_path, sr) = by_class[SEG_SOP_CLASS][0], by_class[COMPREHENSIVE_3D_SR][0]
    return Delivered(seg, sr, seg_path, sr_path)


def segment_voxel_counts(seg: Dataset) -> dict[int, int]:
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    counts: dict[int, int] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        # With one segment highdicom puts the segment identification in the shared groups.
        identification = item if "SegmentIdentificationSequence" in item else shared
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(np.count_nonzero(frame))
    return counts


def _code(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _walk(item: Dataset) -> list[Dataset]:
    out = [item]
    for child in item.get("ContentSequence", []):
        out.extend(_walk(child))
    return out


def sr_volumes_ml(sr: Dataset) -> dict[int, float]:
    """Segment number -> volume (mL) from every measurement group of the TID 1500 report."""
    volumes: dict[int, float] = {}
    for item in _walk(sr):
        if item.get("ValueType") != "CONTAINER" or "ContentSequence" not in item:
            continue
        children = list(item.ContentSequence)
        segment = [
            c for c in children if c.get("ValueType") == "IMAGE" and _code(c) == REFERENCED_SEGMENT
        ]
        volume = [c for c in children if c.get("ValueType") == "NUM" and _code(c) == VOLUME]
        if segment and volume:
            number = int(segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
            measured = volume[0].MeasuredValueSequence[0]
            assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "ml"
            volumes[number] = float(measured.NumericValue)
    return volumes


def check_delivered(
    delivered: Delivered, sources: dict[str, Dataset], voxel_mm3: float, min_segments: int = 1
) -> None:
    """dciodvfy clean; SEG geometry and references; SR volumes = voxels x voxel volume."""
    assert_dciodvfy_clean(delivered.seg_path)
    assert_dciodvfy_clean(delivered.sr_path)
    seg, sr = delivered.seg, delivered.sr
    assert seg.SegmentationType == "BINARY"
    assert (
        seg.StudyInstanceUID == sr.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    )
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    frame_sources = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        frame_sources.append(uid)
        source = sources[uid]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-3)
    assert set(frame_sources) <= referenced <= set(sources)
    counts = segment_voxel_counts(seg)
    assert len(seg.SegmentSequence) >= min_segments
    assert set(counts) == {int(s.SegmentNumber) for s in seg.SegmentSequence}
    volumes = sr_volumes_ml(sr)
    assert set(volumes) == set(counts), (volumes, counts)
    for number, voxels in counts.items():
        expected = voxels * voxel_mm3 / 1000.0
        assert abs(volumes[number] - expected) <= 0.01 * expected, (
            number,
            volumes[number],
            expected,
        )
    assert str(seg.SOPInstanceUID) in sr_evidence_uids(sr)


def sr_evidence_uids(sr: Dataset) -> list[str]:
    """SOP Instance UIDs in the SR's Current Requested Procedure Evidence, in order."""
    return [
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]


def source_headers(paths: list[Path]) -> dict[str, Dataset]:
    """SOP Instance UID -> header of each source file."""
    return {
        str(ds.SOPInstanceUID): ds for ds in (dcmread(p, stop_before_pixels=True) for p in paths)
    }


def check_phantom_results(
    files: list[Path], sources: list[Path], spec: PhantomSpec, min_segments: int = 1
) -> Delivered:
    """Exactly one SEG and one SR for a phantom series, valid and consistent with it."""
    delivered = split_results(files)
    voxel_mm3 = spec.pixel_spacing_mm**2 * spec.slice_thickness_mm
    check_delivered(delivered, source_headers(sources), voxel_mm3, min_segments)
    return delivered
