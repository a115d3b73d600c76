"""What a model returns, independent of how it is encoded.

A segmentation's label map is laid out like the source frames: ``label_map[k]`` is the
mask plane of the k-th source instance in ``source_sop_instance_uids`` order (rows,
columns exactly as in the source image).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt


class AlgorithmFamily(Enum):
    """CID 7162 Surface Processing Algorithm Families, the two we use."""

    ARTIFICIAL_INTELLIGENCE = "artificial-intelligence"
    CLASSICAL = "classical"


@dataclass(frozen=True)
class AlgorithmIdentification:
    """Who made the findings: goes into the SEG's and SR's algorithm identification."""

    name: str
    version: str
    family: AlgorithmFamily
    intended_use: str = ""


@dataclass(frozen=True)
class SegmentLabel:
    """One label value of a label map and the model's name for it (e.g. ``spleen``)."""

    value: int
    name: str


@dataclass(frozen=True)
class SegmentationFindings:
    """A label map on the source grid plus the names of its labels."""

    label_map: npt.NDArray[np.uint16]
    labels: tuple[SegmentLabel, ...]
    algorithm: AlgorithmIdentification
    source_sop_instance_uids: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.label_map.ndim != 3:
            raise ValueError(
                f"label_map must be (frames, rows, columns), got {self.label_map.shape}"
            )
        if self.label_map.shape[0] != len(self.source_sop_instance_uids):
            raise ValueError(
                f"label_map has {self.label_map.shape[0]} frames for "
                f"{len(self.source_sop_instance_uids)} source instances"
            )

    def present_labels(self) -> tuple[SegmentLabel, ...]:
        """Labels with at least one voxel, in label-value order."""
        present = set(np.unique(self.label_map).tolist())
        return tuple(label for label in self.labels if label.value in present and label.value != 0)
