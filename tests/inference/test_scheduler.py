"""The scheduler, one `step` at a time: a real index in tmp_path, a fake worker pool."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_ai.assembly import AssemblyPolicy
from dicom_ai.config import Config, NodeConfig
from dicom_ai.pipeline.scheduler import JobSpecs, Scheduler
from dicom_ai.pipeline.worker import JobOutcome, JobSpec
from dicom_ai.routing import LiveRules
from dicom_ai.store.index import Index, InstanceRecord, PendingSeries
from dicom_ai.store.spool import Spool
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets


class FakeWorkers:
    """Stands in for `WorkerPool`: ``size`` slots, jobs finish when the test says."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.busy = False  # refuse prefetches (no idle worker)
        self.running: dict[int, JobSpec] = {}
        self.submitted: list[JobSpec] = []
        self.prefetches: list[tuple[str, tuple[Path, ...]]] = []
        self.prefetch_models: list[tuple[str, ...]] = []
        self.outcomes: list[JobOutcome] = []
        self.polled: list[tuple[float, socket.socket | None]] = []

    def idle(self) -> int:
        return 0 if self.busy else self.size - len(self.running)

    def submit(self, spec: JobSpec) -> None:
        assert self.idle() > 0, "no idle worker"
        self.running[spec.job_id] = spec
        self.submitted.append(spec)

    def prefetch(
        self, series_uid: str, paths: tuple[Path, ...], models: tuple[str, ...] = ()
    ) -> bool:
        if self.busy or self.idle() == 0:
            return False
        self.prefetches.append((series_uid, paths))
        self.prefetch_models.append(models)
        return True

    def poll(self, timeout: float = 0.0, wake: socket.socket | None = None) -> list[JobOutcome]:
        self.polled.append((timeout, wake))
        outcomes, self.outcomes = self.outcomes, []
        for outcome in outcomes:
            self.running.pop(outcome.job_id, None)
        return outcomes

    def finish(self, job_id: int, ok: bool = True, retry: bool = False) -> None:
        files = (Path(f"/r/{job_id}/seg.dcm"),) if ok else ()
        self.outcomes.append(JobOutcome(job_id, ok, files, "" if ok else "boom", 1.0, retry))


class Harness:
    def __init__(self, tmp_path: Path, workers: int = 1, early_start: bool = False) -> None:
        self.config = Config(node=NodeConfig(data_dir=tmp_path, port=0))
        self.spool = Spool(tmp_path / "spool")
        self.index = Index(tmp_path / "index.sqlite3")
        self.pool = FakeWorkers(workers)
        self.delivered_signals = 0
        rules = LiveRules({t: c.rules for t, c in self.config.called_ae_table().items()})
        self.scheduler = Scheduler(
            self.index,
            self.pool,
            rules,
            AssemblyPolicy(quiet_seconds=5, release_grace_seconds=1, early_start=early_start),
            JobSpecs(self.config, self.spool),
            max_job_attempts=2,
            results_ready=self._results_ready,
        )

    def _results_ready(self) -> None:
        self.delivered_signals += 1

    def receive(self, datasets: list[Dataset], association: int) -> list[Path]:
        paths = []
        for ds in datasets:
            path = self.spool.instance_path(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            self.index.add_instance(
                InstanceRecord(
                    ds.SOPInstanceUID,
                    ds.SOPClassUID,
                    ds.SeriesInstanceUID,
                    ds.StudyInstanceUID,
                    ds.Modality,
                    path,
                    association,
                )
            )
            paths.append(path)
        return paths


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.index.close()


def _ct(slices: int = 3, seed: int = 0) -> list[Dataset]:
    return list(phantom_ct_datasets(PhantomSpec(slices=slices, rows=16, columns=16, seed=seed)))


def test_a_complete_series_is_routed_dispatched_and_its_outcome_recorded(
    harness: Harness,
) -> None:
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    ct = _ct()
    paths = harness.receive(ct, association)
    harness.index.close_association(association)
    now = time.time()
    harness.scheduler.step(now)  # released, but the grace has not passed
    assert harness.index.jobs() == []
    harness.scheduler.step(now + 2)
    (job,) = harness.index.jobs()
    assert (job.state, job.model, job.attempts) == ("running", "ct-body", 1)
    (spec,) = harness.pool.submitted
    assert spec.job_id == job.id and spec.instance_paths == tuple(paths)
    assert spec.results_dir == harness.spool.results_dir(job.id)
    harness.pool.finish(job.id)
    harness.scheduler.step(now + 3)
    assert harness.index.job(job.id).state == "done"
    assert harness.delivered_signals == 1
    assert [d.job_id for d in harness.index.deliveries()] == [job.id]


def test_a_job_the_worker_died_under_is_retried_until_its_attempts_run_out(
    harness: Harness,
) -> None:
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    harness.receive(_ct(), association)
    now = time.time() + 10  # quiet for longer than quiet_seconds
    harness.scheduler.step(now)
    (job,) = harness.index.jobs()
    harness.pool.finish(job.id, ok=False, retry=True)
    harness.scheduler.step(now)  # recorded as pending again, then dispatched next round
    harness.scheduler.step(now)
    assert harness.index.job(job.id).attempts == 2
    harness.pool.finish(job.id, ok=False, retry=True)
    harness.scheduler.step(now)
    failed = harness.index.job(job.id)
    assert (failed.state, failed.error) == ("failed", "boom")  # max_job_attempts: 2
    assert harness.delivered_signals == 0


def test_a_series_no_rule_runs_a_model_on_is_kept_without_jobs(harness: Harness) -> None:
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    other = _ct(seed=4)
    for ds in other:
        ds.Modality = "OT"
    harness.receive(other, association)
    harness.scheduler.step(time.time() + 10)
    assert harness.index.jobs() == [] and harness.index.pending_series() == []
    assert harness.pool.submitted == [] and harness.pool.prefetches == []


def test_an_early_start_holds_its_results_until_the_grace_has_passed(tmp_path: Path) -> None:
    harness = Harness(tmp_path, early_start=True)
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    harness.receive(_ct(), association)
    harness.index.close_association(association)
    (pending,) = harness.index.pending_series()
    assert pending.last_closed_at is not None
    harness.scheduler.step(pending.last_closed_at + 0.1)  # before the grace: early
    (job,) = harness.index.jobs()
    harness.pool.finish(job.id)
    harness.scheduler.step(pending.last_closed_at + 0.2)
    grace_over = pending.last_closed_at + 1
    assert harness.index.due_deliveries(grace_over - 0.01) == []
    assert [d.job_id for d in harness.index.due_deliveries(grace_over)] == [job.id]
    harness.index.close()


def test_pending_series_are_read_again_only_when_the_index_changed(harness: Harness) -> None:
    calls = 0
    read = harness.index.pending_series

    def counting() -> list[PendingSeries]:
        nonlocal calls
        calls += 1
        return read()

    harness.index.pending_series = counting  # type: ignore[method-assign]
    now = time.time()
    harness.scheduler.step(now)
    harness.scheduler.step(now)
    assert calls == 1
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    harness.receive(_ct(slices=2), association)
    harness.scheduler.step(now)
    assert calls == 2


def test_step_waits_for_outcomes_on_the_wake_socket(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    wake, waker = socket.socketpair()
    try:
        harness.scheduler.wake = wake
        harness.scheduler.step(time.time(), wait=0.1)
        assert harness.pool.polled == [(0.1, wake)]
    finally:
        wake.close()
        waker.close()
        harness.index.close()


def test_a_rules_file_edited_while_running_routes_the_next_series(
    tmp_path: Path,
) -> None:
    import os

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("rules:\n  - name: nothing\n    model: null\n")
    harness = Harness(tmp_path / "node")
    harness.scheduler.rules = LiveRules({"DICOM_AI": rules_file})
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    harness.receive(_ct(slices=2), association)
    now = time.time() + 10
    harness.scheduler.step(now)
    assert harness.index.jobs() == []
    rules_file.write_text("rules:\n  - name: ct\n    model: ct-body\n    destinations: [pacs]\n")
    os.utime(rules_file, (1, 1))  # a different mtime, however coarse the clock
    harness.receive(_ct(slices=2, seed=7), association)
    harness.scheduler.step(now + 10)
    assert [j.rule for j in harness.index.jobs()] == ["ct"]
    harness.index.close()


def test_series_still_arriving_are_prefetched_when_a_rule_runs_a_model(harness: Harness) -> None:
    """Moved here from test_store_and_pipeline (it called the node's private method)."""
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    prefetcher, pool, index = harness.scheduler.prefetcher, harness.pool, harness.index
    ct = _ct(slices=5)
    other = _ct(slices=2, seed=4)
    for ds in other:
        ds.Modality = "OT"  # no rule of the default rules takes it
    first = harness.receive(ct[:3], association)
    harness.receive(other, association)
    prefetcher.arriving(index.pending_series())
    uid = ct[0].SeriesInstanceUID
    assert pool.prefetches == [(uid, tuple(first))]
    assert pool.prefetch_models == [("ct-body",)]  # what its rule runs, for a cluster
    rest = harness.receive(ct[3:], association)
    pool.busy = True  # not now: asked again on the next round
    prefetcher.arriving(index.pending_series())
    pool.busy = False
    prefetcher.arriving(index.pending_series())
    prefetcher.arriving(index.pending_series())  # nothing new: nothing sent
    assert pool.prefetches[1:] == [(uid, tuple(rest))]
    index.close_association(association)  # released: nothing new, nothing sent
    prefetcher.arriving(index.pending_series())
    assert len(pool.prefetches) == 2


def test_step_prefetches_arriving_series_but_not_those_it_routes(harness: Harness) -> None:
    association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    ct = _ct()
    paths = harness.receive(ct, association)
    now = time.time()
    harness.scheduler.step(now)  # still arriving
    assert harness.pool.prefetches == [(ct[0].SeriesInstanceUID, tuple(paths))]
    more = _ct(slices=2, seed=9)
    harness.receive(more, association)
    harness.pool.prefetches.clear()
    harness.scheduler.step(now + 10)  # quiet: both routed, neither prefetched
    assert harness.pool.prefetches == []
    assert {j.series_instance_uid for j in harness.index.jobs()} == {
        ct[0].SeriesInstanceUID,
        more[0].SeriesInstanceUID,
    }
