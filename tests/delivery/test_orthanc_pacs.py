"""The docker/ setup on loopback: Orthanc as the PACS, with its forwarder, and the node.

Orthanc runs docker/orthanc/orthanc.json and forward.lua (see tests/orthanc_setup.py for the
few loopback overrides). A CT series uploaded to Orthanc's REST API, with no further action,
is forwarded to the node when it is stable; the node's SEG and SR land in the same study,
visible through the REST API and QIDO-RS, and are not forwarded back.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.dicom_validation import assert_sr_template_valid
from tests.orthanc_setup import (
    docker_orthanc,
    docker_orthanc_config,
    node_modality,
    node_modality_name,
)
from tests.peers import (
    NodeProcess,
    Orthanc,
    StoreSCP,
    free_port,
    node_config,
    storescu,
    wait_until,
)
from tests.results_check import (
    check_phantom_results,
    segment_voxel_counts,
    source_headers,
)

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.orthanc,
    pytest.mark.dciodvfy,
    pytest.mark.java,
    pytest.mark.slow,
]

RESULTS_DEADLINE_S = 120
DECISION_DEADLINE_S = 30
MODALITY_TAG = "00080060"
SERIES_UID_TAG = "0020000E"


# --- helpers ------------------------------------------------------------------------


def _study_id(orthanc: Orthanc, study_instance_uid: str) -> str:
    found = orthanc.rest("POST", "/tools/lookup", study_instance_uid.encode())
    (study,) = [f for f in found if f["Type"] == "Study"]
    return str(study["ID"])


def _series_by_modality(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.rest("GET", f"/studies/{study_id}/series"):
        out.setdefault(str(series["MainDicomTags"].get("Modality", "")), []).append(series)
    return out


def _qido_series(orthanc: Orthanc, study_instance_uid: str) -> list[dict[str, Any]]:
    body = orthanc.rest("GET", f"/dicom-web/studies/{study_instance_uid}/series")
    answer: list[dict[str, Any]] = json.loads(body) if isinstance(body, bytes) else body
    return answer


def _forward_decisions(orthanc: Orthanc) -> dict[str, str]:
    """Orthanc series id -> what forward.lua logged for it ('forwarding ...' / 'not ...')."""
    text = orthanc.log.read_text(errors="replace") if orthanc.log.exists() else ""
    pattern = re.compile(r"dicom-ai forward: series (\S+) \([^)]*\): (.*)$", re.MULTILINE)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


def _await_decisions(orthanc: Orthanc, series_ids: list[str]) -> dict[str, str]:
    wait_until(
        lambda: set(series_ids) <= set(_forward_decisions(orthanc)),
        DECISION_DEADLINE_S,
        "forward.lua to decide on every series",
        0.2,
    )
    return _forward_decisions(orthanc)


def _download_results(orthanc: Orthanc, study_id: str, directory: Path) -> list[Path]:
    """The SEG and SR instances of the study, as Orthanc stores them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for modality, series_list in _series_by_modality(orthanc, study_id).items():
        for series in series_list if modality in ("SEG", "SR") else []:
            for instance in series["Instances"]:
                path = directory / f"{instance}.dcm"
                path.write_bytes(orthanc.rest("GET", f"/instances/{instance}/file"))
                files.append(path)
    return files


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# --- the acceptance test: upload to Orthanc, results come back --------------------------


@pytest.fixture
def pacs_and_node(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """Orthanc with the docker config forwarding to the node; the node delivering to it."""
    node_port = free_port()
    orthanc = docker_orthanc(tmp_path / "orthanc", node_port)
    node_ae, _, _ = node_modality(docker_orthanc_config())
    config = node_config(
        tmp_path / "node",
        orthanc.dicom_port,
        node={"ae_title": node_ae, "port": node_port},
        destinations={
            "pacs": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
        },
    )
    node = NodeProcess(tmp_path / "node", config)
    try:
        orthanc.start()
        node.start()
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_upload_to_orthanc_comes_back_with_seg_and_sr(
    tmp_path: Path,
    pacs_and_node: tuple[Orthanc, NodeProcess],
    ct_series: tuple[PhantomSpec, list[Path]],
) -> None:
    orthanc, node = pacs_and_node
    spec, paths = ct_series
    started = time.monotonic()
    assert len(orthanc.upload(paths)) == len(paths)
    study_id = _study_id(orthanc, spec.study_instance_uid)

    # No further action: Orthanc's forwarder and the node do the rest.
    def results_in_study() -> bool:
        by_modality = _series_by_modality(orthanc, study_id)
        return "SEG" in by_modality and "SR" in by_modality

    try:
        wait_until(results_in_study, RESULTS_DEADLINE_S, "SEG and SR in Orthanc's study", 0.5)
    except TimeoutError as exc:
        raise AssertionError(
            f"{exc}\n--- node log ---\n{node.log_text()[-4000:]}\n--- Orthanc decisions ---\n"
            f"{_forward_decisions(orthanc)}"
        ) from exc
    elapsed = time.monotonic() - started

    # REST: the study now holds the CT, one SEG and one SR series, one instance each result.
    by_modality = _series_by_modality(orthanc, study_id)
    assert sorted(by_modality) == ["CT", "SEG", "SR"], by_modality.keys()
    (ct,) = by_modality["CT"]
    assert len(ct["Instances"]) == len(paths)
    (seg_series,) = by_modality["SEG"]
    (sr_series,) = by_modality["SR"]
    assert len(seg_series["Instances"]) == 1 and len(sr_series["Instances"]) == 1

    # QIDO-RS lists the same series with their modalities.
    qido = {
        str(s[SERIES_UID_TAG]["Value"][0]): str(s[MODALITY_TAG]["Value"][0])
        for s in _qido_series(orthanc, spec.study_instance_uid)
    }
    assert qido == {
        str(s["MainDicomTags"]["SeriesInstanceUID"]): modality
        for modality, series in by_modality.items()
        for s in series
    }
    assert sorted(qido.values()) == ["CT", "SEG", "SR"]

    # The objects as Orthanc stores them: dciodvfy, geometry, references, volumes
    # (check_delivered), PixelMed's TID 1500 check, and a highdicom read back.
    files = _download_results(orthanc, study_id, tmp_path / "results")
    delivered = check_phantom_results(files, paths, spec, min_segments=3)
    assert "Found Root Template TID_1500" in assert_sr_template_valid(delivered.sr_path)
    _check_highdicom_read_back(delivered.seg_path, delivered.sr_path, list(source_headers(paths)))

    # Not bounced: forward.lua declined the SEG and SR series, and the node holds only the CT.
    decisions = _await_decisions(orthanc, [ct["ID"], seg_series["ID"], sr_series["ID"]])
    assert decisions[ct["ID"]].startswith("forwarding"), decisions
    for result in (seg_series, sr_series):
        assert decisions[result["ID"]].startswith("not forwarded"), decisions
    time.sleep(2)  # a forward, had there been one, would reach the node within this
    modalities = node.index_rows("SELECT modality, COUNT(*) FROM series GROUP BY modality")
    assert modalities == [("CT", 1)], modalities
    received = node.index_rows("SELECT series_instance_uid, COUNT(*) FROM instances GROUP BY 1")
    assert received == [(spec.series_instance_uid, len(paths))], received
    print(f"upload -> SEG and SR in Orthanc: {elapsed:.1f} s")


def _check_highdicom_read_back(seg_path: Path, sr_path: Path, source_uids: list[str]) -> None:
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, assert_missing_frames_are_empty=True
    )
    from_highdicom = {
        number: int(np.count_nonzero(pixels[..., k]))
        for k, number in enumerate(seg.get_segment_numbers())
    }
    counts = segment_voxel_counts(dcmread(seg_path))
    assert from_highdicom == counts
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert len(report.get_volumetric_roi_measurement_groups()) == len(counts)


# --- forward.lua's filter, each branch on its own -------------------------------------


def _relabelled(paths: list[Path], modality: str) -> list[Path]:
    """The files as a new series with another Modality value (Orthanc indexes headers only)."""
    series_uid = generate_uid()
    for path in paths:
        ds: Dataset = dcmread(path)
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
    return paths


def test_forwarder_sends_new_series_but_never_results_or_what_the_node_stored(
    tmp_path: Path,
) -> None:
    def small(name: str) -> list[Path]:
        return write_phantom_ct(tmp_path / name, PhantomSpec(slices=3, rows=64, columns=64))

    uploaded_ct = small("ct")
    seg_like = _relabelled(small("seg"), "SEG")
    sr_like = _relabelled(small("sr"), "SR")
    from_node = small("from-node")
    node_ae, _, _ = node_modality(docker_orthanc_config())

    stand_in = StoreSCP(tmp_path / "node-received", ae_title=node_ae).start()  # the node
    orthanc = docker_orthanc(tmp_path / "orthanc", stand_in.port)
    try:
        orthanc.start()
        for files in (uploaded_ct, seg_like, sr_like):
            orthanc.upload(files)
        sent = storescu(orthanc.dicom_port, from_node, orthanc.ae_title, calling_ae=node_ae)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        series_of = {
            str(s["MainDicomTags"]["SeriesInstanceUID"]): str(s["ID"])
            for s in orthanc.rest("GET", "/series?expand")
        }
        uid = {
            name: str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, files in (
                ("ct", uploaded_ct),
                ("seg", seg_like),
                ("sr", sr_like),
                ("node", from_node),
            )
        }
        assert set(series_of) == set(uid.values())
        decisions = _await_decisions(orthanc, list(series_of.values()))
        wait_until(lambda: len(stand_in.files()) >= len(uploaded_ct), 30, "the forwarded CT")
        time.sleep(1)  # anything else forwarded would arrive right behind it
        received = _sop_uids(stand_in.files())
    finally:
        orthanc.stop()
        stand_in.stop()

    forwarded = f"forwarding {len(uploaded_ct)} instance(s) to {node_modality_name()}"
    assert decisions[series_of[uid["ct"]]] == forwarded
    assert "Modality SEG is a result" in decisions[series_of[uid["seg"]]]
    assert "Modality SR is a result" in decisions[series_of[uid["sr"]]]
    assert "stored by the node itself" in decisions[series_of[uid["node"]]]
    assert received == _sop_uids(uploaded_ct)


# --- a push from Orthanc's REST API to a called AE, results back to the sender -----------


def test_orthanc_push_to_called_ae_returns_to_sender(tmp_path: Path) -> None:
    """POST /modalities/{id}/store sends a series to the node's AI_CT title, whose rules send
    the results to `sender`: the calling AE ORTHANC resolves to Orthanc's DICOM port."""
    node_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        settings={"DicomModalities": {"ai-ct": ["AI_CT", "127.0.0.1", node_port]}},
    )
    rules = tmp_path / "ct.yaml"
    rules.write_text(
        "rules:\n  - name: ct-back\n    match: {Modality: {equals: CT}}\n"
        "    model: ct-body\n    destinations: [sender]\n"
    )
    config = node_config(
        tmp_path / "node",
        free_port(),  # the configured PACS is not used: results go back to the sender
        node={"port": node_port},
        called_aes={"AI_CT": {"rules": str(rules), "allowed_calling_aes": [orthanc.ae_title]}},
        senders={
            orthanc.ae_title: {
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        },
    )
    node = NodeProcess(tmp_path / "node", config)
    spec = PhantomSpec(slices=12, rows=128, columns=128, pixel_spacing_mm=3.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    try:
        orthanc.start()
        node.start()
        orthanc.upload(paths)
        study_id = _study_id(orthanc, spec.study_instance_uid)
        (ct_series_id,) = [s["ID"] for s in orthanc.rest("GET", f"/studies/{study_id}/series")]
        orthanc.rest("POST", "/modalities/ai-ct/store", ct_series_id.encode())
        wait_until(
            lambda: {"SEG", "SR"} <= set(_series_by_modality(orthanc, study_id)),
            RESULTS_DEADLINE_S,
            "SEG and SR back in Orthanc",
            0.5,
        )
        # Orthanc has the SR a moment before the node records the delivery.
        wait_until(
            lambda: node.index_rows("SELECT state FROM deliveries") == [("delivered",)],
            30,
            "the delivery to be recorded",
        )
        rows = node.index_rows("SELECT destination, state FROM deliveries")
        calling = node.index_rows("SELECT DISTINCT calling_ae, called_ae FROM associations")
        files = _download_results(orthanc, study_id, tmp_path / "results")
    finally:
        node.stop()
        orthanc.stop()
    assert rows == [(f"sender:{orthanc.ae_title}", "delivered")]
    assert calling == [(orthanc.ae_title, "AI_CT")]
    check_phantom_results(files, paths, spec)
