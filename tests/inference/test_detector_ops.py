"""A detector configured as the zoo's RetinaNet bundle is: the inferer holds a detector
object, the evaluator ``_requires_`` its ``detector_ops`` (which set its output keys), and
the boxes come under the detector's own keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.findings import DetectionFindings
from dicom_ai.inference.volume import load_series
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.task_bundles import DETECTOR_SCORES, make_box_detector_bundle

_KEYED = '''
class KeyedDetector:
    """Keys unset until its ops run, as a detector that needs configuring."""

    def __init__(self, network):
        self.network = network
        self.target_box_key = self.target_label_key = self.pred_score_key = None

    def set_target_keys(self, box_key, label_key):
        self.target_box_key, self.target_label_key = box_key, label_key
        self.pred_score_key = label_key + "_scores"

    def __call__(self, images):
        if self.target_box_key is None:
            raise RuntimeError("detector_ops did not run")
        return [
            {
                self.target_box_key: out["box"],
                self.target_label_key: out["label"],
                self.pred_score_key: out["label_scores"],
            }
            for out in self.network(images)
        ]


class DetectorInferer:
    def __init__(self, detector):
        self.detector = detector

    def __call__(self, inputs, network):
        self.detector.network = network
        return self.detector(inputs)
'''


def _keyed_bundle(directory: Path, *, ops: bool) -> Path:
    root = make_box_detector_bundle(directory)
    (root / "scripts" / "keyed.py").write_text(_KEYED)
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["imports"].append("$import scripts.keyed")
    config["network"] = "@network_def"
    config["detector"] = {"_target_": "scripts.keyed.KeyedDetector", "network": "@network"}
    config["detector_ops"] = [
        "$@detector.set_target_keys(box_key='nodule_box', label_key='nodule')"
    ]
    config["inferer"] = {"_target_": "scripts.keyed.DetectorInferer", "detector": "@detector"}
    config["evaluator"] = {"_target_": "SupervisedEvaluator", "network": "@network"}
    if ops:
        config["evaluator"]["_requires_"] = "@detector_ops"
    config_path.write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = PhantomSpec(slices=8, rows=48, columns=48, pixel_spacing_mm=6.0)
    return write_phantom_ct(tmp_path_factory.mktemp("ct"), spec)


def test_detector_ops_run_and_its_keys_are_read(tmp_path: Path, ct: list[Path]) -> None:
    model = BundleModel(_keyed_bundle(tmp_path, ops=True), "cpu")
    findings = model(load_series(ct))
    assert isinstance(findings, DetectionFindings)
    scores = sorted((d.score for d in findings.detections), reverse=True)
    assert scores == pytest.approx([s for s in DETECTOR_SCORES if s >= 0.5], abs=1e-6)


def test_without_the_evaluators_requirements_the_detector_is_unconfigured(
    tmp_path: Path, ct: list[Path]
) -> None:
    model = BundleModel(_keyed_bundle(tmp_path, ops=False), "cpu")
    with pytest.raises(Exception, match="detector_ops did not run"):
        model(load_series(ct))
