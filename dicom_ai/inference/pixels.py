"""Reading instances and decoding their pixels: headers with the pixel data deferred, the
stored values of a frame, and the rescale to output units (e.g. HU).

Uncompressed little-endian single-frame images are read straight from the file
(:func:`native_pixels`); everything else goes through pydicom's decoders, multi-frame
images frame by frame (:func:`decode_frames`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_ai import _compat
from dicom_ai.enhanced import frame_macro, number_of_frames
from dicom_ai.errors import InputError

__all__ = [
    "apply_rescale",
    "check_shape",
    "decode_frames",
    "decode_single",
    "native_pixels",
    "read_ahead",
    "read_header",
    "rescale",
    "strip_pixels",
]

# Elements dropped from the kept headers: the pixels live in the volume.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Values larger than this (pixel data) are read when used, not when the header is parsed.
_DEFER_BYTES = 64 * 1024
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to start reading these files now, all at once. The spool writes
    instances with O_DIRECT, so they are on disk but not in the page cache; read one by
    one, each would wait for the disk in turn, where the batch streams at disk speed."""
    if not hasattr(os, "posix_fadvise"):  # not on every platform; only advice
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the reader reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advice only
        finally:
            os.close(fd)


def read_header(path: Path) -> Dataset:
    """The instance's data set with its pixel data not yet read (deferred): it is parsed
    once, and decoding later reads just the pixel bytes (:func:`decode_single`)."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    for keyword in ("SOPInstanceUID", "Rows", "Columns"):
        if keyword not in ds:
            raise InputError(f"{path.name}: no {keyword}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path.name}: only single-sample (grayscale) images are supported")
    return ds


def strip_pixels(header: Dataset) -> None:
    """Headers travel on without pixel data (to SEG, SR): only the decoded volume keeps it."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in header:
            delattr(header, keyword)


def rescale(header: Dataset, frame_number: int | None = None) -> tuple[float, float]:
    """(slope, intercept) of a single-frame instance, or of frame ``frame_number`` of a
    multi-frame one (its Pixel Value Transformation, else the top-level attributes)."""
    if frame_number is not None:
        transformation = frame_macro(header, frame_number, "PixelValueTransformationSequence")
        if transformation is not None:
            return rescale(transformation)
    slope = float(header.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def decode_single(header: Dataset, path: Path) -> npt.NDArray[Any]:
    """The stored values of a single-frame instance, decoded from the header read by
    :func:`read_header` (no second parse of the file); its pixel data is dropped."""
    try:
        native = native_pixels(header, path)
        stored: npt.NDArray[Any] = header.pixel_array if native is None else native
    except Exception as exc:  # decoders raise many types; the boundary is "cannot decode"
        raise InputError(f"{path.name}: pixel data cannot be decoded: {exc}") from exc
    finally:
        strip_pixels(header)
    return stored


def native_pixels(header: Dataset, path: Path) -> npt.NDArray[Any] | None:
    """The stored values of an uncompressed little-endian single-frame image, read straight
    from the file with one ``np.fromfile``; None where pydicom's decoder is needed.

    pydicom's ``pixel_array`` gives the same array (tests compare them), but its option
    handling and copies cost several times more, and prefetch has to keep pace with the
    receiver.
    """
    element = header.get_item("PixelData", keep_deferred=True)
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if element is None or syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    allocated = int(header.get("BitsAllocated") or 0)
    stored_bits = int(header.get("BitsStored") or 0)
    representation = header.get("PixelRepresentation")
    rows, columns = int(header.Rows), int(header.Columns)
    if (
        allocated not in (8, 16, 32)
        or not 0 < stored_bits <= allocated
        or representation not in (0, 1)
        or number_of_frames(header) != 1
        or rows <= 0
        or columns <= 0
    ):
        return None
    dtype = np.dtype(f"<{'i' if representation else 'u'}{allocated // 8}")
    count = rows * columns
    value = element.value
    offset = 0
    if isinstance(value, bytes):
        length = len(value)
    elif (location := _compat.deferred_value_location(header, "PixelData")) is not None:
        offset, length = location  # deferred: still in the file
    else:
        return None
    # An odd length carries one pad byte; any other size is for pydicom to judge.
    if length not in (count * dtype.itemsize, count * dtype.itemsize + 1):
        return None
    if isinstance(value, bytes):
        pixels = np.frombuffer(value, dtype=dtype, count=count).copy()
    else:
        pixels = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if pixels.size != count:  # the file is shorter than its header says
            return None
    if stored_bits < allocated:
        # As pydicom does: the unused high bits carry no meaning (PS3.5 8.1.1).
        shift = allocated - stored_bits
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels.reshape(rows, columns)


def decode_frames(
    out: npt.NDArray[np.float32],
    path: Path,
    targets: Mapping[int, tuple[int, float, float]],
) -> None:
    """Frame by frame (``iter_pixels``): one decode of the instance, one frame in memory.
    Frame ``n`` of ``targets`` (1-based) goes, rescaled, into ``out[k]`` where
    ``targets[n]`` is ``(k, slope, intercept)``."""
    decoded = 0
    try:
        for number, stored in enumerate(iter_pixels(path), start=1):
            decoded = number
            target = targets.get(number)
            if target is not None:
                k, slope, intercept = target
                check_shape(out[k], stored, f"{path.name} frame {number}")
                apply_rescale(out[k], stored, slope, intercept)
    except InputError:
        raise
    except Exception as exc:  # decoders raise many types; the boundary is "cannot decode"
        raise InputError(f"{path.name}: pixel data cannot be decoded: {exc}") from exc
    if decoded < max(targets):
        raise InputError(f"{path.name}: pixel data holds {decoded} frames, fewer than the header")


def check_shape(out: npt.NDArray[np.float32], stored: npt.NDArray[Any], where: str) -> None:
    if stored.shape != out.shape:
        raise InputError(f"{where}: pixel data is {stored.shape}, header says {out.shape}")


def apply_rescale(
    out: npt.NDArray[np.float32], stored: npt.NDArray[Any], slope: float, intercept: float
) -> None:
    """``out = stored * slope + intercept``, in float32, without a temporary."""
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept:
        out += np.float32(intercept)
