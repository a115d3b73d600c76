"""DICOM series -> MetaTensor: geometry, slice order, rescale, refusals, and the way back;
compressed series; 2-D images for 2-D models."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch
from monai.transforms.compose import Compose
from monai.transforms.spatial.dictionary import Orientationd, Spacingd
from monai.transforms.utility.dictionary import EnsureChannelFirstd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_ai.errors import GeometryError, InputError
from dicom_ai.inference.arena import PrefetchArena
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, phantom_hu_volume

# Non-square, unequal row/column spacing: a swapped axis or spacing cannot pass unnoticed.
SPEC = PhantomSpec(slices=6, rows=40, columns=56, pixel_spacing_mm=1.0, slice_thickness_mm=2.5)
ROW_SPACING, COLUMN_SPACING = 0.7, 0.9  # PixelSpacing = [between rows, between columns]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Edit = Callable[[int, Dataset], None]


def _write(directory: Path, edit: Edit | None = None, spec: PhantomSpec = SPEC) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(phantom_ct_datasets(spec)):
        ds.PixelSpacing = [ROW_SPACING, COLUMN_SPACING]
        if edit is not None:
            edit(k, ds)
        path = directory / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _oriented(row: Iterable[float], column: Iterable[float], origin: Iterable[float]) -> Edit:
    """Put slice k at origin + k * 2.5 mm along row x column, with these cosines."""
    row_v, col_v = np.array(list(row), float), np.array(list(column), float)
    normal, origin_v = np.cross(row_v, col_v), np.array(list(origin), float)

    def edit(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [*row_v.tolist(), *col_v.tolist()]
        ds.ImagePositionPatient = (origin_v + k * 2.5 * normal).tolist()

    return edit


def _lps(volume: SeriesVolume, ijk: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    ras = np.asarray(volume.image.affine, dtype=float) @ np.array([*ijk, 1.0])
    lps: npt.NDArray[np.float64] = (LPS_TO_RAS @ ras)[:3]
    return lps


def _expected_lps(header: Dataset, i: float, j: float) -> npt.NDArray[np.float64]:
    iop = np.array([float(v) for v in header.ImageOrientationPatient])
    ipp = np.array([float(v) for v in header.ImagePositionPatient])
    return ipp + i * COLUMN_SPACING * iop[:3] + j * ROW_SPACING * iop[3:]


def _check_affine(volume: SeriesVolume) -> None:
    for k, header in enumerate(volume.headers):
        for i, j in ((0, 0), (1, 0), (0, 1), (55, 39), (17, 23)):
            np.testing.assert_allclose(
                _lps(volume, (i, j, k)), _expected_lps(header, i, j), atol=1e-6
            )


def test_layout_affine_and_meta(tmp_path: Path) -> None:
    volume = load_series(_write(tmp_path))
    image = volume.image
    assert tuple(image.shape) == (1, SPEC.columns, SPEC.rows, SPEC.slices)
    assert image.dtype == torch.float32
    # voxel (0, 0, 0) is the first slice's IPP (LPS); steps along row, column and slice
    np.testing.assert_allclose(
        _lps(volume, (0, 0, 0)), [float(v) for v in volume.headers[0].ImagePositionPatient]
    )
    np.testing.assert_allclose(_lps(volume, (1, 0, 0)) - _lps(volume, (0, 0, 0)), [0.9, 0, 0])
    np.testing.assert_allclose(_lps(volume, (0, 1, 0)) - _lps(volume, (0, 0, 0)), [0, 0.7, 0])
    np.testing.assert_allclose(_lps(volume, (0, 0, 1)) - _lps(volume, (0, 0, 0)), [0, 0, 2.5])
    _check_affine(volume)
    assert volume.spacing_mm == pytest.approx((0.9, 0.7, 2.5))
    assert image.meta["original_channel_dim"] == 0
    assert image.meta["space"] == "RAS"
    assert list(image.meta["spatial_shape"]) == [SPEC.columns, SPEC.rows, SPEC.slices]
    np.testing.assert_allclose(np.asarray(image.meta["original_affine"]), np.asarray(image.affine))
    # pixels: image[0, i, j, k] is row j, column i of slice k, in HU
    hu = phantom_hu_volume(SPEC)
    np.testing.assert_array_equal(image[0, 7, 3, 2].item(), hu[2, 3, 7])
    np.testing.assert_array_equal(volume.frames, hu.astype(np.float32))
    assert all("PixelData" not in h for h in volume.headers)


def test_shuffled_files_are_sorted_by_position(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    shuffled = paths[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != paths
    volume = load_series(shuffled)
    assert volume.paths == tuple(paths)  # written inferior to superior
    z = [float(h.ImagePositionPatient[2]) for h in volume.headers]
    assert z == sorted(z)
    hu = phantom_hu_volume(SPEC)
    for k, header in enumerate(volume.headers):
        np.testing.assert_array_equal(volume.frames[k], hu[int(header.InstanceNumber) - 1])
    _check_affine(volume)


def test_descending_z_is_sorted_ascending(tmp_path: Path) -> None:
    def reverse(k: int, ds: Dataset) -> None:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], -300.0 - k * 2.5]

    volume = load_series(_write(tmp_path, reverse))
    numbers = [int(h.InstanceNumber) for h in volume.headers]
    assert numbers == list(range(SPEC.slices, 0, -1))
    assert volume.sop_instance_uids == tuple(str(h.SOPInstanceUID) for h in volume.headers)
    np.testing.assert_allclose(_lps(volume, (0, 0, 1)) - _lps(volume, (0, 0, 0)), [0, 0, 2.5])
    hu = phantom_hu_volume(SPEC)
    np.testing.assert_array_equal(volume.frames[0], hu[SPEC.slices - 1])
    _check_affine(volume)


def test_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    def rescale(k: int, ds: Dataset) -> None:
        if k % 2:  # same HU, other encoding: stored = (HU + 2048) / 2
            stored = np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.int32) - 1024
            ds.PixelData = ((stored + 2048) // 2).astype(np.uint16).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = 2, -2048

    volume = load_series(_write(tmp_path, rescale))
    hu = phantom_hu_volume(SPEC).astype(np.float32)
    np.testing.assert_array_equal(volume.frames[0::2], hu[0::2])
    # odd slices lose the lowest bit in the halving; the rescale itself is exact
    np.testing.assert_array_equal(volume.frames[1::2], np.floor(hu[1::2] / 2) * 2)
    assert volume.frames.min() == -1000.0


@pytest.mark.parametrize(
    ("row", "column"),
    [
        pytest.param((0, 1, 0), (0, 0, -1), id="sagittal"),
        pytest.param((1, 0, 0), (0, 0, -1), id="coronal"),
        pytest.param((0.8, 0.6, 0), (0, 0, -1), id="oblique"),
    ],
)
def test_other_orientations(
    tmp_path: Path, row: tuple[float, ...], column: tuple[float, ...]
) -> None:
    volume = load_series(_write(tmp_path, _oriented(row, column, (-20.0, 30.0, 40.0))))
    _check_affine(volume)
    normal = np.cross(row, column)
    step = _lps(volume, (0, 0, 1)) - _lps(volume, (0, 0, 0))
    np.testing.assert_allclose(step, 2.5 * normal, atol=1e-9)
    positions = [np.dot([float(v) for v in h.ImagePositionPatient], normal) for h in volume.headers]
    assert positions == sorted(positions)


def test_monai_transforms_treat_it_as_channel_first_and_invert(tmp_path: Path) -> None:
    volume = load_series(_write(tmp_path))
    pre = Compose(
        [
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS", labels=None),  # from meta "space"
            Spacingd("image", pixdim=(1.8, 1.4, 5.0), mode="nearest"),
        ]
    )
    out = pre({"image": volume.image})
    image = out["image"]
    assert image.shape[0] == 1
    # LPS-stored rows and columns are flipped to RAS: the diagonal becomes positive
    np.testing.assert_allclose(np.diag(np.asarray(image.affine))[:3], [1.8, 1.4, 5.0])
    assert tuple(image.shape[1:3]) == (SPEC.columns // 2, SPEC.rows // 2)
    back = pre.inverse(out)["image"]  # type: ignore[no-untyped-call]
    assert tuple(back.shape) == tuple(volume.image.shape)
    np.testing.assert_allclose(np.asarray(back.affine), np.asarray(volume.image.affine))
    # a 2x nearest round trip keeps the voxels the coarse grid sampled: every other one,
    # counted in RAS (i and j run backwards in the LPS-ordered source, and 56, 40 are even)
    kept = (0, slice(1, None, 2), slice(1, None, 2), slice(0, None, 2))
    np.testing.assert_array_equal(back[kept].numpy(), volume.image[kept].numpy())


def test_frames_from_volume_inverts_the_load_layout(tmp_path: Path) -> None:
    volume = load_series(_write(tmp_path))
    labels = (volume.image > 0).to(torch.uint8) + (volume.image > 500).to(torch.uint8)
    frames = volume.frames_from_volume(labels)
    expected = (volume.frames > 0).astype(np.uint16) + (volume.frames > 500)
    assert frames.shape == (SPEC.slices, SPEC.rows, SPEC.columns)
    assert frames.dtype == np.uint16 and frames.flags.c_contiguous
    np.testing.assert_array_equal(frames, expected)
    assert set(np.unique(frames).tolist()) == {0, 1, 2}
    # (C, R, S) numpy, floats rounded
    np.testing.assert_array_equal(
        volume.frames_from_volume(labels[0].numpy().astype(np.float32) + 0.2), expected
    )
    with pytest.raises(ValueError, match="series grid"):
        volume.frames_from_volume(labels[0, :, :, :-1])
    with pytest.raises(ValueError, match="one channel"):
        volume.frames_from_volume(torch.zeros(2, SPEC.columns, SPEC.rows, SPEC.slices))


def test_load_shares_memory_with_frames(tmp_path: Path) -> None:
    volume = load_series(_write(tmp_path))
    assert np.shares_memory(volume.frames, volume.image.numpy())
    assert volume.frames.flags.c_contiguous


def _shift(k: int, ds: Dataset) -> None:
    # 10 degree gantry tilt: each slice shifts 2.5 * tan(10 deg) mm in y
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + k * 2.5 * np.tan(np.radians(10)), z]


def _one_rotated(k: int, ds: Dataset) -> None:
    if k == 3:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def _one_smaller(k: int, ds: Dataset) -> None:
    if k == 2:
        ds.PixelSpacing = [0.5, 0.5]


def _duplicate(k: int, ds: Dataset) -> None:
    if k == 4:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], -300.0 + 3 * 2.5]


def _gap(k: int, ds: Dataset) -> None:
    if k >= 3:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], -300.0 + (k + 1) * 2.5]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(_shift, "gantry tilt about 10.0 degrees", id="tilt"),
        pytest.param(_one_rotated, "mixed orientations", id="mixed-orientation"),
        pytest.param(_one_smaller, "mixed PixelSpacing", id="mixed-spacing"),
        pytest.param(_duplicate, "share a position", id="duplicate"),
        pytest.param(_gap, "not evenly spaced", id="gap"),
    ],
)
def test_inconsistent_geometry_is_refused(tmp_path: Path, edit: Edit, message: str) -> None:
    with pytest.raises(GeometryError, match=message):
        load_series(_write(tmp_path, edit))


def test_small_jitter_is_accepted(tmp_path: Path) -> None:
    def jitter(k: int, ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + 0.01 * (k % 2), y, z + 0.05 * (k % 2)]

    volume = load_series(_write(tmp_path, jitter))
    assert volume.spacing_mm[2] == pytest.approx(2.5, abs=0.02)


def test_single_slice_and_bad_input_are_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    with pytest.raises(GeometryError, match="at least 2 slices"):
        load_series(paths[:1])
    with pytest.raises(InputError, match="no instances"):
        load_series([])
    with pytest.raises(InputError, match="more than once"):
        load_series([paths[0], paths[0], paths[1]])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InputError, match=r"junk\.dcm"):
        load_series([*paths, junk])


def test_instances_of_two_series_are_refused(tmp_path: Path) -> None:
    first = _write(tmp_path / "a")
    other = _write(tmp_path / "b", spec=PhantomSpec(slices=2, rows=40, columns=56))
    with pytest.raises(InputError, match="different series"):
        load_series([*first, *other])


# --- compressed single-frame series ---------------------------------------------------


def _compress(source: Path, target: Path, transfer_syntax: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax == JPEGLosslessSV1:
        # pydicom has no JPEG Lossless encoder; DCMTK's default lossless mode is process 14 SV1.
        done = subprocess.run(
            ["dcmcjpeg", "+e1", str(source), str(target)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return
    ds = pydicom.dcmread(source)
    ds.compress(transfer_syntax, generate_instance_uid=False)  # lossless: the same image
    ds.save_as(target, enforce_file_format=True)


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        pytest.param(JPEG2000Lossless, id="jpeg2000-lossless"),
        pytest.param(JPEGLSLossless, id="jpeg-ls-lossless"),
        pytest.param(RLELossless, id="rle-lossless"),
        pytest.param(JPEGLosslessSV1, id="jpeg-lossless-process14-sv1"),
    ],
)
def test_compressed_series_load_to_the_same_voxels(tmp_path: Path, transfer_syntax: str) -> None:
    raw = _write(tmp_path / "raw")
    compressed = [tmp_path / "compressed" / p.name for p in raw]
    for source, target in zip(raw, compressed, strict=True):
        _compress(source, target, transfer_syntax)
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in compressed
    }
    assert syntaxes == {transfer_syntax}
    expected = load_series(raw)
    volume = load_series(list(reversed(compressed)))
    np.testing.assert_array_equal(volume.frames, phantom_hu_volume(SPEC).astype(np.float32))
    np.testing.assert_array_equal(volume.frames, expected.frames)
    np.testing.assert_array_equal(
        np.asarray(volume.image.affine), np.asarray(expected.image.affine)
    )
    assert volume.sop_instance_uids == expected.sop_instance_uids
    assert volume.frame_numbers is None


# --- 2-D images -----------------------------------------------------------------------

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
PLANAR_ROWS, PLANAR_COLUMNS = 6, 9


def _planar(
    path: Path,
    stored: npt.NDArray[np.integer[Any]],
    *,
    sop_class: UID = CR_IMAGE_STORAGE,
    modality: str = "CR",
    photometric: str = "MONOCHROME1",
    bits_stored: int = 10,
    signed: bool = False,
    **attributes: Any,
) -> Path:
    """A minimal CR/DX file; ``attributes`` are set on the dataset as given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2001"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2002"
    ds.Modality = modality
    ds.PatientName = "PLANAR^TEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _stored(low: int, high: int) -> npt.NDArray[np.int64]:
    """Rows x columns of distinct values from ``low`` up, ending at ``high``."""
    values = np.linspace(low, high, PLANAR_ROWS * PLANAR_COLUMNS).round().astype(np.int64)
    return values.reshape(PLANAR_ROWS, PLANAR_COLUMNS)


def test_cr_monochrome1_is_inverted_within_the_rescaled_range(tmp_path: Path) -> None:
    stored = _stored(0, 1023)  # BitsStored 10: 0 is white, 1023 black
    path = _planar(
        tmp_path / "cr.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-100,
        PixelSpacing=[0.2, 0.3],
        ImagerPixelSpacing=[0.25, 0.35],
    )
    (planar,) = load_planar_images([path])
    image = planar.image
    assert tuple(image.shape) == (1, PLANAR_COLUMNS, PLANAR_ROWS)
    assert image.dtype == torch.float32
    # rescaled range: 0 * 2 - 100 = -100 .. 1023 * 2 - 100 = 1946; inverted lo + hi - value
    expected = (-100 + 1946) - (stored * 2 - 100)
    np.testing.assert_array_equal(image[0].numpy().T, expected.astype(np.float32))
    assert image[0, 0, 0].item() == 1946.0  # stored 0 (white) is now the brightest
    assert image[0, -1, -1].item() == -100.0  # stored 1023 (black) the darkest
    assert image[0, 1, 0].item() > image[0, 2, 0].item()  # more stored = darker = lower
    # PixelSpacing wins over ImagerPixelSpacing; i runs along a row (column spacing)
    np.testing.assert_allclose(np.asarray(image.affine), np.diag([0.3, 0.2, 1.0]))
    assert planar.sop_instance_uid == str(planar.header.SOPInstanceUID)
    assert planar.path == path
    assert "PixelData" not in planar.header


def test_signed_monochrome1_uses_the_signed_range(tmp_path: Path) -> None:
    stored = _stored(-2048, 2047)
    path = _planar(tmp_path / "cr.dcm", stored, bits_stored=12, signed=True)
    (planar,) = load_planar_images([path])
    # no rescale: lo + hi = -2048 + 2047 = -1
    np.testing.assert_array_equal(planar.image[0].numpy().T, (-1 - stored).astype(np.float32))


def test_monochrome1_with_a_modality_lut(tmp_path: Path) -> None:
    stored = _stored(0, 4095)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "US"
    lut.add_new("LUTData", "US", [2 * v for v in range(4096)])  # stored -> 2 x stored
    path = _planar(tmp_path / "cr.dcm", stored, bits_stored=12, ModalityLUTSequence=[lut])
    (planar,) = load_planar_images([path])
    np.testing.assert_array_equal(planar.image[0].numpy().T, (8190 - 2 * stored).astype(np.float32))


def test_dx_monochrome2_is_kept_and_spaced_by_the_detector(tmp_path: Path) -> None:
    stored = _stored(0, 4095)
    dx = _planar(
        tmp_path / "dx.dcm",
        stored,
        sop_class=DX_FOR_PRESENTATION,
        modality="DX",
        photometric="MONOCHROME2",
        bits_stored=12,
        ImagerPixelSpacing=[0.15, 0.1],
    )
    plain = _planar(tmp_path / "plain.dcm", stored, photometric="MONOCHROME2", bits_stored=12)
    first, second = load_planar_images([dx, plain])
    np.testing.assert_array_equal(first.image[0].numpy().T, stored.astype(np.float32))
    assert first.image[0, 8, 5].item() == stored[5, 8]  # image[0, i, j] is row j, column i
    np.testing.assert_allclose(np.asarray(first.image.affine), np.diag([0.1, 0.15, 1.0]))
    # neither PixelSpacing nor ImagerPixelSpacing: 1 mm
    np.testing.assert_allclose(np.asarray(second.image.affine), np.eye(3))
    assert first.sop_instance_uid != second.sop_instance_uid
    # MONAI's spatial transforms take it as a 2-D channel-first image
    resampled = Spacingd("image", pixdim=(0.2, 0.3), mode="nearest")({"image": first.image})
    # columns: (9 - 1) x 0.1 / 0.2 + 1 = 5; rows: (6 - 1) x 0.15 / 0.3 + 1 = 3.5 -> 4
    assert tuple(resampled["image"].shape) == (1, 5, 4)


def test_colour_multiframe_and_undecodable_planar_images_are_refused(tmp_path: Path) -> None:
    stored = _stored(0, 255)
    rgb = tmp_path / "rgb.dcm"
    _planar(rgb, stored, photometric="MONOCHROME2")
    ds = pydicom.dcmread(rgb)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.repeat(stored.astype(np.uint8)[..., None], 3, axis=2).tobytes()
    ds.save_as(rgb, enforce_file_format=True)
    with pytest.raises(InputError, match="grayscale"):
        load_planar_images([rgb])
    palette = _planar(tmp_path / "palette.dcm", stored, photometric="PALETTE COLOR")
    with pytest.raises(InputError, match="PALETTE COLOR"):
        load_planar_images([palette])
    frames = np.concatenate([stored, stored])
    multiframe = _planar(tmp_path / "mf.dcm", frames, photometric="MONOCHROME2")
    ds = pydicom.dcmread(multiframe)
    ds.Rows, ds.NumberOfFrames = PLANAR_ROWS, 2
    ds.save_as(multiframe, enforce_file_format=True)
    with pytest.raises(InputError, match="multi-frame"):
        load_planar_images([multiframe])
    truncated = _planar(tmp_path / "short.dcm", stored, photometric="MONOCHROME2")
    ds = pydicom.dcmread(truncated)
    ds.PixelData = ds.PixelData[:20]
    ds.save_as(truncated, enforce_file_format=True)
    with pytest.raises(InputError, match="cannot be decoded"):
        load_planar_images([truncated])
    with pytest.raises(InputError, match="no instances"):
        load_planar_images([])


@pytest.fixture
def arena() -> PrefetchArena:
    return PrefetchArena(16 << 20)


def _decoding_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded again although prefetched")

    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    monkeypatch.setattr("dicom_ai.inference.pixels.native_pixels", refuse)


def _memory(arena: PrefetchArena) -> npt.NDArray[np.float32]:
    memory = arena._arena
    assert memory is not None
    return memory


def test_prefetched_instances_load_without_reading_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena: PrefetchArena
) -> None:
    paths = _write(tmp_path / "ct")
    expected = load_series(paths).frames.copy()
    assert arena.prefetch(paths[:4]) == 4
    assert arena.prefetch(paths) == len(paths) - 4  # cached: not read twice
    _decoding_forbidden(monkeypatch)
    volume = load_series(list(reversed(paths)), arena)
    np.testing.assert_array_equal(volume.frames, expected)
    assert volume.frames.base is not None  # a view of the buffer prefetch made ready
    assert all("PixelData" not in header for header in volume.headers)
    # Each prefetched instance serves one load; the next one reads the files.
    with pytest.raises(InputError, match="decoded again"):
        load_series(paths, arena)


def test_without_the_arena_a_load_reads_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena: PrefetchArena
) -> None:
    paths = _write(tmp_path / "ct")
    arena.prefetch(paths)
    _decoding_forbidden(monkeypatch)
    with pytest.raises(InputError, match="decoded again"):
        load_series(paths)  # another worker's arena, or none: nothing is shared


def test_an_instance_received_again_after_prefetch_is_read_afresh(
    tmp_path: Path, arena: PrefetchArena
) -> None:
    import os

    paths = _write(tmp_path / "ct")
    arena.prefetch(paths)
    ds = pydicom.dcmread(paths[2])
    arr = ds.pixel_array.copy()
    arr[:] = 123
    ds.PixelData = arr.tobytes()
    ds.save_as(paths[2], enforce_file_format=True)
    os.utime(paths[2], ns=(1, 1))  # a different mtime even on a coarse clock
    volume = load_series(paths, arena)
    k = [str(h.SOPInstanceUID) for h in volume.headers].index(str(ds.SOPInstanceUID))
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume.frames[k], 123 * slope + intercept)


@pytest.mark.parametrize(
    ("allocated", "stored", "signed", "shape"),
    [
        (16, 16, True, (40, 56)),
        (16, 12, True, (40, 56)),  # high bits set at random: sign-extended from bit 11
        (16, 12, False, (300, 300)),  # deferred (over 64 KiB): read from the file
        (8, 8, False, (5, 7)),  # odd length: one pad byte
        (8, 6, True, (300, 300)),
        (32, 32, False, (20, 24)),
        (32, 20, True, (20, 24)),
    ],
)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixels_are_what_pydicom_decodes(
    tmp_path: Path,
    allocated: int,
    stored: int,
    signed: bool,
    shape: tuple[int, int],
    syntax: UID,
) -> None:
    from dicom_ai.inference.pixels import decode_single, native_pixels, read_header

    ds = next(iter(phantom_ct_datasets(SPEC)))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    raw = np.random.default_rng(allocated + stored).integers(
        0, 256, size=shape[0] * shape[1] * allocated // 8, dtype=np.uint8
    )
    ds.PixelData = raw.tobytes() + (b"\0" if raw.size % 2 else b"")
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    expected = pydicom.dcmread(path).pixel_array

    native = native_pixels(read_header(path), path)
    assert native is not None  # the fast path was taken, not pydicom's
    assert native.dtype == expected.dtype
    np.testing.assert_array_equal(native, expected)
    np.testing.assert_array_equal(decode_single(read_header(path), path), expected)


def test_other_pixel_encodings_are_left_to_pydicom(tmp_path: Path) -> None:
    from dicom_ai.inference.pixels import decode_single, native_pixels, read_header

    big, short = list(phantom_ct_datasets(SPEC))[:2]
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    short.PixelData = short.PixelData[:-100]  # shorter than Rows x Columns
    for name, ds in (("big.dcm", big), ("short.dcm", short)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
    path = tmp_path / "big.dcm"
    assert native_pixels(read_header(path), path) is None
    np.testing.assert_array_equal(
        decode_single(read_header(path), path), pydicom.dcmread(path).pixel_array
    )
    path = tmp_path / "short.dcm"
    assert native_pixels(read_header(path), path) is None
    with pytest.raises(InputError, match="cannot be decoded"):
        decode_single(read_header(path), path)


@pytest.mark.parametrize("arrival", ["in order", "reversed", "shuffled", "half"])
def test_a_prefetched_series_becomes_its_volume_in_place(
    tmp_path: Path, arrival: str, arena: PrefetchArena
) -> None:
    paths = _write(tmp_path / "ct", spec=PhantomSpec(slices=9, rows=40, columns=56))
    expected = load_series(paths).frames.copy()
    order = {
        "in order": paths,
        "reversed": paths[::-1],
        "shuffled": random.Random(3).sample(paths, len(paths)),
        "half": random.Random(4).sample(paths, 5),  # the job decodes the other 4 itself
    }[arrival]
    for path in order:  # one at a time, as the receiver stores them
        assert arena.prefetch([path]) == 1
    volume = load_series(paths, arena)
    np.testing.assert_array_equal(volume.frames, expected)
    assert np.shares_memory(volume.frames, _memory(arena))  # no copy: planes put in place


def test_planes_of_another_series_in_between_are_copied_out(
    tmp_path: Path, arena: PrefetchArena
) -> None:
    paths = _write(tmp_path / "a")
    other = _write(tmp_path / "b", spec=PhantomSpec(slices=3, rows=40, columns=56, seed=9))
    expected = load_series(paths).frames.copy()
    arena.prefetch(paths[:3])
    arena.prefetch(other)  # a second series arriving at once, on the same worker
    arena.prefetch(paths[3:])
    arena.keep_only(paths)  # its job starts
    volume = load_series(paths, arena)
    np.testing.assert_array_equal(volume.frames, expected)
    assert not np.shares_memory(volume.frames, _memory(arena))


def test_a_job_keeps_only_its_own_series_prefetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena: PrefetchArena
) -> None:
    paths = _write(tmp_path / "a")
    other = _write(tmp_path / "b", spec=PhantomSpec(slices=3, rows=40, columns=56, seed=9))
    expected = load_series(paths).frames.copy()
    arena.prefetch(other)
    arena.prefetch(paths)
    arena.keep_only(paths)
    assert all(path in arena for path in paths)
    assert not any(path in arena for path in other)
    _decoding_forbidden(monkeypatch)
    np.testing.assert_array_equal(load_series(paths, arena).frames, expected)
    with pytest.raises(InputError, match="decoded again"):
        load_series(other, arena)  # dropped: it would be read from its files


def test_release_forgets_what_was_prefetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena: PrefetchArena
) -> None:
    paths = _write(tmp_path / "ct")
    assert not arena
    arena.prefetch(paths)
    assert arena and all(path in arena for path in paths)
    arena.release()
    assert not arena and not any(path in arena for path in paths)
    _decoding_forbidden(monkeypatch)
    with pytest.raises(InputError, match="decoded again"):
        load_series(paths, arena)


def test_the_arena_is_reused_after_each_job(tmp_path: Path, arena: PrefetchArena) -> None:
    first = _write(tmp_path / "a")
    second = _write(tmp_path / "b", spec=PhantomSpec(slices=6, rows=40, columns=56, seed=9))
    expected = load_series(second).frames.copy()
    arena.prefetch(first)
    start = load_series(first, arena).frames.__array_interface__["data"][0]
    arena.release()  # the job is done
    arena.prefetch(second)
    volume = load_series(second, arena)
    np.testing.assert_array_equal(volume.frames, expected)
    assert volume.frames.__array_interface__["data"][0] == start  # the same memory again


def test_what_does_not_fit_in_the_arena_is_read_by_the_job(tmp_path: Path) -> None:
    plane = SPEC.rows * SPEC.columns
    arena = PrefetchArena(capacity_bytes=4 * plane * 4)  # four planes of float32
    paths = _write(tmp_path / "ct")  # six
    expected = load_series(paths).frames.copy()
    assert arena.prefetch(paths) == 4
    assert paths[3] in arena and paths[4] not in arena
    volume = load_series(paths, arena)
    np.testing.assert_array_equal(volume.frames, expected)
    assert not np.shares_memory(volume.frames, _memory(arena))


def test_warming_touches_the_arena_past_the_planes_up_to_its_size(tmp_path: Path) -> None:
    plane = 40 * 56
    arena = PrefetchArena(capacity_bytes=64 * plane * 4)
    paths = _write(tmp_path / "ct", spec=PhantomSpec(slices=6, rows=40, columns=56))
    expected = load_series(paths).frames.copy()
    arena.prefetch(paths[:3])  # planes 0-2 of the arena
    memory = _memory(arena)
    memory[3 * plane :] = np.nan  # stands for memory never touched
    size, step = 12 * plane * 4, plane * 4  # bytes: 12 planes, one per call
    calls = 1
    while arena.warm(size, step):
        calls += 1
    assert calls == 9  # planes 3-11; the planes already there are not written over
    assert np.all(memory[3 * plane : 12 * plane] == 0)
    assert np.isnan(memory[12 * plane :]).all()  # no further than asked
    arena.prefetch(paths[3:])
    loaded = load_series(paths, arena)
    np.testing.assert_array_equal(loaded.frames, expected)
    assert np.shares_memory(loaded.frames, memory)
    arena.release()
    assert not arena.warm(size, step)  # touched by now: nothing left to do


def test_warming_stops_at_the_capacity() -> None:
    arena = PrefetchArena(capacity_bytes=4 << 10)
    calls = 1
    while arena.warm(1 << 30, 1 << 10):
        calls += 1
    assert calls == 4
    assert np.all(_memory(arena) == 0)
    assert not arena.warm(1 << 30, 1 << 10)


def test_planar_images_are_decoded_as_stored_even_when_prefetched(
    tmp_path: Path, arena: PrefetchArena
) -> None:
    stored = _stored(0, 1023)
    path = _planar(tmp_path / "cr.dcm", stored, RescaleSlope=2, RescaleIntercept=-7)
    expected = load_planar_images([path])[0].image.clone()
    assert arena.prefetch([path]) == 1  # cached rescaled, which the planar path must not use
    image = load_planar_images([path], arena)[0].image
    assert torch.equal(image, expected)


def test_read_ahead_is_advice_only(tmp_path: Path, arena: PrefetchArena) -> None:
    from dicom_ai.inference.pixels import read_ahead

    paths = _write(tmp_path / "ct")
    expected = load_series(paths).frames.copy()
    read_ahead([tmp_path / "gone.dcm", *paths])  # a missing file is the loader's to report
    arena.prefetch(paths[:2])
    arena.read_ahead([tmp_path / "gone.dcm", *paths])
    np.testing.assert_array_equal(load_series(paths).frames, expected)
