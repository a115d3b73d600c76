"""MONAI bundles run unchanged on the phantom: labels, grid restored by Invertd, placement."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy import ndimage

from dicom_ai.errors import ModelError
from dicom_ai.inference.bundle import BundleModel, read_bundle_labels
from dicom_ai.inference.findings import AlgorithmFamily, SegmentationFindings, SegmentLabel
from dicom_ai.inference.model import Model, load_model
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, phantom_hu_volume, write_phantom_ct
from tests.bundles import (
    SPLEEN,
    WHOLEBODY,
    WHOLEBODY_PHANTOM_LABELS,
    shared_bundle,
    spleen_bundle,  # noqa: F401  (session fixture)
    wholebody_bundle,  # noqa: F401  (session fixture)
)

# wholeBody (SegResNet, 105 channels) is the slow one: one 96^3 window at 1.5 mm.
WB_SPEC = PhantomSpec(slices=24, rows=96, columns=96, pixel_spacing_mm=1.5, seed=11)
# The spleen needs a few centimetres of phantom spleen to be seen through its smoothing.
SP_SPEC = PhantomSpec(slices=24, rows=160, columns=160, pixel_spacing_mm=1.5, seed=12)


def _series(directory: Path, spec: PhantomSpec) -> SeriesVolume:
    return load_series(write_phantom_ct(directory, spec))


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _checksum(volume: SeriesVolume) -> float:
    return float(volume.image.as_tensor().double().sum())


@pytest.fixture(scope="module")
def wb_run(
    tmp_path_factory: pytest.TempPathFactory,
    wholebody_bundle: Path,  # noqa: F811
) -> tuple[BundleModel, SeriesVolume, SegmentationFindings, float]:
    volume = _series(tmp_path_factory.mktemp("wb-ct"), WB_SPEC)
    model = BundleModel(wholebody_bundle, "cpu")
    before = _checksum(volume)
    findings = model(volume)
    return model, volume, findings, before


@pytest.fixture(scope="module")
def spleen_run(
    tmp_path_factory: pytest.TempPathFactory,
    spleen_bundle: Path,  # noqa: F811
) -> tuple[BundleModel, SeriesVolume, SegmentationFindings]:
    volume = _series(tmp_path_factory.mktemp("sp-ct"), SP_SPEC)
    model = BundleModel(spleen_bundle, "cpu")
    return model, volume, model(volume)


@pytest.mark.slow
def test_wholebody_runs_unchanged_with_metadata_labels(
    wb_run: tuple[BundleModel, SeriesVolume, SegmentationFindings, float],
    wholebody_bundle: Path,  # noqa: F811
) -> None:
    model, volume, findings, before = wb_run
    for name in ("inference.json", "metadata.json"):
        assert filecmp.cmp(
            wholebody_bundle / "configs" / name,
            shared_bundle(WHOLEBODY) / "configs" / name,
            shallow=False,
        )
    assert not (wholebody_bundle / "eval").exists()  # SaveImaged was left out
    assert findings.label_map.shape == (WB_SPEC.slices, WB_SPEC.rows, WB_SPEC.columns)
    assert findings.source_sop_instance_uids == volume.sop_instance_uids
    assert len(findings.labels) == 104
    assert findings.labels[0] == SegmentLabel(1, "spleen")
    assert findings.labels[-1] == SegmentLabel(104, "urinary_bladder")
    assert findings.algorithm.name == "Whole body CT segmentation"
    assert findings.algorithm.version == "0.2.5"
    assert findings.algorithm.family is AlgorithmFamily.ARTIFICIAL_INTELLIGENCE
    assert "not to be used for diagnostic" in findings.algorithm.intended_use
    assert isinstance(model, Model)
    assert model.model_id == WHOLEBODY
    assert model.inferer.device == torch.device("cpu")  # the config's own expression overridden
    assert _checksum(volume) == before  # NormalizeIntensityd did not write into the volume


def test_wholebody_weights_give_a_few_contiguous_labels_in_place(
    wb_run: tuple[BundleModel, SeriesVolume, SegmentationFindings, float],
) -> None:
    _, _, findings, _ = wb_run
    present = {label.value: label.name for label in findings.present_labels()}
    assert present == WHOLEBODY_PHANTOM_LABELS
    for value in present:  # one blob each (at most a stray partial-volume voxel besides)
        components, _ = ndimage.label(findings.label_map == value)
        sizes = np.bincount(components.ravel())[1:]
        assert sizes.max() > 0.999 * sizes.sum(), (value, sorted(sizes)[-5:])
    # Invertd brought the prediction back onto the source grid, unflipped: each label lies
    # where the phantom has that tissue (a flip in any axis would move the spine or lungs).
    hu = phantom_hu_volume(WB_SPEC)
    assert _dice(findings.label_map == 13, (hu > -950) & (hu < -600)) > 0.8
    assert _dice(findings.label_map == 22, hu >= 200) > 0.8
    assert _dice(findings.label_map == 5, (hu > -25) & (hu < 165)) > 0.9


def test_spleen_runs_unchanged_and_finds_the_spleen(
    spleen_run: tuple[BundleModel, SeriesVolume, SegmentationFindings],
    spleen_bundle: Path,  # noqa: F811
) -> None:
    model, _, findings = spleen_run
    assert filecmp.cmp(
        spleen_bundle / "configs" / "inference.json",
        shared_bundle(SPLEEN) / "configs" / "inference.json",
        shallow=False,
    )
    assert not (spleen_bundle / "eval").exists()
    assert findings.label_map.shape == (SP_SPEC.slices, SP_SPEC.rows, SP_SPEC.columns)
    assert findings.labels == (SegmentLabel(1, "spleen"),)
    assert (findings.algorithm.name, findings.algorithm.version) == (
        "Spleen CT segmentation",
        "0.5.9",
    )
    assert model.amp is False  # mixed precision only on CUDA
    spleen = findings.label_map == 1
    # the phantom's spleen: an ellipse right of the image centre, in the lower 60 %
    rows, cols = SP_SPEC.rows, SP_SPEC.columns
    yy, xx = np.mgrid[0:rows, 0:cols]
    ellipse = ((yy - rows * 0.48) / (rows * 0.07 + 2)) ** 2 + (
        (xx - cols * 0.72) / (cols * 0.05 + 2)
    ) ** 2 <= 1
    truth = np.zeros_like(spleen)
    truth[: int(0.6 * (SP_SPEC.slices - 1)) + 1] = ellipse
    assert spleen.sum() > 0.1 * truth.sum()  # eroded by the smoothing, but clearly there
    assert (spleen & truth).sum() / spleen.sum() > 0.98
    components, count = ndimage.label(spleen)
    assert count <= 2 and np.bincount(components.ravel())[1:].max() > 0.95 * spleen.sum()


def _tiny_bundle(directory: Path, *, wrap: bool) -> Path:
    """A bundle with no Invertd in its postprocessing and weights under a "model" key."""
    (directory / "configs").mkdir(parents=True)
    (directory / "models").mkdir()
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "torch.nn.Conv3d",
            "in_channels": 1,
            "out_channels": 3,
            "kernel_size": 1,
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0]},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 1000,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "$@bundle_root + '/eval'"},
            ],
        },
    }
    metadata = {
        "name": "Tiny threshold",
        "version": "1.2.3",
        "network_data_format": {
            "outputs": {
                "pred": {
                    "channel_def": {
                        "0": "background",
                        "1": "bright",
                        "2": "dark",
                    }
                }
            }
        },
    }
    (directory / "configs" / "inference.json").write_text(json.dumps(config))
    (directory / "configs" / "metadata.json").write_text(json.dumps(metadata))
    # logits: background 0, bright 40 (x - 0.6) (HU > 200), dark 40 (0.1 - x) (HU < -800)
    weight = torch.tensor([0.0, 40.0, -40.0]).reshape(3, 1, 1, 1, 1)
    state = {"weight": weight, "bias": torch.tensor([0.0, -24.0, 4.0])}
    torch.save({"model": state, "epoch": 3} if wrap else state, directory / "models" / "model.pt")
    return directory


@pytest.mark.parametrize(
    "orientation",
    [
        pytest.param(None, id="axial"),
        pytest.param(((0, 1, 0), (0, 0, -1)), id="sagittal"),
        pytest.param(((1, 0, 0), (0, 0, -1)), id="coronal"),
    ],
)
def test_bundle_without_invertd_comes_back_on_the_source_grid(
    tmp_path: Path, orientation: tuple[tuple[int, ...], tuple[int, ...]] | None
) -> None:
    spec = PhantomSpec(slices=10, rows=48, columns=64, pixel_spacing_mm=2.0, slice_thickness_mm=2.0)
    paths = []
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(phantom_ct_datasets(spec)):
        if orientation is not None:
            row, column = np.array(orientation[0]), np.array(orientation[1])
            ds.ImageOrientationPatient = [*row.tolist(), *column.tolist()]
            ds.ImagePositionPatient = (k * 2.0 * np.cross(row, column) + [5.0, -7.0, 9.0]).tolist()
        path = tmp_path / "ct" / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    volume = load_series(paths)
    bundle = _tiny_bundle(tmp_path / "tiny", wrap=True)
    model = load_model("tiny", bundle, "cpu")
    assert model.model_id == "tiny"
    findings = model(volume)
    expected = np.zeros(volume.frames.shape, dtype=np.uint16)
    expected[volume.frames > 200] = 1
    expected[volume.frames < -800] = 2
    np.testing.assert_array_equal(findings.label_map, expected)
    assert [label.name for label in findings.present_labels()] == ["bright", "dark"]
    assert not (bundle / "eval").exists()


def test_bare_state_dict_and_load_errors(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "bare", wrap=False)
    model = BundleModel(bundle, "cpu")
    assert model.algorithm.name == "Tiny threshold" and model.algorithm.version == "1.2.3"
    assert float(model.network.state_dict()["weight"][1]) == 40.0
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match="no weights"):
        BundleModel(bundle, "cpu")
    torch.save({"weight": torch.zeros(2, 1, 1, 1, 1)}, bundle / "models" / "model.pt")
    with pytest.raises(ModelError, match="cannot load"):
        BundleModel(bundle, "cpu")
    with pytest.raises(ModelError, match=r"missing configs/inference\.json"):
        BundleModel(tmp_path / "nowhere", "cpu")


def test_labels_from_channel_def() -> None:
    metadata = {
        "network_data_format": {
            "outputs": {
                "pred": {
                    "channel_def": {
                        "0": "background",
                        "2": "kidney_right",
                        "1": "spleen",
                    }
                }
            }
        }
    }
    assert read_bundle_labels(metadata) == (
        SegmentLabel(1, "spleen"),
        SegmentLabel(2, "kidney_right"),
    )
    with pytest.raises(ModelError, match="channel_def"):
        read_bundle_labels({"network_data_format": {"outputs": {}}})
