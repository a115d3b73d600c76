"""2-D segmentation bundles: a 2-D network on each image of a series (a SEG plane per
source image), the same network run slice by slice by the bundle's own ``SliceInferer`` over
the volume, and on a single projection image (CR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydicom import dcmread

from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.findings import SegmentationFindings
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.inference.volume import load_series
from dicom_ai.pipeline.worker import JobSpec, run_job
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.task_bundles import chest_radiograph

# Logits of a 1x1 convolution on x = clip((HU + 1000) / 2000): background 0,
# bright 40 (x - 0.6) (HU > 200), dark 40 (0.1 - x) (HU < -800).
_WEIGHT = torch.tensor([0.0, 40.0, -40.0]).reshape(3, 1, 1, 1)
_BIAS = torch.tensor([0.0, -24.0, 4.0])


def _planar_bundle(directory: Path, *, slice_inferer: bool) -> Path:
    (directory / "configs").mkdir(parents=True)
    (directory / "models").mkdir()
    inferer = (
        {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": 2}
        if slice_inferer
        else {"_target_": "SimpleInferer"}
    )
    config = {
        "imports": ["$import torch"],
        "network_def": {
            "_target_": "torch.nn.Conv2d",
            "in_channels": 1,
            "out_channels": 3,
            "kernel_size": 1,
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
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
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
    }
    metadata = {
        "name": "Planar threshold",
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [64, 64]}},
            "outputs": {
                "pred": {
                    "format": "segmentation",
                    "channel_def": {"0": "background", "1": "bright", "2": "dark"},
                }
            },
        },
    }
    (directory / "configs" / "inference.json").write_text(json.dumps(config))
    (directory / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save({"weight": _WEIGHT, "bias": _BIAS}, directory / "models" / "model.pt")
    return directory


def _expected(hu: npt.NDArray[np.float64]) -> npt.NDArray[np.uint16]:
    x = np.clip((hu + 1000) / 2000, 0, 1)
    logits = np.stack([np.zeros_like(x), 40 * (x - 0.6), 40 * (0.1 - x)])
    return np.argmax(logits, axis=0).astype(np.uint16)


@pytest.fixture(scope="module")
def ct_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = PhantomSpec(slices=6, rows=40, columns=48, pixel_spacing_mm=8.0)
    return write_phantom_ct(tmp_path_factory.mktemp("ct"), spec)


def _hu(path: Path) -> npt.NDArray[np.float64]:
    ds = dcmread(path)
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )


def test_a_2d_network_segments_each_image(tmp_path: Path, ct_paths: list[Path]) -> None:
    model = BundleModel(_planar_bundle(tmp_path / "b", slice_inferer=False), "cpu")
    assert model.spatial_dims == 2
    images = load_planar_images(ct_paths)
    findings = model(images)
    assert isinstance(findings, SegmentationFindings)
    assert findings.source_sop_instance_uids == tuple(i.sop_instance_uid for i in images)
    expected = np.stack([_expected(_hu(Path(i.path))) for i in images])
    assert findings.label_map.shape == expected.shape  # (images, rows, columns)
    assert np.array_equal(findings.label_map, expected)
    assert {label.name for label in findings.present_labels()} == {"bright", "dark"}


def test_slice_inferer_takes_the_volume_and_agrees(tmp_path: Path, ct_paths: list[Path]) -> None:
    model = BundleModel(_planar_bundle(tmp_path / "b", slice_inferer=True), "cpu")
    assert model.spatial_dims == 3  # the bundle slices the volume itself
    volume = load_series(ct_paths)
    findings = model(volume)
    assert isinstance(findings, SegmentationFindings)
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ct_paths}
    expected = np.stack([_expected(_hu(by_uid[uid])) for uid in volume.sop_instance_uids])
    assert np.array_equal(findings.label_map, expected)


@pytest.mark.dciodvfy
@pytest.mark.java
@pytest.mark.slow
def test_2d_segmentation_job_gives_a_valid_seg(tmp_path: Path, ct_paths: list[Path]) -> None:
    bundle = _planar_bundle(tmp_path / "b", slice_inferer=False)
    cr = tmp_path / "cr.dcm"
    chest_radiograph(modality="CR", photometric="MONOCHROME2").save_as(cr, enforce_file_format=True)
    for n, paths in enumerate([tuple(ct_paths), (cr,)]):
        results = tmp_path / "spool" / "results" / str(n)
        results.mkdir(parents=True)
        spec = JobSpec(n, "1.2.3", "planar", bundle, "cpu", 60.0, paths, results, "NODE")
        files = run_job(spec)
        seg = dcmread(next(f for f in files if f.name.startswith("seg")))
        assert seg.Modality == "SEG"
        referenced = {
            item.SourceImageSequence[0].ReferencedSOPInstanceUID
            for frame in seg.PerFrameFunctionalGroupsSequence
            for item in frame.DerivationImageSequence
        }
        sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        assert referenced <= sources and referenced
        for path in files:
            assert_dciodvfy_clean(path)
        sr = next(f for f in files if f.name.startswith("sr"))
        assert_sr_template_valid(sr)
