"""The Ray executor's pieces without a cluster: settings, the input buffer, and the pool
with a bridge that finds no head."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_ai.config import Config, ModelConfig, RayConfig
from dicom_ai.pipeline.cluster import ClusterSettings, RayPool, ReplicaSettings
from tests.peers import free_port


def test_settings_name_every_model_with_its_resources_and_replicas() -> None:
    config = Config(
        models={"ct-body": ModelConfig(resources={"model_host": 1, "num_gpus": 1}, replicas=2)},
        pipeline={"executor": "ray", "ray": {"address": "10.0.0.5:6380", "namespace": "x"}},
    )
    settings = ClusterSettings.from_config(config)
    assert (settings.address, settings.namespace) == ("10.0.0.5:6380", "x")
    assert settings.models["ct-body"] == ReplicaSettings({"model_host": 1, "num_gpus": 1}, 2)
    assert settings.models["mr-brain"] == ReplicaSettings({}, 1)  # built in, not configured
    # A model runs at most its replicas at once, fewer with max_concurrent.
    assert settings.capacity({}) == {"ct-body": 2, "mr-brain": 1}
    assert settings.capacity({"ct-body": 1}) == {"ct-body": 1, "mr-brain": 1}


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: RayConfig(address="no-port"), "address"),
        (lambda: ModelConfig(resources={"num_gpus": -1}), "cannot be negative: num_gpus"),
        (lambda: ModelConfig(replicas=0), "replicas"),
        (lambda: ModelConfig(resources={"GPU": 1}), "num_gpus, not CPU and GPU"),
        (lambda: Config(pipeline={"executor": "kubernetes"}), "executor"),
    ],
)
def test_bad_cluster_settings_are_refused_with_the_field(make: object, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        make()  # type: ignore[operator]


def test_the_job_input_travels_as_one_buffer_and_lands_as_the_same_files(tmp_path: Path) -> None:
    from dicom_ai.pipeline.ray_bridge import JobInput

    paths = []
    for k, size in enumerate([0, 1, 4097, 123]):
        path = tmp_path / "in" / f"{k}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes((k + i) % 251 for i in range(size)))
        paths.append(path)
    job_input = JobInput.read(tuple(paths))
    assert job_input.data.nbytes == 0 + 1 + 4097 + 123
    placed = job_input.write(tmp_path / "out")
    assert sorted(placed) == sorted(paths)
    for path, local in placed.items():
        assert local.parent == tmp_path / "out"
        assert local.read_bytes() == path.read_bytes()


def test_no_head_no_jobs_and_one_line_that_says_so(caplog: pytest.LogCaptureFixture) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    pool = RayPool(ClusterSettings(address, "dicom-ai", {"ct-body": ReplicaSettings()}))
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_ai.pipeline.cluster"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and pool.state.detail == "not connected yet":
                assert pool.poll(timeout=0.5) == []
            for _ in range(6):  # three seconds more: still once
                assert pool.poll(timeout=0.5) == []
        assert not pool.state.connected
        assert address in pool.state.detail
        assert pool.idle() == 0  # the scheduler claims nothing: jobs stay pending
        lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(lines) == 1, lines
        assert f"Ray cluster at {address} unreachable" in lines[0]
        assert "jobs wait, receiving goes on" in lines[0]
    finally:
        pool.shutdown()


def test_a_replica_removes_the_folders_of_replicas_whose_processes_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import tempfile

    from dicom_ai.pipeline.ray_bridge import REPLICA_FOLDER_PREFIX, ModelReplica, replica_pid

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = tmp_path / f"{REPLICA_FOLDER_PREFIX}{ended.pid}-k3j_x9a1"
    (gone / "bundle" / "models").mkdir(parents=True)
    (gone / "bundle" / "models" / "model.pt").write_bytes(b"weights")
    running = tmp_path / f"{REPLICA_FOLDER_PREFIX}{os.getpid()}-a1b2c3d4"  # alive: kept
    running.mkdir()
    unnamed = tmp_path / f"{REPLICA_FOLDER_PREFIX}0h99k_5d"  # no process id: not ours to judge
    unnamed.mkdir()
    other = tmp_path / f"job-{ended.pid}-x"
    other.mkdir()

    replica = ModelReplica(None)

    assert not gone.exists()
    assert running.is_dir() and unnamed.is_dir() and other.is_dir()
    mine = replica._folder
    assert mine.parent == tmp_path and mine.is_dir() and replica_pid(mine) == os.getpid()
    assert replica_pid(unnamed) is None and replica_pid(other) is None
