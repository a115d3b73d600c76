"""Attribution maps (``explain``) through the bundle runner: a classifier built to look at
one box only must be explained by that box, on the source grid; a RetinaNet detector (the
zoo's lung nodule config, a small feature extractor instead of its torchvision backbone)
gets a map around its best box."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydicom.dataset import Dataset

from dicom_ai.errors import ModelError
from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.explain import Explainer, default_target_layer
from dicom_ai.inference.findings import AttributionMap, ClassificationFindings, DetectionFindings
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.inference.volume import load_series
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.explain_bundles import (
    _TINY_FEATURES,
    BOX,
    box_classifier_bundle,
    retinanet_bundle,
)
from tests.task_bundles import chest_radiograph


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain-bundles")
    return {
        "2d": box_classifier_bundle(root, 2),
        "3d": box_classifier_bundle(root, 3),
    }


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dx") / "dx.dcm"
    ds: Dataset = chest_radiograph(modality="DX", photometric="MONOCHROME2", rows=128, columns=96)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = PhantomSpec(slices=12, rows=48, columns=40, pixel_spacing_mm=8.0, slice_thickness_mm=6.0)
    return write_phantom_ct(tmp_path_factory.mktemp("ct"), spec)


def _box_2d(rows: int, columns: int) -> npt.NDArray[np.bool_]:
    """BOX on a (rows, columns) plane: the network's first axis is the image's columns."""
    inside = np.zeros((rows, columns), dtype=bool)
    (c0, c1), (r0, r1) = BOX[0], BOX[1]
    inside[round(r0 * rows) : round(r1 * rows), round(c0 * columns) : round(c1 * columns)] = True
    return inside


def _box_3d(slices: int, rows: int, columns: int) -> npt.NDArray[np.bool_]:
    """BOX on (slices, rows, columns) frames of an axial series: RAS flips its columns and
    rows (LPS x, y), slices ascend in z as they do in RAS."""
    inside = np.zeros((slices, rows, columns), dtype=bool)
    (a0, a1), (b0, b1), (s0, s1) = BOX
    inside[
        round(s0 * slices) : round(s1 * slices),
        rows - round(b1 * rows) : rows - round(b0 * rows),
        columns - round(a1 * columns) : columns - round(a0 * columns),
    ] = True
    return inside


def _check_map(attribution: AttributionMap, method: str, shape: tuple[int, ...]) -> None:
    values = attribution.values
    assert attribution.method == method
    assert attribution.target == "box"
    assert values.dtype == np.float32 and values.shape == shape
    assert values.min() >= 0.0 and values.max() == pytest.approx(1.0)


def _contrast(values: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_]) -> float:
    """Mean attribution inside the box over the mean outside it."""
    return float(values[inside].mean() / max(float(values[~inside].mean()), 1e-6))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "occlusion"])
def test_2d_map_lies_on_the_box_the_classifier_uses(
    bundles: dict[str, Path], radiograph: Path, method: str
) -> None:
    model = BundleModel(bundles["2d"], "cpu", explain=method)
    images = load_planar_images([radiograph])
    findings = model(images)
    assert isinstance(findings, ClassificationFindings)
    (attribution,) = findings.attributions
    _check_map(attribution, method, (1, 128, 96))
    assert attribution.source_sop_instance_uids == (images[0].sop_instance_uid,)
    assert attribution.source_frame_numbers is None
    inside = _box_2d(128, 96)
    # Occlusion's mask reaches past the box edge by half its size; GradCAM's upsampling
    # and the inverse resize blur it by a pixel or two.
    assert _contrast(attribution.values[0], inside) > (5 if method == "occlusion" else 20)
    peak = np.unravel_index(np.argmax(attribution.values[0]), inside.shape)
    assert inside[peak]


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_3d_map_lies_on_the_box_back_on_the_source_grid(
    bundles: dict[str, Path], ct: list[Path], method: str
) -> None:
    model = BundleModel(bundles["3d"], "cpu", explain=method)
    volume = load_series(ct)
    findings = model(volume)
    assert isinstance(findings, ClassificationFindings)
    (attribution,) = findings.attributions
    _check_map(attribution, method, (12, 48, 40))
    assert attribution.source_sop_instance_uids == volume.sop_instance_uids
    inside = _box_3d(12, 48, 40)
    assert _contrast(attribution.values, inside) > (3 if method == "occlusion" else 20)


def test_off_by_default_and_for_other_tasks_no_map(
    bundles: dict[str, Path], radiograph: Path
) -> None:
    model = BundleModel(bundles["2d"], "cpu")
    assert model.explainer is None
    findings = model(load_planar_images([radiograph]))
    assert isinstance(findings, ClassificationFindings) and findings.attributions == ()


def test_configured_layer_is_read(bundles: dict[str, Path], radiograph: Path) -> None:
    """GradCAM of the first convolution, before BoxNet masks its box: that layer's
    activations are the whole image, so the map is no longer confined to the box."""
    default = BundleModel(bundles["2d"], "cpu", explain="gradcam")
    first = BundleModel(bundles["2d"], "cpu", explain="gradcam", explain_layer="features")
    assert (
        default.explainer is not None and default.explainer.target_layer(default.network) == "last"
    )
    images = load_planar_images([radiograph])
    inside = _box_2d(128, 96)
    maps = []
    for model in (default, first):
        findings = model(images)
        assert isinstance(findings, ClassificationFindings)
        maps.append(findings.attributions[0].values[0])
    assert maps[0][~inside].max() < 0.05
    assert maps[1][~inside].max() > 0.5


def test_a_layer_the_network_lacks_is_a_config_error(bundles: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"explain_layer 'classifier\.7'"):
        BundleModel(bundles["2d"], "cpu", explain="gradcam", explain_layer="classifier.7")


def test_hooks_are_gone_after_a_map(bundles: dict[str, Path], radiograph: Path) -> None:
    """MONAI's GradCAM leaves hooks on the layer it reads; later inferences would keep its
    activations alive."""
    model = BundleModel(bundles["2d"], "cpu", explain="gradcam")
    model(load_planar_images([radiograph]))
    for module in model.network.modules():
        assert not module._forward_hooks and not module._backward_hooks


def test_a_failed_map_leaves_the_findings(
    bundles: dict[str, Path],
    radiograph: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    model = BundleModel(bundles["2d"], "cpu", explain="gradcam")
    monkeypatch.setattr(Explainer, "__call__", fail)
    with caplog.at_level(logging.WARNING, logger="dicom_ai.inference.bundle"):
        findings = model(load_planar_images([radiograph]))
    assert isinstance(findings, ClassificationFindings)
    assert findings.attributions == () and findings.results
    assert "no gradcam map: out of memory" in caplog.text


def test_retinanet_detector_map_about_its_best_box(tmp_path: Path, ct: list[Path]) -> None:
    model = BundleModel(retinanet_bundle(tmp_path), "cpu", explain="gradcam", threshold=0.0)
    assert model.explainer is not None
    # The backbone's last convolution: every pyramid level depends on it.
    assert model.explainer.target_layer(model.network) == "feature_extractor.body.c2"
    volume = load_series(ct)
    findings = model(volume)
    assert isinstance(findings, DetectionFindings) and findings.detections
    (attribution,) = findings.attributions
    assert attribution.method == "gradcam" and attribution.target == "finding"
    assert attribution.values.shape == (12, 48, 40) and attribution.values.dtype == np.float32
    assert attribution.values.min() >= 0 and attribution.values.max() == pytest.approx(1.0)
    assert attribution.source_sop_instance_uids == volume.sop_instance_uids


def test_detector_map_covers_the_crop_about_the_box_only() -> None:
    """On a large CT the backward pass covers a crop about the box, not the volume."""
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork  # noqa: F401

    namespace: dict[str, object] = {}
    exec(_TINY_FEATURES, namespace)  # the bundle script's class, without a bundle
    torch.manual_seed(0)
    network = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=3,
        feature_extractor=namespace["TinyFeatures"](),  # type: ignore[operator]
        size_divisible=[16, 16, 8],
    ).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    image = torch.rand(1, 70, 60, 30)
    for method in ("gradcam", "occlusion"):
        explainer = Explainer(method, roi_size=(32, 32, 16))
        values = explainer(network, image, 0, center=(20.0, 50.0, 10.0))
        assert values.shape == (1, 70, 60, 30)
        nonzero = values[0].nonzero()
        # x 4..35, y clamped to the image (28..59), z 2..17
        assert nonzero.min(0).values.tolist() >= [4, 28, 2]
        assert nonzero.max(0).values.tolist() <= [35, 59, 17]
        assert float(values.max()) > 0


def test_default_layers() -> None:
    from monai.networks.nets.densenet import DenseNet121

    densenet = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    assert default_target_layer(densenet) == "features.denseblock4.denselayer16.layers.conv2"
    with pytest.raises(ValueError, match="no convolution"):
        default_target_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


def test_config_reads_a_bare_off_and_refuses_an_unknown_method() -> None:
    import yaml
    from pydantic import ValidationError

    from dicom_ai.config import ModelConfig

    # YAML 1.1 reads `off` as false: still "off".
    assert ModelConfig.model_validate(yaml.safe_load("explain: off")).explain == "off"
    assert ModelConfig.model_validate({}).explain == "off"
    with pytest.raises(ValidationError, match="gradcampp"):
        ModelConfig.model_validate({"explain": "saliency"})


def test_a_padded_input_map_is_not_shifted() -> None:
    # The map is cut back from the start of the padded input: padding goes at the end.
    class Net(torch.nn.Module):
        size_divisible = 16

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    class Seen(Explainer):
        def _occlusion(self, scores: object, x: torch.Tensor, target: int) -> torch.Tensor:
            return x[0, :1]  # the padded input as the network saw it

    image = torch.zeros(1, 20, 20)
    image[0, 5, 7] = 1.0
    seen = Seen("occlusion")(Net(), image, 0)
    assert divmod(int(seen.argmax()), 20) == (5, 7)


def test_a_layer_before_an_inplace_relu_gets_its_map() -> None:
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    image = torch.rand(1, 16, 16)
    values = Explainer("gradcam", "0")(network, image, 1)
    assert values.shape == (1, 16, 16) and torch.isfinite(values).all()
    assert network[1].inplace is True  # restored
