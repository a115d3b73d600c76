"""A real T1 (ITK's KmeansTest brain, written as a DICOM MR series) through the node with the
default rules: storescu -> node (rules route it to mr-brain) -> storescp as the PACS.

The delivered SEG is decoded with highdicom, its frames put back on the source slices by
their ReferencedSOPInstanceUID, and compared with ITK's skull strip and with deepbet's own
code run directly on the NIfTI.
"""

from __future__ import annotations

import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.inference.test_mr_brain import MIN_DICE, SKULL_STRIP, T1, deepbet_reference, dice
from tests.nifti_dicom import MRSeriesSpec, write_nifti_as_mr_series
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until
from tests.results_check import (
    Delivered,
    source_headers,
    split_results,
    sr_evidence_uids,
    sr_volumes_ml,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.java, pytest.mark.slow]

DELIVERY_TIMEOUT = 300
BRAIN_SNOMED = "12738006"


@pytest.fixture(scope="module")
def t1_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[MRSeriesSpec, list[Path]]:
    if not T1.is_file():
        pytest.fail(f"{T1} missing: apt-get install insighttoolkit5-examples")
    spec = MRSeriesSpec(
        study_instance_uid="1.2.826.0.1.3680043.8.498.2001",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2002",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2003",
    )
    return spec, write_nifti_as_mr_series(T1, tmp_path_factory.mktemp("t1"), spec)


def _check_references(delivered: Delivered, paths: list[Path]) -> None:
    """SEG frames sit on their source slices; SEG and SR reference the series and each other.

    (results_check.check_delivered reads the segment number per frame; a one-segment SEG
    keeps it in the shared functional groups, so the checks are spelt out here.)
    """
    seg, sr = delivered.seg, delivered.sr
    sources = source_headers(paths)
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.2001"
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    for item in seg.PerFrameFunctionalGroupsSequence:
        source_item = item.DerivationImageSequence[0].SourceImageSequence[0]
        uid = str(source_item.ReferencedSOPInstanceUID)
        assert uid in referenced
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in sources[uid].ImagePositionPatient]
        assert np.allclose(position, expected, atol=1e-3)
    assert referenced <= set(sources)
    assert str(seg.SOPInstanceUID) in sr_evidence_uids(sr)


def test_t1_series_to_brain_seg_and_sr(
    tmp_path: Path, pacs: StoreSCP, t1_series: tuple[MRSeriesSpec, list[Path]]
) -> None:
    spec, paths = t1_series
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port)).start()
    try:
        started = time.monotonic()
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, DELIVERY_TIMEOUT, "SEG and SR at the PACS", 0.5)
        seconds = time.monotonic() - started
        time.sleep(1.0)  # anything extra would arrive right after
        files = pacs.files()
    finally:
        node.stop()
    assert len(files) == 2, files
    log = node.log_text()
    assert "mr-brain" in log
    assert spec.patient_name not in log and spec.patient_id not in log

    delivered = split_results(files)
    assert_dciodvfy_clean(delivered.seg_path)
    assert_dciodvfy_clean(delivered.sr_path)
    assert_sr_template_valid(delivered.sr_path)
    _check_references(delivered, paths)

    seg = hd.seg.segread(delivered.seg_path)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "brain"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == BRAIN_SNOMED
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("deepbet", "1.0.2")

    # Frames back onto the source slices, in NIfTI slice order (InstanceNumber = k + 1).
    by_slice = sorted(
        (int(ds.InstanceNumber), str(ds.SOPInstanceUID))
        for ds in (dcmread(p, stop_before_pixels=True) for p in paths)
    )
    planes = seg.get_pixels_by_source_instance(
        [uid for _, uid in by_slice],
        segment_numbers=[1],
        combine_segments=True,
        assert_missing_frames_are_empty=True,  # slices without brain have no frame
    )
    mask = planes.transpose(2, 1, 0) > 0  # (slices, rows, columns) -> the NIfTI's (i, j, k)
    reference = np.asarray(nib.load(SKULL_STRIP).dataobj) > 0
    ours = dice(mask, reference)
    print(f"\nnode (DICOM in, SEG out): Dice {ours:.4f} vs skull strip, {seconds:.1f} s send->SR")

    volume_ml = sr_volumes_ml(delivered.sr)[1]
    expected_ml = np.count_nonzero(mask) * 12.0 / 1000.0
    print(f"SR brain volume {volume_ml:.1f} ml; mask {expected_ml:.1f} ml")
    assert volume_ml == pytest.approx(expected_ml, rel=0.005)
    assert ours >= MIN_DICE

    direct = deepbet_reference(nib.load(T1))
    if direct is not None:
        theirs, _ = direct
        print(
            f"deepbet on the NIfTI: Dice {dice(theirs, reference):.4f} vs skull strip; "
            f"{np.count_nonzero(theirs != mask)} voxels differ from the node's SEG"
        )
        assert dice(theirs, mask) >= 0.999
