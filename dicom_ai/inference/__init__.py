"""Series -> volume -> model -> findings. Knows nothing of networks or DICOM encoding."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)

if TYPE_CHECKING:
    from dicom_ai.inference.model import SegmentationModel, load_model
    from dicom_ai.inference.volume import SeriesVolume, load_series

__all__ = [
    "AlgorithmFamily",
    "AlgorithmIdentification",
    "SegmentLabel",
    "SegmentationFindings",
    "SegmentationModel",
    "SeriesVolume",
    "load_model",
    "load_series",
]

# Loaded on first use: results/ imports the findings through this package, and the node's
# main process must not pull in torch and MONAI with them.
_LAZY = {
    "SegmentationModel": "dicom_ai.inference.model",
    "load_model": "dicom_ai.inference.model",
    "SeriesVolume": "dicom_ai.inference.volume",
    "load_series": "dicom_ai.inference.volume",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
