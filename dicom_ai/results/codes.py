"""Coded concepts for segment labels: a model's label name -> SNOMED CT / DCM codes.

Three sources, in order:

1. the TotalSegmentator -> SNOMED mapping shipped in ``data/`` (wholeBody bundle labels),
2. the built-in CT model's labels (``body``, ``lung``/``lungs``, ``bone``),
3. anything else: a local code in the private scheme :data:`LOCAL_CODING_SCHEME_DESIGNATOR`
   whose meaning is the label text, so a viewer shows what the model said and a reader sees
   at once that the concept is not from SNOMED CT.

Label names are matched after :func:`normalize_label_name` (case, spaces, hyphens).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "LOCAL_CODING_SCHEME_DESIGNATOR",
    "SegmentCoding",
    "is_local_code",
    "local_coding_scheme",
    "normalize_label_name",
    "segment_coding",
]

LOCAL_CODING_SCHEME_DESIGNATOR = "99DICOMAI"
"""Private coding scheme for labels no standard code is known for (PS3.3 8.2: ``99`` prefix)."""

_MAPPING_RESOURCE = "totalsegmentator_snomed_mapping.csv"

# The CSV (dcmqi / TotalSegmentator lineage) uses SNOMED 123037004 "Body structure" for the
# anatomical category; CID 7150 lists 91723000 "Anatomical Structure" instead.
_RETIRED_CATEGORY_VALUES = {"123037004": codes.SCT.AnatomicalStructure}

# Known errata in the shipped CSV, corrected at load: (structure) -> property type.
_TYPE_ERRATA: dict[str, Code] = {
    "gluteus_minimus_left": Code("75297007", "SCT", "Gluteus minimus muscle"),
    "gluteus_minimus_right": Code("75297007", "SCT", "Gluteus minimus muscle"),
    "gluteus_minimus": Code("75297007", "SCT", "Gluteus minimus muscle"),
}

_LATERALITY_VALUES = frozenset({"7771000", "24028007", "51440002", "66459002"})


@dataclass(frozen=True)
class SegmentCoding:
    """How one label is described in a SEG Segment Sequence item and in the SR."""

    label: str
    category: CodedConcept
    property_type: CodedConcept
    property_type_modifier: CodedConcept | None
    anatomic_region: CodedConcept | None
    anatomic_region_modifier: CodedConcept | None
    display_rgb: tuple[int, int, int]

    @property
    def is_local(self) -> bool:
        """Whether the property type comes from the private scheme, not a standard one."""
        return is_local_code(self.property_type)

    @property
    def laterality(self) -> CodedConcept | None:
        """The Left/Right/... modifier of the type or of the region, if either has one."""
        for modifier in (self.property_type_modifier, self.anatomic_region_modifier):
            if (
                modifier is not None
                and modifier.scheme_designator == "SCT"
                and modifier.value in _LATERALITY_VALUES
            ):
                return modifier
        return None


def normalize_label_name(name: str) -> str:
    """``" Kidney Left"`` -> ``"kidney_left"``: lower case, runs of space/-/_ become ``_``."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


def is_local_code(concept: CodedConcept | Code) -> bool:
    """Whether a concept is in this node's private coding scheme."""
    return str(concept.scheme_designator) == LOCAL_CODING_SCHEME_DESIGNATOR


def local_coding_scheme() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification Sequence item declaring the private scheme."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_CODING_SCHEME_DESIGNATOR,
        name="dicom-ai local segment labels",
        responsible_organization="dicom-ai",
    )


def segment_coding(label_name: str) -> SegmentCoding:
    """The codes and display color for a model's label name; never fails."""
    key = normalize_label_name(label_name)
    known = _mapping().get(key) or _builtin().get(key)
    if known is not None:
        return known
    return _local_coding(label_name, key)


def _concept(code: Code | CodedConcept) -> CodedConcept:
    if isinstance(code, CodedConcept):
        return code
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def _optional_concept(row: dict[str, str], prefix: str) -> CodedConcept | None:
    value = row[f"{prefix}.CodeValue"].strip()
    if not value:
        return None
    return CodedConcept(
        value,
        row[f"{prefix}.CodingSchemeDesignator"].strip(),
        row[f"{prefix}.CodeMeaning"].strip(),
    )


@cache
def _cid7150_by_value() -> dict[str, CodedConcept]:
    # The standard's meanings for category codes (the CSV spells some differently).
    table: dict[str, CodedConcept] = {}
    for keyword in codes.cid7150.dir():
        code = getattr(codes.cid7150, keyword)
        table[code.value] = _concept(code)
    return table


def _category(row: dict[str, str]) -> CodedConcept:
    concept = _optional_concept(row, "SegmentedPropertyCategoryCodeSequence")
    if concept is None:
        raise ValueError(f"mapping row {row['Structure']!r} has no category")
    if concept.scheme_designator == "SCT":
        replacement = _RETIRED_CATEGORY_VALUES.get(concept.value)
        if replacement is not None:
            return _concept(replacement)
        return _cid7150_by_value().get(concept.value, concept)
    return concept


def _rgb(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(f"bad DicomRGBColor {text!r}")
    return parts[0], parts[1], parts[2]


@cache
def _mapping() -> dict[str, SegmentCoding]:
    text = (
        resources.files("dicom_ai.results")
        .joinpath("data", _MAPPING_RESOURCE)
        .read_text(encoding="utf-8")
    )
    table: dict[str, SegmentCoding] = {}
    for row in csv.DictReader(io.StringIO(text)):
        structure = row["Structure"].strip()
        property_type = _optional_concept(row, "SegmentedPropertyTypeCodeSequence")
        if property_type is None:
            raise ValueError(f"mapping row {structure!r} has no property type")
        erratum = _TYPE_ERRATA.get(structure)
        if erratum is not None:
            property_type = _concept(erratum)
        table[normalize_label_name(structure)] = SegmentCoding(
            label=structure,
            category=_category(row),
            property_type=property_type,
            property_type_modifier=_optional_concept(
                row, "SegmentedPropertyTypeModifierCodeSequence"
            ),
            anatomic_region=_optional_concept(row, "AnatomicRegionSequence"),
            anatomic_region_modifier=_optional_concept(row, "AnatomicRegionModifierSequence"),
            display_rgb=_rgb(row["DicomRGBColor"]),
        )
    return table


@cache
def _builtin() -> dict[str, SegmentCoding]:
    anatomical = _concept(codes.SCT.AnatomicalStructure)
    tissue = _concept(codes.SCT.Tissue)

    def coding(
        label: str, category: CodedConcept, code: Code, rgb: tuple[int, int, int]
    ) -> SegmentCoding:
        return SegmentCoding(label, category, _concept(code), None, None, None, rgb)

    lung = coding("lung", anatomical, codes.SCT.Lung, (197, 165, 145))
    return {
        "body": coding("body", anatomical, codes.SCT.EntireBody, (177, 122, 101)),
        "lung": lung,
        "lungs": lung,
        # A threshold model finds bone tissue, not named bones: CID 7151's "Bone" (3138006).
        "bone": coding("bone", tissue, codes.SCT.BoneTissue, (241, 214, 145)),
    }


_ABNORMAL_WORDS = ("tumor", "tumour", "lesion", "nodule", "cyst", "metasta", "hemorrhage")
_TISSUE_WORDS = ("fat", "tissue")


def _local_coding(label_name: str, key: str) -> SegmentCoding:
    # Category by a few telling words; the type carries the model's own text.
    if any(word in key for word in _ABNORMAL_WORDS):
        category = _concept(codes.SCT.MorphologicallyAbnormalStructure)
    elif any(word in key for word in _TISSUE_WORDS):
        category = _concept(codes.SCT.Tissue)
    else:
        category = _concept(codes.SCT.AnatomicalStructure)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    # Code Value is SH (16 chars): keep short keys readable, hash long ones.
    value = key.upper() if re.fullmatch(r"[a-z0-9_.]{1,16}", key) else f"L{digest[:15].upper()}"
    # Code Meaning is LO: 64 characters, no backslash (the VM delimiter).
    meaning = label_name.strip().replace("\\", "/")[:64] or value
    red, green, blue = (64 + int(digest[i : i + 2], 16) % 192 for i in (0, 2, 4))
    return SegmentCoding(
        label=label_name,
        category=category,
        property_type=CodedConcept(value, LOCAL_CODING_SCHEME_DESIGNATOR, meaning),
        property_type_modifier=None,
        anatomic_region=None,
        anatomic_region_modifier=None,
        display_rgb=(red, green, blue),
    )
