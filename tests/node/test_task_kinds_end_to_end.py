"""All three task kinds through the node, with DCMTK peers on both sides.

One node, one rules file: a MONOCHROME1 CR goes to a 2-D classification bundle, a CT whose
Series Description says "nodule" to a detection bundle, any other CT to ct-body with the
Secondary Capture preview switched on; every rule asks for a result card, and the node
config for its PDF too. Everything that reaches the PACS is checked: SR content item by
item, dciodvfy on every object, PixelMed on every SR, each card's text read back by
tesseract.
"""

from __future__ import annotations

import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.explain_bundles import box_classifier_bundle
from tests.ocr import card_text
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until
from tests.task_bundles import (
    DETECTOR_SCORES,
    chest_radiograph,
    cxr_probabilities,
    make_box_detector_bundle,
    make_cxr_classifier_bundle,
)

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.dciodvfy,
    pytest.mark.java,
    pytest.mark.tesseract,
    pytest.mark.slow,
]

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"

RULES = """\
rules:
  - name: chest-radiographs
    match: {Modality: {in: [CR, DX]}}
    model: cxr
    destinations: [pacs]
    card: true
  - name: attention
    priority: 6
    match:
      all:
        - Modality: {equals: CT}
        - SeriesDescription: {regex: "(?i)attention"}
    model: looker
    destinations: [pacs]
  - name: nodules
    priority: 5
    match:
      all:
        - Modality: {equals: CT}
        - SeriesDescription: {regex: "(?i)nodule"}
    model: boxes
    destinations: [pacs]
    card: true
  - name: ct-body-preview
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs]
    preview: true
    card: true
"""


def _by_series(files: list[Path]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for path in files:
        ds = dcmread(path)
        ds.filename = str(path)
        out.setdefault(str(ds.SeriesDescription), []).append(ds)
    return out


def _probabilities(sr: Dataset) -> list[float]:
    values = []
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":
            continue
        for group in item.ContentSequence:
            for child in group.ContentSequence:
                if child.ConceptNameCodeSequence[0].CodeValue == "122157":
                    values.append(float(child.MeasuredValueSequence[0].NumericValue))
    return values


def test_classification_detection_and_preview_end_to_end(tmp_path: Path, pacs: StoreSCP) -> None:
    cxr = chest_radiograph(modality="CR", photometric="MONOCHROME1")
    cxr_path = tmp_path / "cxr" / "cr.dcm"
    cxr_path.parent.mkdir()
    cxr.save_as(cxr_path, enforce_file_format=True)
    nodule_spec = PhantomSpec(
        slices=8,
        rows=64,
        columns=64,
        pixel_spacing_mm=5.0,
        slice_thickness_mm=4.0,
        series_description="Chest nodule screening",
        seed=2,
    )
    body_spec = PhantomSpec(
        slices=12,
        rows=96,
        columns=96,
        pixel_spacing_mm=4.0,
        slice_thickness_mm=5.0,
        study_instance_uid=nodule_spec.study_instance_uid,
        seed=3,
    )
    looker_spec = PhantomSpec(
        slices=16,
        rows=64,
        columns=64,
        pixel_spacing_mm=5.0,
        slice_thickness_mm=5.0,
        series_description="Attention check",
        study_instance_uid=nodule_spec.study_instance_uid,
        seed=4,
    )
    looker_paths = write_phantom_ct(tmp_path / "looker", looker_spec)
    nodule_paths = write_phantom_ct(tmp_path / "nodule", nodule_spec)
    body_paths = write_phantom_ct(tmp_path / "body", body_spec)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    models = {
        "cxr": {
            "bundle": str(make_cxr_classifier_bundle(tmp_path / "b")),
            "device": "cpu",
            "explain": "gradcam",
        },
        "looker": {
            "bundle": str(box_classifier_bundle(tmp_path / "b", 3)),
            "device": "cpu",
            "explain": "gradcam",
        },
        "boxes": {"bundle": str(make_box_detector_bundle(tmp_path / "b")), "device": "cpu"},
    }
    config = node_config(tmp_path / "node", pacs.port, rules, models, results={"card_pdf": True})
    node = NodeProcess(tmp_path / "node", config)
    node.start()
    try:
        for paths in ([cxr_path], nodule_paths, body_paths, looker_paths):
            sent = storescu(node.port, paths)
            assert sent.returncode == 0, sent.stdout + sent.stderr

        def arrived() -> bool:
            series = _by_series(pacs.files())
            cards = [
                ds
                for name, objects in series.items()
                if name.startswith("AI result card")
                for ds in objects
            ]
            return (
                sum(1 for name in series if name.startswith("AI SR")) == 4
                and sum(1 for name in series if name.startswith("AI attribution preview")) == 2
                and sum(1 for name in series if name.startswith("AI attribution box")) == 1
                and any(name.startswith("AI preview") for name in series)
                and len(cards) == 6
            )

        wait_until(
            arrived,
            300,
            "four SRs, a SEG, a preview, 3 cards with PDFs, 2 attribution previews and a map",
            1.0,
        )
        time.sleep(2.0)
    finally:
        node.stop()
    series = _by_series(pacs.files())
    for objects in series.values():
        for ds in objects:
            assert_dciodvfy_clean(ds.filename)
            if ds.SOPClassUID == SR_STORAGE:
                assert_sr_template_valid(ds.filename)

    (cxr_sr,) = series["AI SR cxr-densenet"]
    assert cxr_sr.StudyInstanceUID == cxr.StudyInstanceUID
    # Default threshold 0.5: only pneumonia (0.59) is found.
    assert _probabilities(cxr_sr) == pytest.approx([cxr_probabilities()[1]], abs=1e-6)

    (box_sr,) = series["AI SR box-detector"]
    kept = sorted((s for s in DETECTOR_SCORES if s >= 0.5), reverse=True)
    assert _probabilities(box_sr) == pytest.approx(kept, abs=1e-6)

    (seg,) = series["AI SEG dicom-ai CT body/lung/bone"]
    assert seg.SOPClassUID == SEG_STORAGE
    (body_sr,) = series["AI SR dicom-ai CT body/lung/bone"]
    assert seg.RelatedSeriesSequence[0].SeriesInstanceUID == body_sr.SeriesInstanceUID
    previews = series["AI preview dicom-ai CT body/lung/bone"]
    referenced = {
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    # One preview image per source slice that has a segment, each in RGB on its source.
    assert len(previews) == len(referenced)
    assert {str(p.SourceImageSequence[0].ReferencedSOPInstanceUID) for p in previews} == referenced
    for preview in previews:
        assert preview.SOPClassUID == SC_STORAGE
        assert preview.PhotometricInterpretation == "RGB"
        pixels = preview.pixel_array
        coloured = (pixels[..., 0] != pixels[..., 1]) | (pixels[..., 1] != pixels[..., 2])
        assert np.count_nonzero(coloured) > 0  # outlines drawn
    assert "CHEST^SYNTHETIC" not in node.log_text()

    # explain: gradcam. The 3-D classifier's map is a Parametric Map on its source frames,
    # highest inside the box it looks at; both classifiers' maps come as a colour preview
    # (a radiograph has no patient geometry for a Parametric Map).
    (attribution,) = [
        ds
        for name, objects in series.items()
        if name.startswith("AI attribution box")
        for ds in objects
    ]
    assert attribution.SOPClassUID == PARAMETRIC_MAP_STORAGE
    looker_sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in looker_paths}
    referenced = {
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in attribution.PerFrameFunctionalGroupsSequence
    }
    assert referenced == looker_sops
    values = hd.pm.ParametricMap.from_dataset(attribution).pixel_array
    assert values.max() > 0.5 and values.min() >= 0.0
    previews = [
        ds
        for name, objects in series.items()
        if name.startswith("AI attribution preview")
        for ds in objects
    ]
    assert {str(ds.StudyInstanceUID) for ds in previews} == {
        str(cxr.StudyInstanceUID),
        nodule_spec.study_instance_uid,
    }

    # A card and its PDF per job; each card's text names its model and its findings.
    cards = {
        str(ds.SeriesDescription): ds
        for name, objects in series.items()
        if name.startswith("AI result card")
        for ds in objects
        if ds.SOPClassUID == SC_STORAGE
    }
    pdfs = [
        ds
        for name, objects in series.items()
        if name.startswith("AI result card")
        for ds in objects
        if ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    ]
    assert len(cards) == 3 and len(pdfs) == 3
    assert all(bytes(pdf.EncapsulatedDocument).startswith(b"%PDF") for pdf in pdfs)
    expected = {
        "AI result card dicom-ai CT body/lung/bone": ["soft tissue", "lung", "bone", "ml"],
        "AI result card cxr-densenet": ["pneumonia"],
        "AI result card box-detector": ["mm"],
    }
    for description, words in expected.items():
        text = " ".join(card_text(cards[description].pixel_array))
        for word in words:
            assert word in text, (description, word, text)
        assert "CHEST^SYNTHETIC".lower() not in text
