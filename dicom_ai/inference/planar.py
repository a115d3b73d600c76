"""2-D images (CR, DX, MG, single-frame SC/US, ...) for 2-D models, read one by one."""

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

__all__ = ["PlanarImage", "load_planar_images"]

logger = logging.getLogger(__name__)

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


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
