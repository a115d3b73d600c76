"""Label names -> coded concepts: every label name of the MONAI zoo's bundles, and how the
other spellings of a name (case, spaces, side first or last, synonyms) find its code.

The expected codes are written here (SNOMED CT values as PS3.16 and TotalSegmentator's table
give them), not read from ``dicom_ai.results``.
"""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from dicom_ai.results import LOCAL_CODING_SCHEME_DESIGNATOR, segment_coding
from tests.bundles import shared_bundle
from tests.zoo import ZOO

# (label name as the bundle's metadata.json spells it, SNOMED CT code or None for a local
# code, laterality L/R or None), in bundle order, each name once.
ZOO_LABELS: list[tuple[str, str | None, str | None]] = [
    # spleen_ct_segmentation
    ("background", None, None),
    ("spleen", "78961009", None),
    # wholeBody_ct_segmentation
    ("kidney_right", "64033007", "R"),
    ("kidney_left", "64033007", "L"),
    ("gallbladder", "28231008", None),
    ("liver", "10200004", None),
    ("stomach", "69695003", None),
    ("aorta", "15825003", None),
    ("inferior_vena_cava", "64131007", None),
    ("portal_vein_and_splenic_vein", "110765007", None),
    ("pancreas", "15776009", None),
    ("adrenal_gland_right", "23451007", "R"),
    ("adrenal_gland_left", "23451007", "L"),
    ("lung_upper_lobe_left", "45653009", "L"),
    ("lung_lower_lobe_left", "90572001", "L"),
    ("lung_upper_lobe_right", "45653009", "R"),
    ("lung_middle_lobe_right", "72481006", None),
    ("lung_lower_lobe_right", "90572001", "R"),
    ("vertebrae_L5", "49668003", None),
    ("vertebrae_L4", "11994002", None),
    ("vertebrae_L3", "36470004", None),
    ("vertebrae_L2", "14293000", None),
    ("vertebrae_L1", "66794005", None),
    ("vertebrae_T12", "23215003", None),
    ("vertebrae_T11", "12989004", None),
    ("vertebrae_T10", "7610001", None),
    ("vertebrae_T9", "82687006", None),
    ("vertebrae_T8", "11068009", None),
    ("vertebrae_T7", "62487009", None),
    ("vertebrae_T6", "45296009", None),
    ("vertebrae_T5", "56401006", None),
    ("vertebrae_T4", "73071006", None),
    ("vertebrae_T3", "1626008", None),
    ("vertebrae_T2", "53733008", None),
    ("vertebrae_T1", "64864005", None),
    ("vertebrae_C7", "87391001", None),
    ("vertebrae_C6", "36054005", None),
    ("vertebrae_C5", "36978003", None),
    ("vertebrae_C4", "5329002", None),
    ("vertebrae_C3", "113205007", None),
    ("vertebrae_C2", "39976000", None),
    ("vertebrae_C1", "14806007", None),
    ("esophagus", "32849002", None),
    ("trachea", "44567001", None),
    ("heart_myocardium", "74281007", None),
    ("heart_atrium_left", "82471001", None),
    ("heart_ventricle_left", "87878005", None),
    ("heart_atrium_right", "73829009", None),
    ("heart_ventricle_right", "53085002", None),
    ("pulmonary_artery", "81040000", None),
    ("brain", "12738006", None),
    ("iliac_artery_left", "73634005", "L"),
    ("iliac_artery_right", "73634005", "R"),
    ("iliac_vena_left", "46027005", "L"),
    ("iliac_vena_right", "46027005", "R"),
    ("small_bowel", "30315005", None),
    ("duodenum", "38848004", None),
    ("colon", "71854001", None),
    ("rib_left_1", "48535007", "L"),
    ("rib_left_2", "78247007", "L"),
    ("rib_left_3", "25888004", "L"),
    ("rib_left_4", "25523003", "L"),
    ("rib_left_5", "15339008", "L"),
    ("rib_left_6", "59558009", "L"),
    ("rib_left_7", "24915002", "L"),
    ("rib_left_8", "5953002", "L"),
    ("rib_left_9", "22565002", "L"),
    ("rib_left_10", "77644006", "L"),
    ("rib_left_11", "58830002", "L"),
    ("rib_left_12", "43993008", "L"),
    ("rib_right_1", "48535007", "R"),
    ("rib_right_2", "78247007", "R"),
    ("rib_right_3", "25888004", "R"),
    ("rib_right_4", "25523003", "R"),
    ("rib_right_5", "15339008", "R"),
    ("rib_right_6", "59558009", "R"),
    ("rib_right_7", "24915002", "R"),
    ("rib_right_8", "5953002", "R"),
    ("rib_right_9", "22565002", "R"),
    ("rib_right_10", "77644006", "R"),
    ("rib_right_11", "58830002", "R"),
    ("rib_right_12", "43993008", "R"),
    ("humerus_left", "85050009", "L"),
    ("humerus_right", "85050009", "R"),
    ("scapula_left", "79601000", "L"),
    ("scapula_right", "79601000", "R"),
    ("clavicula_left", "51299004", "L"),
    ("clavicula_right", "51299004", "R"),
    ("femur_left", "71341001", "L"),
    ("femur_right", "71341001", "R"),
    ("hip_left", "29836001", "L"),
    ("hip_right", "29836001", "R"),
    ("sacrum", "54735007", None),
    ("face", "89545001", None),
    ("gluteus_maximus_left", "181674001", "L"),
    ("gluteus_maximus_right", "181674001", "R"),
    ("gluteus_medius_left", "78333006", "L"),
    ("gluteus_medius_right", "78333006", "R"),
    ("gluteus_minimus_left", "75297007", "L"),
    ("gluteus_minimus_right", "75297007", "R"),
    ("autochthon_left", "244849004", "L"),
    ("autochthon_right", "244849004", "R"),
    ("iliopsoas_left", "68455001", "L"),
    ("iliopsoas_right", "68455001", "R"),
    ("urinary_bladder", "89837001", None),
    # multi_organ_segmentation
    ("artery", "51114001", None),
    ("portal vein", "32764006", None),
    # pancreas_ct_dints_segmentation
    ("pancreatic tumor", "108369006", None),
    # pediatric_abdominal_ct_segmentation
    # renalStructures_UNEST_segmentation
    ("kidney cortex", None, None),
    ("medulla", None, None),
    ("pelvicalyceal system", None, None),
    # renalStructures_CECT_segmentation
    ("vein", "29092000", None),
    ("ureter", "87953007", None),
    ("neoplasm", "108369006", None),
    ("parenchyma", None, None),
    # swin_unetr_btcv_segmentation
    ("Right Kidney", "64033007", "R"),
    ("Left Kideny", "64033007", "L"),
    ("Gallbladder", "28231008", None),
    ("Esophagus", "32849002", None),
    ("Liver", "10200004", None),
    ("Stomach", "69695003", None),
    ("Aorta", "15825003", None),
    ("IVC", "64131007", None),
    ("Portal and Splenic Veins", "110765007", None),
    ("Pancreas", "15776009", None),
    ("Right adrenal gland", "23451007", "R"),
    ("Left adrenal gland", "23451007", "L"),
    # vista3d
    ("kidney", "64033007", None),
    ("right kidney", "64033007", "R"),
    ("inferior vena cava", "64131007", None),
    ("right adrenal gland", "23451007", "R"),
    ("left adrenal gland", "23451007", "L"),
    ("left kidney", "64033007", "L"),
    ("bladder", "89837001", None),
    ("prostate or uterus", None, None),
    ("portal vein and splenic vein", "110765007", None),
    ("rectum", "34402009", None),
    ("small bowel", "30315005", None),
    ("lung", "39607008", None),
    ("bone", "3138006", None),
    ("lung tumor", "108369006", None),
    ("hepatic vessel", "59820001", None),
    ("hepatic tumor", "108369006", None),
    ("colon cancer primaries", None, None),
    ("left lung upper lobe", "45653009", "L"),
    ("left lung lower lobe", "90572001", "L"),
    ("right lung upper lobe", "45653009", "R"),
    ("right lung middle lobe", "72481006", None),
    ("right lung lower lobe", "90572001", "R"),
    ("vertebrae L5", "49668003", None),
    ("vertebrae L4", "11994002", None),
    ("vertebrae L3", "36470004", None),
    ("vertebrae L2", "14293000", None),
    ("vertebrae L1", "66794005", None),
    ("vertebrae T12", "23215003", None),
    ("vertebrae T11", "12989004", None),
    ("vertebrae T10", "7610001", None),
    ("vertebrae T9", "82687006", None),
    ("vertebrae T8", "11068009", None),
    ("vertebrae T7", "62487009", None),
    ("vertebrae T6", "45296009", None),
    ("vertebrae T5", "56401006", None),
    ("vertebrae T4", "73071006", None),
    ("vertebrae T3", "1626008", None),
    ("vertebrae T2", "53733008", None),
    ("vertebrae T1", "64864005", None),
    ("vertebrae C7", "87391001", None),
    ("vertebrae C6", "36054005", None),
    ("vertebrae C5", "36978003", None),
    ("vertebrae C4", "5329002", None),
    ("vertebrae C3", "113205007", None),
    ("vertebrae C2", "39976000", None),
    ("vertebrae C1", "14806007", None),
    ("left iliac artery", "73634005", "L"),
    ("right iliac artery", "73634005", "R"),
    ("left iliac vena", "46027005", "L"),
    ("right iliac vena", "46027005", "R"),
    ("left rib 1", "48535007", "L"),
    ("left rib 2", "78247007", "L"),
    ("left rib 3", "25888004", "L"),
    ("left rib 4", "25523003", "L"),
    ("left rib 5", "15339008", "L"),
    ("left rib 6", "59558009", "L"),
    ("left rib 7", "24915002", "L"),
    ("left rib 8", "5953002", "L"),
    ("left rib 9", "22565002", "L"),
    ("left rib 10", "77644006", "L"),
    ("left rib 11", "58830002", "L"),
    ("left rib 12", "43993008", "L"),
    ("right rib 1", "48535007", "R"),
    ("right rib 2", "78247007", "R"),
    ("right rib 3", "25888004", "R"),
    ("right rib 4", "25523003", "R"),
    ("right rib 5", "15339008", "R"),
    ("right rib 6", "59558009", "R"),
    ("right rib 7", "24915002", "R"),
    ("right rib 8", "5953002", "R"),
    ("right rib 9", "22565002", "R"),
    ("right rib 10", "77644006", "R"),
    ("right rib 11", "58830002", "R"),
    ("right rib 12", "43993008", "R"),
    ("left humerus", "85050009", "L"),
    ("right humerus", "85050009", "R"),
    ("left scapula", "79601000", "L"),
    ("right scapula", "79601000", "R"),
    ("left clavicula", "51299004", "L"),
    ("right clavicula", "51299004", "R"),
    ("left femur", "71341001", "L"),
    ("right femur", "71341001", "R"),
    ("left hip", "29836001", "L"),
    ("right hip", "29836001", "R"),
    ("left gluteus maximus", "181674001", "L"),
    ("right gluteus maximus", "181674001", "R"),
    ("left gluteus medius", "78333006", "L"),
    ("right gluteus medius", "78333006", "R"),
    ("left gluteus minimus", "75297007", "L"),
    ("right gluteus minimus", "75297007", "R"),
    ("left autochthon", "244849004", "L"),
    ("right autochthon", "244849004", "R"),
    ("left iliopsoas", "68455001", "L"),
    ("right iliopsoas", "68455001", "R"),
    ("left atrial appendage", "68786006", "L"),
    ("brachiocephalic trunk", "12691009", None),
    ("left brachiocephalic vein", "8887007", "L"),
    ("right brachiocephalic vein", "8887007", "R"),
    ("left common carotid artery", "32062004", "L"),
    ("right common carotid artery", "32062004", "R"),
    ("costal cartilages", "50016007", None),
    ("heart", "80891009", None),
    ("left kidney cyst", "367643001", "L"),
    ("right kidney cyst", "367643001", "R"),
    ("prostate", "41216001", None),
    ("pulmonary vein", "122972007", None),
    ("skull", "89546000", None),
    ("spinal cord", "2748008", None),
    ("sternum", "56873002", None),
    ("left subclavian artery", "29700009", "L"),
    ("right subclavian artery", "29700009", "R"),
    ("superior vena cava", "48345005", None),
    ("thyroid gland", "69748006", None),
    ("vertebrae S1", "65985001", None),
    ("bone lesion", "52988006", None),
    ("kidney mass", "4147007", None),
    ("liver tumor", "108369006", None),
    ("vertebrae L6", None, None),
    ("airway", "110726009", None),
    # brats_mri_segmentation
    ("Tumor core", None, None),
    ("Whole tumor", None, None),
    ("Enhancing tumor", None, None),
    # lung_nodule_ct_detection
    # breast_density_classification
    ("A", None, None),
    ("B", None, None),
    ("C", None, None),
    ("D", None, None),
    # valve_landmarks
    ("Y Dimension", None, None),
    ("X Dimension", None, None),
]


def _zoo_label_names() -> set[str]:
    names: set[str] = set()
    for bundle in ZOO:
        metadata = json.loads((shared_bundle(bundle) / "configs" / "metadata.json").read_text())
        pred = metadata["network_data_format"]["outputs"].get("pred", {})
        for key in ("channel_def", "label_def"):
            names.update(str(name) for name in pred.get(key, {}).values())
    return names


def test_table_covers_every_zoo_label_name() -> None:
    table = [name for name, _, _ in ZOO_LABELS]
    assert len(table) == len(set(table))
    assert set(table) == _zoo_label_names()


@pytest.mark.parametrize(("name", "code", "side"), ZOO_LABELS)
def test_zoo_label_code(name: str, code: str | None, side: str | None) -> None:
    coding = segment_coding(name)
    if code is None:
        assert coding.is_local
        assert coding.property_type.scheme_designator == LOCAL_CODING_SCHEME_DESIGNATOR
        assert coding.property_type.meaning == name
        assert len(coding.property_type.value) <= 16
    else:
        assert not coding.is_local
        assert coding.property_type.scheme_designator == "SCT"
        assert coding.property_type.value == code
    laterality = coding.laterality
    assert (None if laterality is None else laterality.meaning[0]) == side
    if laterality is not None:
        assert laterality.value == {"L": "7771000", "R": "24028007"}[side or ""]


@pytest.mark.parametrize(
    ("name", "code", "meaning"),
    [
        ("spleen", "78961009", "Spleen"),
        ("Liver", "10200004", "Liver"),
        ("pancreas", "15776009", "Pancreas"),
        ("aorta", "15825003", "Aorta"),
        ("IVC", "64131007", "Inferior vena cava"),
        ("bladder", "89837001", "Urinary bladder"),
        ("Left Atrium", "82471001", "Left atrium"),
        ("right ventricle", "53085002", "Right ventricle of heart"),
        ("rectum", "34402009", "Rectum"),
        ("hepatic vessel", "59820001", "Blood vessel"),
    ],
)
def test_exact_codes(name: str, code: str, meaning: str) -> None:
    concept = segment_coding(name).property_type
    assert (concept.value, concept.scheme_designator, concept.meaning) == (code, "SCT", meaning)


@pytest.mark.parametrize(
    "name",
    ["kidney_left", "Kidney Left", "left kidney", "LEFT_KIDNEY", "left-kidney", " Left  Kideny "],
)
def test_side_first_or_last_same_code(name: str) -> None:
    coding = segment_coding(name)
    assert coding.property_type.value == "64033007"  # Kidney
    assert coding.property_type_modifier is not None
    assert coding.property_type_modifier.value == "7771000"  # Left


def test_side_before_a_number_and_on_an_unsided_organ() -> None:
    assert segment_coding("left rib 3") == segment_coding("rib_left_3")
    assert (
        segment_coding("left rib 3").property_type.value
        != segment_coding("left rib 4").property_type.value
    )
    lung = segment_coding("Right Lung")
    assert lung.property_type.value == "39607008"  # Lung
    assert lung.property_type_modifier is not None
    assert lung.property_type_modifier.value == "24028007"  # Right
    assert segment_coding("lung").property_type_modifier is None
    # Two sides, or a side alone, name nothing known.
    assert segment_coding("left right kidney").is_local
    assert segment_coding("left").is_local


def test_lesion_in_an_organ() -> None:
    tumor = segment_coding("pancreatic tumor")
    assert tumor.property_type.value == "108369006"  # Neoplasm
    assert tumor.category.value == "49755003"  # Morphologically abnormal structure
    assert tumor.anatomic_region is not None and tumor.anatomic_region.value == "15776009"
    cyst = segment_coding("left kidney cyst")
    assert cyst.property_type.value == "367643001"  # Cyst
    assert cyst.anatomic_region is not None and cyst.anatomic_region.value == "64033007"
    assert cyst.anatomic_region_modifier is not None
    assert cyst.anatomic_region_modifier.value == "7771000"
    mass = segment_coding("right kidney mass")
    assert mass.property_type.value == "4147007"  # Mass
    assert mass.anatomic_region_modifier is not None
    assert mass.anatomic_region_modifier.value == "24028007"
    bare = segment_coding("Tumor")
    assert bare.property_type.value == "108369006" and bare.anatomic_region is None
    # The words before the lesion word must name an organ.
    assert segment_coding("whole tumor").is_local
    assert segment_coding("lesion_of_something").is_local


def test_unknown_names_get_local_codes() -> None:
    for name in ("Mystery Blob", "valve annulus point", "vertebrae L6", "prostate or uterus"):
        coding = segment_coding(name)
        assert coding.is_local, name
        assert coding.property_type.scheme_designator == LOCAL_CODING_SCHEME_DESIGNATOR
        assert coding.property_type.meaning == name
        assert coding.property_type_modifier is None


def test_each_call_gets_its_own_concepts() -> None:
    # The SEG nests its modifier into its property type item: a later SR must not see it.
    first = segment_coding("kidney_left")
    first.property_type.SegmentedPropertyTypeModifierCodeSequence = [Dataset()]
    first.category.CodeMeaning = "changed"
    again = segment_coding("kidney_left")
    assert "SegmentedPropertyTypeModifierCodeSequence" not in again.property_type
    assert again.category.meaning != "changed"
    assert again.property_type is not first.property_type
    assert again == segment_coding("Kidney Left")


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("Abdominal multi-organ segmentation", "ABDOMINAL MULTI"),  # cut at an underscore
        ("spleen", "SPLEEN"),
        ("  __x-ray  ", "X_RAY"),
        ("---", "SEGMENTATION"),
    ],
)
def test_seg_content_label_is_a_code_string_highdicom_accepts(name: str, label: str) -> None:
    from dicom_ai.results.seg import content_label

    assert content_label(name) == label
