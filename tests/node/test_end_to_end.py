"""The node end to end with real peers: DCMTK storescu -> node -> DCMTK storescp."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, echoscu, free_port, node_config, storescu, wait_until
from tests.results_check import Delivered, check_phantom_results

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.slow]

DELIVERY_TIMEOUT = 240


def _send_and_wait(
    node: NodeProcess, pacs: StoreSCP, paths: list[Path], expected: int = 2
) -> list[Path]:
    sent = storescu(node.port, paths)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(
        lambda: len(pacs.files()) >= expected, DELIVERY_TIMEOUT, "SEG and SR at the PACS", 0.5
    )
    time.sleep(1.0)  # anything extra would arrive right after; "exactly" is checked by callers
    return pacs.files()


def _deliver_and_check(
    node: NodeProcess, pacs: StoreSCP, spec: PhantomSpec, paths: list[Path]
) -> Delivered:
    """Run the node, send the series, and check exactly one SEG and one SR arrive valid."""
    node.start()
    try:
        files = _send_and_wait(node, pacs, paths)
    finally:
        node.stop()
    assert len(files) == 2, files
    return check_phantom_results(files, paths, spec, min_segments=3)


def test_ct_series_to_seg_and_sr(
    tmp_path: Path, pacs: StoreSCP, ct_series: tuple[PhantomSpec, list[Path]]
) -> None:
    spec, paths = ct_series
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port))
    delivered = _deliver_and_check(node, pacs, spec, paths)
    labels = [str(s.SegmentLabel) for s in delivered.seg.SegmentSequence]
    assert labels == ["soft tissue", "lung", "bone"]
    log = node.log_text()
    assert spec.patient_name not in log and spec.patient_id not in log


def test_wholebody_bundle_multilabel(
    tmp_path: Path, pacs: StoreSCP, wholebody_bundle: Path
) -> None:
    # A 250 mm field of view (the 512x512 phantom's is 400 mm) at 1.5625 mm, and few
    # slices: the bundle's CPU sliding window over the resampled volume dominated the suite
    # (102 s at 256x256, 38 s at 160x160 on 2 cores).
    spec = PhantomSpec(slices=24, rows=160, columns=160, pixel_spacing_mm=1.5625)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: ct-wholebody\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: wholebody\n"
        "    destinations: [pacs]\n"
    )
    config = node_config(
        tmp_path / "node",
        pacs.port,
        rules=rules,
        models={
            "wholebody": {"bundle": str(wholebody_bundle), "device": "cpu", "timeout_seconds": 600}
        },
    )
    delivered = _deliver_and_check(NodeProcess(tmp_path / "node", config), pacs, spec, paths)
    algorithm = delivered.seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "Whole body" in str(algorithm.AlgorithmName)


def _cli_echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "echo", f"DICOM_AI@127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_echo_with_echoscu_and_cli(tmp_path: Path, pacs: StoreSCP) -> None:
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port)).start()
    try:
        result = echoscu(node.port)
        assert result.returncode == 0, result.stdout + result.stderr
        cli = _cli_echo(node.port)
        assert cli.returncode == 0 and "Success" in cli.stdout, cli.stdout + cli.stderr
        assert _cli_echo(free_port()).returncode != 0
    finally:
        node.stop()


def _seg_sr_uids(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_kill9_after_ack_resumes_and_delivers_once(
    tmp_path: Path, ct_series: tuple[PhantomSpec, list[Path]]
) -> None:
    _, paths = ct_series
    # Baseline: a run without a kill.
    baseline_pacs = StoreSCP(tmp_path / "pacs-baseline").start()
    try:
        node = NodeProcess(tmp_path / "a", node_config(tmp_path / "a", baseline_pacs.port)).start()
        try:
            baseline = _seg_sr_uids(_send_and_wait(node, baseline_pacs, paths))
        finally:
            node.stop()
    finally:
        baseline_pacs.stop()

    # With a kill: the PACS is down, so results cannot leave before the kill.
    pacs_port = free_port()
    node = NodeProcess(tmp_path / "b", node_config(tmp_path / "b", pacs_port)).start()
    try:
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr  # every instance acknowledged
        wait_until(
            lambda: bool(node.index_rows("SELECT id FROM jobs WHERE state IN ('running', 'done')")),
            120,
            "the job to start",
        )
        node.kill9()
        assert len(node.index_rows("SELECT 1 FROM instances")) == len(paths)
        pacs = StoreSCP(tmp_path / "pacs", port=pacs_port).start()
        try:
            node.start()
            wait_until(
                lambda: len(pacs.files()) >= 2, DELIVERY_TIMEOUT, "results after restart", 0.5
            )
            time.sleep(3)  # a duplicate would come within the retry interval
            files = pacs.files()
        finally:
            pacs.stop()
    finally:
        node.stop()
    assert len(files) == 2, files
    assert _seg_sr_uids(files) == baseline
    assert node.index_rows("SELECT state FROM deliveries") == [("delivered",)]


def test_destination_down_then_up_is_retried(
    tmp_path: Path, ct_series: tuple[PhantomSpec, list[Path]]
) -> None:
    _, paths = ct_series
    pacs_port = free_port()
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs_port)).start()
    pacs = StoreSCP(tmp_path / "pacs", port=pacs_port)
    try:
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(
            lambda: bool(node.index_rows("SELECT 1 FROM deliveries WHERE attempts >= 1")),
            120,
            "a failed delivery attempt",
        )
        time.sleep(10)
        assert pacs.files() == []
        pacs.start()
        wait_until(lambda: len(pacs.files()) >= 2, 60, "delivery after the PACS came up", 0.5)
        rows = node.index_rows("SELECT state, attempts, last_error FROM deliveries")
    finally:
        node.stop()
        pacs.stop()
    assert len(rows) == 1
    state, attempts, _ = rows[0]
    assert state == "delivered"
    assert int(attempts) >= 2  # type: ignore[call-overload]
    assert "failed" in node.log_text() and "retry in" in node.log_text()


@pytest.fixture(scope="session")
def wholebody_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.bundles import make_wholebody_bundle

    return make_wholebody_bundle(tmp_path_factory.mktemp("wholebody"))
