"""A 2-D detection bundle on a projection image (CR): boxes come back in the image's own
pixels through the bundle's resizing, and the SR carries them as SCOORD polylines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.findings import ImageDetectionFindings
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.pipeline.worker import JobSpec, run_job
from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.task_bundles import chest_radiograph

# xyxy in pixels of the resized (100 x 128) image; the last one scores under the threshold.
BOXES = ((10.0, 20.0, 30.0, 40.0), (50.0, 60.0, 70.0, 100.0), (0.0, 0.0, 5.0, 5.0))
SCORES = (0.9, 0.7, 0.1)

_SCRIPT = """
import torch


class StoredBoxes2D(torch.nn.Module):
    def __init__(self, count):
        super().__init__()
        self.box = torch.nn.Parameter(torch.zeros(count, 4), requires_grad=False)
        self.label_scores = torch.nn.Parameter(torch.zeros(count), requires_grad=False)

    def forward(self, images):
        labels = torch.zeros(self.box.shape[0], dtype=torch.long)
        return [
            {"box": self.box.clone(), "label": labels, "label_scores": self.label_scores.clone()}
            for _ in range(images.shape[0])
        ]
"""


def _bundle(directory: Path) -> Path:
    for folder in ("configs", "models", "scripts"):
        (directory / folder).mkdir(parents=True, exist_ok=True)
    (directory / "scripts" / "__init__.py").write_text("")
    (directory / "scripts" / "boxes.py").write_text(_SCRIPT)
    config = {
        "imports": ["$import scripts.boxes"],
        "network_def": {"_target_": "scripts.boxes.StoredBoxes2D", "count": len(BOXES)},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityd", "keys": "image"},
                {"_target_": "Resized", "keys": "image", "spatial_size": [100, 128]},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": []},
    }
    metadata = {
        "name": "Stored 2-D boxes",
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [100, 128]}},
            "outputs": {"pred": {"type": "object", "format": "dict", "channel_def": {"0": "mass"}}},
        },
    }
    (directory / "configs" / "inference.json").write_text(json.dumps(config))
    (directory / "configs" / "metadata.json").write_text(json.dumps(metadata))
    state = {"box": torch.tensor(BOXES), "label_scores": torch.tensor(SCORES)}
    torch.save(state, directory / "models" / "model.pt")
    return directory


def _expected_source_box(box: tuple[float, ...]) -> np.ndarray:
    # Resize (no corner alignment) of 200 columns x 256 rows to 100 x 128: pixel centre
    # x of the resized image is source pixel 2 x + 0.5.
    return np.array([2 * box[0] + 0.5, 2 * box[1] + 0.5, 2 * box[2] + 0.5, 2 * box[3] + 0.5])


@pytest.fixture
def cr(tmp_path: Path) -> Path:
    path = tmp_path / "cr.dcm"
    image = chest_radiograph(modality="CR", photometric="MONOCHROME2", rows=256, columns=200)
    image.save_as(path, enforce_file_format=True)
    return path


def test_2d_boxes_come_back_in_source_pixels(tmp_path: Path, cr: Path) -> None:
    model = BundleModel(_bundle(tmp_path / "b"), "cpu")
    assert model.spatial_dims == 2
    (image,) = load_planar_images([cr])
    findings = model((image,))
    assert isinstance(findings, ImageDetectionFindings)
    assert [d.score for d in findings.detections] == pytest.approx([0.9, 0.7])
    for detection, box in zip(findings.detections, BOXES, strict=False):
        assert detection.source_sop_instance_uid == image.sop_instance_uid
        assert detection.box == pytest.approx(_expected_source_box(box), abs=1e-3)


@pytest.mark.dciodvfy
@pytest.mark.java
@pytest.mark.slow
def test_2d_detection_job_gives_a_valid_sr_with_scoord(tmp_path: Path, cr: Path) -> None:
    results = tmp_path / "spool" / "results" / "1"
    results.mkdir(parents=True)
    spec = JobSpec(1, "1.2.3", "boxes2d", _bundle(tmp_path / "b"), "cpu", 60.0, (cr,), results, "N")
    (path,) = run_job(spec)
    assert_dciodvfy_clean(path)
    assert_sr_template_valid(path)
    sr = dcmread(path)
    regions = []
    copies = []

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            if item.ValueType == "SCOORD":
                # The region a group CONTAINS; its copy under the first measurement is
                # INFERRED FROM, for OHIF.
                (regions if item.RelationshipType == "CONTAINS" else copies).append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert len(regions) == 2
    assert [c.RelationshipType for c in copies] == ["INFERRED FROM"] * 2
    assert [list(c.GraphicData) for c in copies] == [list(r.GraphicData) for r in regions]
    left, top, right, bottom = _expected_source_box(BOXES[0])
    polyline = np.asarray(regions[0].GraphicData, dtype=np.float64).reshape(-1, 2)
    # SCOORD: first pixel centre at (0.5, 0.5); the box spans its edge pixels whole.
    assert polyline[0] == pytest.approx([left, top], abs=1e-3)
    assert polyline[2] == pytest.approx([right + 1, bottom + 1], abs=1e-3)
    source = regions[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == dcmread(cr).SOPInstanceUID
