"""Series -> volume -> model -> findings. Knows nothing of networks or DICOM encoding."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    ClassificationFindings,
    ClassScore,
    Detection,
    DetectionFindings,
    Findings,
    ImageClassification,
    ImageDetection,
    ImageDetectionFindings,
    Landmark,
    LandmarkFindings,
    SegmentationFindings,
    SegmentLabel,
    TaskKind,
)

if TYPE_CHECKING:
    from dicom_ai.inference.model import Model, load_model
    from dicom_ai.inference.planar import PlanarImage
    from dicom_ai.inference.volume import SeriesVolume, load_series

__all__ = [
    "AlgorithmFamily",
    "AlgorithmIdentification",
    "ClassScore",
    "ClassificationFindings",
    "Detection",
    "DetectionFindings",
    "Findings",
    "ImageClassification",
    "ImageDetection",
    "ImageDetectionFindings",
    "Landmark",
    "LandmarkFindings",
    "Model",
    "PlanarImage",
    "SegmentLabel",
    "SegmentationFindings",
    "SeriesVolume",
    "TaskKind",
    "load_model",
    "load_series",
]

# Loaded on first use: results/ imports the findings through this package, and the node's
# main process must not pull in torch and MONAI with them.
_LAZY = {
    "Model": "dicom_ai.inference.model",
    "load_model": "dicom_ai.inference.model",
    "PlanarImage": "dicom_ai.inference.planar",
    "SeriesVolume": "dicom_ai.inference.volume",
    "load_series": "dicom_ai.inference.volume",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
