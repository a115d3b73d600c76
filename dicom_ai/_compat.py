"""Every place the node leans on a library's internals (highdicom, pydicom, MONAI), fenced.

Each function here does one thing the library's public API does not offer, for the exact
library version it was written for (pinned in pyproject). On any other version it logs
once and takes the library's own path: slower, never wrong. Nothing is applied by
importing this module; callers apply what they need where they need it, and applying
twice is harmless. ``tests/node/test_compat.py`` holds, for each function, the check that
fails when a library upgrade makes it unnecessary or wrong.

pynetdicom's counterparts live in :mod:`dicom_ai.dimse._compat` (pynetdicom is imported
only under ``dicom_ai/dimse/``); they share :func:`written_for`. highdicom is imported
inside the functions that need it: this module is also imported where highdicom is not.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr, correct_ambiguous_vr_element
from pydicom.valuerep import AMBIGUOUS_VR

if TYPE_CHECKING:
    from highdicom.seg import Segmentation

__all__ = [
    "HIGHDICOM",
    "MONAI",
    "PYDICOM",
    "cache_is_attribute_in_iod",
    "deferred_value_location",
    "installed_version",
    "monai_array_loader",
    "monai_reader_filenames",
    "pydicom_correct_ambiguous_vr",
    "pydicom_mark_explicit_little_endian",
    "pydicom_write_shortcuts",
    "segmentation_without_luts",
    "written_for",
]

log = logging.getLogger(__name__)

HIGHDICOM = "0.28.2"
MONAI = "1.6.1"
PYDICOM = "3.0.2"

_versions: dict[str, str | None] = {}
_warned: set[str] = set()
_lock = threading.Lock()


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None when it is not installed)."""
    if distribution not in _versions:
        try:
            _versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            _versions[distribution] = None
    return _versions[distribution]


def written_for(distribution: str, version: str, patch: str) -> bool:
    """Whether ``distribution`` is at ``version``, the one ``patch`` was written for.

    When it is not, says so once per patch: the caller then takes the library's own path.
    """
    installed = installed_version(distribution)
    if installed == version:
        return True
    if patch not in _warned:
        _warned.add(patch)
        log.warning(
            "%s was written for %s %s, %s is installed: using %s's own code path instead",
            patch,
            distribution,
            version,
            installed or "none",
            distribution,
        )
    return False


# --- MONAI ------------------------------------------------------------------------------
# Used by inference/loader.py (a bundle's own LoadImage(d) fed decoded images). MONAI has no
# other way to hand its loader in-memory images with a reader's meta, so there is no
# fallback path: on another MONAI (a bundle's own environment runs 1.3 or 1.4, which have
# both attributes) the use is said once, and a missing attribute is an error the job reports.


def _monai_internal(patch: str) -> None:
    installed = installed_version("monai")
    if installed != MONAI and patch not in _warned:
        _warned.add(patch)
        log.info("%s was written for monai %s; %s is installed", patch, MONAI, installed)


def monai_array_loader(loader: object) -> object:
    """The array ``LoadImage`` (readers and settings) that a ``LoadImaged`` keeps in its
    private ``_loader``."""
    _monai_internal("monai_array_loader")
    inner = getattr(loader, "_loader", None)
    if inner is None:
        raise AttributeError("this MONAI's LoadImaged keeps no array loader in _loader")
    return inner


def monai_reader_filenames(reader: object, names: Sequence[str]) -> None:
    """Set the names ``NibabelReader.get_data`` pairs its images with (``filenames``, set by
    its ``read`` from the files it opens; images handed in-memory need them set)."""
    _monai_internal("monai_reader_filenames")
    reader.filenames = list(names)  # type: ignore[attr-defined]


# --- highdicom --------------------------------------------------------------------------


def cache_is_attribute_in_iod() -> bool:
    """Cache highdicom's ``_standard_utils.is_attribute_in_iod`` where its answer depends
    on the attribute and SOP class alone (no ``exclude_path_elements``). Returns whether
    the cache is in place.

    Why: a SEG build asks ``is_multiframe_image`` of every source image, and each call
    scans the standard's module tables for the same answer. ``is_multiframe_image`` looks
    the function up in its module's globals, so replacing it there is enough; modules that
    imported it by name keep the uncached one, which answers the same. Process-wide and
    permanent once applied (it is a pure function of its arguments).

    Fallback (another highdicom): nothing is replaced; highdicom scans every time.
    """
    if not written_for("highdicom", HIGHDICOM, "cache_is_attribute_in_iod"):
        return False
    from highdicom import _standard_utils

    with _lock:
        original = _standard_utils.is_attribute_in_iod
        if getattr(original, "cached_by_dicom_ai", False):
            return True

        @functools.lru_cache(maxsize=1024)
        def cached(attribute: str, sop_class_uid: str) -> bool:
            return bool(original(attribute, sop_class_uid))

        @functools.wraps(original)
        def is_attribute_in_iod(
            attribute: str,
            sop_class_uid: str,
            exclude_path_elements: Sequence[str] | None = None,
        ) -> bool:
            if exclude_path_elements is not None:
                return bool(original(attribute, sop_class_uid, exclude_path_elements))
            return cached(attribute, str(sop_class_uid))

        is_attribute_in_iod.cached_by_dicom_ai = True  # type: ignore[attr-defined]
        is_attribute_in_iod.cache_info = cached.cache_info  # type: ignore[attr-defined]
        _standard_utils.is_attribute_in_iod = is_attribute_in_iod
    return True


def segmentation_without_luts() -> type[Segmentation]:
    """The class to build a SEG with that the node writes and sends, and never queries.

    Why: highdicom's constructor ends by building lookup tables (an in-memory SQLite table
    of the frames, ``_build_luts``) for its query methods, a sizeable part of a large
    SEG's build. The subclass skips them; the dataset is the same element for element.
    Without the tables highdicom's query methods, pickling and deepcopy of the object
    fail; whatever reads the SEG back (``segread``) builds its own.

    Fallback (another highdicom): highdicom's own ``Segmentation``.
    """
    from highdicom.seg import Segmentation

    if not written_for("highdicom", HIGHDICOM, "segmentation_without_luts"):
        return Segmentation
    return _segmentation_without_luts()


@functools.cache
def _segmentation_without_luts() -> type[Segmentation]:
    from highdicom.seg import Segmentation

    class SegmentationWithoutLuts(Segmentation):
        def _build_luts(self) -> None:
            return None

    return SegmentationWithoutLuts


# --- pydicom ----------------------------------------------------------------------------


def pydicom_write_shortcuts() -> bool:
    """Whether :mod:`dicom_ai.results.encoding` may encode sequences itself and have
    pydicom's ``save_as`` write them as raw elements (see the two functions below).

    Fallback (another pydicom): False, and the caller writes with plain ``save_as``.
    """
    return written_for("pydicom", PYDICOM, "pydicom_write_shortcuts")


def pydicom_correct_ambiguous_vr(dataset: Dataset) -> None:
    """What ``save_as`` would correct (Pixel Data's OB or OW from Bits Allocated, ...),
    once, in place, for explicit VR little endian.

    Why: pydicom runs the correction again at every nesting level, each run recursing
    through the whole subtree. Raw elements are skipped: they hold no ambiguous VR (the
    caller encoded them). Relies on the ``ancestors`` parameter of pydicom 3's
    ``correct_ambiguous_vr`` and ``correct_ambiguous_vr_element``.
    """
    for element in dataset.elements():
        if isinstance(element, RawDataElement):
            continue
        if element.VR == "SQ":
            for item in element.value:
                correct_ambiguous_vr(item, True, [item, dataset])
        elif element.VR in AMBIGUOUS_VR:
            correct_ambiguous_vr_element(element, dataset, True, [dataset])


def pydicom_mark_explicit_little_endian(dataset: Dataset) -> None:
    """Mark ``dataset`` and every nested item as already in explicit VR little endian in
    its own character set, so that ``save_as`` writes raw elements as they are and does
    not run the ambiguous-VR correction again.

    Why: pydicom 3.0's ``write_dataset`` corrects (and decodes raw elements) whenever the
    original encoding or character set differs from the one written. Relies on the private
    ``Dataset._character_set``; only for a dataset already corrected
    (:func:`pydicom_correct_ambiguous_vr`).
    """
    dataset.set_original_encoding(False, True, dataset._character_set)
    for element in dataset.elements():
        if isinstance(element, DataElement) and element.VR == "SQ":
            items: Sequence[Dataset] = element.value
            for item in items:
                pydicom_mark_explicit_little_endian(item)


def deferred_value_location(dataset: Dataset, keyword: str) -> tuple[int, int] | None:
    """(file offset, length) of a value that ``dcmread(..., defer_size=...)`` left in the
    file; None when the value is not deferred (or ``dataset`` was not read with deferral).

    Why: reading native pixel data straight from the file skips pydicom's decoder. pydicom
    3.0 keeps a deferred element as a ``RawDataElement`` with no value, its ``value_tell``
    the offset of the value in the file.

    Fallback (another pydicom): None; the caller reads the value through pydicom.
    """
    if not written_for("pydicom", PYDICOM, "deferred_value_location"):
        return None
    element = dataset.get_item(keyword, keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.value is not None:
        return None
    return int(element.value_tell), int(element.length)
