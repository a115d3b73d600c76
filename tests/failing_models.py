"""MONAI bundles (model-zoo layout) whose network misbehaves, for the isolation tests.

- :func:`make_crashing_bundle`: the network's forward dereferences a null pointer (a real
  SIGSEGV, as a broken native extension would), killing the worker process.
- :func:`make_hanging_bundle`: the network's forward writes ``<bundle>/started`` (so a test
  knows the model itself was reached, not just its loading) and then sleeps for an hour.
- :func:`make_slow_bundle`: the network's forward appends a line to a marker file given by
  absolute path (a bundle on a Ray cluster runs from a copy), sleeps, then segments.

Both bundles carry the same ``scripts/misbehave.py``: the node puts each bundle root on
``sys.path`` and Python caches the first ``scripts`` package a worker imports, so two
bundles with different ``scripts`` in one worker would see only the first one's modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["make_crashing_bundle", "make_hanging_bundle", "make_slow_bundle"]

_SCRIPT = '''"""Test doubles: a network that crashes its process, one that never returns."""

import ctypes
import time
from pathlib import Path

import torch


class Crash(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
        return images


class Hang(torch.nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.marker = marker

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        Path(self.marker).write_text("inference started")
        time.sleep(3600)
        return images


class Slow(torch.nn.Module):
    """Appends a line to ``marker`` (an absolute path), sleeps ``seconds``, then segments
    what is above 100 (Hounsfield units on a CT) as label 1."""

    def __init__(self, marker: str, seconds: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.marker = marker
        self.seconds = seconds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with open(self.marker, "a") as marker:
            marker.write("inference started; ")
        time.sleep(self.seconds)
        images = images if images.dim() == 5 else images.unsqueeze(1)  # no channel given
        above = (images > 100).float() * 2 - 1
        return torch.cat([-above, above], dim=1)
'''


def _make(directory: Path, name: str, network_def: dict[str, object]) -> Path:
    root = Path(directory) / name
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "misbehave.py").write_text(_SCRIPT)
    config = {
        "imports": ["$import scripts.misbehave"],
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": network_def,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    metadata = {
        "version": "0.0.1",
        "name": name,
        "intended_use": "Test model that misbehaves",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": ["n"] * 3}},
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "channel_def": {"0": "background", "1": "spleen"},
                }
            },
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    torch.save({"weight": torch.zeros(1)}, root / "models" / "model.pt")
    return root


def make_crashing_bundle(directory: Path) -> Path:
    """``directory / "crashing_model"``: segfaults in the network's forward."""
    return _make(directory, "crashing_model", {"_target_": "scripts.misbehave.Crash"})


def make_hanging_bundle(directory: Path) -> Path:
    """``directory / "hanging_model"``: writes ``started`` beside its configs, then sleeps."""
    return _make(
        directory,
        "hanging_model",
        {"_target_": "scripts.misbehave.Hang", "marker": "$@bundle_root + '/started'"},
    )


def make_slow_bundle(directory: Path, marker: Path, seconds: float) -> Path:
    """``directory / "slow_model"``: a line in ``marker`` per inference, ``seconds`` of
    sleep, then label 1 where the image is above 100."""
    return _make(
        directory,
        "slow_model",
        {"_target_": "scripts.misbehave.Slow", "marker": str(marker), "seconds": seconds},
    )
