"""How a bundle's configs are read: JSON or YAML, merged files, weights where the config's
checkpoint loader reads them, ``label_def``, CUDA asked for on a machine without one, an
architecture file holding numpy arrays, file readers the node lacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicom_ai.errors import ModelError
from dicom_ai.inference.bundle import BundleModel, bundle_config_files, read_bundle_labels
from tests.inference.test_bundle import _tiny_bundle


def _config(bundle: Path) -> dict[str, object]:
    config: dict[str, object] = json.loads((bundle / "configs" / "inference.json").read_text())
    return config


def _as_yaml(bundle: Path) -> dict[str, object]:
    config = _config(bundle)
    (bundle / "configs" / "inference.json").unlink()
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    return config


def test_yaml_config_and_label_def(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    _as_yaml(bundle)
    meta_path = bundle / "configs" / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    pred["label_def"] = pred.pop("channel_def")
    meta_path.write_text(json.dumps(metadata))
    model = BundleModel(bundle, "cpu")
    assert [label.name for label in model.labels] == ["bright", "dark"]
    assert bundle_config_files(bundle) == [bundle / "configs" / "inference.yaml"]


def test_config_files_merge_in_order(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    # A second file overrides the network: 3 output channels become a mismatch.
    (bundle / "configs" / "bigger.yaml").write_text(
        yaml.safe_dump(
            {
                "network_def": {
                    "_target_": "torch.nn.Conv3d",
                    "in_channels": 1,
                    "out_channels": 5,
                    "kernel_size": 1,
                }
            }
        )
    )
    assert BundleModel(bundle, "cpu", config_files=["inference.json"]).network.out_channels == 3
    with pytest.raises(ModelError, match="size mismatch"):
        BundleModel(bundle, "cpu", config_files=["inference.json", "bigger.yaml"])
    with pytest.raises(ModelError, match=r"missing configs/nothere\.yaml"):
        BundleModel(bundle, "cpu", config_files=["nothere.yaml"])


def test_weights_where_the_handlers_checkpoint_loader_reads(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    config = _config(bundle)
    config["network"] = "$@network_def"
    config["handlers"] = [
        {"_target_": "StatsHandler"},
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/fine_tuned.pt'",
            "load_dict": {"net": "@network"},
        },
    ]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)["model"]
    state["bias"] = torch.tensor([1.0, 2.0, 3.0])
    torch.save({"net": state}, bundle / "models" / "fine_tuned.pt")
    model = BundleModel(bundle, "cpu")
    assert model.weights_path.name == "fine_tuned.pt"
    assert model.network.state_dict()["bias"].tolist() == [1.0, 2.0, 3.0]


def test_torchscript_weights(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=False)
    network = BundleModel(bundle, "cpu").network
    (bundle / "models" / "model.pt").unlink()
    torch.jit.script(network).save(str(bundle / "models" / "model.ts"))
    model = BundleModel(bundle, "cpu")
    assert model.weights_path.name == "model.ts"
    assert isinstance(model.network, torch.jit.ScriptModule)


def test_cuda_in_the_config_runs_on_cpu_and_numpy_architecture_file(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    config = _as_yaml(bundle)
    # As DiNTS bundles do: an architecture file of numpy arrays, mapped to CUDA.
    torch.save({"channels": np.array([3])}, bundle / "models" / "arch.pt")
    config["arch"] = (
        "$torch.load(@bundle_root + '/models/arch.pt', map_location=torch.device('cuda'))"
    )
    config["network_def"] = {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": "$int(@arch['channels'][0])",
        "kernel_size": 1,
        "device": "cuda:0",
    }
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    model = BundleModel(bundle, "cpu")
    assert model.network.weight.device.type == "cpu"
    assert model.network.out_channels == 3


def test_a_reader_the_node_lacks_is_not_needed(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    config = _config(bundle)
    preprocessing = config["preprocessing"]
    assert isinstance(preprocessing, dict)
    preprocessing["transforms"][0]["reader"] = "NoSuchReader"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert BundleModel(bundle, "cpu").labels


def test_labels_from_label_def_drop_background() -> None:
    metadata = {
        "network_data_format": {
            "outputs": {"pred": {"label_def": {"0": "background", "1": "liver", "3": "pancreas"}}}
        }
    }
    assert [(label.value, label.name) for label in read_bundle_labels(metadata)] == [
        (1, "liver"),
        (3, "pancreas"),
    ]


def test_pretrained_backbones_are_not_downloaded(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    config = _config(bundle)
    # A constructor that downloads when asked for pretrained weights (as torchvision's do).
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "net.py").write_text(
        "import torch\n"
        "def conv(pretrained=False, **kwargs):\n"
        "    if pretrained:\n"
        "        raise OSError('would download weights')\n"
        "    return torch.nn.Conv3d(**kwargs)\n"
    )
    network = config["network_def"]
    assert isinstance(network, dict)
    network["_target_"] = "scripts.net.conv"
    network["pretrained"] = True
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert BundleModel(bundle, "cpu").network.out_channels == 3


def test_a_failing_transform_is_named_with_its_own_error(tmp_path: Path) -> None:
    from dicom_ai.inference.volume import load_series
    from dicom_ai.synthetic import PhantomSpec, write_phantom_ct

    bundle = _tiny_bundle(tmp_path / "b", wrap=True)
    config = _config(bundle)
    preprocessing = config["preprocessing"]
    assert isinstance(preprocessing, dict)
    # Channel 3 of a one-channel image: MONAI wraps the IndexError in "applying transform".
    preprocessing["transforms"].append({"_target_": "SplitDimd", "keys": "image", "dim": 5})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    spec = PhantomSpec(slices=4, rows=16, columns=16, pixel_spacing_mm=20.0)
    volume = load_series(write_phantom_ct(tmp_path / "ct", spec))
    with pytest.raises(ModelError, match=r"failed on the series: SplitDimd: ") as failure:
        BundleModel(bundle, "cpu")(volume)
    assert "applying transform" not in str(failure.value)
