"""Left/right labels -> SEG + SR: the side stays in both, each the way its IOD allows.

The SEG nests it in the segment's property type (Segmented Property Type Modifier Code
Sequence); the SR carries it as a "Laterality" (SNOMED 272741003) HAS CONCEPT MOD item under
the group's finding site, never as that SEG attribute inside an SR code item.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import DeviceIdentity, build_seg, build_sr, result_uids
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets
from tests.dicom_validation import assert_dciodvfy_clean, dciodvfy_output

pytestmark = [pytest.mark.dciodvfy]

SPEC = PhantomSpec(slices=6, rows=48, columns=48, pixel_spacing_mm=4.0, slice_thickness_mm=5.0)
LEFT, RIGHT = "7771000", "24028007"
# label value -> (name, finding site, its laterality); every label has a side.
SIDED = {
    1: ("kidney_left", "64033007", LEFT),
    2: ("right kidney", "64033007", RIGHT),
    3: ("lung_upper_lobe_left", "45653009", LEFT),
    4: ("Left Lung", "39607008", LEFT),
    5: ("left kidney cyst", "64033007", LEFT),  # a lesion: its site is the region
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    headers = list(phantom_ct_datasets(SPEC))
    label_map = np.zeros((SPEC.slices, SPEC.rows, SPEC.columns), dtype=np.uint16)
    for value in SIDED:
        label_map[1:5, 8 * value : 8 * value + 6, 10:30] = value
    findings = SegmentationFindings(
        label_map=label_map,
        labels=tuple(SegmentLabel(value, name) for value, (name, _, _) in SIDED.items()),
        algorithm=AlgorithmIdentification("sided", "1.0", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE),
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
    )
    uids = result_uids(SPEC.series_instance_uid, "sided", "1.0")
    device = DeviceIdentity.for_node("node-sided")
    seg = build_seg(headers, findings, uids, device)
    sr = build_sr(headers, seg, findings, uids, device)
    directory = tmp_path_factory.mktemp("sided")
    seg_path, sr_path = directory / "seg.dcm", directory / "sr.dcm"
    seg_path.write_bytes(file_bytes(seg))
    sr_path.write_bytes(file_bytes(sr))
    return seg_path, sr_path


def test_sr_has_no_seg_attributes_in_its_code_items(results: tuple[Path, Path]) -> None:
    _, sr_path = results
    assert_dciodvfy_clean(sr_path)
    output = dciodvfy_output(sr_path)
    assert "Modifier" not in output, output
    assert "not present in standard DICOM IOD" not in output, output
    assert "Standard Extended SOP Class" not in output, output

    def walk(items: pydicom.Sequence) -> list[Dataset]:
        found = []
        for item in items:
            found.append(item)
            for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence", "ContentSequence"):
                if keyword in item:
                    found += walk(item[keyword].value)
        return found

    items = walk(pydicom.dcmread(sr_path).ContentSequence)
    assert not [i for i in items if "SegmentedPropertyTypeModifierCodeSequence" in i]
    assert not [i for i in items if "AnatomicRegionModifierSequence" in i]


def test_sr_finding_sites_keep_the_side(results: tuple[Path, Path]) -> None:
    _, sr_path = results
    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    by_name = {str(group.tracking_identifier): group for group in groups}
    assert set(by_name) == {name for name, _, _ in SIDED.values()}
    for name, site_code, side in SIDED.values():
        (site,) = by_name[name].finding_sites
        assert site.value.value == site_code, name
        assert site.laterality is not None, name
        assert site.laterality.value == side, name
        # The Laterality concept, SNOMED 272741003, as a HAS CONCEPT MOD child of the site.
        (modifier,) = site.ContentSequence
        assert modifier.RelationshipType == "HAS CONCEPT MOD"
        assert modifier.ConceptNameCodeSequence[0].CodeValue == "272741003"


def test_seg_keeps_the_side_in_the_property_type(results: tuple[Path, Path]) -> None:
    seg_path, _ = results
    assert_dciodvfy_clean(seg_path)
    seg = pydicom.dcmread(seg_path)
    sides = {}
    for segment in seg.SegmentSequence:
        property_type: Dataset = segment.SegmentedPropertyTypeCodeSequence[0]
        modifiers: list[Dataset] = list(
            property_type.get("SegmentedPropertyTypeModifierCodeSequence", [])
        )
        for region in segment.get("AnatomicRegionSequence", []):
            modifiers += region.get("AnatomicRegionModifierSequence", [])
        (modifier,) = modifiers
        sides[str(segment.SegmentLabel)] = str(modifier.CodeValue)
    # SEG segment labels stay the model's own names.
    assert sides == {name: side for name, _, side in SIDED.values()}
