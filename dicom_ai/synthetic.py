"""A synthetic CT series with phantom anatomy, for demos, tests and benchmarks.

Real CT headers (CT Image Storage, rescale to HU, patient position, geometry) over a
phantom of air, body, fat, lungs, liver, spleen, kidneys and a spine, so the built-in
threshold model and the bundles see plausible Hounsfield values. No real patient data.

The slices can be laid out axial (the default), sagittal or coronal, and the series can be
converted into one Legacy Converted Enhanced CT multi-frame image (highdicom), for tests of
geometry and of enhanced sources.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "Orientation",
    "PhantomSpec",
    "phantom_ct_datasets",
    "phantom_enhanced_ct",
    "phantom_hu_volume",
    "write_phantom_ct",
    "write_phantom_enhanced_ct",
]

Orientation = Literal["axial", "sagittal", "coronal"]

# Row and column direction cosines (LPS) of each slice orientation, as scanners write them.
_COSINES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class PhantomSpec:
    """Shape and identity of a phantom series. Same seed and UIDs give the same bytes."""

    slices: int = 64
    rows: int = 512
    columns: int = 512
    pixel_spacing_mm: float = 0.78125
    slice_thickness_mm: float = 2.5
    patient_name: str = "PHANTOM^CT"
    patient_id: str = "PHANTOM-0001"
    study_instance_uid: str = field(default_factory=generate_uid)
    series_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_description: str = "Phantom CT chest-abdomen"
    seed: int = 1
    # Slice k lies at -300 + k * slice_thickness_mm along x (sagittal), y (coronal) or z
    # (axial); the pixels are the same whichever the orientation.
    orientation: Orientation = "axial"


def _ellipse(
    yy: npt.NDArray[np.float64],
    xx: npt.NDArray[np.float64],
    cy: float,
    cx: float,
    ry: float,
    rx: float,
) -> npt.NDArray[np.bool_]:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def phantom_hu_volume(spec: PhantomSpec) -> npt.NDArray[np.int16]:
    """(slices, rows, columns) in HU; slice 0 is the most inferior (lowest z)."""
    rng = np.random.default_rng(spec.seed)
    rows, cols = spec.rows, spec.columns
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = rows / 2, cols / 2
    volume = np.full((spec.slices, rows, cols), -1000, dtype=np.int16)
    for k in range(spec.slices):
        t = k / max(spec.slices - 1, 1)  # 0 = abdomen (inferior), 1 = chest (superior)
        plane = volume[k]
        body = _ellipse(yy, xx, cy, cx, rows * 0.30, cols * 0.40)
        plane[body] = -90  # subcutaneous fat
        plane[_ellipse(yy, xx, cy, cx, rows * 0.27, cols * 0.37)] = 40  # soft tissue
        if t > 0.45:  # lungs in the upper part
            r = 0.08 + 0.10 * min((t - 0.45) / 0.3, 1.0)
            plane[
                _ellipse(yy, xx, cy - rows * 0.02, cx - cols * 0.17, rows * (r + 0.05), cols * r)
            ] = -850
            plane[
                _ellipse(yy, xx, cy - rows * 0.02, cx + cols * 0.17, rows * (r + 0.05), cols * r)
            ] = -850
        if t < 0.6:  # liver (patient's right = image left), spleen, kidneys below
            plane[
                _ellipse(yy, xx, cy - rows * 0.05, cx - cols * 0.18, rows * 0.14, cols * 0.14)
            ] = 60
            plane[
                _ellipse(yy, xx, cy - rows * 0.02, cx + cols * 0.22, rows * 0.07, cols * 0.05)
            ] = 50
        if t < 0.35:
            plane[
                _ellipse(yy, xx, cy + rows * 0.10, cx - cols * 0.11, rows * 0.05, cols * 0.035)
            ] = 30
            plane[
                _ellipse(yy, xx, cy + rows * 0.10, cx + cols * 0.11, rows * 0.05, cols * 0.035)
            ] = 30
        # spine: cortical ring around cancellous bone, behind the centre
        plane[_ellipse(yy, xx, cy + rows * 0.17, cx, rows * 0.045, cols * 0.04)] = 700
        plane[_ellipse(yy, xx, cy + rows * 0.17, cx, rows * 0.03, cols * 0.027)] = 250
        noise = rng.normal(0.0, 12.0, size=(rows, cols)).astype(np.int16)
        plane[body] += noise[body]
    return volume


def phantom_ct_datasets(spec: PhantomSpec) -> Iterator[Dataset]:
    """One CT Image Storage dataset per slice, inferior to superior, with pixel data."""
    hu = phantom_hu_volume(spec)
    sop_uids = [
        generate_uid(entropy_srcs=[spec.series_instance_uid, str(k)]) for k in range(spec.slices)
    ]
    half_width = spec.columns * spec.pixel_spacing_mm / 2
    half_height = spec.rows * spec.pixel_spacing_mm / 2
    if spec.orientation not in _COSINES:
        raise ValueError(f"orientation must be one of {sorted(_COSINES)}, got {spec.orientation!r}")
    row_cosines, column_cosines = _COSINES[spec.orientation]
    for k in range(spec.slices):
        # Rounded: 3 * 0.8 is 2.4000000000000004, too long for a DS (16 characters).
        z = round(-300.0 + k * spec.slice_thickness_mm, 6)
        position = {
            "axial": [-half_width, -half_height, z],
            "sagittal": [z, -half_width, half_height],
            "coronal": [-half_width, z, half_height],
        }[spec.orientation]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uids[k]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "AXIAL"]
            if spec.orientation == "axial"
            else ["DERIVED", "SECONDARY", "REFORMATTED"]
        )
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.StudyDate = "20260101"
        ds.SeriesDate = "20260101"
        ds.ContentDate = "20260101"
        ds.StudyTime = "080000"
        ds.SeriesTime = "080100"
        ds.ContentTime = "080100"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-ai phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Phantom CT"
        ds.SeriesDescription = spec.series_description
        ds.BodyPartExamined = "CHEST"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = spec.slice_thickness_mm
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = spec.study_instance_uid
        ds.SeriesInstanceUID = spec.series_instance_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = (
            [1, 0, 0, 0, 1, 0] if spec.orientation == "axial" else [*row_cosines, *column_cosines]
        )
        ds.FrameOfReferenceUID = spec.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        stored = np.clip(hu[k].astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        yield ds


def write_phantom_ct(directory: Path, spec: PhantomSpec) -> list[Path]:
    """Write the phantom series as one Part 10 file per slice; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in phantom_ct_datasets(spec):
        path = directory / f"CT{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_enhanced_ct(spec: PhantomSpec) -> Dataset:
    """The phantom series as one Legacy Converted Enhanced CT image (frames in slice order),
    in a series of its own whose UIDs derive from ``spec``'s series UID."""
    # highdicom is imported here: the single-frame phantom does not need it.
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    enhanced = LegacyConvertedEnhancedCTImage(
        list(phantom_ct_datasets(spec)),
        series_instance_uid=generate_uid(entropy_srcs=[spec.series_instance_uid, "enhanced"]),
        series_number=3,
        sop_instance_uid=generate_uid(
            entropy_srcs=[spec.series_instance_uid, "enhanced", "instance"]
        ),
        instance_number=1,
    )
    enhanced.SeriesDescription = f"{spec.series_description} (enhanced)"
    return enhanced


def write_phantom_enhanced_ct(directory: Path, spec: PhantomSpec) -> Path:
    """Write :func:`phantom_enhanced_ct` as one Part 10 file; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ECT0001.dcm"
    phantom_enhanced_ct(spec).save_as(path, enforce_file_format=True)
    return path
