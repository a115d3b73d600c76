"""The bundle-loader stand-in: the node's decoded series give the rest of a bundle's chain
what MONAI's own loader gives for the same voxels and affine written as NIfTI."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose
from monai.transforms.io.array import LoadImage
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.utility.dictionary import EnsureChannelFirstd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_ai.errors import InputError, ModelError
from dicom_ai.inference.loader import (
    SeriesLoadImage,
    SeriesLoadImaged,
    series_loader,
    series_loaders,
)
from dicom_ai.inference.planar import (
    PlanarImage,
    cine_series,
    load_planar_images,
    with_channels,
)
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

BUNDLES = Path("/work/shared/monai-bundles")
SPEC = PhantomSpec(slices=6, rows=20, columns=28, pixel_spacing_mm=1.0, slice_thickness_mm=2.5)
ROW_SPACING, COLUMN_SPACING = 0.7, 0.9

Edit = Callable[[int, Dataset], None]


def _oriented(row: tuple[float, ...], column: tuple[float, ...]) -> Edit:
    row_v, column_v = np.array(row), np.array(column)
    normal = np.cross(row_v, column_v)

    def edit(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [*row_v.tolist(), *column_v.tolist()]
        # written in descending order along the normal: the loader must sort them
        ds.ImagePositionPatient = (np.array([-20.0, 30.0, 40.0]) - k * 2.5 * normal).tolist()

    return edit


ORIENTATIONS = {
    "axial": None,
    # rows run right to left and columns anterior to posterior: x and y flipped
    "flipped": _oriented((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "oblique": _oriented((0.8, 0.6, 0.0), (0.0, 0.0, -1.0)),
}


def _series(directory: Path, edit: Edit | None) -> SeriesVolume:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(phantom_ct_datasets(SPEC)):
        ds.PixelSpacing = [ROW_SPACING, COLUMN_SPACING]
        if edit is not None:
            edit(k, ds)
        path = directory / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return load_series(paths)


def _nifti(image: MetaTensor, path: Path) -> str:
    """The node's image as the NIfTI a converter would write: the voxels, channels last
    (none for one channel), and the affine."""
    data = image.as_tensor().numpy()
    array = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    affine = np.eye(4)
    a = np.asarray(image.affine, dtype=np.float64)
    if a.shape == (3, 3):  # a 2-D image's affine
        affine[:2, :2], affine[:2, 3] = a[:2, :2], a[:2, 2]
    else:
        affine = a
    nib.Nifti1Image(np.ascontiguousarray(array), affine).to_filename(path)
    return str(path)


def _assert_meta_equal(expected: dict[str, Any], actual: dict[str, Any], name: str) -> None:
    assert set(expected) == set(actual)
    for key, want in expected.items():
        got = actual[key]
        if key == "filename_or_obj":
            assert got == name
        elif key == "affine":
            # a NIfTI file stores the affine as float32; the node keeps its float64 one
            assert got.dtype == want.dtype == torch.float64
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        elif isinstance(want, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype == want.dtype, key
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=key)
        elif isinstance(want, float) and math.isnan(want):
            assert isinstance(got, float) and math.isnan(got), key
        else:
            assert type(got) is type(want) and got == want, key


def _assert_same_image(expected: Any, actual: Any, name: str) -> None:
    assert isinstance(actual, MetaTensor) and isinstance(expected, MetaTensor)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert torch.equal(actual.as_tensor(), expected.as_tensor())
    _assert_meta_equal(expected.meta, actual.meta, name)


@pytest.fixture(params=list(ORIENTATIONS), scope="module")
def volume(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp(request.param)
    return _series(directory, ORIENTATIONS[request.param])


@pytest.fixture
def nifti(volume: SeriesVolume, tmp_path: Path) -> str:
    return _nifti(volume.image, tmp_path / "series.nii")


def _uid(volume: SeriesVolume) -> str:
    return str(volume.headers[0].SeriesInstanceUID)


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"image_only": False},
        {"image_only": False, "meta_key_postfix": "header"},
        {"image_only": False, "meta_keys": "image_info"},
        {"ensure_channel_first": True},
        {"dtype": None},
        {"dtype": np.float16},
        {"simple_keys": True},
        {"prune_meta_pattern": ".*_code$", "prune_meta_sep": " "},
        # the bundle's own NibabelReader options apply (reoriented: flipped views)
        {"reader": "NibabelReader", "as_closest_canonical": True},
    ],
    ids=repr,
)
def test_dict_loader_gives_what_loadimaged_gives_for_the_nifti(
    volume: SeriesVolume, nifti: str, arguments: dict[str, Any]
) -> None:
    loader = LoadImaged("image", **arguments)
    expected = loader({"image": nifti, "other": 3})
    before = volume.image.as_tensor().clone()
    actual = series_loader(loader)({"image": volume.image, "other": 3})
    assert set(actual) == set(expected)
    assert actual["other"] == 3
    _assert_same_image(expected["image"], actual["image"], _uid(volume))
    for key in set(expected) - {"image", "other"}:  # the meta dict, where image_only=False
        _assert_meta_equal(expected[key], actual[key], _uid(volume))
    # the bundle may write in place: never into the node's volume
    assert not np.may_share_memory(actual["image"].numpy(), volume.image.numpy())
    actual["image"].fill_(0)
    assert torch.equal(volume.image.as_tensor(), before)


@pytest.mark.parametrize(
    "arguments", [{}, {"image_only": False}, {"ensure_channel_first": True}], ids=repr
)
def test_array_loader_gives_what_loadimage_gives_for_the_nifti(
    volume: SeriesVolume, nifti: str, arguments: dict[str, Any]
) -> None:
    loader = LoadImage(**arguments)
    expected, actual = loader(nifti), series_loader(loader)(volume.image)
    if arguments.get("image_only") is False:
        assert isinstance(actual, tuple)
        _assert_meta_equal(expected[1], actual[1], _uid(volume))
        expected, actual = expected[0], actual[0]
    _assert_same_image(expected, actual, _uid(volume))


def test_loaded_volume_is_the_series_without_a_channel(volume: SeriesVolume) -> None:
    image = series_loader(LoadImaged("image"))({"image": volume.image})["image"]
    assert tuple(image.shape) == (SPEC.columns, SPEC.rows, SPEC.slices)
    assert math.isnan(image.meta["original_channel_dim"])
    assert list(image.meta["spatial_shape"]) == [SPEC.columns, SPEC.rows, SPEC.slices]
    assert image.meta["space"] == "RAS"
    np.testing.assert_array_equal(image.numpy(), volume.image[0].numpy())
    np.testing.assert_array_equal(np.asarray(image.affine), np.asarray(volume.image.affine))
    # the plain EnsureChannelFirstd of 3-D bundles gives the node's own layout back
    first = EnsureChannelFirstd("image")({"image": image})["image"]
    assert tuple(first.shape) == tuple(volume.image.shape)


def _renal_preprocessing() -> Compose:
    parser = ConfigParser()
    parser.read_config(BUNDLES / "renalStructures_UNEST_segmentation/configs/inference.json")
    return parser.get_parsed_content("preprocessing")


def test_renal_unest_chain_runs_as_on_the_nifti(volume: SeriesVolume, nifti: str) -> None:
    preprocessing = _renal_preprocessing()
    expected = preprocessing({"image": nifti})["image"]
    ours = Compose(series_loaders(preprocessing.flatten().transforms))
    assert isinstance(ours.transforms[0], SeriesLoadImaged)
    assert ours.transforms[1] is preprocessing.transforms[1]  # Invertd finds them by id
    actual = ours({"image": volume.image})["image"]
    assert actual.shape == expected.shape and actual.shape[0] == 1
    np.testing.assert_allclose(np.asarray(actual.affine), np.asarray(expected.affine), atol=1e-4)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-4)
    assert [op["class"] for op in actual.applied_operations] == [
        op["class"] for op in expected.applied_operations
    ]


def test_renal_unest_chain_fails_on_the_channel_first_image(volume: SeriesVolume) -> None:
    """What the node did before: the loader dropped, its own channel-first image fed."""
    chain = [
        t for t in _renal_preprocessing().flatten().transforms if not isinstance(t, LoadImaged)
    ]
    with pytest.raises(RuntimeError, match="Orientationd") as raised:
        Compose(chain)({"image": volume.image})
    assert "axcodes must match data_array spatially" in str(raised.value.__cause__)


def test_several_images_under_one_key_stack_as_several_files(
    volume: SeriesVolume, tmp_path: Path
) -> None:
    other = MetaTensor(
        volume.image.as_tensor() * 2, affine=volume.image.affine, meta={"filename_or_obj": "b"}
    )
    files = [_nifti(volume.image, tmp_path / "a.nii"), _nifti(other, tmp_path / "b.nii")]
    expected = LoadImaged("image")({"image": files})["image"]
    actual = series_loader(LoadImaged("image"))({"image": [volume.image, other]})["image"]
    assert tuple(actual.shape) == (2, SPEC.columns, SPEC.rows, SPEC.slices)
    _assert_same_image(expected, actual, _uid(volume))


def test_what_is_not_the_nodes_image_is_refused(volume: SeriesVolume) -> None:
    loader = series_loader(LoadImaged("image"))
    with pytest.raises(ModelError, match="not the node's image"):
        loader({"image": "/some/file.nii"})
    with pytest.raises(ModelError, match="channel-first MetaTensor"):
        loader({"image": volume.image.as_tensor()})
    with pytest.raises(KeyError):  # LoadImaged's own rule: a missing key is an error...
        loader({"label": volume.image})
    # ...unless the bundle allows it
    assert series_loader(LoadImaged("image", allow_missing_keys=True))({"x": 1}) == {"x": 1}
    assert isinstance(series_loader(LoadImage()), SeriesLoadImage)
    assert series_loaders([1, "a"]) == [1, "a"]


# 2-D: single images and cines


def _mr(path: Path, pixels: np.ndarray[Any, Any], **attributes: Any) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.3001"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3002"
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [1.5, 1.25]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


ROWS_2D, COLUMNS_2D, TIMES = 12, 16, 5


def _frames() -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(3)
    return rng.integers(0, 4000, size=(TIMES, ROWS_2D, COLUMNS_2D))


def _planar(tmp_path: Path) -> tuple[PlanarImage, ...]:
    frames = _frames()
    # written out of time order
    order = [3, 0, 4, 1, 2]
    paths = [
        _mr(tmp_path / f"{t}.dcm", frames[t], TriggerTime=40.0 * t, InstanceNumber=t + 1)
        for t in order
    ]
    return load_planar_images(paths)


def test_planar_image_gives_what_loadimage_gives_for_a_2d_nifti(tmp_path: Path) -> None:
    image = _planar(tmp_path)[0]
    expected = LoadImage()(_nifti(image.image, tmp_path / "planar.nii"))
    actual = series_loader(LoadImage())(image.image)
    _assert_same_image(expected, actual, image.sop_instance_uid)
    assert tuple(actual.shape) == (COLUMNS_2D, ROWS_2D)
    assert list(actual.meta["spatial_shape"]) == [COLUMNS_2D, ROWS_2D]
    np.testing.assert_allclose(np.diag(np.asarray(actual.affine)), [1.25, 1.5, 1.0, 1.0])


def test_breast_density_chain_on_a_grey_image_as_rgb(tmp_path: Path) -> None:
    image = _planar(tmp_path)[0]
    rgb = with_channels(image.image, 3)
    assert tuple(rgb.shape) == (3, COLUMNS_2D, ROWS_2D)
    assert rgb.untyped_storage().data_ptr() == image.image.untyped_storage().data_ptr()
    parser = ConfigParser()
    parser.read_config(BUNDLES / "breast_density_classification/configs/inference.json")
    preprocessing = parser.get_parsed_content("preprocessing")
    expected = preprocessing({"image": _nifti(rgb, tmp_path / "rgb.nii")})["image"]
    actual = Compose(series_loaders(preprocessing.flatten().transforms))({"image": rgb})["image"]
    assert tuple(actual.shape) == (3, 299, 299)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-6)
    np.testing.assert_array_equal(actual[0].numpy(), actual[2].numpy())
    with pytest.raises(InputError, match="one-channel"):
        with_channels(rgb, 3)


def test_cine_is_stacked_in_time_order_for_the_valve_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cine = cine_series(_planar(tmp_path))
    assert [float(p.header.TriggerTime) for p in cine.images] == [0, 40, 80, 120, 160]
    assert tuple(cine.image.shape) == (TIMES, COLUMNS_2D, ROWS_2D, 1)
    loaded = series_loader(LoadImage(image_only=True))(cine.image)
    assert isinstance(loaded, MetaTensor)
    assert tuple(loaded.shape) == (COLUMNS_2D, ROWS_2D, 1, TIMES)
    assert loaded.meta["original_channel_dim"] == -1
    assert list(loaded.meta["spatial_shape"]) == [COLUMNS_2D, ROWS_2D, 1]
    # loaded[i, j, 0, t] is column i, row j of time t
    np.testing.assert_array_equal(loaded[..., 0, :].numpy().transpose(2, 1, 0), _frames())
    expected_file = LoadImage(image_only=True)(_nifti(cine.image, tmp_path / "cine.nii"))
    _assert_same_image(expected_file, loaded, "1.2.826.0.1.3680043.8.498.3002")

    monkeypatch.syspath_prepend(str(BUNDLES / "valve_landmarks"))
    parser = ConfigParser()
    parser.read_config(BUNDLES / "valve_landmarks/configs/inference.json")
    parser["device"] = "cpu"
    preprocessing = parser.get_parsed_content("preprocessing")
    expected = preprocessing(str(tmp_path / "cine.nii"))
    actual = Compose(series_loaders(preprocessing.flatten().transforms))(cine.image)
    assert tuple(actual.shape) == (1, COLUMNS_2D, ROWS_2D, TIMES)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-6)


def test_cine_of_several_planes_or_sizes_is_refused(tmp_path: Path) -> None:
    frames = _frames()
    moved = [
        _mr(tmp_path / "a.dcm", frames[0], TriggerTime=0),
        _mr(tmp_path / "b.dcm", frames[1], TriggerTime=40, ImagePositionPatient=[0, 0, 8]),
    ]
    with pytest.raises(InputError, match="different planes"):
        cine_series(load_planar_images(moved))
    smaller = _mr(tmp_path / "c.dcm", frames[2][:, :-1], TriggerTime=80)
    with pytest.raises(InputError, match="differ in size"):
        cine_series(load_planar_images([moved[0], smaller]))
    with pytest.raises(InputError, match="no images"):
        cine_series([])


def test_a_contiguous_image_is_copied_too() -> None:
    """Where the loader's own conversions would keep a view, the node's memory is still
    never handed to the bundle."""
    image = MetaTensor(torch.rand(1, 4, 5, 6), affine=torch.eye(4, dtype=torch.float64))
    loaded = series_loader(LoadImage())(image)
    assert isinstance(loaded, MetaTensor) and tuple(loaded.shape) == (4, 5, 6)
    assert not np.may_share_memory(loaded.numpy(), image.numpy())
