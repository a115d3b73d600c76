"""Spool, index state machine, assembly and delivery, with a fake SCU in place of a peer."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from dicom_ai.assembly import AssemblyPolicy
from dicom_ai.config import DeliveryConfig, DicomDestination
from dicom_ai.dimse.status import SendResult
from dicom_ai.errors import InputError, OutOfSpaceError
from dicom_ai.pipeline import delivery
from dicom_ai.pipeline.delivery import Deliverer, backoff_seconds
from dicom_ai.store.index import Index, InstanceRecord, PendingSeries, RunPlan
from dicom_ai.store.spool import Spool


def test_spool_write_is_atomic_and_refuses_path_tricks(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.write_atomic(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(InputError):
        spool.instance_path("1.2.3", "../../etc", "1.2")


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 525_000])
def test_spool_writes_pieces_one_after_the_other(tmp_path: Path, size: int) -> None:
    """The SCP hands the file meta and the data set fragments as received, unjoined; the
    O_DIRECT path pads to 4 KiB and cuts the padding off again."""
    spool = Spool(tmp_path)
    data = os.urandom(size)
    pieces = [b"meta", memoryview(bytearray(data[: size // 2])), memoryview(data)[size // 2 :]]
    path = spool.instance_path("1.2", "1.2.3", f"1.2.3.{size}")
    spool.write_atomic(path, pieces)
    assert path.read_bytes() == b"meta" + data


def test_spool_refuses_below_the_watermark_and_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=spool_free(tmp_path) + 10**12)
    path = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(OutOfSpaceError):
        spool.write_atomic(path, b"x" * 100)
    assert not path.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def spool_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_stale_temp_files_are_removed_on_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "tmp" / "x.part").write_bytes(b"partial")
    assert spool.remove_stale_temp_files() == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def _add(index: Index, sop: str, series: str, association: int) -> None:
    index.add_instance(
        InstanceRecord(
            sop,
            "1.2.840.10008.5.1.4.1.1.2",
            series,
            "9.9",
            "CT",
            Path(f"/spool/{sop}.dcm"),
            association,
        )
    )


def test_index_series_runs_jobs_and_deliveries(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    for n in range(3):
        _add(index, f"1.{n}", "5.5", association)
    (pending,) = index.pending_series()
    assert pending.series_instance_uid == "5.5" and pending.open_associations == 1
    index.close_association(association)
    (pending,) = index.pending_series()
    assert pending.open_associations == 0 and pending.last_closed_at is not None
    assert index.series_senders("5.5") == [("SCANNER", "DICOM_AI", "127.0.0.1")]

    (job_id,) = index.start_run("5.5", [RunPlan("ct", "ct-body", ("pacs",))], "ct: matched")
    assert index.pending_series() == []
    (job,) = index.claim_pending_jobs(4)
    assert (job.id, job.state, job.attempts, job.destinations) == (job_id, "running", 1, ("pacs",))
    assert index.claim_pending_jobs(4) == []
    # A crash while running: the job runs again after restart.
    assert index.requeue_running_jobs() == 1
    (job,) = index.claim_pending_jobs(4)
    assert job.attempts == 2
    index.finish_job(job.id, [Path("/r/seg.dcm"), Path("/r/sr.dcm")], job.destinations)
    (due,) = index.due_deliveries(now=1e12)
    assert due.destination == "pacs" and due.files == (Path("/r/seg.dcm"), Path("/r/sr.dcm"))

    # Late instances start a new run of the same series.
    association2 = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    _add(index, "1.9", "5.5", association2)
    (pending,) = index.pending_series()
    assert pending.open_associations == 1
    index.start_run("5.5", [RunPlan("ct", "ct-body", ("pacs",))], "ct")
    assert [j.run for j in index.jobs()] == [1, 2]
    index.close()


def test_preview_switch_is_kept_with_the_job_and_old_indexes_gain_it(tmp_path: Path) -> None:
    import sqlite3

    # An index written before the preview column existed.
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, series_instance_uid TEXT NOT NULL, "
        "run INTEGER NOT NULL, rule TEXT NOT NULL, model TEXT NOT NULL, destinations TEXT "
        "NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, "
        "result_files TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, "
        "UNIQUE (series_instance_uid, run, rule))"
    )
    old.execute(
        "INSERT INTO jobs (series_instance_uid, run, rule, model, destinations, state, "
        "created_at, updated_at) VALUES ('4.4', 1, 'ct', 'ct-body', '[\"pacs\"]', "
        "'pending', 0, 0)"
    )
    old.commit()
    old.close()
    index = Index(path)
    (legacy,) = index.jobs()
    assert (legacy.preview, legacy.card) == (False, False)
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    _add(index, "2.1", "6.6", association)
    plans = [
        RunPlan("a", "ct-body", ("pacs",), preview=True),
        RunPlan("b", "m", ("pacs",), card=True),
    ]
    index.start_run("6.6", plans, "")
    jobs = {
        job.rule: (job.preview, job.card)
        for job in index.jobs()
        if job.series_instance_uid == "6.6"
    }
    assert jobs == {"a": (True, False), "b": (False, True)}
    index.close()


def test_assembly_quiet_time_and_release_grace() -> None:
    policy = AssemblyPolicy(quiet_seconds=5, release_grace_seconds=1)
    open_series = PendingSeries("1", last_received=100.0, open_associations=1, last_closed_at=None)
    assert not policy.is_complete(open_series, now=104.0)
    assert policy.is_complete(open_series, now=105.0)  # quiet for 5 s, still open
    released = PendingSeries("2", last_received=100.0, open_associations=0, last_closed_at=100.5)
    assert not policy.is_complete(released, now=101.0)
    assert policy.is_complete(released, now=101.5)
    one_still_open = PendingSeries(
        "3", last_received=100.0, open_associations=1, last_closed_at=100.5
    )
    assert not policy.is_complete(one_still_open, now=102.0)


def test_early_start_for_a_batch_one_association_sent_and_released() -> None:
    policy = AssemblyPolicy(quiet_seconds=5, release_grace_seconds=1, early_start=True)

    def series(associations: int, instances: int, open_: int = 0) -> PendingSeries:
        return PendingSeries("1", 100.0, open_, 100.5, associations, instances)

    assert policy.runnable([series(1, 300)], now=100.6) == [(series(1, 300), 101.5)]
    assert policy.runnable([series(1, 300)], now=101.6) == [(series(1, 300), None)]
    # An association per instance, several associations, one still open: wait the grace.
    assert policy.runnable([series(1, 1), series(3, 300), series(2, 300, open_=1)], 100.6) == []
    off = AssemblyPolicy(quiet_seconds=5, release_grace_seconds=1)
    assert off.runnable([series(1, 300)], now=100.6) == []


def test_held_results_go_out_after_the_grace_unless_more_of_the_series_came(
    tmp_path: Path,
) -> None:
    index = Index(tmp_path / "index.sqlite3")
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    for n in range(3):
        _add(index, f"1.{n}", "8.8", association)
    index.close_association(association)
    (pending,) = index.pending_series()
    assert (pending.batch_associations, pending.batch_instances) == (1, 3)
    plan = [RunPlan("ct", "ct-body", ("pacs",))]
    t = time.time() + 100  # the grace ends then
    (first,) = index.start_run("8.8", plan, "", hold_until=t)
    (job,) = index.claim_pending_jobs(4)
    index.finish_job(job.id, [Path("/r1/seg.dcm")], job.destinations)
    assert index.due_deliveries(now=t - 1) == []  # held
    (due,) = index.due_deliveries(now=t)
    assert due.job_id == first
    # More of the series came: held, then replaced by the run of the whole batch.
    late = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    _add(index, "1.9", "8.8", late)
    assert index.due_deliveries(now=t + 1) == []
    (second,) = index.start_run("8.8", plan, "", hold_until=t + 2)
    states = {d.job_id: d.state for d in index.deliveries()}
    assert states == {first: "superseded"}
    # A held run that finishes after a later run started never goes out.
    _add(index, "1.10", "8.8", late)
    (third,) = index.start_run("8.8", plan, "")
    jobs = {j.id: j for j in index.claim_pending_jobs(4)}
    index.finish_job(third, [Path("/r3/seg.dcm")], jobs[third].destinations)
    index.finish_job(second, [Path("/r2/seg.dcm")], jobs[second].destinations)
    states = {d.job_id: d.state for d in index.deliveries()}
    assert (states[second], states[third]) == ("superseded", "pending")
    assert [d.job_id for d in index.due_deliveries(now=t + 3)] == [third]
    index.close()


def test_backoff_doubles_and_caps() -> None:
    policy = DeliveryConfig(retry_base_seconds=2, retry_max_seconds=10, max_attempts=5)
    assert [backoff_seconds(n, policy) for n in range(1, 6)] == [2, 4, 8, 10, 10]


class FakeSCU:
    """Stands in for a peer: refuses the first ``failures`` attempts, then stores."""

    def __init__(self, failures: int, status: int = 0x0000) -> None:
        self.failures = failures
        self.status = status
        self.calls: list[tuple[str, tuple[Path, ...]]] = []

    def __call__(
        self,
        peer: object,
        paths: tuple[Path, ...],
        calling_ae: str,
        timeout: float,
        tls: object = None,
    ) -> list[SendResult]:
        self.calls.append((str(peer), tuple(paths)))
        if len(self.calls) <= self.failures:
            raise OSError("connection refused")
        return [SendResult(p, self.status) for p in paths]


@pytest.fixture
def queued(tmp_path: Path) -> tuple[Index, list[Path]]:
    index = Index(tmp_path / "index.sqlite3")
    files = [tmp_path / "seg.dcm", tmp_path / "sr.dcm"]
    for f in files:
        f.write_bytes(b"x")
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    _add(index, "1.1", "5.5", association)
    (job_id,) = index.start_run("5.5", [RunPlan("ct", "ct-body", ("pacs",))], "")
    index.claim_pending_jobs(1)
    index.finish_job(job_id, files, ("pacs",))
    return index, files


def _deliverer(index: Index, max_attempts: int) -> Deliverer:
    return Deliverer(
        index,
        {"pacs": DicomDestination(ae_title="PACS", host="127.0.0.1", port=104)},
        "DICOM_AI",
        DeliveryConfig(retry_base_seconds=1, retry_max_seconds=4, max_attempts=max_attempts),
    )


def test_delivery_retries_then_succeeds(
    queued: tuple[Index, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, files = queued
    fake = FakeSCU(failures=2)
    monkeypatch.setattr(delivery, "send_files", fake)
    deliverer = _deliverer(index, max_attempts=5)
    now = time.time() + 0.5
    assert deliverer.run_due(now) == 0
    (record,) = index.deliveries()
    assert (record.state, record.attempts) == ("pending", 1)
    assert index.due_deliveries(now) == []  # backing off
    assert deliverer.run_due(now + 100) == 0
    assert deliverer.run_due(now + 200) == 1
    (record,) = index.deliveries()
    assert (record.state, record.attempts) == ("delivered", 3)
    assert fake.calls[-1] == ("PACS@127.0.0.1:104", tuple(files))


def test_delivery_parks_dead_letter_and_resubmits(
    queued: tuple[Index, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _ = queued
    monkeypatch.setattr(delivery, "send_files", FakeSCU(failures=10**6))
    deliverer = _deliverer(index, max_attempts=2)
    deliverer.run_due(1e12)
    deliverer.run_due(1e13)
    (record,) = index.deliveries()
    assert record.state == "dead" and "connection refused" in (record.last_error or "")
    assert index.resubmit_dead() == 1
    monkeypatch.setattr(delivery, "send_files", FakeSCU(failures=0))
    assert deliverer.run_due(1e14) == 1


def test_delivery_refused_status_is_a_failure(
    queued: tuple[Index, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _ = queued
    monkeypatch.setattr(delivery, "send_files", FakeSCU(failures=0, status=0xA700))
    _deliverer(index, max_attempts=5).run_due(1e12)
    (record,) = index.deliveries()
    assert record.state == "pending" and "0xA700" in (record.last_error or "")


def test_spooled_file_missing_from_the_index_is_reindexed_on_start(tmp_path: Path) -> None:
    from dicom_ai.recovery import reindex_spooled_files
    from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite3")
    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=16, columns=16)))
    path = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)  # as if a power loss lost the index row
    assert index.unindexed([path]) == [path]
    assert reindex_spooled_files(spool, index, "DICOM_AI") == 1
    assert index.unindexed([path]) == []
    (pending,) = index.pending_series()
    assert pending.series_instance_uid == ds.SeriesInstanceUID
    assert reindex_spooled_files(spool, index, "DICOM_AI") == 0
    index.close()


def test_an_earlier_run_never_overwrites_a_later_runs_results(tmp_path: Path) -> None:
    """Found by the crash harness: run 1's delivery backing off after a failure went out
    after run 2's, so the PACS kept the results of half the series."""
    index = Index(tmp_path / "index.sqlite3")
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    _add(index, "1.1", "7.7", association)
    (first,) = index.start_run("7.7", [RunPlan("ct", "ct-body", ("pacs",))], "")
    (job,) = index.claim_pending_jobs(4)
    index.finish_job(job.id, [Path("/r1/seg.dcm")], job.destinations)
    (old,) = index.due_deliveries(now=1e12)
    index.delivery_failed(old.id, "PACS down", next_attempt_at=1e11)  # backing off
    _add(index, "1.2", "7.7", association)
    (second,) = index.start_run("7.7", [RunPlan("ct", "ct-body", ("pacs",))], "")
    (job2,) = index.claim_pending_jobs(4)
    index.finish_job(job2.id, [Path("/r2/seg.dcm")], job2.destinations)
    (due,) = index.due_deliveries(now=1e12)
    assert due.job_id == second
    states = {d.job_id: d.state for d in index.deliveries()}
    assert states == {first: "superseded", second: "pending"}
    # A failed attempt on a superseded delivery (it was in flight) does not revive it.
    index.delivery_failed(old.id, "PACS down", next_attempt_at=1.0)
    assert {d.job_id: d.state for d in index.deliveries()}[first] == "superseded"
    # And a run that finishes after a later run is superseded at once (two workers).
    _add(index, "1.3", "7.7", association)
    (third,) = index.start_run("7.7", [RunPlan("ct", "ct-body", ("pacs",))], "")
    _add(index, "1.4", "7.7", association)
    (fourth,) = index.start_run("7.7", [RunPlan("ct", "ct-body", ("pacs",))], "")
    jobs = {j.id: j for j in index.claim_pending_jobs(4)}
    index.finish_job(fourth, [Path("/r4/seg.dcm")], jobs[fourth].destinations)
    index.finish_job(third, [Path("/r3/seg.dcm")], jobs[third].destinations)
    states = {d.job_id: d.state for d in index.deliveries()}
    assert [states[third], states[fourth], states[second]] == [
        "superseded",
        "pending",
        "superseded",
    ]
    index.close()


def test_a_worker_that_dies_while_idle_is_replaced(tmp_path: Path) -> None:
    """A prefetch that kills its worker (a decoder crash) must not leave a dead slot that
    jobs are then sent to."""
    import signal

    from dicom_ai.pipeline.worker import WorkerPool

    pool = WorkerPool(1)
    try:
        (slot,) = pool._slots
        first = slot.process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        slot.process.join(timeout=10)
        assert pool.poll(timeout=0) == []  # no job was lost: nothing to report
        (fresh,) = pool._slots
        assert fresh.process.pid != first and fresh.process.is_alive()
        assert pool.idle() == 1
        assert pool.prefetch("1.2.3", (tmp_path / "absent.dcm",))  # best effort, no answer
        assert pool.poll(timeout=0.2) == []
        # A byte on the wake socket (an association released) ends the wait at once.
        wake, waker = socket.socketpair()
        wake.setblocking(False)
        waker.send(b"\0")
        started = time.monotonic()
        assert pool.poll(timeout=10, wake=wake) == []
        assert time.monotonic() - started < 2
        started = time.monotonic()
        assert pool.poll(timeout=0.3, wake=wake) == []  # read: it does not wake twice
        assert time.monotonic() - started >= 0.3
        wake.close()
        waker.close()
    finally:
        pool.shutdown()


def test_stopping_the_pool_kills_a_worker_in_a_job_and_lets_an_idle_one_exit(
    tmp_path: Path,
) -> None:
    """A job in progress is not waited for (it runs again at the next start); before, a
    stop waited 3 s for the worker, then killed it anyway."""
    import signal

    from dicom_ai.pipeline.worker import JobSpec, WorkerPool

    pool = WorkerPool(2)
    busy, idle = pool._slots
    busy.job = JobSpec(7, "1.2.3", "ct-body", None, "cpu", 60.0, (), tmp_path, "NODE")
    pool.shutdown()
    assert busy.process.exitcode == -signal.SIGKILL
    assert idle.process.exitcode == 0


def test_a_worker_drops_the_prefetches_of_the_series_its_job_reads(tmp_path: Path) -> None:
    """Queued behind the job, they would decode its files again after it, while its results
    are being delivered; other series' prefetches stay."""
    from collections import deque
    from multiprocessing import Pipe

    from dicom_ai.pipeline.worker import JobSpec, Prefetch, _next_message

    node_end, worker_end = Pipe()
    job = JobSpec(1, "1.2.3", "ct-body", None, "cpu", 60, (), tmp_path, "X")
    for message in (
        Prefetch("1.2.3", (tmp_path / "a.dcm",)),
        Prefetch("4.5.6", (tmp_path / "b.dcm",)),
        job,
        Prefetch("1.2.3", (tmp_path / "c.dcm",)),
    ):
        node_end.send(message)
    inbox: deque[JobSpec | Prefetch | None] = deque()
    assert _next_message(worker_end, inbox) == job
    assert list(inbox) == [Prefetch("4.5.6", (tmp_path / "b.dcm",))]


def test_a_worker_freezes_what_it_keeps_for_life(tmp_path: Path) -> None:
    """Imports and loaded models leave the cyclic collector's view; garbage does not."""
    import gc
    import weakref

    from dicom_ai.pipeline import worker

    class Node:
        def __init__(self) -> None:
            self.me = self

    kept, garbage = Node(), Node()
    gone = weakref.ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    try:
        worker._freeze_long_lived()
        assert gc.get_freeze_count() > before
        assert gone() is None  # collected before freezing, not frozen with the rest
        assert not gc.is_finalized(kept) and kept.me is kept
    finally:
        gc.unfreeze()


class _Conn:
    """A worker's end of the pipe, where a message arrives at the ``arrives``-th poll."""

    def __init__(self, arrives: int) -> None:
        self.arrives = arrives
        self.polls = 0

    def poll(self) -> bool:
        self.polls += 1
        return self.polls >= self.arrives


class _Arena:
    """A prefetch arena with five warming steps to go."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def warm(self, size_bytes: int) -> bool:
        self.steps.append(size_bytes)
        return len(self.steps) < 5


def test_an_idle_worker_warms_its_arena_until_done_or_a_message_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from dicom_ai.pipeline import worker

    arena = _Arena()
    worker._warm_while_idle(_Conn(arrives=100), arena, 1 << 20)  # type: ignore[arg-type]
    assert arena.steps == [1 << 20] * 5
    arena = _Arena()
    worker._warm_while_idle(_Conn(arrives=3), arena, 1 << 20)  # type: ignore[arg-type]
    assert len(arena.steps) == 2  # a message came: it goes first
    arena = _Arena()
    worker._warm_while_idle(_Conn(arrives=100), arena, 0)  # type: ignore[arg-type]
    assert arena.steps == []  # warm_memory_mb: 0
    for module in ("dicom_ai.inference.volume", "dicom_ai.inference.arena"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    worker._warm_while_idle(_Conn(arrives=100), None, 1 << 20)  # type: ignore[arg-type]
    # Never sent a message, so no arena: nothing (torch) imported for warming alone.
    assert "dicom_ai.inference.volume" not in sys.modules
    assert "dicom_ai.inference.arena" not in sys.modules


def test_the_index_version_moves_with_every_commit_from_any_process(tmp_path: Path) -> None:
    """The scheduler re-reads pending series only when it moves; a receiver process writes
    through its own connection."""
    index = Index(tmp_path / "index.sqlite3")
    other = Index(tmp_path / "index.sqlite3")  # as a receiver process holds it
    try:
        first = index.version()
        index.pending_series()
        assert index.version() == first  # reading changes nothing
        association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
        second = index.version()
        assert second != first
        _add(other, "1.1", "7.7", association)
        assert index.version() != second
    finally:
        other.close()
        index.close()
