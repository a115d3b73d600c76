"""Cost of attribution maps (``explain``, dicom_ai/inference/explain.py) on this machine.

    .venv/bin/python -m benchmarks.explain [2d] [3d] [det]      (default: all three)
    DET_METHODS=gradcam,gradcampp,occlusion .venv/bin/python -m benchmarks.explain det

- 2d: a 2-D DenseNet121 classifier bundle (224x224 input) on a 512x512 DX, per image:
  explain off, gradcam, gradcampp, occlusion (best of 3; occlusion once).
- 3d: a 3-D DenseNet121 classifier bundle (96^3 input) on a 128x128x96 CT: off, gradcam,
  occlusion (first call each).
- det: the lung nodule bundle's RetinaNet (ResNet50 + FPN) on a preprocessed 512x512x256
  chest CT, the map alone, in the 128x128x64 crop about one box (occlusion only when
  DET_METHODS names it: about a quarter of an hour on 2 CPU cores).

Wall-clock and CPU seconds (the process's, all threads), and the load average beside each
line. Random weights: the cost does not depend on them. No peer makes attribution maps.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.explain import Explainer
from dicom_ai.inference.planar import load_planar_images
from dicom_ai.inference.volume import load_series
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.task_bundles import chest_radiograph, make_cxr_classifier_bundle


def log(*args: object) -> None:
    print(f"[load {os.getloadavg()[0]:.1f}]", *args, flush=True)


class Seconds(tuple):
    """(wall, cpu): cpu is this process's CPU time (all threads), far less disturbed by
    other load than the wall clock; on an idle machine wall ~ cpu / threads."""

    def __str__(self) -> str:
        return f"wall {self[0]:.2f} s, cpu {self[1]:.2f} s"


def timed(call, repeat: int = 1) -> Seconds:
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        best = min(
            best, (time.perf_counter() - wall, time.process_time() - cpu), key=lambda t: t[1]
        )
    return Seconds(best)


def part_2d(work: Path) -> None:
    bundle = make_cxr_classifier_bundle(work)  # DenseNet121 2-D, Resized to 224x224
    path = work / "dx512.dcm"
    chest_radiograph(modality="DX", photometric="MONOCHROME2", rows=512, columns=512).save_as(
        path, enforce_file_format=True
    )
    images = load_planar_images([path])
    for method in ("off", "gradcam", "gradcampp", "occlusion"):
        model = BundleModel(bundle, "cpu", explain=method)
        if method != "occlusion":
            model(images)  # warm-up
        seconds = timed(lambda model=model: model(images), 1 if method == "occlusion" else 3)
        log(f"2-D DenseNet121, 512x512 DX -> 224x224: explain={method}: {seconds} per image")


DENSENET3D = {
    "image_key": "image",
    "device": "$torch.device('cpu')",
    "network_def": {
        "_target_": "DenseNet121",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -1000,
                "a_max": 1000,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "Resized", "keys": "image", "spatial_size": [96, 96, 96]},
        ],
    },
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
    },
}


def part_3d(work: Path) -> None:
    from monai.networks.nets import DenseNet121

    root = work / "densenet3d"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(DENSENET3D))
    (root / "configs" / "metadata.json").write_text(
        json.dumps(
            {
                "version": "0.1.0",
                "name": "densenet3d",
                "network_data_format": {
                    "inputs": {
                        "image": {"type": "image", "num_channels": 1, "spatial_shape": [96, 96, 96]}
                    },
                    "outputs": {
                        "pred": {"type": "probabilities", "channel_def": {"0": "no", "1": "yes"}}
                    },
                },
            }
        )
    )
    torch.manual_seed(0)
    torch.save(
        DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).state_dict(),
        root / "models" / "model.pt",
    )
    spec = PhantomSpec(
        slices=96, rows=128, columns=128, pixel_spacing_mm=3.0, slice_thickness_mm=3.0
    )
    volume = load_series(write_phantom_ct(work / "ct3d", spec))
    for method in ("off", "gradcam", "occlusion"):
        model = BundleModel(root, "cpu", explain=method)
        seconds = timed(lambda model=model: model(volume), 1)
        log(
            f"3-D DenseNet121, 128x128x96 CT -> 96^3: explain={method}: {seconds} per series "
            "(first call)"
        )


class _Body(nn.Module):
    """torchvision's IntermediateLayerGetter over MONAI's ResNet (layer1 and layer2), which
    resnet_fpn_feature_extractor builds; torchvision does not load beside this torch."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "act", "maxpool", "layer1", "layer2"):
            setattr(self, name, getattr(backbone, name))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        a = self.layer1(x)
        return OrderedDict([("0", a), ("1", self.layer2(a))])


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from monai.networks.blocks.backbone_fpn_utils import LastLevelMaxPool
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
        from monai.networks.nets import resnet50

        backbone = resnet50(
            spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7]
        )
        self.body = _Body(backbone)
        self.fpn = FeaturePyramidNetwork(3, [256, 512], 256, LastLevelMaxPool(3))
        self.out_channels = 256

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def part_det(work: Path) -> None:
    """The lung nodule bundle's RetinaNet (ResNet50 + FPN, 3 anchors, its size_divisible) on a
    preprocessed chest CT of 512x512x256 voxels, explained about one box (ROI 128x128x64)."""
    from monai.apps.detection.networks.retinanet_network import RetinaNet

    torch.manual_seed(0)
    network = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=3,
        feature_extractor=_Features(),
        size_divisible=[16, 16, 8],
        use_list_output=False,
    ).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    image = torch.rand(1, 512, 512, 256)
    roi = image[:, 192:320, 192:320, 96:160].unsqueeze(0)
    with torch.no_grad():
        log(f"RetinaNet forward, one 128x128x64 crop: {timed(lambda: network(roi), 1)}")
    for method in os.environ.get("DET_METHODS", "gradcam,gradcampp").split(","):
        explainer = Explainer(method)
        seconds = timed(
            lambda explainer=explainer: explainer(network, image, 0, center=(256.0, 256.0, 128.0)),
            1,
        )
        log(f"RetinaNet ResNet50-FPN, 512x512x256 CT, ROI 128x128x64: explain={method}: {seconds}")


def main() -> None:
    parts = sys.argv[1:] or ["2d", "3d", "det"]
    log(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    try:
        for part in parts:
            {"2d": part_2d, "3d": part_3d, "det": part_det}[part](work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
