"""The zoo's multi-series bundles through the running node, configs unchanged, by study rules.

One node serves both bundles (shared configs copied, seeded weights: :mod:`tests.zoo`):

- ``brats_mri_segmentation``: four MR series of one study on grids of their own (T1c 3-D
  sagittal at 1 mm, T1 and T2 axial, FLAIR axial at 5 mm), each in its own storescu
  association, in a shuffled order, as channels T1c, T1, T2, FLAIR. One SEG on the T1c frames
  and one SR whose evidence and source images cover all four series.
- ``renalStructures_CECT_segmentation``: three CT phases told apart by AcquisitionTime
  (``order_by``/``position``), as the bundle's keys ``artery``, ``vein``, ``excret``; its
  loader's ``label`` key (ground truth) has no image. One SEG on the arterial phase, an SR.

Every result: dciodvfy clean, PixelMed TID 1500 clean (SRs), highdicom reads it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until
from tests.studies import AXIAL, CORONAL, SAGITTAL, Cube, SeriesSpec, write_study
from tests.zoo import make_zoo_bundle

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.java, pytest.mark.slow]

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# brats' Lambdad writes 1, 2, 4 where its metadata names the network's channels 0..2.
BRATS_LABELS = {1: "Tumor core", 2: "Whole tumor", 4: "Enhancing tumor"}

RULES = {
    "rules": [
        {
            "name": "brain-tumour",
            "match": {"Modality": {"equals": "MR"}},
            "model": "brats",
            "destinations": ["pacs"],
            "study": {
                "input": "channels",
                "reference": "t1c",
                "deadline_seconds": 300,
                "roles": [
                    {"name": "t1c", "match": {"SeriesDescription": {"regex": "(?i)^t1 ?(c|post)"}}},
                    {"name": "t1", "match": {"SeriesDescription": {"regex": "(?i)^t1$"}}},
                    {"name": "t2", "match": {"SeriesDescription": {"regex": "(?i)^t2"}}},
                    {"name": "flair", "match": {"SeriesDescription": {"regex": "(?i)flair"}}},
                ],
            },
        },
        {
            "name": "kidney-phases",
            "match": {"Modality": {"equals": "CT"}},
            "model": "renal",
            "destinations": ["pacs"],
            "study": {
                "input": "keys",
                "deadline_seconds": 300,
                "roles": [
                    {"name": "artery", "order_by": "AcquisitionTime", "position": 1},
                    {"name": "vein", "order_by": "AcquisitionTime", "position": 2},
                    {"name": "excret", "order_by": "AcquisitionTime", "position": 3},
                ],
            },
        },
    ]
}


@dataclass
class Studies:
    node: NodeProcess
    pacs: StoreSCP
    brats: dict[str, list[Path]]
    renal: dict[str, list[Path]]


def _brats_series() -> list[SeriesSpec]:
    tumour = (Cube((6.0, -4.0, 8.0), 9.0, 900.0),)
    return [
        SeriesSpec("t1c", "T1C", rows=48, columns=48, slices=36, pixel_spacing=(1.0, 1.0),
                   slice_spacing=1.0, orientation=SAGITTAL, mr_acquisition_type="3D",
                   cubes=tumour),
        SeriesSpec("t1", "T1", rows=32, columns=32, slices=10, pixel_spacing=(1.6, 1.6),
                   slice_spacing=4.0),
        SeriesSpec("t2", "T2", rows=36, columns=36, slices=12, pixel_spacing=(1.4, 1.4),
                   slice_spacing=3.0, orientation=CORONAL, cubes=tumour),
        SeriesSpec("flair", "FLAIR", rows=28, columns=28, slices=8, pixel_spacing=(1.8, 1.8),
                   slice_spacing=5.0, orientation=AXIAL, cubes=tumour),
    ]  # fmt: skip


def _renal_series() -> list[SeriesSpec]:
    # Written in an order other than time: the roles come from AcquisitionTime.
    return [
        SeriesSpec("venous", "ABD VENOUS", modality="CT", rows=32, columns=32, slices=12,
                   pixel_spacing=(1.5, 1.5), slice_spacing=3.0, tissue=120.0,
                   background=-1000.0, semi_axes_mm=(20.0, 20.0, 15.0)),
        SeriesSpec("arterial", "ABD ARTERIAL", modality="CT", rows=30, columns=30, slices=16,
                   pixel_spacing=(1.6, 1.6), slice_spacing=2.0, tissue=200.0,
                   background=-1000.0, semi_axes_mm=(20.0, 20.0, 15.0)),
        SeriesSpec("delayed", "ABD DELAYED", modality="CT", rows=28, columns=28, slices=10,
                   pixel_spacing=(1.7, 1.7), slice_spacing=4.0, tissue=90.0,
                   background=-1000.0, semi_axes_mm=(20.0, 20.0, 15.0)),
    ]  # fmt: skip


_PHASE_TIMES = {"arterial": "101500.000000", "venous": "101610.000000", "delayed": "102200.000000"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studies]:
    work = tmp_path_factory.mktemp("zoo-studies")
    brats_bundle = make_zoo_bundle("brats_mri_segmentation", work / "bundles")
    renal_bundle = make_zoo_bundle("renalStructures_CECT_segmentation", work / "bundles")
    brats = write_study(work / "brats", _brats_series(), seed=11)
    renal = write_study(work / "renal", _renal_series(), seed=12)
    for phase, paths in renal.items():
        for path in paths:
            ds = dcmread(path)
            ds.AcquisitionTime = _PHASE_TIMES[phase]
            ds.ContrastBolusAgent = "IODINE"
            ds.save_as(path)
    pacs = StoreSCP(work / "pacs").start()
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES, sort_keys=False))
    models = {
        "brats": {"bundle": str(brats_bundle), "device": "cpu", "labels": BRATS_LABELS},
        "renal": {"bundle": str(renal_bundle), "device": "cpu"},
    }
    node = NodeProcess(work / "node", node_config(work / "node", pacs.port, rules, models))
    try:
        node.start()
        order = [*(("brats", r) for r in brats), *(("renal", r) for r in renal)]
        random.Random(18).shuffle(order)
        for study, role in order:  # one association per series, the two studies mixed
            sent = storescu(node.port, (brats if study == "brats" else renal)[role])
            assert sent.returncode == 0, sent.stdout + sent.stderr
        yield Studies(node, pacs, brats, renal)
    finally:
        node.stop()
        pacs.stop()


def _results(studies: Studies, source: Path) -> dict[str, Dataset]:
    """The SEG and the SR of ``source``'s study at the PACS, once both are there."""
    study_uid = dcmread(source, stop_before_pixels=True).StudyInstanceUID

    def found() -> list[Dataset]:
        out = []
        for path in studies.pacs.files():
            try:
                ds = dcmread(path)
            except Exception:  # storescp is still writing it
                continue
            if ds.StudyInstanceUID == study_uid:
                ds.filename = str(path)
                out.append(ds)
        return out

    wait_until(lambda: len(found()) >= 2, 400, "a SEG and an SR at the PACS", 1.0)
    results = found()
    assert sorted(ds.SOPClassUID for ds in results) == sorted([SEG_STORAGE, SR_STORAGE])
    return {"seg" if ds.SOPClassUID == SEG_STORAGE else "sr": ds for ds in results}


def _series_uid(paths: list[Path]) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def _check_valid(results: dict[str, Dataset]) -> None:
    for ds in results.values():
        assert_dciodvfy_clean(ds.filename)
    assert_sr_template_valid(results["sr"].filename)
    hd.seg.segread(results["seg"].filename)
    hd.sr.srread(results["sr"].filename)


def _evidence_series(sr: Dataset) -> set[str]:
    return {
        str(series.SeriesInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }


def _seg_sources(seg: Dataset) -> set[str]:
    return {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}


def test_brats_four_series_give_one_seg_on_the_reference_and_an_sr_naming_all(
    studies: Studies,
) -> None:
    results = _results(studies, studies.brats["t1c"][0])
    series = {role: _series_uid(paths) for role, paths in studies.brats.items()}
    assert _seg_sources(results["seg"]) == {series["t1c"]}
    assert results["seg"].NumberOfFrames <= len(studies.brats["t1c"]) * len(BRATS_LABELS)
    labels = {str(s.SegmentLabel) for s in results["seg"].SegmentSequence}
    assert labels <= set(BRATS_LABELS.values()) and labels
    seg_series = results["seg"].SeriesInstanceUID
    assert _evidence_series(results["sr"]) == {*series.values(), seg_series}
    (row,) = studies.node.index_rows(
        "SELECT state, inputs FROM jobs WHERE study_instance_uid IS NOT NULL AND model = 'brats'"
    )
    assert row[0] == "done"
    for role, uid in series.items():
        assert f'["{role}", "{uid}"]' in row[1]
    _check_valid(results)


def test_renal_three_phases_run_the_cect_bundle_by_acquisition_time(studies: Studies) -> None:
    results = _results(studies, studies.renal["arterial"][0])
    series = {role: _series_uid(paths) for role, paths in studies.renal.items()}
    assert _seg_sources(results["seg"]) == {series["arterial"]}
    seg_series = results["seg"].SeriesInstanceUID
    assert _evidence_series(results["sr"]) == {*series.values(), seg_series}
    ((inputs,),) = studies.node.index_rows(
        "SELECT inputs FROM jobs WHERE study_instance_uid IS NOT NULL AND model = 'renal'"
    )
    for role, phase in (("artery", "arterial"), ("vein", "venous"), ("excret", "delayed")):
        assert f'["{role}", "{series[phase]}"]' in inputs
    _check_valid(results)
