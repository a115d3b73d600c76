"""Tiny MONAI bundles (model-zoo layout, config as data) for the study tests, and the CT
phases they read.

- :func:`make_enhancement_bundle`: contrast enhancement from CT phases given as input keys
  (a study rule's ``input: keys``): ``pre`` (unenhanced), ``post`` and an optional
  ``delayed`` phase. ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``ConcatItemsd`` (into
  ``image``: pre, then the contrast phases present) -> a network whose logits are
  0 (background) and ``max(contrast phases) - pre - threshold`` (label 1,
  :data:`ENHANCEMENT_LABEL`: enhancing more than ``threshold`` HU, 50 in its weights) ->
  ``SimpleInferer`` -> ``AsDiscreted(argmax)``.
- :func:`make_slow_bundle`: one series; label 1 (:data:`SLOW_LABEL`) where HU > 0.
- :func:`write_phases`: CT phases of one study (one Frame of Reference, the same grid and
  noise) from :mod:`dicom_ai.synthetic`; a phase may add :data:`ENHANCEMENT_HU` in a box of
  voxels, so the enhancement model's SEG is exactly that box.

Taking time: the last preprocessing step of both writes ``<bundle>/started`` when a job
reaches it and waits up to ``seconds`` (default 0 for the enhancement bundle), less once
``<bundle>/release`` exists (:func:`release`): a test keeps a job running until it has seen
what it waits for (jobs queued behind it, a moment to kill the node), then lets every job
go at once. The wait is not in the network's forward: the node's start-time model check
runs the forward pass, and holds the model's jobs until it is done.

Each bundle's code lives in a ``scripts/`` module named for it: the node takes a bundle's
``scripts`` package fresh for each bundle it loads, and distinct module names keep two
bundles in one worker apart in any case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from pydicom.uid import generate_uid

from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

__all__ = [
    "ENHANCEMENT_HU",
    "ENHANCEMENT_LABEL",
    "LIVER_BOX",
    "OTHER_LIVER_BOX",
    "SLOW_LABEL",
    "Box",
    "Phase",
    "make_enhancement_bundle",
    "make_slow_bundle",
    "phase_spec",
    "release",
    "write_phases",
]

ENHANCEMENT_HU = 100  # what a contrast phase adds in its box; the model's threshold is 50
ENHANCEMENT_LABEL = "liver lesion"  # coded as SNOMED CT Lesion, anatomic region Liver
SLOW_LABEL = "liver"

_WAIT = """

class Wait:
    \"\"\"A preprocessing step that writes ``marker`` and waits up to ``seconds``, less once
    ``release`` exists. Not in the network: the node's start-time check runs the forward.\"\"\"

    def __init__(self, marker: str, release: str, seconds: float) -> None:
        self.marker, self.release, self.seconds = marker, release, seconds

    def __call__(self, data):
        Path(self.marker).write_text("job started")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not Path(self.release).exists():
            time.sleep(0.05)
        return data
"""

_ENHANCEMENT_SCRIPT = (
    '''"""Contrast enhancement: pre, then the contrast phases, as channels."""

import time
from pathlib import Path

import torch


class Enhancement(torch.nn.Module):
    """Logits: background 0, enhancing max(contrast phases) - pre - threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pre = images[:, :1]
        contrast = images[:, 1:].amax(dim=1, keepdim=True)
        enhancing = contrast - pre - self.threshold
        return torch.cat([torch.zeros_like(enhancing), enhancing], dim=1)
'''
    + _WAIT
)

_SLOW_SCRIPT = (
    '''"""A one-series model that takes its time: HU above 0 is label 1."""

import time
from pathlib import Path

import torch


class Threshold(torch.nn.Module):
    """Logits: background 0, label 1 HU - threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(images), images - self.threshold], dim=1)
'''
    + _WAIT
)


def _write_bundle(
    root: Path,
    module: str,
    script: str,
    network: str,
    keys: list[str],
    num_channels: int,
    label: str,
    threshold: float,
    seconds: float,
) -> Path:
    """The bundle at ``root``: ``scripts/<module>.py`` holds ``script``, whose ``network``
    class the config builds; a loader for ``keys``, concatenated into ``image`` when there
    are several."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / f"{module}.py").write_text(script)
    # A study job leaves an optional role's key out: every step allows missing keys.
    transforms: list[dict[str, object]] = [
        {"_target_": "LoadImaged", "keys": keys, "allow_missing_keys": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "allow_missing_keys": True},
    ]
    if keys != ["image"]:
        transforms.append(
            {"_target_": "ConcatItemsd", "keys": keys, "name": "image", "allow_missing_keys": True}
        )
    transforms += [
        {"_target_": "EnsureTyped", "keys": "image"},
        {
            "_target_": f"scripts.{module}.Wait",
            "marker": "$@bundle_root + '/started'",
            "release": "$@bundle_root + '/release'",
            "seconds": seconds,
        },
    ]
    config = {
        "imports": [f"$import scripts.{module}"],
        "bundle_root": str(root),
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": f"scripts.{module}.{network}"},
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    # "n": the node's start-time check runs the network on the smallest input, one voxel.
    spatial = ["n", "n", "n"]
    metadata = {
        "version": "0.1.0",
        "name": root.name,
        "intended_use": "Test model for study jobs; not for clinical use",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": num_channels,
                    "spatial_shape": spatial,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": spatial,
                    "channel_def": {"0": "background", "1": label},
                }
            },
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    torch.save({"threshold": torch.tensor([threshold])}, root / "models" / "model.pt")
    return root


def make_enhancement_bundle(
    directory: Path, seconds: float = 0.0, name: str = "enhancement"
) -> Path:
    """``directory / name``: label 1 (:data:`ENHANCEMENT_LABEL`) where a contrast phase
    (``post``, or ``delayed`` when given) is more than 50 HU above ``pre``; each job waits
    up to ``seconds`` before its network runs (see the module docstring)."""
    return _write_bundle(
        Path(directory) / name,
        "enhancement_net",
        _ENHANCEMENT_SCRIPT,
        "Enhancement",
        keys=["pre", "post", "delayed"],
        num_channels=2,  # pre and at least one contrast phase
        label=ENHANCEMENT_LABEL,
        threshold=50.0,
        seconds=seconds,
    )


def make_slow_bundle(directory: Path, seconds: float, name: str = "slow") -> Path:
    """``directory / name``: one series, label 1 (:data:`SLOW_LABEL`) where HU > 0; each
    job waits up to ``seconds`` before its network runs (see the module docstring)."""
    return _write_bundle(
        Path(directory) / name,
        "slow_net",
        _SLOW_SCRIPT,
        "Threshold",
        keys=["image"],
        num_channels=1,
        label=SLOW_LABEL,
        threshold=0.0,
        seconds=seconds,
    )


def release(bundle: Path) -> None:
    """Let every waiting and later job of ``bundle`` go on at once."""
    (bundle / "release").write_text("go")


# -- the CT phases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Voxels ``[slices) x [rows) x [columns)`` (slice 0 the most inferior)."""

    slices: tuple[int, int]
    rows: tuple[int, int]
    columns: tuple[int, int]

    def mask(self, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
        mask = np.zeros(shape, dtype=bool)
        mask[slice(*self.slices), slice(*self.rows), slice(*self.columns)] = True
        return mask

    @property
    def voxels(self) -> int:
        return int(np.prod([b - a for a, b in (self.slices, self.rows, self.columns)]))


# Inside the phantom's liver (64x64, slices 0-4 of 8): no clipping at 0 or 4095 HU + 1024.
LIVER_BOX = Box((1, 4), (26, 32), (17, 23))
OTHER_LIVER_BOX = Box((2, 4), (22, 26), (22, 26))


@dataclass(frozen=True)
class Phase:
    """One series of the study: its description, and where it enhances (None: nowhere)."""

    description: str
    enhancing: Box | None = None


def phase_spec(study: str, phase: Phase) -> PhantomSpec:
    """The phase's phantom: the study's UIDs and grid; the series UID from the phase."""
    return PhantomSpec(
        slices=8,
        rows=64,
        columns=64,
        pixel_spacing_mm=5.0,
        slice_thickness_mm=5.0,
        study_instance_uid=generate_uid(entropy_srcs=["phases", study]),
        frame_of_reference_uid=generate_uid(entropy_srcs=["phases", study, "frame"]),
        series_instance_uid=generate_uid(entropy_srcs=["phases", study, phase.description]),
        series_description=phase.description,
        seed=7,  # every phase the same noise: they differ only where contrast enhances
    )


def write_phases(directory: Path, study: str, phases: list[Phase]) -> dict[str, list[Path]]:
    """Write each phase of study ``study`` (a name: the same name, the same UIDs) under
    ``directory / <description>``; the paths in slice order, by description."""
    written: dict[str, list[Path]] = {}
    for phase in phases:
        spec = phase_spec(study, phase)
        folder = Path(directory) / phase.description
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, ds in enumerate(phantom_ct_datasets(spec)):
            box = phase.enhancing
            if box is not None and box.slices[0] <= k < box.slices[1]:
                pixels = ds.pixel_array.astype(np.int32)
                pixels[slice(*box.rows), slice(*box.columns)] += ENHANCEMENT_HU
                ds.PixelData = pixels.astype(np.uint16).tobytes()
            ds.SeriesNumber = 10 + len(written)  # the phases in the order written
            path = folder / f"CT{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        written[phase.description] = paths
    return written
