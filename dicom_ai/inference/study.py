"""Several series of one study as one model input, on the reference series' grid.

A study job (a rule with roles) names, per role, the series chosen for it; optional roles
may have none. :func:`load_study` loads each with :func:`~dicom_ai.inference.volume.load_series`
and resamples every role but the reference onto the reference role's grid, in patient
space, with MONAI's ``ResampleToMatch`` (bilinear; outside a series' field of view the
image is 0, as a sequence that did not image a region gives no signal there). The result,
a :class:`StudyInput`, holds the images in the rule's role order; the model's results lie
on the reference series' frames.

Refused with :class:`~dicom_ai.errors.InputError`, naming the role: a series whose Frame of
Reference UID is not the reference series' (patient space is only shared within one; the
node does no registration, and never combines such series silently), and one whose volume
does not overlap the reference grid at all.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.spatial.array import ResampleToMatch
from pydicom.dataset import Dataset

from dicom_ai.errors import InputError
from dicom_ai.inference.arena import PrefetchArena
from dicom_ai.inference.volume import SeriesVolume, load_series

__all__ = ["ROLE_INPUTS", "RoleInputMode", "StudyInput", "load_study"]

logger = logging.getLogger(__name__)

RoleInputMode = Literal["channels", "keys"]
ROLE_INPUTS: tuple[RoleInputMode, ...] = ("channels", "keys")


@dataclass(frozen=True, eq=False)
class StudyInput:
    """The series of a study job, each role's image on the reference grid.

    ``images`` is every role in the rule's order, ``(role, image)``: the reference role's
    image is ``reference.image`` itself, the others are resampled copies with the reference
    affine and shape, ``(1, columns, rows, slices)`` float32; None for an optional role that
    did not come. ``others`` are the non-reference roles' series as loaded (their headers
    name them in the report). ``mode``: ``channels`` (the images stacked as the bundle's
    input channels in role order) or ``keys`` (each image under its role name).
    """

    reference: SeriesVolume
    reference_role: str
    images: tuple[tuple[str, MetaTensor | None], ...]
    others: Mapping[str, SeriesVolume]
    mode: RoleInputMode = "channels"

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.images)

    @property
    def missing(self) -> tuple[str, ...]:
        """The roles without a series (optional roles that did not come)."""
        return tuple(role for role, image in self.images if image is None)

    @property
    def other_headers(self) -> list[Dataset]:
        """Every instance header of the other roles' series, in role order."""
        return [h for role in self.roles if role in self.others for h in self.others[role].headers]


def load_study(
    roles: Sequence[tuple[str, Sequence[Path]]],
    reference_role: str,
    mode: str = "channels",
    arena: PrefetchArena | None = None,
) -> StudyInput:
    """Load the series of each role (``(role, instance paths)`` in the rule's order; no
    paths: an optional role that did not come) and resample them onto the reference role's
    grid. ``arena``: the worker's, whose prefetched instances the loads take.

    Raises :class:`InputError` (see the module docstring) and what ``load_series`` raises.
    """
    if mode not in ROLE_INPUTS:
        raise InputError(f"unknown role input {mode!r} (channels or keys)")
    names = [role for role, _ in roles]
    if len(set(names)) != len(names):
        raise InputError(f"a role is named twice: {', '.join(names)}")
    paths = {role: tuple(Path(p) for p in files) for role, files in roles}
    if reference_role not in paths:
        raise InputError(f"the reference role {reference_role} is not one of the roles")
    if not paths[reference_role]:
        raise InputError(f"the reference role {reference_role} has no series")
    reference = load_series(paths[reference_role], arena)
    frame = _frame_of_reference(reference, reference_role)
    resample = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=np.float32)
    images: list[tuple[str, MetaTensor | None]] = []
    others: dict[str, SeriesVolume] = {}
    for role in names:
        if role == reference_role:
            images.append((role, reference.image))
            continue
        if not paths[role]:
            images.append((role, None))
            continue
        volume = load_series(paths[role], arena)
        uid = str(volume.headers[0].get("SeriesInstanceUID", "?"))
        theirs = _frame_of_reference(volume, role)
        if theirs != frame:
            raise InputError(
                f"role {role}: series {uid} has Frame of Reference {theirs}, the reference "
                f"role {reference_role} {frame}: no registration, not combined"
            )
        if not _overlaps(volume.image, reference.image):
            raise InputError(
                f"role {role}: series {uid} does not overlap the reference role "
                f"{reference_role}'s volume: nothing of it lies on the reference grid"
            )
        resampled = cast(MetaTensor, resample(volume.image, reference.image))
        logger.debug(
            "role %s: %s -> %s (the reference role %s's grid)",
            role,
            tuple(volume.image.shape[1:]),
            tuple(resampled.shape[1:]),
            reference_role,
        )
        images.append((role, resampled))
        others[role] = volume
    return StudyInput(reference, reference_role, tuple(images), others, mode)


def _frame_of_reference(volume: SeriesVolume, role: str) -> str:
    frame = str(volume.headers[0].get("FrameOfReferenceUID", "") or "")
    if not frame:
        uid = volume.headers[0].get("SeriesInstanceUID", "?")
        raise InputError(
            f"role {role}: series {uid} has no Frame of Reference UID: it cannot be placed "
            "in patient space with the other roles"
        )
    return frame


def _overlaps(image: MetaTensor, reference: MetaTensor) -> bool:
    """Whether the volume of ``image`` (its voxels as boxes) and the reference's share any
    space: the separating-axis test of two parallelepipeds, in the reference's voxel
    coordinates (where the reference is the box [-0.5, n - 0.5] along each axis)."""
    to_reference = np.linalg.inv(_affine(reference)) @ _affine(image)
    box = _corners(tuple(image.shape[1:]))
    theirs = (to_reference @ np.c_[box, np.ones(len(box))].T).T[:, :3]
    ours = _corners(tuple(reference.shape[1:]))
    edges = to_reference[:3, :3]  # their edge directions, as columns
    normals = np.linalg.inv(edges)  # their face normals, as rows
    axes = [*np.eye(3), *normals]
    axes += [np.cross(e, edges[:, j]) for e, j in itertools.product(np.eye(3), range(3))]
    for axis in axes:
        norm = float(np.linalg.norm(axis))
        if norm < 1e-9:  # parallel edges: no axis
            continue
        a, b = ours @ (axis / norm), theirs @ (axis / norm)
        if a.max() <= b.min() + 1e-6 or b.max() <= a.min() + 1e-6:
            return False
    return True


def _affine(image: MetaTensor) -> npt.NDArray[np.float64]:
    return np.asarray(torch.as_tensor(image.affine), dtype=np.float64)


def _corners(shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """The 8 corners of a voxel grid of ``shape`` (voxel centres at integers)."""
    extent = [(-0.5, n - 0.5) for n in shape[:3]]
    return np.array(list(itertools.product(*extent)), dtype=np.float64)
