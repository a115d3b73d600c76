"""Classification and detection bundles in MONAI model-zoo layout, written by the tests.

- :func:`make_cxr_classifier_bundle`: a 2-D DenseNet121 for CR/DX chest radiographs with
  three classes. Its weights are random (seeded) except the last linear layer: zero weights
  and a chosen bias, so the probabilities are ``softmax(CXR_LOGITS)`` whatever the image,
  and the test knows every number the SR must carry. The postprocessing ends with
  ``AsDiscreted(argmax)`` as zoo classifiers do; the node must report probabilities anyway.
- :func:`make_box_detector_bundle`: a detector in ``scripts/`` (imported by the config, as
  zoo bundles do) that returns the boxes stored in its weights, in MONAI's detector output
  format, on the image after the bundle's ``Orientationd(RAS)``: the test controls the
  boxes and computes where they are in patient space by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

__all__ = [
    "CXR_CLASSES",
    "CXR_LOGITS",
    "DETECTOR_BOXES",
    "DETECTOR_SCORES",
    "chest_radiograph",
    "cxr_probabilities",
    "display_values",
    "expected_box_lps",
    "make_box_detector_bundle",
    "make_cxr_classifier_bundle",
]

CXR_CLASSES = ("normal", "pneumonia", "pleural effusion")
CXR_LOGITS = (-1.0, 1.5, 1.0)
# xyzxyz in voxels of the RAS-oriented image; the third one scores under the threshold.
DETECTOR_BOXES = (
    (10.0, 20.0, 2.0, 30.0, 36.0, 6.0),
    (40.0, 8.0, 1.0, 44.0, 12.0, 3.0),
    (0, 0, 0, 4, 4, 2),
)
DETECTOR_SCORES = (0.92, 0.61, 0.2)


def cxr_probabilities() -> tuple[float, ...]:
    """softmax(CXR_LOGITS), computed here without torch."""
    exps = [math.exp(v) for v in CXR_LOGITS]
    return tuple(e / sum(exps) for e in exps)


def _metadata(name: str, outputs: dict[str, object], spatial: list[object], intended: str) -> str:
    return json.dumps(
        {
            "version": "0.1.0",
            "name": name,
            "intended_use": intended,
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image",
                        "format": "magnitude",
                        "num_channels": 1,
                        "spatial_shape": spatial,
                    }
                },
                "outputs": {"pred": outputs},
            },
        },
        indent=2,
    )


def make_cxr_classifier_bundle(directory: Path) -> Path:
    """A 2-D classification bundle (``directory / "cxr_classification"``)."""
    from monai.networks.nets import DenseNet121

    root = Path(directory) / "cxr_classification"
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    config = {
        "image_key": "image",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "DenseNet121",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": len(CXR_CLASSES),
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityd", "keys": "image"},
                {"_target_": "Resized", "keys": "image", "spatial_size": [224, 224]},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    outputs = {
        "type": "probabilities",
        "format": "classes",
        "num_channels": len(CXR_CLASSES),
        "channel_def": {str(k): name for k, name in enumerate(CXR_CLASSES)},
    }
    (root / "configs" / "metadata.json").write_text(
        _metadata("cxr-densenet", outputs, [224, 224], "Test model: chest radiograph triage")
    )
    torch.manual_seed(7)
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(CXR_CLASSES))
    state = network.state_dict()
    state["class_layers.out.weight"] = torch.zeros_like(state["class_layers.out.weight"])
    state["class_layers.out.bias"] = torch.tensor(CXR_LOGITS)
    torch.save(state, root / "models" / "model.pt")
    return root


_DETECTOR_SCRIPT = '''"""Test double for RetinaNet: returns the boxes in its weights."""

import torch


class StoredBoxes(torch.nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.box = torch.nn.Parameter(torch.zeros(count, 6), requires_grad=False)
        self.label_scores = torch.nn.Parameter(torch.zeros(count), requires_grad=False)

    def forward(self, images: torch.Tensor) -> list:
        labels = torch.zeros(self.box.shape[0], dtype=torch.long)
        return [
            {"box": self.box.clone(), "label": labels, "label_scores": self.label_scores.clone()}
            for _ in range(images.shape[0])
        ]
'''


def make_box_detector_bundle(directory: Path) -> Path:
    """A 3-D detection bundle (``directory / "box_detection"``)."""
    root = Path(directory) / "box_detection"
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "stored_boxes.py").write_text(_DETECTOR_SCRIPT)
    config = {
        "imports": ["$import scripts.stored_boxes"],
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": {
            "_target_": "scripts.stored_boxes.StoredBoxes",
            "count": len(DETECTOR_BOXES),
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
                    "a_min": -1024,
                    "a_max": 300,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": []},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    outputs = {
        "type": "object",
        "format": "dict",
        "channel_def": {"0": "lung nodule"},
    }
    (root / "configs" / "metadata.json").write_text(
        _metadata("box-detector", outputs, ["n", "n", "n"], "Test model: stored boxes")
    )
    state = {
        "box": torch.tensor(DETECTOR_BOXES, dtype=torch.float32),
        "label_scores": torch.tensor(DETECTOR_SCORES, dtype=torch.float32),
    }
    torch.save(state, root / "models" / "model.pt")
    return root


def expected_box_lps(
    box: tuple[float, ...],
    *,
    columns: int,
    rows: int,
    first_ipp: tuple[float, float, float],
    pixel_spacing: float,
    slice_spacing: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Centre and (width, height, depth) in LPS of a box given on the RAS-oriented image of
    an axial, head-first-supine series (rows along +x, columns along +y in LPS).

    MONAI's box convention: coordinate i is voxel i's centre. Orientationd(RAS) flips the
    first two axes of such a series (LPS x, y -> RAS -x, -y): RAS coordinate a along the
    first axis is source column ``columns - 1 - a``.
    """
    low, high = np.array(box[:3], dtype=np.float64), np.array(box[3:], dtype=np.float64)
    centre = (low + high) / 2
    column = columns - 1 - centre[0]
    row = rows - 1 - centre[1]
    lps = np.array(
        [
            first_ipp[0] + column * pixel_spacing,
            first_ipp[1] + row * pixel_spacing,
            first_ipp[2] + centre[2] * slice_spacing,
        ]
    )
    size = (high - low) * np.array([pixel_spacing, pixel_spacing, slice_spacing])
    return lps, size


def chest_radiograph(
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME1",
    rows: int = 256,
    columns: int = 200,
    seed: int = 3,
) -> Dataset:
    """A synthetic chest radiograph (CR or DX Image Storage) with pixel data.

    Body and bone attenuate more than the lungs: in *display* terms lungs are dark and bone
    bright. Stored values follow the photometric interpretation: MONOCHROME1 stores the
    lungs high (white = low values), MONOCHROME2 stores them low. ``display_values(ds)``
    gives the expected brightness either way.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    brightness = np.full((rows, columns), 300.0)  # air outside the body: dark
    body = ((x - columns / 2) / (0.45 * columns)) ** 2 + ((y - rows / 2) / (0.48 * rows)) ** 2 < 1
    brightness[body] = 2000.0
    for side in (-1, 1):
        lung = ((x - columns / 2 - side * 0.2 * columns) / (0.14 * columns)) ** 2 + (
            (y - rows * 0.45) / (0.3 * rows)
        ) ** 2 < 1
        brightness[lung] = 800.0
    spine = (np.abs(x - columns / 2) < 0.04 * columns) & body
    brightness[spine] = 3500.0
    brightness += rng.normal(0, 20, brightness.shape)
    display = np.clip(brightness, 0, 4095).astype(np.uint16)
    stored = (4095 - display) if photometric == "MONOCHROME1" else display
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    uid = generate_uid(entropy_srcs=[modality, photometric, str(seed)])
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", modality, str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", modality, photometric, str(seed)])
    ds.Modality = modality
    ds.PatientName = "CHEST^SYNTHETIC"
    ds.PatientID = "CXR-0001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = "ACC-CXR"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "dicom-ai test"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Laterality = ""
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.4, 0.4]
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.BurnedInAnnotation = "NO"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def display_values(ds: Dataset) -> npt.NDArray[np.float64]:
    """What a viewer shows (brighter = higher), independent of the loader under test."""
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    values = stored.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = (2 ** int(ds.BitsStored) - 1) - values
    return values
