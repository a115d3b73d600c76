"""Built-in ``ct-body`` model: soft tissue, lungs and bone of a CT from Hounsfield thresholds.

No weights, no download: a classical pipeline that gives every CT a plausible result in a
second or two, so the node works out of the box and the SEG/SR path can be exercised.

One label per voxel: ``soft tissue`` (1) is everything inside the patient that is neither
lung nor bone (muscle, organs, fat, bowel gas, ...), ``lung`` (2) the aerated lung (trachea
included), ``bone`` (3) voxels at or above the bone threshold. Label 1 was ``body`` (Entire
body) before 1.1.0, which a reader took for the whole patient's volume.

Topology (which blob is the patient, what is enclosed, which air pockets are lung, which
bright specks are noise) is decided on a coarse grid of about 3 mm, where connected
components are cheap; the coarse decisions are then brought back to the full grid and
intersected with full-resolution thresholds, so the boundaries stay sharp.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from monai.transforms.post.array import KeepLargestConnectedComponent, RemoveSmallObjects
from scipy import ndimage

from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
    TaskKind,
)
from dicom_ai.inference.model import ModelInput, require_volume

__all__ = ["CT_BODY_LABELS", "CTBodyModel"]

MODEL_ID = "ct-body"
VERSION = "1.1.0"
BODY, LUNG, BONE = 1, 2, 3
CT_BODY_LABELS = (
    SegmentLabel(BODY, "soft tissue"),
    SegmentLabel(LUNG, "lung"),
    SegmentLabel(BONE, "bone"),
)

# Bits of the coarse code volume, so one upsampling carries every coarse decision.
_INSIDE, _HOLE, _LUNG, _BONE = 1, 2, 4, 8
_SLAB = 16  # slices per full-resolution pass
# In-plane neighbours only: holes are filled slice by slice (a trachea leaving the top slice
# must not stop the lungs being enclosed).
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


class CTBodyModel:
    """Threshold model: ``CTBodyModel()(volume)`` -> :class:`SegmentationFindings`.

    Args:
        body_hu: above this the voxel is patient, not air.
        lung_hu: enclosed air below this is a lung candidate.
        gas_median_hu: an enclosed air component whose median is below this is gas (bowel),
            not lung parenchyma (which sits around -850 HU).
        bone_hu: at or above this the voxel is bone.
        min_lung_ml: smaller lung candidates are dropped.
        min_bone_ml: smaller bone fragments are dropped (noise specks in low-dose scans).
        working_spacing_mm: voxel size of the coarse grid used for connected components.
    """

    model_id = MODEL_ID
    task = TaskKind.SEGMENTATION
    spatial_dims = 3

    def __init__(
        self,
        *,
        body_hu: float = -500.0,
        lung_hu: float = -400.0,
        gas_median_hu: float = -970.0,
        bone_hu: float = 200.0,
        min_lung_ml: float = 5.0,
        min_bone_ml: float = 0.1,
        working_spacing_mm: float = 3.0,
    ) -> None:
        self.body_hu = body_hu
        self.lung_hu = lung_hu
        self.gas_median_hu = gas_median_hu
        self.bone_hu = bone_hu
        self.min_lung_ml = min_lung_ml
        self.min_bone_ml = min_bone_ml
        self.working_spacing_mm = working_spacing_mm
        self.labels: tuple[SegmentLabel, ...] = CT_BODY_LABELS
        self.algorithm = AlgorithmIdentification(
            name="dicom-ai CT body/lung/bone",
            version=VERSION,
            family=AlgorithmFamily.CLASSICAL,
            intended_use="Demonstration and testing; not for diagnostic use",
        )
        self._largest = KeepLargestConnectedComponent(connectivity=1)

    def __call__(self, source: ModelInput) -> SegmentationFindings:
        volume = require_volume(source, self.model_id)
        label_map = self.segment(volume.frames, volume.spacing_mm[::-1])
        return SegmentationFindings(
            label_map=label_map,
            labels=self.labels,
            algorithm=self.algorithm,
            source_sop_instance_uids=volume.sop_instance_uids,
            source_frame_numbers=volume.frame_numbers,
        )

    def segment(
        self, hu: npt.NDArray[np.floating[Any]], spacing_mm: tuple[float, float, float]
    ) -> npt.NDArray[np.uint16]:
        """Label map for ``hu`` laid out ``(slices, rows, columns)`` with that voxel size."""
        factors = tuple(
            max(1, round(self.working_spacing_mm / s)) if s > 0 else 1 for s in spacing_mm
        )
        coarse_spacing = tuple(s * f for s, f in zip(spacing_mm, factors, strict=True))
        voxel_ml = math.prod(coarse_spacing) / 1000.0
        # Coarse grid: the voxel at each block's centre, plus "any bone in the block" so thin
        # cortex (ribs) is not lost by the sampling.
        sample = hu[np.ix_(*_block_centres(hu.shape, factors))]
        patient = np.asarray(self._largest(sample[None] > self.body_hu))[0].astype(bool)
        filled = ndimage.binary_fill_holes(patient, structure=_IN_PLANE)
        holes = filled & ~patient
        lung = self._lungs(holes & (sample < self.lung_hu), sample, voxel_ml)
        bone = _block_any(hu, self.bone_hu, factors, sample.shape) & ndimage.binary_dilation(filled)
        with warnings.catch_warnings():
            # skimage deprecates the min_size argument MONAI passes; same semantics for us.
            warnings.simplefilter("ignore", FutureWarning)
            bone = np.asarray(
                RemoveSmallObjects(
                    min_size=max(1, round(self.min_bone_ml / voxel_ml)), connectivity=3
                )(bone[None])
            )[0].astype(bool)

        # One dilation step covers the block edges that the full-resolution thresholds then
        # trim; enclosed air is not grown into blocks next to outside air, where the
        # threshold cannot tell a lung edge from the air around the patient.
        near_outside = ndimage.binary_dilation(~filled)
        code = np.zeros(sample.shape, dtype=np.uint8)
        code[ndimage.binary_dilation(filled)] |= _INSIDE
        code[ndimage.binary_dilation(holes) & ~near_outside | holes] |= _HOLE
        code[ndimage.binary_dilation(lung) & ~near_outside | lung] |= _LUNG
        code[bone] |= _BONE

        label_map = np.empty(hu.shape, dtype=np.uint16)
        index = _block_index(hu.shape, factors, code.shape)
        # Full resolution in slabs, so the temporaries stay in cache and memory stays flat.
        for start in range(0, hu.shape[0], _SLAB):
            stop = min(start + _SLAB, hu.shape[0])
            self._label_slab(
                hu[start:stop],
                code[np.ix_(index[0][start:stop], index[1], index[2])],
                label_map[start:stop],
            )
        return label_map

    def _label_slab(
        self,
        hu: npt.NDArray[np.floating[Any]],
        code: npt.NDArray[np.uint8],
        out: npt.NDArray[np.uint16],
    ) -> None:
        inside = (code & _INSIDE).astype(bool)
        inside &= (hu > self.body_hu) | (code & _HOLE).astype(bool)
        out[...] = inside
        out[inside & (code & _LUNG).astype(bool) & (hu < self.lung_hu)] = LUNG
        out[inside & (code & _BONE).astype(bool) & (hu >= self.bone_hu)] = BONE

    def _lungs(
        self,
        candidates: npt.NDArray[np.bool_],
        sample: npt.NDArray[np.floating[Any]],
        voxel_ml: float,
    ) -> npt.NDArray[np.bool_]:
        """Enclosed air big enough and not pure gas: lung parenchyma (and its airways)."""
        remove = RemoveSmallObjects(
            min_size=max(1, round(self.min_lung_ml / voxel_ml)), connectivity=1
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            kept = np.asarray(remove(candidates[None]))[0].astype(bool)
        components, count = ndimage.label(kept)
        values, ids = sample[kept], components[kept]
        lung_ids = [
            i for i in range(1, count + 1) if np.median(values[ids == i]) >= self.gas_median_hu
        ]
        return np.isin(components, lung_ids)


def _block_centres(shape: tuple[int, ...], factors: tuple[int, ...]) -> list[npt.NDArray[np.intp]]:
    return [
        np.minimum(np.arange(math.ceil(n / f)) * f + f // 2, n - 1)
        for n, f in zip(shape, factors, strict=True)
    ]


def _block_index(
    shape: tuple[int, ...], factors: tuple[int, ...], coarse: tuple[int, ...]
) -> list[npt.NDArray[np.intp]]:
    return [
        np.minimum(np.arange(n) // f, c - 1) for n, f, c in zip(shape, factors, coarse, strict=True)
    ]


def _block_any(
    hu: npt.NDArray[np.floating[Any]],
    threshold: float,
    factors: tuple[int, ...],
    coarse: tuple[int, ...],
) -> npt.NDArray[np.bool_]:
    """True where any voxel of the block reaches ``threshold`` (max pooling, no padding)."""
    peak = np.full(coarse, -np.inf, dtype=np.float32)
    fz, fr, fc = factors
    for a in range(fz):
        for b in range(fr):
            for c in range(fc):
                view = hu[a::fz, b::fr, c::fc]
                part = peak[: view.shape[0], : view.shape[1], : view.shape[2]]
                np.maximum(part, view, out=part)
    return peak >= threshold
