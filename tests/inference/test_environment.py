"""A bundle's own environment: built from its declarations, once, and its workers run in it."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from dicom_ai.inference.check import run_check
from dicom_ai.inference.environment import (
    MARKER,
    Declarations,
    default_wheelhouse,
    env_dir,
    prepare,
    prepared,
    prepared_python,
)
from dicom_ai.pipeline.worker import JobSpec, WorkerPool, _interpreter_path, _spawning_with
from tests.bundles import shared_bundle

SWIN = "swin_unetr_btcv_segmentation"


def _copy(bundle: Path, directory: Path) -> Path:
    copy = directory / bundle.name
    shutil.copytree(bundle, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    return copy


def test_the_environment_path_follows_the_bundle_and_its_declarations(tmp_path: Path) -> None:
    bundle = _copy(shared_bundle(SWIN), tmp_path / "a")
    declarations = Declarations.of(bundle)
    assert (declarations.monai, declarations.numpy, declarations.required) == (
        "1.4.0",
        "1.24.4",
        (),
    )
    first = env_dir(tmp_path / "data", bundle)
    assert first.parent == (tmp_path / "data" / "bundle-envs").resolve()
    assert first.name.startswith(f"{SWIN}-")
    assert env_dir(tmp_path / "data", bundle) == first
    other = _copy(shared_bundle(SWIN), tmp_path / "b")
    assert env_dir(tmp_path / "data", other) != first
    meta = bundle / "configs" / "metadata.json"
    data = json.loads(meta.read_text())
    data["monai_version"] = "1.3.0"
    meta.write_text(json.dumps(data))
    assert env_dir(tmp_path / "data", bundle) != first
    assert prepared(tmp_path / "data", bundle) is None
    assert prepared_python(tmp_path / "data", bundle) is None


def _write_weights(bundle: Path, wheelhouse: Path, directory: Path) -> None:
    """Seeded random weights of the bundle's network_def, instantiated by the MONAI it
    declares (1.4.0, from the wheelhouse: MONAI 1.6 refuses the config's arguments)."""
    target = directory / "monai-1.4.0"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"),
            *("--find-links", str(wheelhouse), "--target", str(target), "monai==1.4.0"),
        ],
        check=True,
    )
    (bundle / "models").mkdir(exist_ok=True)
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from monai.bundle import ConfigParser; p = ConfigParser();"
        "p.read_config(sys.argv[2] + '/configs/inference.json'); torch.manual_seed(0);"
        "torch.save(p.get_parsed_content('network_def').state_dict(),"
        " sys.argv[2] + '/models/model.pt')"
    )
    subprocess.run([sys.executable, "-c", script, str(target), str(bundle)], check=True)


def _versions(conn: Connection) -> None:
    import monai
    import numpy

    conn.send((numpy.__version__, monai.__version__, numpy.__file__))


@pytest.mark.slow
def test_prepare_builds_the_declared_environment_once_and_workers_run_in_it(
    tmp_path: Path,
) -> None:
    wheelhouse = default_wheelhouse()
    if wheelhouse is None:
        pytest.fail("no wheelhouse: ./install.sh downloads it into .venv/wheelhouse")
    bundle = _copy(shared_bundle(SWIN), tmp_path)
    _write_weights(bundle, wheelhouse, tmp_path)
    data = tmp_path / "data"
    # In the node's environment it fails (MONAI >= 1.5 has no SwinUNETR img_size).
    here = run_check(bundle)
    assert not here.ok and "img_size" in here.verdict, here.verdict

    lines: list[str] = []
    env = prepare(bundle, data, wheelhouse, use_index=False, progress=lines.append)
    assert env.ok and env.verdict == "ok" and env.built_now, env
    assert {"monai==1.4.0", "numpy==1.24.4"} <= set(env.installed)
    assert not [r for r, _ in env.not_installed if r.startswith(("monai", "numpy"))]
    directory = env_dir(data, bundle)
    assert Path(env.python) == directory / "bin" / "python"
    assert json.loads((directory / MARKER).read_text())["verdict"] == "ok"
    assert not list(directory.glob("lib/python*/site-packages/torch"))  # the node's is shared

    started = time.monotonic()
    again = prepare(bundle, data, wheelhouse, use_index=False, progress=lines.append)
    assert not again.built_now and again.ok and time.monotonic() - started < 5  # a no-op
    assert prepared_python(data, bundle) == Path(env.python)

    # A process spawned on the environment's interpreter imports its numpy and MONAI,
    # though spawn hands it the node's sys.path.
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_versions, args=(child,))
    with _spawning_with(Path(env.python), _interpreter_path(Path(env.python))):
        process.start()
    assert parent.poll(120)
    numpy_version, monai_version, numpy_file = parent.recv()
    process.join(10)
    assert (numpy_version, monai_version) == ("1.24.4", "1.4.0")
    assert numpy_file.startswith(str(directory))

    # A job on the environment's interpreter replaces the idle worker on the node's, and
    # loads the model there: the series is what fails (there is none), not the load.
    pool = WorkerPool(1, warm_bytes=0)
    try:
        spec = JobSpec(
            job_id=1,
            series_instance_uid="1.2.3",
            model_id="swin",
            bundle=bundle,
            device="cpu",
            timeout_seconds=300,
            instance_paths=(),
            results_dir=tmp_path / "spool" / "results" / "1",
            device_serial_number="TEST",
            python=Path(env.python),
        )
        pool.submit(spec)
        deadline = time.monotonic() + 300
        outcomes = []
        while not outcomes and time.monotonic() < deadline:
            outcomes = pool.poll(timeout=1.0)
        (outcome,) = outcomes
        assert not outcome.ok and not outcome.retry
        assert "img_size" not in outcome.reason and "cannot load" not in outcome.reason
        assert outcome.reason.startswith("InputError"), outcome.reason
    finally:
        pool.shutdown()


def test_spawn_settings_come_back_after_each_worker_start(tmp_path: Path) -> None:
    import multiprocessing.spawn
    import os

    from dicom_ai.pipeline.worker import _spawning_with

    before = os.fsdecode(multiprocessing.spawn.get_executable())
    for _ in range(3):  # a second round used to restore "b'/...'" as the executable
        with _spawning_with(tmp_path / "python", [str(tmp_path)]):
            assert os.fsdecode(multiprocessing.spawn.get_executable()) == str(tmp_path / "python")
        assert os.fsdecode(multiprocessing.spawn.get_executable()) == before
