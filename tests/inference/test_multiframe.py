"""Enhanced (multi-frame) CT/MR instances as volumes: per-frame geometry from the functional
groups, the same sorting and refusals as single-frame series, one decode per instance.

Test data: pydicom-data's ``eCT_Supplemental.dcm`` (Enhanced CT, 2 frames of 512 x 512,
10 mm apart, stored superior to inferior) loads; its ``emri_small*.dcm`` (Enhanced MR, 10
frames of 64 x 64 in five transfer syntaxes) have no functional groups at all, so no frame
has a position: they are refused, and load once the groups are added. The phantom converted
by highdicom into a Legacy Converted Enhanced CT image must load to exactly the voxels and
affine of the single-frame phantom.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from dicom_ai.errors import GeometryError, InputError
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.synthetic import (
    PhantomSpec,
    phantom_ct_datasets,
    phantom_enhanced_ct,
    phantom_hu_volume,
    write_phantom_ct,
)

SPEC = PhantomSpec(
    slices=6,
    rows=40,
    columns=56,
    pixel_spacing_mm=0.75,  # exact in binary: positions stay short decimal strings
    slice_thickness_mm=2.5,
    study_instance_uid="1.2.826.0.1.3680043.8.498.3001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.3002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3003",
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
EMRI = (
    "emri_small.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_big_endian.dcm",
)

Edit = Callable[[Dataset], None]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data has no {name}"
    return Path(path)


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _enhanced(directory: Path, edit: Edit | None = None) -> Path:
    ds = phantom_enhanced_ct(SPEC)
    if edit is not None:
        edit(ds)
    return _save(ds, directory / "enhanced.dcm")


def _lps(volume: SeriesVolume, ijk: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    ras = np.asarray(volume.image.affine, dtype=float) @ np.array([*ijk, 1.0])
    lps: npt.NDArray[np.float64] = (LPS_TO_RAS @ ras)[:3]
    return lps


def _frame_ipp(ds: Dataset, number: int) -> list[float]:
    item = ds.PerFrameFunctionalGroupsSequence[number - 1]
    return [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]


def _per_frame(ds: Dataset, sequence: str) -> None:
    """Move a shared functional group into every frame's item, as some scanners write it."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    value = shared[sequence].value[0]
    for item in ds.PerFrameFunctionalGroupsSequence:
        copy = Dataset()
        for element in value:
            copy.add_new(element.tag, element.VR, element.value)
        setattr(item, sequence, [copy])
    delattr(shared, sequence)


# --- what the test files contain ------------------------------------------------------


def test_ect_supplemental_is_two_frames_of_one_stack() -> None:
    ds = pydicom.dcmread(_testdata("eCT_Supplemental.dcm"), stop_before_pixels=True)
    assert ds.SOPClassUID.name == "Enhanced CT Image Storage"
    assert int(ds.NumberOfFrames) == 2 and (ds.Rows, ds.Columns) == (512, 512)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.388672] * 2
    assert _frame_ipp(ds, 1) == [99.5, -301.5, -159.0]
    assert _frame_ipp(ds, 2) == [99.5, -301.5, -149.0]


@pytest.mark.parametrize("name", EMRI)
def test_emri_small_has_no_functional_groups(name: str) -> None:
    ds = pydicom.dcmread(_testdata(name), stop_before_pixels=True)
    assert ds.SOPClassUID.name == "Enhanced MR Image Storage"
    assert int(ds.NumberOfFrames) == 10 and (ds.Rows, ds.Columns) == (64, 64)
    assert "PerFrameFunctionalGroupsSequence" not in ds
    assert "SharedFunctionalGroupsSequence" not in ds


# --- loading ----------------------------------------------------------------------------


def test_ect_supplemental_loads_as_a_two_slice_volume() -> None:
    path = _testdata("eCT_Supplemental.dcm")
    volume = load_series([path])
    full = pydicom.dcmread(path)
    assert tuple(volume.image.shape) == (1, 512, 512, 2)
    # Normal = row x column cosines = (-1, 0, 0) x (0, 1, 0) = (0, 0, -1): frame 2 (z = -149)
    # comes first along it.
    assert volume.frame_numbers == (2, 1)
    assert volume.sop_instance_uids == (str(full.SOPInstanceUID),) * 2
    assert volume.headers[0] is volume.headers[1]
    assert "PixelData" not in volume.headers[0]
    assert volume.paths == (path, path)
    assert volume.spacing_mm == pytest.approx((0.388672, 0.388672, 10.0))
    for k, number in enumerate(volume.frame_numbers):
        np.testing.assert_allclose(_lps(volume, (0, 0, k)), _frame_ipp(full, number))
        # Pixel Value Transformation: slope 1, intercept -1024
        expected = full.pixel_array[number - 1].astype(np.float32) - 1024
        np.testing.assert_array_equal(volume.frames[k], expected)
    np.testing.assert_allclose(
        _lps(volume, (1, 0, 0)) - _lps(volume, (0, 0, 0)), [-0.388672, 0, 0], atol=1e-9
    )
    np.testing.assert_allclose(
        _lps(volume, (0, 1, 0)) - _lps(volume, (0, 0, 0)), [0, 0.388672, 0], atol=1e-9
    )


@pytest.mark.parametrize("name", EMRI)
def test_emri_small_is_refused_for_want_of_frame_positions(name: str) -> None:
    with pytest.raises(GeometryError, match="without Per-Frame Functional Groups"):
        load_series([_testdata(name)])


def _with_functional_groups(ds: Dataset) -> None:
    """Give emri_small a stack: frame n at z = 1.2 * (10 - n), so frame 10 is lowest;
    stored values are rescaled 2 x stored - 5."""
    shared = Dataset()
    orientation, measures, transformation = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [0.9, 0.7]
    measures.SliceThickness = 1.2
    transformation.RescaleSlope, transformation.RescaleIntercept = 2, -5
    transformation.RescaleType = "US"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transformation]
    ds.SharedFunctionalGroupsSequence = [shared]
    items = []
    for number in range(1, 11):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [-20.0, -30.0, 1.2 * (10 - number)]
        item.PlanePositionSequence = [position]
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = items


@pytest.mark.parametrize("name", EMRI)
def test_emri_small_with_functional_groups_loads_in_every_transfer_syntax(
    tmp_path: Path, name: str
) -> None:
    reference = pydicom.dcmread(_testdata("emri_small.dcm")).pixel_array
    ds = pydicom.dcmread(_testdata(name))
    syntax = ds.file_meta.TransferSyntaxUID
    _with_functional_groups(ds)
    path = _save(ds, tmp_path / name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    volume = load_series([path])
    assert volume.frame_numbers == tuple(range(10, 0, -1))
    assert volume.spacing_mm == pytest.approx((0.7, 0.9, 1.2))
    expected = reference[::-1].astype(np.float32) * 2 - 5
    np.testing.assert_array_equal(volume.frames, expected)


def test_legacy_converted_phantom_matches_the_single_frame_series(tmp_path: Path) -> None:
    single = load_series(write_phantom_ct(tmp_path / "single", SPEC))
    path = _enhanced(tmp_path)
    enhanced = load_series([path])
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID.name == (
        "Legacy Converted Enhanced CT Image Storage"
    )
    # highdicom stores the frames superior to inferior: the last frame is the lowest slice
    assert enhanced.frame_numbers == tuple(range(SPEC.slices, 0, -1))
    assert single.frame_numbers is None
    np.testing.assert_array_equal(enhanced.frames, single.frames)
    np.testing.assert_array_equal(enhanced.frames, phantom_hu_volume(SPEC).astype(np.float32))
    np.testing.assert_allclose(
        np.asarray(enhanced.image.affine), np.asarray(single.image.affine), atol=1e-9
    )
    assert enhanced.spacing_mm == pytest.approx(single.spacing_mm)
    assert len(set(enhanced.sop_instance_uids)) == 1
    assert all(h is enhanced.headers[0] for h in enhanced.headers)
    assert "PixelData" not in enhanced.headers[0]


def _split_series(directory: Path) -> tuple[Path, Path]:
    """The phantom as two Legacy Converted Enhanced CT instances of one series."""
    datasets = list(phantom_ct_datasets(SPEC))
    paths = []
    for number, part in enumerate((datasets[:3], datasets[3:]), start=1):
        ds = LegacyConvertedEnhancedCTImage(
            part,
            series_instance_uid=generate_uid(entropy_srcs=[SPEC.series_instance_uid, "split"]),
            series_number=4,
            sop_instance_uid=generate_uid(entropy_srcs=[SPEC.series_instance_uid, str(number)]),
            instance_number=number,
        )
        paths.append(_save(ds, directory / f"part{number}.dcm"))
    return paths[0], paths[1]


def test_several_enhanced_instances_form_one_volume(tmp_path: Path) -> None:
    first, second = _split_series(tmp_path)
    volume = load_series([second, first])
    uid_a = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    uid_b = str(pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID)
    assert volume.sop_instance_uids == (uid_a,) * 3 + (uid_b,) * 3
    assert volume.frame_numbers == (3, 2, 1, 3, 2, 1)
    assert volume.paths == (first,) * 3 + (second,) * 3
    np.testing.assert_array_equal(volume.frames, phantom_hu_volume(SPEC).astype(np.float32))


def test_each_instance_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = iter_pixels

    def counting(src: Path, **kwargs: Any) -> Iterator[npt.NDArray[Any]]:
        calls.append(Path(src))
        return real(src, **kwargs)

    def no_whole_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("multi-frame pixels must be decoded frame by frame")

    monkeypatch.setattr("dicom_ai.inference.pixels.iter_pixels", counting)
    monkeypatch.setattr(Dataset, "pixel_array", property(no_whole_decode))
    first, second = _split_series(tmp_path)
    load_series([first, second])
    assert sorted(calls) == sorted([first, second])


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        pytest.param(JPEGLSLossless, id="jpeg-ls-lossless"),
        pytest.param(JPEG2000Lossless, id="jpeg2000-lossless"),
        pytest.param(RLELossless, id="rle-lossless"),
    ],
)
def test_compressed_enhanced_image_loads_to_the_same_voxels(
    tmp_path: Path, transfer_syntax: str
) -> None:
    def compress(ds: Dataset) -> None:
        ds.compress(transfer_syntax, generate_instance_uid=False)

    path = _enhanced(tmp_path, compress)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax
    volume = load_series([path])
    np.testing.assert_array_equal(volume.frames, phantom_hu_volume(SPEC).astype(np.float32))


def test_per_frame_orientation_measures_and_rescale(tmp_path: Path) -> None:
    def edit(ds: Dataset) -> None:
        _per_frame(ds, "PlaneOrientationSequence")
        _per_frame(ds, "PixelMeasuresSequence")
        _per_frame(ds, "PixelValueTransformationSequence")
        pixels = ds.pixel_array.astype(np.int32)
        for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            if index % 2:  # same HU, other encoding: stored = (HU + 2048) / 2
                pixels[index] = (pixels[index] - 1024 + 2048) // 2
                transformation = item.PixelValueTransformationSequence[0]
                transformation.RescaleSlope, transformation.RescaleIntercept = 2, -2048
        ds.PixelData = pixels.astype(np.uint16).tobytes()

    volume = load_series([_enhanced(tmp_path, edit)])
    assert volume.frame_numbers is not None
    hu = phantom_hu_volume(SPEC).astype(np.float32)
    for k, number in enumerate(volume.frame_numbers):
        # odd frames lose the lowest bit in the halving; the rescale itself is exact
        expected = np.floor(hu[k] / 2) * 2 if (number - 1) % 2 else hu[k]
        np.testing.assert_array_equal(volume.frames[k], expected)
    assert volume.spacing_mm == pytest.approx((0.75, 0.75, 2.5))


# --- refusals ---------------------------------------------------------------------------


def _move_frame(number: int, shift: Callable[[list[float]], list[float]]) -> Edit:
    def edit(ds: Dataset) -> None:
        position = ds.PerFrameFunctionalGroupsSequence[number - 1].PlanePositionSequence[0]
        position.ImagePositionPatient = shift([float(v) for v in position.ImagePositionPatient])

    return edit


def _tilt(ds: Dataset) -> None:
    # 10 degree gantry tilt: each frame shifts 2.5 * tan(10 deg) mm in y
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        x, y, z = (float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        shifted = [x, y + index * 2.5 * np.tan(np.radians(10)), z]
        item.PlanePositionSequence[0].ImagePositionPatient = shifted


def _one_rotated(ds: Dataset) -> None:
    _per_frame(ds, "PlaneOrientationSequence")
    item = ds.PerFrameFunctionalGroupsSequence[3]
    item.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def _one_finer(ds: Dataset) -> None:
    _per_frame(ds, "PixelMeasuresSequence")
    ds.PerFrameFunctionalGroupsSequence[2].PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.5]


def _no_position(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence


def _one_item_short(ds: Dataset) -> None:
    ds.PerFrameFunctionalGroupsSequence = list(ds.PerFrameFunctionalGroupsSequence)[:-1]


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        pytest.param(_tilt, GeometryError, "gantry tilt about 10.0 degrees", id="tilt"),
        pytest.param(_one_rotated, GeometryError, "mixed orientations", id="mixed-orientation"),
        pytest.param(_one_finer, GeometryError, "mixed PixelSpacing", id="mixed-spacing"),
        pytest.param(
            _move_frame(5, lambda p: [p[0], p[1], p[2] - 2.5]),
            GeometryError,
            "share a position",
            id="duplicate",
        ),
        pytest.param(
            _move_frame(1, lambda p: [p[0], p[1], p[2] + 2.5]),  # frame 1 is the top
            GeometryError,
            "not evenly spaced",
            id="gap",
        ),
        pytest.param(
            _no_position,
            GeometryError,
            r"frame 3: no ImagePositionPatient \(PlanePositionSequence\)",
            id="no-position",
        ),
        pytest.param(
            _one_item_short, GeometryError, "5 Per-Frame Functional Groups items", id="items"
        ),
    ],
)
def test_inconsistent_enhanced_geometry_is_refused(
    tmp_path: Path, edit: Edit, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        load_series([_enhanced(tmp_path, edit)])


def test_one_frame_and_mixed_instances_are_refused(tmp_path: Path) -> None:
    one = LegacyConvertedEnhancedCTImage(
        list(phantom_ct_datasets(SPEC))[:1],
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    with pytest.raises(GeometryError, match=r"at least 2 slices.*got 1"):
        load_series([_save(one, tmp_path / "one.dcm")])

    def same_series(ds: Dataset) -> None:
        ds.SeriesInstanceUID = SPEC.series_instance_uid

    single = write_phantom_ct(tmp_path / "single", SPEC)
    with pytest.raises(InputError, match="mixes single-frame and multi-frame"):
        load_series([*single, _enhanced(tmp_path, same_series)])
