"""Synthetic MR and CT studies of several series, each on a grid of its own.

Every series of a study images the same phantom in patient space (LPS, mm): an ellipsoid of
``tissue`` in ``background`` (centred at the origin), and optionally bright cubes at known
positions, so a test knows where each structure must land on another series' grid. The
series differ as real sequences do: orientation (axial, sagittal, coronal, oblique), pixel
spacing, slice spacing, rows, columns and field of view (``center``).

Use from a test::

    from tests.studies import AXIAL, SAGITTAL, Cube, SeriesSpec, write_study

    paths = write_study(
        tmp_path,
        [
            SeriesSpec("t1c", "T1 post", rows=40, columns=36, slices=30, orientation=SAGITTAL),
            SeriesSpec("flair", "FLAIR", rows=32, columns=32, slices=8, slice_spacing=5.0),
        ],
    )  # -> {"t1c": [...], "flair": [...]}, each series' files under tmp_path / role

Each voxel's value is the phantom at the voxel's centre (no partial volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = [
    "AXIAL",
    "CORONAL",
    "OBLIQUE",
    "SAGITTAL",
    "Cube",
    "SeriesSpec",
    "phantom",
    "voxel_centres_lps",
    "write_study",
]

# ImageOrientationPatient: row direction, then column direction (LPS).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# Axial tilted by 20 degrees about the patient's left-right axis.
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(np.radians(20))), float(-np.sin(np.radians(20))))

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_CT_INTERCEPT = -1024.0


@dataclass(frozen=True)
class Cube:
    """A bright cube: centre (LPS, mm), half its edge (mm), its value."""

    center: tuple[float, float, float]
    half_size_mm: float
    value: float


@dataclass(frozen=True)
class SeriesSpec:
    """One series of the study: its role (the folder it is written to), description and
    grid, and what of the phantom it shows."""

    role: str
    series_description: str
    rows: int = 32
    columns: int = 32
    slices: int = 16
    pixel_spacing: tuple[float, float] = (2.0, 2.0)  # row spacing, column spacing (mm)
    slice_spacing: float = 2.0
    orientation: tuple[float, ...] = AXIAL
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the grid's centre (LPS, mm)
    modality: str = "MR"
    tissue: float = 400.0  # inside the ellipsoid (MR signal, or HU for CT)
    background: float = 0.0
    cubes: tuple[Cube, ...] = ()
    frame_of_reference_uid: str | None = None  # None: the study's
    mr_acquisition_type: str = "2D"
    series_number: int | None = None  # None: its place in the study, from 1
    semi_axes_mm: tuple[float, float, float] = field(default=(45.0, 55.0, 40.0))


def phantom(spec: SeriesSpec, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The phantom's value at ``points`` (N, 3) in LPS mm, as ``spec`` shows it."""
    inside = ((points / np.asarray(spec.semi_axes_mm)) ** 2).sum(axis=1) < 1
    values = np.where(inside, spec.tissue, spec.background)
    for cube in spec.cubes:
        within = (np.abs(points - np.asarray(cube.center)) <= cube.half_size_mm).all(axis=1)
        values = np.where(within, cube.value, values)
    return values


def voxel_centres_lps(spec: SeriesSpec) -> npt.NDArray[np.float64]:
    """Where each pixel of each slice lies: (slices, rows, columns, 3) in LPS mm."""
    row_dir, column_dir, normal = _axes(spec)
    row_spacing, column_spacing = spec.pixel_spacing
    k, r, c = np.meshgrid(
        np.arange(spec.slices), np.arange(spec.rows), np.arange(spec.columns), indexing="ij"
    )
    origin = _first_position(spec)
    return (
        origin
        + c[..., None] * column_spacing * row_dir
        + r[..., None] * row_spacing * column_dir
        + k[..., None] * spec.slice_spacing * normal
    )


def write_study(
    directory: Path, specs: list[SeriesSpec], *, seed: int = 1
) -> dict[str, list[Path]]:
    """Write each series of one study (one patient, one Frame of Reference unless a spec
    names another) as single-frame DICOM files under ``directory / role``; the paths by
    role, in slice order."""
    roles = [spec.role for spec in specs]
    if len(set(roles)) != len(roles):
        raise ValueError(f"roles must differ: {roles}")
    study_uid = generate_uid(entropy_srcs=["study", str(seed)])
    frame_uid = generate_uid(entropy_srcs=["frame", str(seed)])
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for number, spec in enumerate(specs, start=1):
        ds = _series_header(spec, study_uid, spec.frame_of_reference_uid or frame_uid, seed)
        ds.SeriesNumber = spec.series_number if spec.series_number is not None else number
        centres = voxel_centres_lps(spec)
        values = phantom(spec, centres.reshape(-1, 3)).reshape(centres.shape[:3])
        values = values + rng.normal(0, 2.0, values.shape)  # a little noise, never negative
        _, _, normal = _axes(spec)
        paths = []
        for k in range(spec.slices):
            position = centres[k, 0, 0]
            ds.ImagePositionPatient = [round(float(v), 4) for v in position]
            ds.SliceLocation = round(float(position @ normal), 4)
            stored = values[k] - (_CT_INTERCEPT if spec.modality == "CT" else 0.0)
            ds.PixelData = np.clip(np.rint(stored), 0, 4095).astype(np.uint16).tobytes()
            paths.append(_save(ds, Path(directory) / spec.role, k + 1))
        written[spec.role] = paths
    return written


def _axes(spec: SeriesSpec) -> tuple[npt.NDArray[np.float64], ...]:
    orientation = np.asarray(spec.orientation, dtype=np.float64)
    row_dir, column_dir = orientation[:3], orientation[3:]
    return row_dir, column_dir, np.cross(row_dir, column_dir)


def _first_position(spec: SeriesSpec) -> npt.NDArray[np.float64]:
    """Image Position (Patient) of the first slice: the grid is centred on ``center``."""
    row_dir, column_dir, normal = _axes(spec)
    row_spacing, column_spacing = spec.pixel_spacing
    return (
        np.asarray(spec.center, dtype=np.float64)
        - (spec.columns - 1) / 2 * column_spacing * row_dir
        - (spec.rows - 1) / 2 * row_spacing * column_dir
        - (spec.slices - 1) / 2 * spec.slice_spacing * normal
    )


def _series_header(spec: SeriesSpec, study_uid: str, frame_uid: str, seed: int) -> Dataset:
    sop_class = CT_IMAGE_STORAGE if spec.modality == "CT" else MR_IMAGE_STORAGE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", study_uid, spec.role, str(seed)])
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Modality = spec.modality
    ds.PatientName = "STUDY^SYNTHETIC"
    ds.PatientID = "STUDY-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "100000"
    ds.AccessionNumber = "ACC-STUDY"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesDescription = spec.series_description
    ds.Manufacturer = "dicom-ai test"
    ds.PatientPosition = "HFS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if spec.modality == "CT" else "M", "NONE"]
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.PixelSpacing = list(spec.pixel_spacing)
    ds.SliceThickness = spec.slice_spacing
    ds.ImageOrientationPatient = [round(float(v), 6) for v in spec.orientation]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if spec.modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _CT_INTERCEPT, 1.0, "HU"
        ds.KVP = 120
    else:
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SS"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = spec.mr_acquisition_type
        ds.EchoTrainLength = 1
        ds.RepetitionTime = 3.0
        ds.EchoTime = 1.5
        ds.MagneticFieldStrength = 1.5
    return ds


def _save(ds: Dataset, directory: Path, number: int) -> Path:
    ds.SOPInstanceUID = generate_uid(
        entropy_srcs=[str(ds.SeriesInstanceUID), "instance", str(number)]
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{number:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
