"""2-D images (CR, DX, MG, single-frame SC/US, ...) for 2-D models, read one by one; and
what 2-D bundles' loaders expect made from them (:func:`with_channels`, :func:`cine_series`;
fed to :mod:`dicom_ai.inference.loader`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.data.meta_tensor import MetaTensor
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from dicom_ai.enhanced import is_multiframe, number_of_frames
from dicom_ai.errors import InputError
from dicom_ai.geometry import floats
from dicom_ai.inference.arena import PrefetchArena
from dicom_ai.inference.pixels import (
    apply_rescale,
    decode_single,
    read_ahead,
    read_header,
    rescale,
)

__all__ = ["CineSeries", "PlanarImage", "cine_series", "load_planar_images", "with_channels"]

logger = logging.getLogger(__name__)

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Images of one cine lie in one plane: positions within this (mm), as the volume loader's
# in-plane tolerance.
_SAME_POSITION_MM = 1e-3


@dataclass(frozen=True, eq=False)
class PlanarImage:
    """One 2-D image (CR, DX, MG, a single-frame SC/US...) for a 2-D model.

    ``image`` is ``(1, columns, rows)`` float32: rescaled (Modality LUT) values, with
    MONOCHROME1 inverted so that higher is brighter, as for MONOCHROME2. Projection images
    have no patient frame of reference: the 3x3 ``affine`` carries only the pixel size
    (``i`` along a row, ``j`` down a column, as displayed), so orientation transforms leave
    the image as it is shown.
    """

    image: MetaTensor
    sop_instance_uid: str
    header: Dataset  # pixels dropped
    path: Path


def load_planar_images(
    paths: Sequence[Path], arena: PrefetchArena | None = None
) -> tuple[PlanarImage, ...]:
    """Read 2-D grayscale images, each on its own, in the order given (see
    :class:`PlanarImage`); colour, multi-frame and undecodable images are refused with
    :class:`~dicom_ai.errors.InputError`.

    Each image is decoded as stored, never taken from ``arena``: its planes there are
    rescaled, and this applies the Modality LUT. The arena only spares reading ahead what
    it holds (read recently)."""
    if not paths:
        raise InputError("no instances given")
    files = [Path(p) for p in paths]
    if arena is None:
        read_ahead(files)
    else:
        arena.read_ahead(files)
    return tuple(_load_planar(p) for p in files)


def _load_planar(path: Path) -> PlanarImage:
    header = read_header(path)
    if is_multiframe(header):
        raise InputError(
            f"{path.name}: a multi-frame image ({number_of_frames(header)} frames) is not "
            "one 2-D image"
        )
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GRAYSCALE:
        raise InputError(
            f"{path.name}: PhotometricInterpretation {photometric or 'missing'}; only "
            "MONOCHROME1 and MONOCHROME2 images are supported"
        )
    stored = decode_single(header, path)
    shape = (int(header.Rows), int(header.Columns))
    if stored.shape != shape:
        raise InputError(f"{path.name}: pixel data is {stored.shape}, header says {shape}")
    values, low, high = _modality_values(stored, header)
    if photometric == "MONOCHROME1":
        # Mirror within the representable range, not the data's: an image's own min/max
        # would make its brightness depend on its content.
        np.subtract(np.float32(low + high), values, out=values)
    row_spacing, column_spacing = _planar_spacing(header, path)
    affine = torch.diag(torch.tensor([column_spacing, row_spacing, 1.0], dtype=torch.float64))
    meta: dict[str, Any] = {
        "original_affine": affine.clone(),
        "spatial_shape": np.array([shape[1], shape[0]]),
        "original_channel_dim": 0,
        "filename_or_obj": str(header.SOPInstanceUID),
    }
    data = torch.from_numpy(values).permute(1, 0).unsqueeze(0)
    return PlanarImage(
        image=MetaTensor(data, affine=affine, meta=meta),
        sop_instance_uid=str(header.SOPInstanceUID),
        header=header,
        path=path,
    )


def _modality_values(
    stored: npt.NDArray[Any], header: Dataset
) -> tuple[npt.NDArray[np.float32], float, float]:
    """Rescaled (or Modality LUT) values as float32, plus the lowest and highest value the
    stored bits can represent after that transformation."""
    bits = int(header.get("BitsStored") or stored.dtype.itemsize * 8)
    if int(header.get("PixelRepresentation", 0)) == 1:
        stored_range = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1], dtype=np.int64)
    else:
        stored_range = np.array([0, (1 << bits) - 1], dtype=np.int64)
    if header.get("ModalityLUTSequence"):
        try:
            values = np.asarray(apply_modality_lut(stored, header), dtype=np.float32)
            table = apply_modality_lut(np.arange(stored_range[0], stored_range[1] + 1), header)
        except Exception as exc:  # a malformed LUT raises many types
            raise InputError(f"Modality LUT cannot be applied: {exc}") from exc
        return values, float(table.min()), float(table.max())
    slope, intercept = rescale(header)
    values = np.empty(stored.shape, dtype=np.float32)
    apply_rescale(values, stored, slope, intercept)
    ends = stored_range * slope + intercept
    return values, float(ends.min()), float(ends.max())


def _planar_spacing(header: Dataset, path: Path) -> tuple[float, float]:
    """(between rows, between columns) in mm: PixelSpacing, else ImagerPixelSpacing, else 1."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if header.get(keyword):
            row, column = floats(header.get(keyword), 2, keyword, path.name)
            if row > 0 and column > 0:
                return row, column
    logger.debug("%s: no PixelSpacing or ImagerPixelSpacing; assuming 1 mm pixels", path.name)
    return 1.0, 1.0


def with_channels(image: MetaTensor, channels: int) -> MetaTensor:
    """A one-channel ``(1, columns, rows)`` image as ``channels`` equal channels, for a bundle
    trained on colour files (a grey picture saved as RGB); a view, no copy. Through the
    loader this is a ``(columns, rows, channels)`` NIfTI, e.g. for
    ``EnsureChannelFirstd(channel_dim=2)``."""
    if image.shape[0] != 1:
        raise InputError(f"expected a one-channel image, got {image.shape[0]} channels")
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    return MetaTensor(image.as_tensor().expand(channels, *image.shape[1:]), meta=image.meta)


@dataclass(frozen=True, eq=False)
class CineSeries:
    """The images of one plane over time (a cine), as one input for a 2-D+t model.

    ``image`` is ``(times, columns, rows, 1)`` float32, channel-first with the times as
    channels and the affine of one :class:`PlanarImage` as 4x4; through the loader it is the
    ``(columns, rows, 1, times)`` NIfTI that cine bundles read (``original_channel_dim`` -1,
    ``spatial_shape`` ``(columns, rows, 1)``). ``images`` are in time order: channel ``t``
    is ``images[t]``.
    """

    image: MetaTensor
    images: tuple[PlanarImage, ...]


def cine_series(images: Sequence[PlanarImage]) -> CineSeries:
    """Stack one plane's images in time order (TriggerTime, else TemporalPositionIndex,
    then InstanceNumber); images of different sizes, pixel spacing or positions are refused
    with :class:`~dicom_ai.errors.InputError`."""
    if not images:
        raise InputError("no images given")
    ordered = tuple(sorted(images, key=_time_key))
    first = ordered[0]
    for other in ordered[1:]:
        if other.image.shape != first.image.shape:
            raise InputError(
                f"cine images differ in size: {tuple(first.image.shape[1:])} and "
                f"{tuple(other.image.shape[1:])} (columns, rows)"
            )
        if not torch.allclose(other.image.affine, first.image.affine, atol=1e-4):
            raise InputError("cine images differ in pixel spacing")
        if not _same_plane(first.header, other.header):
            raise InputError("cine images lie in different planes (several positions)")
    data = torch.cat([p.image.as_tensor() for p in ordered]).unsqueeze(-1)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:2, :2] = first.image.affine[:2, :2]
    affine[:2, 3] = first.image.affine[:2, 2]
    meta: dict[str, Any] = {
        "original_affine": affine.clone(),
        "spatial_shape": np.array(data.shape[1:]),
        "original_channel_dim": 0,
        "filename_or_obj": str(first.header.get("SeriesInstanceUID") or first.sop_instance_uid),
    }
    return CineSeries(MetaTensor(data, affine=affine, meta=meta), ordered)


def _time_key(image: PlanarImage) -> tuple[float, float, int]:
    header = image.header
    trigger = header.get("TriggerTime")
    temporal = header.get("TemporalPositionIndex")
    return (
        float(trigger) if trigger not in (None, "") else 0.0,
        float(temporal) if temporal not in (None, "") else 0.0,
        int(header.get("InstanceNumber") or 0),
    )


def _same_plane(a: Dataset, b: Dataset) -> bool:
    """Same ImagePositionPatient and ImageOrientationPatient, where both are given."""
    for keyword, tolerance in (
        ("ImagePositionPatient", _SAME_POSITION_MM),
        ("ImageOrientationPatient", 1e-4),
    ):
        va, vb = a.get(keyword), b.get(keyword)
        if (
            va
            and vb
            and not np.allclose(
                np.asarray(va, dtype=float), np.asarray(vb, dtype=float), atol=tolerance
            )
        ):
            return False
    return True
