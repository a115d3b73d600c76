"""DICOM series -> MetaTensor: geometry, slice order, rescale, refusals, and the way back."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from monai.transforms.compose import Compose
from monai.transforms.spatial.dictionary import Orientationd, Spacingd
from monai.transforms.utility.dictionary import EnsureChannelFirstd
from pydicom.dataset import Dataset

from dicom_ai.errors import GeometryError, InputError
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
