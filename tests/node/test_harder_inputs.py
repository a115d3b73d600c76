"""Harder inputs end to end with real peers: DCMTK storescu -> node -> DCMTK storescp.

A phantom CT series compressed (JPEG-LS lossless, JPEG 2000 lossless) and kept compressed
by the node; an enhanced multi-frame CT (the phantom converted by highdicom into one Legacy
Converted Enhanced CT image); and pydicom-data's Enhanced CT ``eCT_Supplemental.dcm`` (two
512 x 512 frames of a brain perfusion map: ct-body finds only "soft tissue"). Each must come
back as one SEG and one SR that pass dciodvfy and PixelMed, the SEG's frames referencing the
source frames (by frame number for the multi-frame sources) at their positions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct, write_phantom_enhanced_ct
from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until
from tests.results_check import (
    Delivered,
    check_phantom_results,
    split_results,
    sr_volumes_ml,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.java, pytest.mark.slow]

DELIVERY_TIMEOUT = 240
# Small enough to be quick, large enough for ct-body's body, lung and bone.
SPEC = PhantomSpec(
    slices=40,
    rows=256,
    columns=256,
    pixel_spacing_mm=1.5625,
    slice_thickness_mm=2.5,
    study_instance_uid="1.2.826.0.1.3680043.8.498.5001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.5002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.5003",
)
# storescu proposes uncompressed transfer syntaxes unless told otherwise.
PROPOSE = {JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv"}


def _deliver(
    tmp_path: Path, pacs: StoreSCP, paths: list[Path], options: tuple[str, ...] = ()
) -> tuple[Delivered, NodeProcess]:
    """Run the node, send ``paths``, and return the one SEG and one SR that arrive."""
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port)).start()
    try:
        sent = storescu(node.port, paths, options=options)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, DELIVERY_TIMEOUT, "SEG and SR at the PACS", 0.5)
        time.sleep(1.0)  # anything extra would arrive right after
        files = pacs.files()
    finally:
        node.stop()
    assert len(files) == 2, (files, node.log_text()[-3000:])
    return split_results(files), node


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        pytest.param(JPEGLSLossless, id="jpeg-ls-lossless"),
        pytest.param(JPEG2000Lossless, id="jpeg2000-lossless"),
    ],
)
def test_compressed_ct_series(tmp_path: Path, pacs: StoreSCP, transfer_syntax: UID) -> None:
    paths = []
    for raw in write_phantom_ct(tmp_path / "raw", SPEC):
        ds = pydicom.dcmread(raw)
        ds.compress(transfer_syntax, generate_instance_uid=False)
        path = tmp_path / "compressed" / raw.name
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    delivered, node = _deliver(tmp_path, pacs, paths, (PROPOSE[transfer_syntax],))
    # The node kept the instances as sent: it decoded the compressed pixels itself.
    stored = [Path(p) for (p,) in node.index_rows("SELECT path FROM instances")]
    assert len(stored) == SPEC.slices
    syntaxes = {
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in stored
    }
    assert syntaxes == {transfer_syntax}
    check_phantom_results(pacs.files(), paths, SPEC, min_segments=3)
    assert [str(s.SegmentLabel) for s in delivered.seg.SegmentSequence] == [
        "soft tissue",
        "lung",
        "bone",
    ]
    assert "Found Root Template TID_1500" in assert_sr_template_valid(delivered.sr_path)
    log = node.log_text()
    assert SPEC.patient_name not in log and SPEC.patient_id not in log


def _frame_value(source: Dataset, number: int, sequence: str, keyword: str) -> list[float]:
    item = source.PerFrameFunctionalGroupsSequence[number - 1]
    group = item if sequence in item else source.SharedFunctionalGroupsSequence[0]
    return [float(v) for v in group[sequence].value[0][keyword].value]


def _shared_item(source: Dataset, sequence: str) -> Dataset:
    item: Dataset = source.SharedFunctionalGroupsSequence[0][sequence].value[0]
    return item


def _check_multiframe_results(delivered: Delivered, source_path: Path) -> dict[str, int]:
    """Validators, frame references and positions, SR volumes; returns voxels per label."""
    assert_dciodvfy_clean(delivered.seg_path)
    assert_dciodvfy_clean(delivered.sr_path)
    assert "Found Root Template TID_1500" in assert_sr_template_valid(delivered.sr_path)
    source = pydicom.dcmread(source_path)
    seg, sr = delivered.seg, delivered.sr
    uid = str(source.SOPInstanceUID)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence] == [uid]
    shared = seg.SharedFunctionalGroupsSequence[0]
    seg_iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    transformation = _shared_item(source, "PixelValueTransformationSequence")
    hu = source.pixel_array * float(transformation.RescaleSlope) + float(
        transformation.RescaleIntercept
    )
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    counts: dict[int, int] = {}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        (reference,) = item.DerivationImageSequence[0].SourceImageSequence
        assert str(reference.ReferencedSOPInstanceUID) == uid
        number = int(reference.ReferencedFrameNumber)
        assert 1 <= number <= int(source.NumberOfFrames)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        expected = _frame_value(source, number, "PlanePositionSequence", "ImagePositionPatient")
        np.testing.assert_allclose(position, expected, rtol=0, atol=1e-6)
        orientation = _frame_value(
            source, number, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        np.testing.assert_allclose(seg_iop, orientation, rtol=0, atol=1e-6)
        # highdicom puts the segment into the shared groups when there is only one
        identification = item if "SegmentIdentificationSequence" in item else shared
        segment = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask = frame.astype(bool)
        counts[segment] = counts.get(segment, 0) + int(mask.sum())
        name = names[segment]
        # The mask lies on the frame it names: its HU there are what the label means.
        if name == "bone":
            assert (hu[number - 1][mask] >= 200).all()
        if name == "lung":
            assert (hu[number - 1][mask] < -400).all()
    spacing = _frame_value(source, 1, "PixelMeasuresSequence", "PixelSpacing")
    normal = np.cross(seg_iop[:3], seg_iop[3:])
    positions = sorted(
        float(
            np.dot(_frame_value(source, n, "PlanePositionSequence", "ImagePositionPatient"), normal)
        )
        for n in range(1, int(source.NumberOfFrames) + 1)
    )
    voxel_mm3 = spacing[0] * spacing[1] * float(np.median(np.diff(positions)))
    volumes = sr_volumes_ml(sr)
    assert set(volumes) == set(counts) == set(names)
    for number, count in counts.items():
        assert volumes[number] == pytest.approx(count * voxel_mm3 / 1000.0, rel=1e-6)
    return {names[number]: count for number, count in counts.items()}


def test_enhanced_multiframe_ct(tmp_path: Path, pacs: StoreSCP) -> None:
    path = write_phantom_enhanced_ct(tmp_path / "enhanced", SPEC)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert source.SOPClassUID.name == "Legacy Converted Enhanced CT Image Storage"
    assert int(source.NumberOfFrames) == SPEC.slices
    delivered, _ = _deliver(tmp_path, pacs, [path])
    voxels = _check_multiframe_results(delivered, path)
    assert sorted(voxels) == ["bone", "lung", "soft tissue"]
    assert all(count > 0 for count in voxels.values())


def test_ect_supplemental(tmp_path: Path, pacs: StoreSCP) -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None
    delivered, _ = _deliver(tmp_path, pacs, [Path(path)])
    voxels = _check_multiframe_results(delivered, Path(path))
    # A perfusion map, not anatomy: ct-body finds "soft tissue" and no lung or bone.
    assert list(voxels) == ["soft tissue"] and voxels["soft tissue"] > 0
    referenced = {
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in delivered.seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {1, 2}
