"""Coded concepts for segment labels: a model's label name -> SNOMED CT / DCM codes.

Sources, in order:

1. the TotalSegmentator -> SNOMED mapping shipped in ``data/`` (wholeBody bundle labels),
2. the built-in CT model's labels (``soft tissue``, ``lung``/``lungs``, ``bone``), ``body``,
   and a few more organs other MONAI zoo bundles name (rectum, uterus, artery, ...), codes
   from pydicom's SNOMED CT dictionary,
3. the same names spelt otherwise: synonyms (``IVC``, ``bladder``, ``hepatic vessel``), the
   side first (``left kidney`` = ``kidney_left``, ``left rib 3`` = ``rib_left_3``), a side
   on an organ known only without one (``left lung``: Lung, modifier Left), and a lesion
   word after an organ (``pancreatic tumor``: Neoplasm, anatomic region Pancreas),
4. anything else: a local code in the private scheme :data:`LOCAL_CODING_SCHEME_DESIGNATOR`
   whose meaning is the label text, so a viewer shows what the model said and a reader sees
   at once that the concept is not from SNOMED CT.

Label names are matched after :func:`normalize_label_name` (case, spaces, hyphens).
Every call returns new concept objects: a caller that nests attributes into one (the SEG
nests its modifiers) must not change what the next caller (the SR) gets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, replace
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
    coding = _known(key)
    if coding is None:
        coding = _local_coding(label_name, key)
    return _fresh(coding)


def _fresh(coding: SegmentCoding) -> SegmentCoding:
    # New Dataset objects for every concept: the tables are cached, and highdicom keeps the
    # objects it is given, so an attribute nested into one would reach every later user.
    def optional(concept: CodedConcept | None) -> CodedConcept | None:
        return None if concept is None else _copy(concept)

    return replace(
        coding,
        category=_copy(coding.category),
        property_type=_copy(coding.property_type),
        property_type_modifier=optional(coding.property_type_modifier),
        anatomic_region=optional(coding.anatomic_region),
        anatomic_region_modifier=optional(coding.anatomic_region_modifier),
    )


def _copy(concept: CodedConcept) -> CodedConcept:
    return CodedConcept(
        concept.value, concept.scheme_designator, concept.meaning, concept.scheme_version
    )


_SIDES: dict[str, Code] = {"left": codes.SCT.Left, "right": codes.SCT.Right}

# Other spellings of names in the tables (normalized, side removed): the MONAI zoo bundles'
# words for TotalSegmentator's structures, and one misspelling a published bundle ships.
_SYNONYMS: dict[str, str] = {
    "ivc": "inferior_vena_cava",
    "svc": "superior_vena_cava",
    "bladder": "urinary_bladder",
    "gall_bladder": "gallbladder",
    "oesophagus": "esophagus",
    "small_intestine": "small_bowel",
    "adrenal": "adrenal_gland",
    "kideny": "kidney",
    "portal_and_splenic_veins": "portal_vein_and_splenic_vein",
    "portal_vein_and_splenic_veins": "portal_vein_and_splenic_vein",
    "hepatic_vessel": "liver_vessels",
    "hepatic_vessels": "liver_vessels",
    "liver_vessel": "liver_vessels",
    "airway": "lung_trachea_bronchia",
    "airways": "lung_trachea_bronchia",
    "iliac_vein": "iliac_vena",
    "atrium": "heart_atrium",
    "ventricle": "heart_ventricle",
    "myocardium": "heart_myocardium",
    "clavicle": "clavicula",
    "spine_cord": "spinal_cord",
    "thyroid": "thyroid_gland",
}

# Adjectives before a lesion word that name an organ ("hepatic tumor": tumor of the liver).
_ORGAN_ADJECTIVES = {"hepatic": "liver", "pancreatic": "pancreas", "renal": "kidney"}

# A lesion word at the end of a label: SNOMED CT morphology (CID 7159 / TotalSegmentator).
_LESIONS: dict[str, Code] = {
    "tumor": codes.SCT.Neoplasm,
    "tumour": codes.SCT.Neoplasm,
    "neoplasm": codes.SCT.Neoplasm,
    "mass": codes.SCT.Mass,
    "lesion": codes.SCT.Lesion,
    "cyst": codes.SCT.Cyst,
}


def _table(key: str) -> SegmentCoding | None:
    return _mapping().get(key) or _builtin().get(key)


def _known(key: str) -> SegmentCoding | None:
    """A standard coding for a normalized label name, trying its other spellings."""
    found = _table(key) or _table(_SYNONYMS.get(key, ""))
    if found is not None:
        return found
    tokens = key.split("_")
    sided = _with_side(tokens)
    if sided is not None:
        return sided
    return _lesion(tokens)


def _with_side(tokens: list[str]) -> SegmentCoding | None:
    """``left kidney``, ``kidney left``, ``left rib 3``, ``left lung``: the table's sided
    entry (``kidney_left``, ``rib_left_3``) or the unsided one with a Left/Right modifier."""
    sides = [token for token in tokens if token in _SIDES]
    base = [token for token in tokens if token not in _SIDES]
    if len(sides) != 1 or not base:
        return None
    side = sides[0]
    stem = "_".join(base)
    stem = _SYNONYMS.get(stem, stem)
    candidates = [f"{stem}_{side}"]
    head, _, last = stem.rpartition("_")
    if head and last.isdigit():
        candidates.append(f"{head}_{side}_{last}")
    for candidate in candidates:
        found = _table(candidate)
        if found is not None:
            return found
    unsided = _table(stem)
    if unsided is None or unsided.property_type_modifier is not None:
        return None
    return replace(unsided, property_type_modifier=_concept(_SIDES[side]))


def _lesion(tokens: list[str]) -> SegmentCoding | None:
    """``tumor``, ``pancreatic tumor``, ``bone lesion``, ``left kidney mass``: the lesion
    word's morphology, in the organ the words before it name (if they name one)."""
    morphology = _LESIONS.get(tokens[-1])
    if morphology is None:
        return None
    words = [_ORGAN_ADJECTIVES.get(token, token) for token in tokens[:-1]]
    organ: SegmentCoding | None = None
    if words:
        organ = _known("_".join(words))
        if (
            organ is None
            or organ.category.value == codes.SCT.MorphologicallyAbnormalStructure.value
        ):
            return None
    return SegmentCoding(
        label="_".join(tokens),
        category=_concept(codes.SCT.MorphologicallyAbnormalStructure),
        property_type=_concept(morphology),
        property_type_modifier=None,
        anatomic_region=organ.property_type if organ is not None else None,
        anatomic_region_modifier=organ.property_type_modifier if organ is not None else None,
        # TotalSegmentator's color for its liver tumor.
        display_rgb=(255, 0, 200),
    )


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
        # ct-body's label 1: inside the patient, neither lung nor bone. Slicer's tissue green,
        # far from the lung's and bone's tans.
        "soft_tissue": coding("soft tissue", tissue, codes.SCT.SoftTissue, (128, 174, 128)),
        "lung": lung,
        "lungs": lung,
        # A threshold model finds bone tissue, not named bones: CID 7151's "Bone" (3138006).
        "bone": coding("bone", tissue, codes.SCT.BoneTissue, (241, 214, 145)),
        # Organs other zoo bundles segment that TotalSegmentator's table lacks.
        "rectum": coding("rectum", anatomical, codes.SCT.Rectum, (188, 95, 70)),
        "uterus": coding("uterus", anatomical, codes.SCT.Uterus, (229, 150, 150)),
        "ureter": coding("ureter", anatomical, codes.SCT.Ureter, (255, 235, 0)),
        "artery": coding("artery", anatomical, codes.SCT.Artery, (216, 101, 79)),
        "vein": coding("vein", anatomical, codes.SCT.Vein, (0, 151, 206)),
        "portal_vein": coding("portal_vein", anatomical, codes.SCT.PortalVein, (0, 120, 180)),
        "renal_pelvis": coding("renal_pelvis", anatomical, codes.SCT.RenalPelvis, (255, 200, 80)),
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
