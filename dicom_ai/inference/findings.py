"""What a model returns, independent of how it is encoded.

A segmentation's label map is laid out like the source frames: ``label_map[k]`` is the
mask plane of the k-th source instance in ``source_sop_instance_uids`` order (rows,
columns exactly as in the source image).
"""

from __future__ import annotations

import functools
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
    # 1-based frame numbers within the source instances, parallel to the UIDs, for
    # multi-frame sources (the same UID repeats); None when every source is single-frame.
    source_frame_numbers: tuple[int, ...] | None = None

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
        if self.source_frame_numbers is not None and len(self.source_frame_numbers) != len(
            self.source_sop_instance_uids
        ):
            raise ValueError("source_frame_numbers must parallel source_sop_instance_uids")

    @functools.cached_property
    def frame_voxel_counts(self) -> npt.NDArray[np.int64]:
        """``frame_voxel_counts[k, v]``: the number of voxels with label value ``v`` in
        frame ``k``. Counted once (a pass over the whole label map); :attr:`voxel_counts`
        sums it, the SR takes each segment's largest cross-section from it.

        One ``bincount`` per frame: a whole-volume ``bincount`` would first copy the volume
        to intp (8 bytes a voxel), and ``np.unique`` sorts it; both are far slower.
        """
        frames = self.label_map.shape[0]
        if self.label_map.size == 0:
            return np.zeros((frames, 1), dtype=np.int64)
        length = int(self.label_map.max()) + 1
        counts = np.empty((frames, length), dtype=np.int64)
        for k, plane in enumerate(self.label_map):
            counts[k] = np.bincount(plane.ravel(), minlength=length)
        return counts

    @functools.cached_property
    def voxel_counts(self) -> npt.NDArray[np.int64]:
        """``voxel_counts[v]``: the number of voxels with label value ``v``; SEG, SR and
        preview each need it (from :attr:`frame_voxel_counts`: one pass for both)."""
        counts: npt.NDArray[np.int64] = self.frame_voxel_counts.sum(axis=0, dtype=np.int64)
        return counts

    def present_labels(self) -> tuple[SegmentLabel, ...]:
        """Labels with at least one voxel, in label-value order."""
        present = set(np.flatnonzero(self.voxel_counts).tolist())
        return tuple(label for label in self.labels if label.value in present and label.value != 0)


class TaskKind(Enum):
    """What a model's output is, as MONAI bundle metadata describes ``outputs.pred``."""

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    LANDMARKS = "landmarks"


@dataclass(frozen=True)
class ClassScore:
    """One class of a classifier and the probability the model gave it (0..1)."""

    name: str
    probability: float


@dataclass(frozen=True)
class ImageClassification:
    """A classifier's scores for some source images: one image for a 2-D model, the series'
    images for a 3-D one."""

    scores: tuple[ClassScore, ...]
    source_sop_instance_uids: tuple[str, ...]
    source_frame_numbers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.source_sop_instance_uids:
            raise ValueError("a classification must name the images it is about")
        for score in self.scores:
            if not 0.0 <= score.probability <= 1.0:
                raise ValueError(f"probability of {score.name!r} is {score.probability}")


@dataclass(frozen=True)
class AttributionMap:
    """Where a classifier or detector looked for one class: an attribution map laid out like
    the source frames, ``values[k]`` on the k-th source instance (frame
    ``source_frame_numbers[k]`` of a multi-frame one), 0 (no evidence) .. 1 (the most).

    ``method`` is how it was computed (``gradcam``, ``gradcampp``, ``occlusion``), ``target``
    the class it explains (a detector's: the class of its highest-scoring box).
    """

    values: npt.NDArray[np.float32]
    source_sop_instance_uids: tuple[str, ...]
    method: str
    target: str
    source_frame_numbers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or self.values.dtype != np.float32:
            raise ValueError(
                f"values must be float32 (frames, rows, columns), got {self.values.dtype} "
                f"{self.values.shape}"
            )
        if self.values.shape[0] != len(self.source_sop_instance_uids):
            raise ValueError(
                f"values have {self.values.shape[0]} frames for "
                f"{len(self.source_sop_instance_uids)} source instances"
            )
        if self.source_frame_numbers is not None and len(self.source_frame_numbers) != len(
            self.source_sop_instance_uids
        ):
            raise ValueError("source_frame_numbers must parallel source_sop_instance_uids")


@dataclass(frozen=True)
class ClassificationFindings:
    """Class probabilities; a class counts as found at or above ``threshold``.

    ``attributions``: with the model's ``explain`` on, one map per result it was made for
    (a 2-D model's: each image; a 3-D model's: the series), in result order.
    """

    results: tuple[ImageClassification, ...]
    algorithm: AlgorithmIdentification
    threshold: float = 0.5
    attributions: tuple[AttributionMap, ...] = ()

    def found(self, result: ImageClassification) -> tuple[ClassScore, ...]:
        """The classes of ``result`` at or above the threshold, most probable first."""
        hits = [score for score in result.scores if score.probability >= self.threshold]
        return tuple(sorted(hits, key=lambda score: -score.probability))


@dataclass(frozen=True)
class Detection:
    """One detected object: an oriented box in patient space (DICOM LPS, mm).

    ``center`` is the box centre; ``edges`` holds the box's three full edge vectors as rows,
    ordered along the source series' row, column and slice directions (the box's own axes
    are those of the grid the model ran on, which may be the series' own or a reoriented
    one), so a box on an oblique series stays exact.
    """

    name: str
    score: float
    center: npt.NDArray[np.float64]
    edges: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        if self.center.shape != (3,) or self.edges.shape != (3, 3):
            raise ValueError("a detection needs a centre (3,) and three edge vectors (3, 3)")

    @property
    def size_mm(self) -> tuple[float, float, float]:
        """Edge lengths along the row, column and slice directions."""
        lengths = np.linalg.norm(self.edges, axis=1)
        return (float(lengths[0]), float(lengths[1]), float(lengths[2]))


@dataclass(frozen=True)
class DetectionFindings:
    """Detections on one series, in its frame of reference."""

    detections: tuple[Detection, ...]
    algorithm: AlgorithmIdentification
    source_sop_instance_uids: tuple[str, ...]
    frame_of_reference_uid: str
    source_frame_numbers: tuple[int, ...] | None = None
    # With the model's ``explain`` on: the map of its highest-scoring box, if it found any.
    attributions: tuple[AttributionMap, ...] = ()


@dataclass(frozen=True)
class ImageDetection:
    """One object a 2-D detector found on one image: an axis-aligned box in that image's
    pixel coordinates (``box``: first column, first row, last column, last row; pixel
    centres at integers, as DICOM's SCOORD has them at +0.5)."""

    name: str
    score: float
    source_sop_instance_uid: str
    box: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        if self.box.shape != (4,) or not (self.box[2:] >= self.box[:2]).all():
            raise ValueError("a 2-D detection needs a box (column, row, column, row), low first")


@dataclass(frozen=True)
class ImageDetectionFindings:
    """A 2-D detector's boxes on the images of one series (projection images included:
    no frame of reference is needed)."""

    detections: tuple[ImageDetection, ...]
    algorithm: AlgorithmIdentification
    source_sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class Landmark:
    """One located point: a landmark the model names, in patient space (DICOM LPS, mm),
    found on one source image (frame)."""

    name: str
    position: npt.NDArray[np.float64]
    source_sop_instance_uid: str
    source_frame_number: int | None = None

    def __post_init__(self) -> None:
        if self.position.shape != (3,):
            raise ValueError("a landmark needs a position (3,) in patient space")


@dataclass(frozen=True)
class LandmarkFindings:
    """Landmarks (points) on the images of one series, in its frame of reference."""

    landmarks: tuple[Landmark, ...]
    algorithm: AlgorithmIdentification
    source_sop_instance_uids: tuple[str, ...]
    frame_of_reference_uid: str


Findings = (
    SegmentationFindings
    | ClassificationFindings
    | DetectionFindings
    | ImageDetectionFindings
    | LandmarkFindings
)
"""Whatever a model returns."""
