"""A bundle's file loader, fed the node's decoded images instead of files.

MONAI bundles begin their ``preprocessing`` with ``LoadImage`` or ``LoadImaged``, which read
a file. The node has decoded the series already; the rest of the chain must still get what
the bundle's own loader would have given. :class:`SeriesLoadImage` and
:class:`SeriesLoadImaged` stand in for it: each is built from the bundle's loader
(:func:`series_loader`, or :func:`series_loaders` for a whole transform list) and is called
where the loader is called, with the node's image(s) where the loader takes file names.

What to feed (the node's channel-first ``MetaTensor`` s, never a copy):

- ``SeriesLoadImage``: the image, e.g. ``volume.image``; or a list of images (several
  files: MONAI stacks them on a new first axis).
- ``SeriesLoadImaged``: the data dict with an image (or a list) under each of the loader's
  keys, e.g. ``{image_key: volume.image}``; other items pass through as ``LoadImaged``
  leaves them. Built with ``leave_out_missing`` (as a bundle's are), a key without an
  image is left out, as with ``allow_missing_keys``: a study's roles as keys, where the
  loader also names ground truth for evaluation.

Accepted images: channel-first ``(C, *spatial)`` on the CPU with a RAS affine (4x4 for 3-D,
3x3 for 2-D), as ``SeriesVolume.image`` ``(1, columns, rows, slices)``,
``PlanarImage.image`` ``(1, columns, rows)``, :func:`~dicom_ai.inference.planar.with_channels`
``(C, columns, rows)`` and :func:`~dicom_ai.inference.planar.cine_series` ``(times, columns,
rows, 1)`` are.

What comes out is what the *bundle's own loader object*, with every argument it was built
with (``image_only``, ``dtype``, ``ensure_channel_first``, ``simple_keys``,
``prune_meta_pattern``, ``meta_keys``, ``meta_key_postfix``, ``overwriting``,
``allow_missing_keys``, a ``NibabelReader``'s ``channel_dim`` / ``as_closest_canonical`` /
``squeeze_non_spatial_dims``), returns for a NIfTI-1 file holding the image's voxels and
affine, its channels last: ``C == 1`` is stored without a channel axis, so the array is
``spatial`` and ``original_channel_dim`` is ``nan`` ("no_channel"); ``C > 1`` is stored
``(*spatial, C)``, which NibabelReader reads as it reads any such file (a 3-D spatial image
gets ``original_channel_dim == -1``; a 2-D one with channels is a 3-D volume to it). The
loader's own code runs: the images reach it as in-memory ``nibabel`` images through
:class:`monai.data.NibabelReader`, so the meta dict holds the same NIfTI header fields,
``affine``, ``original_affine``, ``spatial_shape``, ``space`` (RAS),
``original_channel_dim``, ``as_closest_canonical``; ``filename_or_obj`` is the image's own
(no path: a series or SOP instance UID).

Where it differs from a file, on purpose: the affine is the node's float64 one (a NIfTI file
rounds it to float32), and the loader's reader choice is not used (a bundle naming
``ITKReader`` gets NibabelReader's meta keys; its array, affine and space are the same for a
NIfTI).

Memory: the node's image is never written, so the bundle's transforms may write in place.
It is copied once, keeping its memory order: LoadImage would make a file's array C-contiguous
(a transposing copy, several times slower than a plain one for the node's layout); values,
shape, dtype and meta are the same, only the strides differ. A ``dtype`` other than float32
converts that copy (a second one).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from monai.data.image_reader import ImageReader, NibabelReader
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms.io.array import LoadImage
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.transform import Transform

from dicom_ai._compat import monai_array_loader, monai_reader_filenames
from dicom_ai.errors import ModelError

__all__ = ["SeriesLoadImage", "SeriesLoadImaged", "series_loader", "series_loaders"]

Loaded = MetaTensor | tuple[MetaTensor, dict[str, Any]]


class SeriesLoadImage(Transform):
    """Stands in for an array ``LoadImage``: called with the node's image (or a list of
    them), returns what ``loader`` returns for it as a NIfTI file (see the module
    docstring)."""

    def __init__(self, loader: LoadImage) -> None:
        self.loader = loader
        self._nifti = _nifti_reader(loader)

    def __call__(self, image: MetaTensor | Sequence[MetaTensor]) -> Loaded:
        reader = _DecodedReader(self._nifti, expanduser=bool(self.loader.expanduser))
        name = reader.add(image, "image")
        result: Loaded = self.loader(name, reader=reader)
        return result


class SeriesLoadImaged(Transform):
    """Stands in for a dict ``LoadImaged``: each of its keys holds the node's image (or a
    list of them) instead of a file name; returns the dict ``loader`` returns for them as
    NIfTI files (see the module docstring)."""

    def __init__(self, loader: LoadImaged, *, leave_out_missing: bool = False) -> None:
        if leave_out_missing and not loader.allow_missing_keys:
            # A bundle's loader may also read ground truth for its evaluation (renal CECT's
            # `label`), which inference never has: such keys are left out, as
            # allow_missing_keys would. A copy: the bundle's own object is unchanged.
            loader = copy.copy(loader)
            loader.allow_missing_keys = True
        self.loader = loader
        self.keys = loader.keys
        self._array_loader = cast(LoadImage, monai_array_loader(loader))
        self._nifti = _nifti_reader(self._array_loader)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        reader = _DecodedReader(self._nifti, expanduser=bool(self._array_loader.expanduser))
        named = dict(data)
        for key in self.keys:
            if key in named:
                named[key] = reader.add(named[key], str(key))
        out: dict[Hashable, Any] = self.loader(named, reader=reader)
        return out


def series_loader(
    loader: LoadImage | LoadImaged, *, leave_out_missing: bool = False
) -> SeriesLoadImage | SeriesLoadImaged:
    """The stand-in for one bundle loader; ``leave_out_missing``: a dict loader's keys
    without an image are left out (as with ``allow_missing_keys``), not an error."""
    if isinstance(loader, LoadImaged):
        return SeriesLoadImaged(loader, leave_out_missing=leave_out_missing)
    if isinstance(loader, LoadImage):
        return SeriesLoadImage(loader)
    raise ModelError(f"{type(loader).__name__} is not a LoadImage or LoadImaged")


def series_loaders(transforms: Iterable[Any], *, leave_out_missing: bool = False) -> list[Any]:
    """``transforms`` (a flattened preprocessing) with each ``LoadImage(d)`` replaced by its
    stand-in (``leave_out_missing`` as :func:`series_loader`'s); every other transform is
    the same object (``Invertd`` finds them by id)."""
    return [
        series_loader(t, leave_out_missing=leave_out_missing)
        if isinstance(t, LoadImage | LoadImaged)
        else t
        for t in transforms
    ]


class _DecodedReader(ImageReader):
    """Hands ``LoadImage`` the node's images, by name, as in-memory NIfTI images; the
    bundle's NibabelReader turns them into array and meta as it does files."""

    def __init__(self, nifti: NibabelReader, *, expanduser: bool) -> None:
        self._nifti = nifti
        self._expanduser = expanduser
        self._images: dict[str, MetaTensor] = {}

    def add(self, value: Any, what: str) -> str | list[str]:
        """Register ``value`` (an image or a list of images); the name(s) to give
        ``LoadImage`` for it."""
        if isinstance(value, torch.Tensor):
            return self._add_one(value, what)
        if isinstance(value, list | tuple) and value:
            return [self._add_one(v, what) for v in value]
        raise ModelError(
            f"loader input {what!r} is a {type(value).__name__}, not the node's image; "
            "the node feeds decoded images, not files"
        )

    def _add_one(self, image: Any, what: str) -> str:
        if not isinstance(image, MetaTensor) or image.ndim < 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else None
            raise ModelError(
                f"loader input {what!r} must be a channel-first MetaTensor with two or three "
                f"spatial axes, got {type(image).__name__} {shape}"
            )
        base = str(image.meta.get("filename_or_obj") or what)
        name, n = base, 1
        while self._key(name) in self._images:  # the same series twice: names stay apart
            n += 1
            name = f"{base}#{n}"
        self._images[self._key(name)] = image
        return name

    def _key(self, name: str) -> str:
        # LoadImage hands the reader its names through Path(...).expanduser().
        return f"{Path(name).expanduser()}" if self._expanduser else name

    def verify_suffix(self, filename: Any) -> bool:
        return True

    def read(self, data: Any, **kwargs: Any) -> Any:
        names = [str(n) for n in (data if isinstance(data, list | tuple) else [data])]
        images = [_as_nifti(self._images[n]) for n in names]
        monai_reader_filenames(self._nifti, names)  # get_data pairs images with them
        return images if len(images) > 1 else images[0]

    # A tensor, not the array the base class names: LoadImage converts either.
    def get_data(self, img: Any) -> tuple[torch.Tensor, dict[str, Any]]:  # type: ignore[override]
        array, meta = self._nifti.get_data(img)
        if any(stride < 0 for stride in array.strides):  # torch takes no flipped views
            array = np.ascontiguousarray(array)
        # The one copy, in the node's memory order: a tensor passes through LoadImage's
        # conversions as it is, where an array would be transposed to C order, several
        # times slower than a plain copy.
        return torch.from_numpy(array).clone(), meta


def _nifti_reader(loader: LoadImage) -> NibabelReader:
    """A copy of the loader's own NibabelReader (the last registered wins, as in
    ``LoadImage``), so its options apply; a plain one if it has none."""
    for reader in reversed(loader.readers):
        if isinstance(reader, NibabelReader):
            return copy.copy(reader)
    return NibabelReader()


def _as_nifti(image: MetaTensor) -> Any:
    """The NIfTI image the node would write: the voxels (a view, channels last, no channel
    axis for one channel) and the affine as 4x4."""
    data = image.as_tensor().detach().cpu().numpy()
    array = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    affine = to_affine_nd(3, np.asarray(image.affine, dtype=np.float64))
    return nib.Nifti1Image(array, affine)  # type: ignore[no-untyped-call]
