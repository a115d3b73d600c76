"""The state machine of store/states.py, checked by the index; numbered migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_ai.store.index import MIGRATIONS, Index, InstanceRecord, RunPlan
from dicom_ai.store.states import (
    DELIVERY_MOVES,
    JOB_MOVES,
    SERIES_MOVES,
    DeliveryState,
    IllegalTransition,
    JobState,
    SeriesState,
    check,
)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (old, new)
        for moves in (SERIES_MOVES, JOB_MOVES, DELIVERY_MOVES)
        for old, targets in moves.items()
        for new in targets
    ],
)
def test_every_allowed_move_passes(
    old: SeriesState | JobState | DeliveryState | None, new: SeriesState | JobState | DeliveryState
) -> None:
    assert check(old, new) is new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (JobState.DONE, JobState.PENDING),
        (JobState.FAILED, JobState.RUNNING),
        (JobState.PENDING, JobState.DONE),
        (None, JobState.RUNNING),
        (DeliveryState.DELIVERED, DeliveryState.PENDING),
        (DeliveryState.SUPERSEDED, DeliveryState.PENDING),
        (DeliveryState.DEAD, DeliveryState.DELIVERED),
        (None, DeliveryState.DELIVERED),
        (SeriesState.ROUTED, SeriesState.ROUTED),
        (None, SeriesState.ROUTED),
    ],
)
def test_illegal_moves_raise(
    old: SeriesState | JobState | DeliveryState | None, new: SeriesState | JobState | DeliveryState
) -> None:
    with pytest.raises(IllegalTransition, match="is not allowed"):
        check(old, new, "7")


def test_every_state_has_its_row_in_the_table() -> None:
    for kind, moves in ((SeriesState, SERIES_MOVES), (JobState, JOB_MOVES)):
        assert set(moves) == {None, *kind}
    assert set(DELIVERY_MOVES) == {None, *DeliveryState}


def test_states_are_the_strings_stored_before() -> None:
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed"]
    assert {s.value for s in DeliveryState} == {
        "pending",
        "delivered",
        "dead",
        "superseded",
        "discarded",
    }
    assert JobState.DONE == "done"


def _add(index: Index, sop: str, series: str, association: int) -> None:
    index.add_instance(
        InstanceRecord(sop, "1.2.3", series, "9.9", "CT", Path(f"/s/{sop}.dcm"), association)
    )


def test_the_index_refuses_an_illegal_move_and_changes_nothing(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    try:
        association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
        _add(index, "1.1", "5.5", association)
        (job_id,) = index.start_run("5.5", [RunPlan("ct", "ct-body", ("pacs",))], "")
        with pytest.raises(IllegalTransition, match="pending -> done"):
            index.finish_job(job_id, [Path("/r/seg.dcm")], ("pacs",))  # never claimed
        assert index.job(job_id).state is JobState.PENDING
        assert index.deliveries() == []
        with pytest.raises(IllegalTransition, match=r"series 5\.5: routed -> routed"):
            index.start_run("5.5", [], "")  # nothing new since its run
        (claimed,) = index.claim_pending_jobs(1)
        index.fail_job(claimed.id, "boom", retry=False)
        with pytest.raises(IllegalTransition, match="failed -> pending"):
            index.fail_job(claimed.id, "boom", retry=True)
        assert index.jobs(JobState.FAILED)[0].error == "boom"
    finally:
        index.close()


def test_a_delivery_superseded_while_being_sent_records_that_it_went_out(
    tmp_path: Path,
) -> None:
    index = Index(tmp_path / "index.sqlite3")
    try:
        association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
        plan = [RunPlan("ct", "ct-body", ("pacs",))]
        for run, sop in enumerate(("1.1", "1.2")):
            _add(index, sop, "5.5", association)
            index.start_run("5.5", plan, "")
            (job,) = index.claim_pending_jobs(1)
            if run == 0:
                index.finish_job(job.id, [Path("/r1")], job.destinations)
                (sending,) = index.due_deliveries(1e12)
        index.finish_job(job.id, [Path("/r2")], job.destinations)  # supersedes the first
        index.delivery_succeeded(sending.id)
        states = [d.state for d in index.deliveries()]
        assert states == [DeliveryState.DELIVERED, DeliveryState.PENDING]
    finally:
        index.close()


_OLD_TABLES = """
CREATE TABLE associations (id INTEGER PRIMARY KEY, calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL, source_ip TEXT NOT NULL, opened_at REAL NOT NULL, closed_at REAL);
CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, path TEXT NOT NULL,
    association_id INTEGER NOT NULL, received_at REAL NOT NULL);
CREATE INDEX instances_series ON instances(series_instance_uid);
CREATE TABLE series (series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL, modality TEXT NOT NULL,
    first_received REAL NOT NULL, last_received REAL NOT NULL,
    dirty INTEGER NOT NULL, runs INTEGER NOT NULL DEFAULT 0,
    last_association_id INTEGER NOT NULL, routed_note TEXT);
CREATE TABLE series_associations (series_instance_uid TEXT NOT NULL,
    association_id INTEGER NOT NULL, PRIMARY KEY (series_instance_uid, association_id));
CREATE TABLE jobs (id INTEGER PRIMARY KEY,
    series_instance_uid TEXT NOT NULL, run INTEGER NOT NULL, rule TEXT NOT NULL,
    model TEXT NOT NULL, destinations TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    result_files TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    {extra}UNIQUE (series_instance_uid, run, rule));
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE deliveries (id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL, destination TEXT NOT NULL, files TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, last_error TEXT, delivered_at REAL,
    UNIQUE (job_id, destination));
CREATE INDEX deliveries_state ON deliveries(state, next_attempt_at);
INSERT INTO associations VALUES (1, 'SCANNER', 'DICOM_AI', '127.0.0.1', 10.0, 11.0);
INSERT INTO instances VALUES ('1.1', '5.5', '9.9', '1.2.3', '/s/1.1.dcm', 1, 10.0);
INSERT INTO series VALUES ('5.5', '9.9', 'CT', 10.0, 10.0, 0, 1, 1, 'ct: matched');
INSERT INTO jobs (id, series_instance_uid, run, rule, model, destinations, state, attempts,
    result_files, created_at, updated_at) VALUES
    (1, '5.5', 1, 'ct', 'ct-body', '["pacs"]', 'running', 1, NULL, 10.0, 10.0),
    (2, '5.5', 1, 'mr', 'mr-brain', '["pacs"]', 'done', 1, '["/r/sr.dcm"]', 10.0, 10.0);
INSERT INTO deliveries VALUES (1, 2, 'pacs', '["/r/sr.dcm"]', 'dead', 5, 0.0, 'refused', NULL);
"""


@pytest.mark.parametrize(
    "extra",
    [
        "",  # before the preview column
        "preview INTEGER NOT NULL DEFAULT 0, ",  # before hold_until
        "preview INTEGER NOT NULL DEFAULT 0, hold_until REAL, ",  # 5b4e090, user_version 0
    ],
)
def test_an_index_written_by_the_old_code_opens_and_upgrades(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "index.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_OLD_TABLES.format(extra=extra))
    old.close()
    index = Index(path)
    try:
        assert index.schema_version() == MIGRATIONS[-1][0]
        columns = {r["name"] for r in index._query("PRAGMA table_info(jobs)")}
        assert {"preview", "hold_until"} <= columns
        job, done = index.jobs()
        assert (job.state, job.preview, job.destinations) == (JobState.RUNNING, False, ("pacs",))
        assert done.state == JobState.DONE
        assert index.requeue_running_jobs() == 1
        assert index.resubmit_dead() == 1
        assert index.counts() == {
            "instances": 1,
            "series": 1,
            "jobs.pending": 1,
            "jobs.done": 1,
            "deliveries.pending": 1,
        }
        (job,) = index.claim_pending_jobs(1)
        index.finish_job(job.id, [Path("/r/seg2.dcm")], job.destinations)  # a later column
    finally:
        index.close()
    again = Index(path)  # opening once more applies nothing
    try:
        assert again.schema_version() == MIGRATIONS[-1][0]
        assert [j.state for j in again.jobs()] == [JobState.DONE, JobState.DONE]
        assert [d.job_id for d in again.due_deliveries(1e12)] == [2, 1]
    finally:
        again.close()


def test_migrations_are_numbered_in_order_and_a_new_index_has_them_all(tmp_path: Path) -> None:
    numbers = [number for number, _ in MIGRATIONS]
    assert numbers == list(range(1, len(numbers) + 1))
    index = Index(tmp_path / "new.sqlite3")
    try:
        assert index.schema_version() == numbers[-1]
        tables = {r["name"] for r in index._query("SELECT name FROM sqlite_master")}
        assert {"associations", "instances", "series", "jobs", "deliveries"} <= tables
    finally:
        index.close()


def test_rows_come_out_as_named_records(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    try:
        association = index.open_association("SCANNER", "AI_CT", "10.0.0.5")
        _add(index, "1.1", "5.5", association)
        (sender,) = index.series_senders("5.5")
        assert (sender.calling_ae, sender.called_ae, sender.source_ip) == (
            "SCANNER",
            "AI_CT",
            "10.0.0.5",
        )
        (pending,) = index.pending_series()
        assert (pending.batch_associations, pending.batch_instances) == (1, 1)
    finally:
        index.close()
