"""Write a NIfTI volume as a DICOM MR series (MR Image Storage, one instance per slice).

    from tests.nifti_dicom import MRSeriesSpec, write_nifti_as_mr_series
    paths = write_nifti_as_mr_series(nib.load("t1.nii.gz"), tmp_path / "t1", MRSeriesSpec())

Layout. Slices run along the NIfTI's third axis: instance ``k`` (InstanceNumber ``k + 1``)
holds ``data[:, :, k]``; inside it the NIfTI's first axis runs along a row (column index)
and its second along a column (row index), so the frame is ``data[:, :, k].T``. This is the
layout of :func:`dicom_ai.inference.volume.load_series`, which therefore gives back the
NIfTI's voxels and affine unchanged when the affine is right-handed (``det > 0``, e.g. RAS,
LPS, LSA). A DICOM stack is always right-handed (normal = row x column), so a left-handed
NIfTI (FSL's radiological LAS) loads with its third axis reversed:
:func:`loaded_affine` says which affine to expect.

Geometry comes from the affine (RAS, converted to DICOM's LPS): ImageOrientationPatient
from the first two columns, PixelSpacing from their lengths, ImagePositionPatient from the
origin plus ``k`` times the third column, SliceThickness and SpacingBetweenSlices from the
third column's length. Sheared affines (axes not orthogonal) are refused.

Values. Integer data that fits is stored as is (uint16, else int16) with no rescale; other
data is scaled into uint16 with RescaleSlope/RescaleIntercept giving back the values to
within half a step. Headers are those of a 3-D inversion-prepared gradient echo (MPRAGE-like)
T1 of the head, so routing rules see what a real T1 series carries; the patient and study
are synthetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = ["MRSeriesSpec", "loaded_affine", "nifti_mr_datasets", "write_nifti_as_mr_series"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class MRSeriesSpec:
    """Identity and acquisition headers of the written series (a 3 T MPRAGE by default)."""

    patient_name: str = "SYNTHETIC^BRAIN"
    patient_id: str = "NIFTI-0001"
    study_instance_uid: str = field(default_factory=generate_uid)
    series_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_description: str = "MR Brain"
    series_description: str = "T1 MPRAGE"
    protocol_name: str = "t1_mprage"
    body_part: str = "HEAD"
    series_number: int = 3
    scanning_sequence: tuple[str, ...] = ("GR", "IR")
    sequence_variant: tuple[str, ...] = ("SK", "SP", "MP")
    sequence_name: str = "*tfl3d1"
    acquisition_type: str = "3D"
    repetition_time_ms: float = 2300.0
    echo_time_ms: float = 2.98
    inversion_time_ms: float = 900.0
    flip_angle_deg: float = 9.0
    field_strength_t: float = 3.0


def _ds(value: float) -> DSfloat:
    # At most 16 characters (the DS limit) with as many digits as fit.
    return DSfloat(float(value), auto_format=True)


@dataclass(frozen=True)
class _Geometry:
    row_cosines: npt.NDArray[np.float64]  # LPS direction of the NIfTI's first axis
    column_cosines: npt.NDArray[np.float64]  # ... of its second axis
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    origin: npt.NDArray[np.float64]  # LPS position of voxel (0, 0, 0)
    step: npt.NDArray[np.float64]  # LPS offset from slice k to k + 1
    normal: npt.NDArray[np.float64]

    @classmethod
    def from_affine(cls, affine: npt.NDArray[np.float64]) -> _Geometry:
        lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3]
        axes = lps[:, :3]
        lengths = np.linalg.norm(axes, axis=0)
        if (lengths <= 0).any():
            raise ValueError("the affine has a zero-length axis")
        units = axes / lengths
        gram = units.T @ units
        if np.abs(gram - np.eye(3)).max() > 1e-4:
            raise ValueError("the affine is sheared (axes not orthogonal); DICOM cannot say so")
        normal = np.cross(units[:, 0], units[:, 1])
        return cls(
            row_cosines=units[:, 0],
            column_cosines=units[:, 1],
            pixel_spacing=(float(lengths[1]), float(lengths[0])),
            origin=lps[:, 3],
            step=axes[:, 2],
            normal=normal,
        )


def loaded_affine(affine: npt.NDArray[np.float64], slices: int) -> npt.NDArray[np.float64]:
    """The RAS affine ``load_series`` reports for the written series: the NIfTI's own when it
    is right-handed, else with the third axis reversed (the slices sort along the normal)."""
    result = np.array(affine, dtype=np.float64)
    if np.linalg.det(result[:3, :3]) < 0:
        result[:3, 3] += (slices - 1) * result[:3, 2]
        result[:3, 2] *= -1
    return result


def _stored(
    data: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.uint16] | npt.NDArray[np.int16], float, float]:
    """Stored values, slope, intercept."""
    if not np.isfinite(data).all():
        raise ValueError("the volume has NaN or infinite values")
    low, high = float(data.min()), float(data.max())
    integral = np.issubdtype(data.dtype, np.integer) or bool(np.all(data == np.rint(data)))
    if integral and low >= 0 and high <= np.iinfo(np.uint16).max:
        return data.astype(np.uint16), 1.0, 0.0
    if integral and low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
        return data.astype(np.int16), 1.0, 0.0
    slope = (high - low) / np.iinfo(np.uint16).max if high > low else 1.0
    stored = np.rint((data.astype(np.float64) - low) / slope)
    return stored.astype(np.uint16), slope, low


def nifti_mr_datasets(image: nib.Nifti1Image, spec: MRSeriesSpec) -> list[Dataset]:
    """One MR Image Storage dataset per slice along the NIfTI's third axis, with pixels."""
    data = np.asanyarray(image.dataobj)  # applies scl_slope/scl_inter when set
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"need a 3-D volume, got shape {data.shape}")
    geometry = _Geometry.from_affine(image.affine)
    stored, slope, intercept = _stored(data)
    signed = stored.dtype == np.int16
    values = data.astype(np.float64)
    centre, width = np.percentile(values, 50.0), np.ptp(values) or 1.0
    slice_spacing = float(abs(geometry.step @ geometry.normal))
    columns, rows, slices = data.shape
    sop_uids = [
        generate_uid(entropy_srcs=[spec.series_instance_uid, str(k)]) for k in range(slices)
    ]
    datasets = []
    for k in range(slices):
        ipp = geometry.origin + k * geometry.step
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uids[k]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260102"
        ds.StudyTime = "090000"
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "091500"
        ds.AccessionNumber = "ACCMR0001"
        ds.Modality = "MR"
        ds.Manufacturer = "dicom-ai test"
        ds.ManufacturerModelName = "NIfTI to DICOM"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = spec.study_description
        ds.SeriesDescription = spec.series_description
        ds.ProtocolName = spec.protocol_name
        ds.BodyPartExamined = spec.body_part
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19800101"
        ds.PatientSex = "O"
        ds.ScanningSequence = list(spec.scanning_sequence)
        ds.SequenceVariant = list(spec.sequence_variant)
        ds.ScanOptions = ""  # type 2; Siemens writes IR, which is no defined term
        ds.MRAcquisitionType = spec.acquisition_type
        ds.SequenceName = spec.sequence_name
        ds.AngioFlag = "N"
        ds.SliceThickness = _ds(slice_spacing)
        ds.RepetitionTime = _ds(spec.repetition_time_ms)
        ds.EchoTime = _ds(spec.echo_time_ms)
        if "IR" in spec.scanning_sequence:
            ds.InversionTime = _ds(spec.inversion_time_ms)
        ds.NumberOfAverages = 1
        ds.ImagingFrequency = _ds(42.577478 * spec.field_strength_t)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = _ds(spec.field_strength_t)
        ds.SpacingBetweenSlices = _ds(slice_spacing)
        ds.EchoTrainLength = 1
        ds.FlipAngle = _ds(spec.flip_angle_deg)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = spec.study_instance_uid
        ds.SeriesInstanceUID = spec.series_instance_uid
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = [
            _ds(v) for v in (*geometry.row_cosines, *geometry.column_cosines)
        ]
        ds.FrameOfReferenceUID = spec.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(ipp @ geometry.normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.WindowCenter = _ds(centre)
        ds.WindowWidth = _ds(width)
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets


def write_nifti_as_mr_series(
    image: nib.Nifti1Image | Path, directory: Path, spec: MRSeriesSpec | None = None
) -> list[Path]:
    """Write ``image`` (or the NIfTI file at that path) as Part 10 files; returns the paths."""
    loaded = nib.load(image) if isinstance(image, Path) else image
    assert isinstance(loaded, nib.Nifti1Image | nib.Nifti2Image), type(loaded)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in nifti_mr_datasets(loaded, spec or MRSeriesSpec()):
        path = directory / f"MR{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
