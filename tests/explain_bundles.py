"""Bundles for attribution maps: a classifier built to look at one box of its input only
(2-D or 3-D), and the zoo's RetinaNet lung nodule detector with a small feature extractor
(tests/inference/test_explain.py, tests/node/test_task_kinds_end_to_end.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.bundles import shared_bundle
from tests.zoo import write_weights

__all__ = ["BOX", "box_classifier_bundle", "retinanet_bundle"]

# The network input's box, as fractions of its axes (first, second, third spatial axis).
BOX = ((0.5, 0.875), (0.125, 0.5), (0.25, 0.75))

_BOXNET = '''"""A classifier that looks at one box of its input only (test_explain.py)."""

import torch
from torch import nn

BOX = {box!r}


class BoxNet(nn.Module):
    """Logit 1 ("box") is the mean intensity inside BOX, logit 0 its negative: the box is,
    by construction, all it uses."""

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.features = conv(1, 2, 3, padding=1)
        self.last = conv(2, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.features(x))
        mask = torch.zeros_like(a)
        box = tuple(slice(int(n * lo), int(n * hi)) for n, (lo, hi) in zip(a.shape[2:], BOX))
        mask[(slice(None), slice(None), *box)] = 1.0
        return self.fc(self.last(a * mask).flatten(2).mean(2))
'''

_TINY_FEATURES = '''"""A small feature pyramid for MONAI's RetinaNet, without torchvision."""

from collections import OrderedDict

import torch
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from torch import nn


class TinyFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict(
            {
                "c1": nn.Conv3d(1, 8, 3, stride=(2, 2, 1), padding=1),
                "c2": nn.Conv3d(8, 16, 3, stride=2, padding=1),
            }
        )
        self.fpn = FeaturePyramidNetwork(3, [8, 16], 16)
        self.out_channels = 16

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        a = torch.relu(self.body["c1"](x))
        b = torch.relu(self.body["c2"](a))
        return self.fpn(OrderedDict([("0", a), ("1", b)]))
'''


def _boxnet_state(spatial_dims: int) -> dict[str, torch.Tensor]:
    """Constructed weights: ``features`` passes the input through (ReLU of an identity
    kernel), ``last`` sums its channels, ``fc`` gives (-mean, +mean)."""
    kernel = (2, 1) + (3,) * spatial_dims
    features = torch.zeros(kernel)
    features[:, 0][(1,) * spatial_dims] = 1.0  # the kernel's centre
    return {
        "features.weight": features,
        "features.bias": torch.zeros(2),
        "last.weight": torch.full((2, 2) + (1,) * spatial_dims, 0.5),
        "last.bias": torch.zeros(2),
        "fc.weight": torch.tensor([[-1.0, -1.0], [1.0, 1.0]]),
        "fc.bias": torch.zeros(2),
    }


def _metadata(spatial: list[object], outputs: dict[str, object]) -> str:
    return json.dumps(
        {
            "version": "0.1.0",
            "name": "box-looker",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": spatial}},
                "outputs": {"pred": outputs},
            },
        }
    )


def box_classifier_bundle(directory: Path, spatial_dims: int) -> Path:
    """A classification bundle around BoxNet: 2-D resizes the image to 64x64; 3-D reorients
    to RAS, windows the HU and resizes to 32x32x16."""
    root = Path(directory) / f"box_classifier_{spatial_dims}d"
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "boxnet.py").write_text(_BOXNET.format(box=BOX[:spatial_dims]))
    if spatial_dims == 2:
        spatial = [
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "Resized", "keys": "image", "spatial_size": [64, 64]},
        ]
    else:
        spatial = [
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
            {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32, 16]},
        ]
    config = {
        "imports": ["$import scripts.boxnet"],
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "scripts.boxnet.BoxNet", "spatial_dims": spatial_dims},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                *spatial,
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    outputs: dict[str, object] = {
        "type": "probabilities",
        "channel_def": {"0": "elsewhere", "1": "box"},
    }
    shape: list[object] = [64, 64] if spatial_dims == 2 else [32, 32, 16]
    (root / "configs" / "metadata.json").write_text(_metadata(shape, outputs))
    torch.save(_boxnet_state(spatial_dims), root / "models" / "model.pt")
    return root


def retinanet_bundle(directory: Path) -> Path:
    """The zoo's lung nodule detection bundle as shipped (config, detector ops, inferer
    script), but a small feature extractor for its ResNet50 (torchvision-free), spacing for
    the phantom's 6 mm voxels, and every box kept (seeded weights score near 0.01), weights
    seeded."""
    root = Path(directory) / "lung_nodule_ct_detection"
    shutil.copytree(shared_bundle("lung_nodule_ct_detection"), root, dirs_exist_ok=True)
    (root / "scripts" / "tiny_features.py").write_text(_TINY_FEATURES)
    path = root / "configs" / "inference.json"
    config = json.loads(path.read_text())
    del config["backbone"]
    config["feature_extractor"] = {"_target_": "scripts.tiny_features.TinyFeatures"}
    config["anchor_generator"]["feature_map_scales"] = [1, 2]
    for transform in config["preprocessing"]["transforms"]:
        if transform["_target_"] == "Spacingd":
            transform["pixdim"] = [6.0, 6.0, 6.0]
    config["detector_ops"][1] = config["detector_ops"][1].replace(
        "score_thresh=0.02", "score_thresh=0.0"
    )
    path.write_text(json.dumps(config, indent=2))
    write_weights(root)
    return root
