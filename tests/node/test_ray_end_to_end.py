"""Models on a real Ray cluster on loopback (pipeline.executor ray): a head, and a second
node with the custom resource the model asks for; DCMTK as sender and PACS."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai.pipeline.ray_bridge import REPLICA_FOLDER_PREFIX, replica_pid
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.failing_models import make_slow_bundle
from tests.peers import NodeProcess, StoreSCP, node_config, pid_alive, storescu, wait_until
from tests.ray_cluster import RayCluster
from tests.results_check import check_phantom_results

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.ray, pytest.mark.slow]

MODEL_HOST = {"model_host": 1.0}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RayCluster]:
    ray = RayCluster(tmp_path / "ray")
    ray.start_head()
    try:
        yield ray
    finally:
        ray.remove()


def _ray_node(tmp_path: Path, pacs: StoreSCP, cluster: RayCluster, **config: object) -> NodeProcess:
    models = config.pop("models", {"ct-body": {"resources": MODEL_HOST, "timeout_seconds": 300}})
    return NodeProcess(
        tmp_path / "node",
        node_config(
            tmp_path / "node",
            pacs.port,
            models=models,  # type: ignore[arg-type]
            pipeline={"executor": "ray", "ray": {"address": cluster.address}},
            **config,
        ),
    )


def _slow_node(
    tmp_path: Path, pacs: StoreSCP, cluster: RayCluster, marker: Path, seconds: float
) -> NodeProcess:
    """A node whose CT rule runs a model that takes ``seconds`` on a model_host node and
    writes a line to ``marker`` for each inference."""
    bundle = make_slow_bundle(tmp_path / "bundles", marker, seconds=seconds)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: ct-slow\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: slow\n"
        "    destinations: [pacs]\n"
    )
    model = {"bundle": str(bundle), "device": "cpu", "resources": MODEL_HOST}
    return _ray_node(tmp_path, pacs, cluster, rules=rules, models={"slow": model})


def _send_until_the_model_starts(node: NodeProcess, paths: list[Path], marker: Path) -> None:
    """The series sent, and the slow model's job started on the cluster (its marker)."""
    sent = storescu(node.port, paths)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(marker.exists, 120, "the model to start on the cluster", 0.2)


def _await_results(pacs: StoreSCP, settle: float) -> None:
    """SEG and SR at the PACS; then ``settle`` seconds for anything extra to arrive."""
    wait_until(lambda: len(pacs.files()) >= 2, 300, "SEG and SR at the PACS", 0.5)
    time.sleep(settle)


def _assert_one_seg_and_sr(pacs: StoreSCP) -> None:
    files = pacs.files()
    modalities = sorted(str(dcmread(f, stop_before_pixels=True).Modality) for f in files)
    assert modalities == ["SEG", "SR"], files


def _model_hosts(cluster: RayCluster) -> set[str]:
    return {n["id"] for n in cluster.node_table() if "model_host" in n["resources"]}


def _replica_folders() -> list[Path]:
    """The temporary folders of replicas running now (loopback: every node's /tmp is ours)."""
    root = Path(tempfile.gettempdir())
    return [
        f
        for f in root.glob(f"{REPLICA_FOLDER_PREFIX}*")
        if (pid := replica_pid(f)) is not None and pid_alive(pid)
    ]


def _status(node: NodeProcess) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "status", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node.workdir,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_ct_runs_on_the_node_with_the_resource(
    tmp_path: Path,
    pacs: StoreSCP,
    cluster: RayCluster,
    ct_series: tuple[PhantomSpec, list[Path]],
) -> None:
    spec, paths = ct_series
    cluster.start_worker(MODEL_HOST)
    (host,) = _model_hosts(cluster)
    node = _ray_node(tmp_path, pacs, cluster).start()
    try:
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _await_results(pacs, settle=1.0)
        status = _status(node)
    finally:
        node.stop()
    check_phantom_results(pacs.files(), paths, spec, min_segments=3)
    ((ran_on, attempts),) = node.index_rows("SELECT ran_on, attempts FROM jobs")
    assert ran_on.startswith(f"{host} ("), (ran_on, host)
    assert attempts == 1
    assert f"ran on cluster node {host}" in " ".join(status.split()), status
    log = node.log_text()
    assert f"on cluster node {host}" in log
    assert "Ray cluster at" in log and "connected" in log
    assert spec.patient_name not in log and spec.patient_id not in log


def test_a_node_that_dies_under_a_job_runs_it_again_when_the_resource_is_back(
    tmp_path: Path, pacs: StoreSCP, cluster: RayCluster
) -> None:
    spec = PhantomSpec(slices=12, rows=64, columns=64, pixel_spacing_mm=6.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    marker = tmp_path / "inferences.txt"
    worker = cluster.start_worker(MODEL_HOST)
    (first_host,) = _model_hosts(cluster)
    node = _slow_node(tmp_path, pacs, cluster, marker, seconds=15).start()
    try:
        _send_until_the_model_starts(node, paths, marker)
        killed_copies = _replica_folders()
        assert killed_copies, "the replica's folder (its bundle copy) on the cluster node"
        worker.kill()
        # Sent back at once; claimed again at once, it waits in the bridge for a replica.
        wait_until(lambda: "will retry" in node.log_text(), 60, "the job to be sent back", 0.5)
        time.sleep(3)
        assert pacs.files() == []  # no resource, no replica: the job waits
        cluster.start_worker(MODEL_HOST)
        _await_results(pacs, settle=2.0)
    finally:
        node.stop()
    _assert_one_seg_and_sr(pacs)
    assert marker.read_text().count("inference started") == 2, marker.read_text()  # no check here
    ((ran_on, attempts, state),) = node.index_rows("SELECT ran_on, attempts, state FROM jobs")
    assert state == "done" and attempts == 2
    second_host = (_model_hosts(cluster) - {first_host}).pop()
    assert ran_on.startswith(second_host), (ran_on, first_host, second_host)
    assert f"its replica on cluster node {first_host} (" in node.log_text()
    # The killed replica could not remove its bundle copy; the next one did.
    assert not [f for f in killed_copies if f.exists()], killed_copies


def test_the_head_down_before_a_study_arrives(
    tmp_path: Path,
    pacs: StoreSCP,
    cluster: RayCluster,
) -> None:
    spec = PhantomSpec(slices=16, rows=128, columns=128, pixel_spacing_mm=3.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    cluster.start_worker(MODEL_HOST)
    node = _ray_node(tmp_path, pacs, cluster).start()
    try:
        wait_until(lambda: "connected" in node.log_text(), 60, "the node to reach the cluster")
        cluster.stop()
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr  # every instance acknowledged
        assert node.index_rows("SELECT COUNT(*) FROM instances") == [(len(paths),)]
        wait_until(
            lambda: node.index_rows("SELECT state FROM jobs") == [("pending",)],
            60,
            "a pending job",
            0.5,
        )
        wait_until(lambda: "unreachable" in node.log_text(), 60, "the node to say so")
        time.sleep(5)
        assert node.index_rows("SELECT state FROM jobs") == [("pending",)]
        assert pacs.files() == []
        cluster.start_head()
        cluster.start_worker(MODEL_HOST)
        _await_results(pacs, settle=1.0)
    finally:
        node.stop()
    check_phantom_results(pacs.files(), paths, spec, min_segments=3)
    assert node.index_rows("SELECT state FROM jobs") == [("done",)]


def test_kill9_of_the_node_with_a_job_on_the_cluster(
    tmp_path: Path, pacs: StoreSCP, cluster: RayCluster
) -> None:
    spec = PhantomSpec(slices=12, rows=64, columns=64, pixel_spacing_mm=6.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    marker = tmp_path / "inferences.txt"
    cluster.start_worker(MODEL_HOST)
    node = _slow_node(tmp_path, pacs, cluster, marker, seconds=10).start()
    try:
        _send_until_the_model_starts(node, paths, marker)
        node.kill9()
        # Its replica ends with the node's driver: no result of the killed run comes back.
        time.sleep(12)
        assert pacs.files() == []
        node.start()
        _await_results(pacs, settle=2.0)
    finally:
        node.stop()
    _assert_one_seg_and_sr(pacs)
    assert marker.read_text().count("inference started") == 2, marker.read_text()
    assert node.index_rows("SELECT state FROM jobs") == [("done",)]


def test_a_replica_that_cannot_start_fails_its_job_with_the_reason(
    tmp_path: Path, pacs: StoreSCP, cluster: RayCluster
) -> None:
    spec = PhantomSpec(slices=4, rows=32, columns=32, pixel_spacing_mm=12.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    cluster.start_worker(MODEL_HOST)
    node = _slow_node(tmp_path, pacs, cluster, tmp_path / "inferences.txt", seconds=0)
    # A link out of the bundle: the replica's unpacking refuses it, as it would a bundle
    # that does not fit the cluster node, so its constructor fails.
    (tmp_path / "bundles" / "slow_model" / "configs" / "outside").symlink_to("/etc/hostname")
    node.start()
    try:
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(
            lambda: node.index_rows("SELECT state FROM jobs") == [("failed",)],
            120,
            "the job to fail",
            0.5,
        )
        ((error,),) = node.index_rows("SELECT error FROM jobs")
    finally:
        node.stop()
    assert error.startswith("the model's replica could not start on the cluster"), error
    assert "outside" in error
    assert pacs.files() == []
    assert not (tmp_path / "inferences.txt").exists()
