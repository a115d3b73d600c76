"""A model that crashes its process or hangs fails its job, never the node.

Three series go to one node with two workers: one to a bundle whose network segfaults, one
to a bundle whose network sleeps past its ``timeout_seconds``, one to the built-in ct-body.
The crash is retried (the worker died: maybe the machine's fault) up to
``pipeline.max_job_attempts``, then failed; the timeout fails at once (it would only repeat).
Each time the worker is killed or found dead it is replaced, and the good series gets its
SEG and SR through the same pool.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.failing_models import make_crashing_bundle, make_hanging_bundle
from tests.peers import NodeProcess, StoreSCP, echoscu, node_config, storescu, wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

HANG_TIMEOUT = 25  # seconds; a fresh worker on a busy machine takes ~12 s to load torch, MONAI
MAX_ATTEMPTS = 2
CRASH_REASON = "the worker process died (killed by signal SIGSEGV)"

RULES = """\
rules:
  - name: crashing
    priority: 20
    match: {SeriesDescription: {equals: Crash me}}
    model: crashing
    destinations: [pacs]
  - name: hanging
    priority: 20
    match: {SeriesDescription: {equals: Hang me}}
    model: hanging
    destinations: [pacs]
  - name: ct-body
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs]
"""


@pytest.fixture
def no_core_dumps() -> Iterator[None]:
    """The segfaulting worker must not write a core file of a torch process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def _job(node: NodeProcess, series_uid: str) -> tuple[str, int, str | None]:
    rows = node.index_rows(
        "SELECT state, attempts, error FROM jobs WHERE series_instance_uid = ?", series_uid
    )
    assert len(rows) == 1, rows
    state, attempts, error = rows[0]
    return str(state), int(attempts), error


def test_crashing_and_hanging_models_fail_their_jobs_only(
    tmp_path: Path, pacs: StoreSCP, no_core_dumps: None
) -> None:
    crash_spec = PhantomSpec(slices=4, rows=16, columns=16, series_description="Crash me")
    hang_spec = PhantomSpec(slices=4, rows=16, columns=16, series_description="Hang me")
    good_spec = PhantomSpec(
        slices=12, rows=96, columns=96, pixel_spacing_mm=4.0, slice_thickness_mm=5.0, seed=3
    )
    series = [
        write_phantom_ct(tmp_path / name, spec)
        for name, spec in (("crash", crash_spec), ("hang", hang_spec), ("good", good_spec))
    ]
    hanging = make_hanging_bundle(tmp_path / "bundles")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    models = {
        "crashing": {"bundle": str(make_crashing_bundle(tmp_path / "bundles")), "device": "cpu"},
        "hanging": {"bundle": str(hanging), "device": "cpu", "timeout_seconds": HANG_TIMEOUT},
    }
    config = node_config(
        tmp_path / "node",
        pacs.port,
        rules,
        models,
        pipeline={"workers": 2, "max_job_attempts": MAX_ATTEMPTS},
    )
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        for paths in series:
            sent = storescu(node.port, paths)
            assert sent.returncode == 0, sent.stdout + sent.stderr

        def settled() -> bool:
            states = node.index_rows("SELECT state FROM jobs")
            return len(states) == 3 and all(s in ("done", "failed") for (s,) in states)

        wait_until(settled, 180, "all three jobs to finish or fail", 0.5)
        wait_until(lambda: len(pacs.files()) >= 2, 60, "SEG and SR of the good series", 0.5)

        state, attempts, error = _job(node, crash_spec.series_instance_uid)
        assert (state, attempts) == ("failed", MAX_ATTEMPTS)
        assert error == CRASH_REASON

        state, attempts, error = _job(node, hang_spec.series_instance_uid)
        assert (state, attempts) == ("failed", 1)
        assert error == f"the model ran past its timeout of {HANG_TIMEOUT} s"
        # The model itself was running (not still loading) when the timeout hit.
        assert (hanging / "started").is_file(), "the timeout hit before the model ran"

        assert _job(node, good_spec.series_instance_uid) == ("done", 1, None)
        delivered = [dcmread(p) for p in pacs.files()]
        assert sorted(str(d.Modality) for d in delivered) == ["SEG", "SR"]
        for result in delivered:
            assert result.StudyInstanceUID == good_spec.study_instance_uid

        log = node.log_text()
        crash_line = f"(crashing on series {crash_spec.series_instance_uid}) failed"
        assert log.count(f"{crash_line}, will retry: {CRASH_REASON}") == MAX_ATTEMPTS - 1
        assert log.count(f"{crash_line}: {CRASH_REASON}") == 1
        assert (
            f"(hanging on series {hang_spec.series_instance_uid}) failed: "
            f"the model ran past its timeout of {HANG_TIMEOUT} s" in log
        )
        # Each death and each timeout cost a worker; a fresh one took its slot each time.
        assert log.count("worker replaced") == MAX_ATTEMPTS + 1
        assert node.proc is not None and node.proc.poll() is None
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()
