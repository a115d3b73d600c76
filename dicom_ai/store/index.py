"""SQLite (WAL) index: instances, series, associations, jobs, deliveries.

The index is the state machine's memory: every state a series, job or delivery can be in is a
row here, so a restart (also after ``kill -9``) resumes exactly where the node stopped. The
states and the moves between them are drawn in `dicom_ai.store.states`; every method here
that changes a state checks the move there first. When a run starts early, which results are
held and which a later run supersedes is assembly.py's rule; the index stores it.

Each consumer sees the index through a narrow protocol: `ReceivingIndex` (the storage SCP),
`RecoveryIndex` (recovery at start), `SchedulingIndex` (the scheduler), `DeliveryIndex` (the
deliverer), `StatusIndex` (``dicom-ai status`` and ``resubmit``). `Index` is all of them.

The schema changes only through `MIGRATIONS`, numbered and applied in order on open; the
database's ``PRAGMA user_version`` says how many it has seen.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

from dicom_ai import metrics
from dicom_ai.errors import OutOfSpaceError, StorageError
from dicom_ai.store.states import (
    DeliveryState,
    IllegalTransition,
    JobState,
    SeriesState,
    check,
)

__all__ = [
    "MIGRATIONS",
    "DeliveryIndex",
    "DeliveryRecord",
    "Event",
    "EventIndex",
    "HeldBack",
    "Index",
    "InstanceRecord",
    "JobRecord",
    "MetricValues",
    "PendingSeries",
    "PurgeCandidate",
    "ReceivingIndex",
    "RecoveryIndex",
    "RunPlan",
    "SchedulingIndex",
    "Sender",
    "StatusIndex",
    "StorageUsage",
    "StudyClaim",
    "StudyMember",
    "StudyWait",
    "SweepIndex",
]


# -- schema ----------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _statements(*sql: str) -> Migration:
    def apply(db: sqlite3.Connection) -> None:
        for statement in sql:
            db.execute(statement)

    return apply


def _add_column(table: str, column: str, declaration: str) -> Migration:
    """Indexes written before numbered migrations (user_version 0) may have the column."""

    def apply(db: sqlite3.Connection) -> None:
        columns = {str(row["name"]) for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    return apply


# Append only: a released node may have applied any prefix of these.
MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (
        1,
        _statements(
            "CREATE TABLE IF NOT EXISTS associations ("
            " id INTEGER PRIMARY KEY,"
            " calling_ae TEXT NOT NULL, called_ae TEXT NOT NULL, source_ip TEXT NOT NULL,"
            " opened_at REAL NOT NULL, closed_at REAL)",
            "CREATE TABLE IF NOT EXISTS instances ("
            " sop_instance_uid TEXT PRIMARY KEY,"
            " series_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,"
            " sop_class_uid TEXT NOT NULL, path TEXT NOT NULL,"
            " association_id INTEGER NOT NULL, received_at REAL NOT NULL)",
            "CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid)",
            "CREATE TABLE IF NOT EXISTS series ("
            " series_instance_uid TEXT PRIMARY KEY,"
            " study_instance_uid TEXT NOT NULL, modality TEXT NOT NULL,"
            " first_received REAL NOT NULL, last_received REAL NOT NULL,"
            " dirty INTEGER NOT NULL, runs INTEGER NOT NULL DEFAULT 0,"
            " last_association_id INTEGER NOT NULL, routed_note TEXT)",
            "CREATE TABLE IF NOT EXISTS series_associations ("
            " series_instance_uid TEXT NOT NULL, association_id INTEGER NOT NULL,"
            " PRIMARY KEY (series_instance_uid, association_id))",
            "CREATE TABLE IF NOT EXISTS jobs ("
            " id INTEGER PRIMARY KEY,"
            " series_instance_uid TEXT NOT NULL, run INTEGER NOT NULL, rule TEXT NOT NULL,"
            " model TEXT NOT NULL, destinations TEXT NOT NULL,"
            " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,"
            " result_files TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
            " UNIQUE (series_instance_uid, run, rule))",
            "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
            "CREATE TABLE IF NOT EXISTS deliveries ("
            " id INTEGER PRIMARY KEY,"
            " job_id INTEGER NOT NULL, destination TEXT NOT NULL, files TEXT NOT NULL,"
            " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt_at REAL NOT NULL, last_error TEXT, delivered_at REAL,"
            " UNIQUE (job_id, destination))",
            "CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_attempt_at)",
        ),
    ),
    (2, _add_column("jobs", "preview", "INTEGER NOT NULL DEFAULT 0")),
    (3, _add_column("jobs", "hold_until", "REAL")),
    (
        4,
        _statements(
            # Metric values (dicom_ai/metrics.py): labels are canonical JSON.
            "CREATE TABLE IF NOT EXISTS counters ("
            " name TEXT NOT NULL, labels TEXT NOT NULL, value REAL NOT NULL,"
            " PRIMARY KEY (name, labels))",
            "CREATE TABLE IF NOT EXISTS histograms ("
            " name TEXT NOT NULL, labels TEXT NOT NULL, buckets TEXT NOT NULL,"
            " count INTEGER NOT NULL, sum REAL NOT NULL, PRIMARY KEY (name, labels))",
            "CREATE TABLE IF NOT EXISTS received_hourly ("
            " hour INTEGER PRIMARY KEY, instances INTEGER NOT NULL)",
            "ALTER TABLE jobs ADD COLUMN started_at REAL",
            "ALTER TABLE jobs ADD COLUMN finished_at REAL",
            "ALTER TABLE jobs ADD COLUMN stages TEXT",
            "CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_instance_uid)",
            "CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries(job_id)",
            "CREATE INDEX IF NOT EXISTS series_last_received ON series(last_received)",
            "CREATE TABLE IF NOT EXISTS delivery_attempts ("
            " id INTEGER PRIMARY KEY, delivery_id INTEGER NOT NULL, at REAL NOT NULL,"
            " ok INTEGER NOT NULL, error TEXT)",
            "CREATE INDEX IF NOT EXISTS delivery_attempts_delivery "
            "ON delivery_attempts(delivery_id)",
            # What happened, for webhooks (pipeline/webhooks.py keeps a cursor per URL).
            "CREATE TABLE IF NOT EXISTS events ("
            " id INTEGER PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL,"
            " created_at REAL NOT NULL)",
            "CREATE TABLE IF NOT EXISTS webhook_cursors ("
            " url TEXT PRIMARY KEY, last_event_id INTEGER NOT NULL,"
            " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,"
            " last_error TEXT)",
            # The start-time model checks (pipeline/health.py), for the console.
            "CREATE TABLE IF NOT EXISTS model_checks ("
            " model TEXT PRIMARY KEY, state TEXT NOT NULL, verdict TEXT,"
            " checked_at REAL NOT NULL)",
        ),
    ),
    (
        5,
        _statements(
            # Retention (store/retention.py). An instance row marked purged names a file
            # being deleted: a purge commits the mark before it touches a file.
            "ALTER TABLE instances ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE instances ADD COLUMN purged INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX IF NOT EXISTS instances_purged ON instances(series_instance_uid) "
            "WHERE purged = 1",
            "ALTER TABLE series ADD COLUMN routed_at REAL",
            # 0: no rule claimed the series' last run (keep_unrouted_hours applies).
            "ALTER TABLE series ADD COLUMN claimed INTEGER NOT NULL DEFAULT 1",
            # 1 while the series has instance files not yet purged.
            "ALTER TABLE series ADD COLUMN has_sources INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE series ADD COLUMN sources_purged_at REAL",
            "ALTER TABLE series ADD COLUMN purged_instances INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX IF NOT EXISTS series_has_sources ON series(has_sources) "
            "WHERE has_sources = 1",
            "CREATE INDEX IF NOT EXISTS series_sources_purged ON series(sources_purged_at)",
            "ALTER TABLE jobs ADD COLUMN result_bytes INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN results_purged_at REAL",
            "CREATE INDEX IF NOT EXISTS jobs_results_kept ON jobs(finished_at) "
            "WHERE results_purged_at IS NULL",
            "CREATE INDEX IF NOT EXISTS associations_closed ON associations(closed_at)",
            "CREATE INDEX IF NOT EXISTS events_created ON events(created_at)",
        ),
    ),
    # Which instances were purged: 8-byte digests of their SOP Instance UIDs, so a run
    # waits until exactly these came back (`_purged_shortfall`).
    (6, _add_column("series", "purged_sops", "BLOB")),
    (
        7,
        _statements(
            # Studies (routing/studies.py). A job's subject is what its runs are counted
            # on and supersede each other by: its series, or "study/<study>/<rule>".
            "ALTER TABLE jobs ADD COLUMN subject TEXT",
            "UPDATE jobs SET subject = series_instance_uid",
            "CREATE INDEX IF NOT EXISTS jobs_subject ON jobs(subject, model, run)",
            "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN study_instance_uid TEXT",
            # A study job's inputs: {"reference": role, "input": "channels"|"keys",
            # "roles": [[role, series UID or null], ...], "series": [series UIDs]}.
            "ALTER TABLE jobs ADD COLUMN inputs TEXT",
            "CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, priority DESC, id)",
            "CREATE TABLE IF NOT EXISTS studies ("
            " study_instance_uid TEXT NOT NULL, rule TEXT NOT NULL, called_ae TEXT NOT NULL,"
            " model TEXT NOT NULL, destinations TEXT NOT NULL,"
            " preview INTEGER NOT NULL DEFAULT 0,"
            " first_received REAL NOT NULL, deadline_at REAL NOT NULL,"
            # waiting | started | failed | overdue (past the deadline, still waiting)
            " state TEXT NOT NULL, dirty INTEGER NOT NULL DEFAULT 1,"
            " runs INTEGER NOT NULL DEFAULT 0, last_run TEXT, note TEXT,"
            " updated_at REAL NOT NULL, PRIMARY KEY (study_instance_uid, rule))",
            "CREATE INDEX IF NOT EXISTS studies_open ON studies(state, dirty, deadline_at)",
            "CREATE TABLE IF NOT EXISTS study_members ("
            " study_instance_uid TEXT NOT NULL, rule TEXT NOT NULL,"
            " series_instance_uid TEXT NOT NULL, roles TEXT NOT NULL,"
            " order_values TEXT NOT NULL, instances INTEGER NOT NULL,"
            " series_run INTEGER NOT NULL, routed_at REAL NOT NULL, hold_until REAL,"
            " urgent INTEGER NOT NULL DEFAULT 0,"
            " PRIMARY KEY (study_instance_uid, rule, series_instance_uid))",
            "CREATE INDEX IF NOT EXISTS study_members_series ON study_members(series_instance_uid)",
        ),
    ),
    # Result cards (results/card.py), asked for by a rule like the preview.
    (
        8,
        _statements(
            "ALTER TABLE jobs ADD COLUMN card INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE studies ADD COLUMN card INTEGER NOT NULL DEFAULT 0",
        ),
    ),
    # Where a job ran: a Ray cluster node (pipeline.executor ray); NULL: this machine.
    (9, _statements("ALTER TABLE jobs ADD COLUMN ran_on TEXT")),
)


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    path: Path
    association_id: int
    size: int = 0  # bytes of the file


@dataclass(frozen=True)
class PendingSeries:
    """A series with instances not yet part of a run, and what assembly needs to decide."""

    series_instance_uid: str
    last_received: float
    open_associations: int
    last_closed_at: float | None
    batch_associations: int = 1  # associations that delivered the batch
    batch_instances: int = 0  # instances they delivered


class Sender(NamedTuple):
    """Who delivered (part of) a series: one association's AE titles and peer address."""

    calling_ae: str
    called_ae: str
    source_ip: str


@dataclass(frozen=True)
class StudyClaim:
    """A series is an input of a study rule: the roles it can fill (routing/studies.py
    chooses among the study's series when the study job starts)."""

    called_ae: str  # whose rules name the study rule
    roles: tuple[str, ...]
    order_values: tuple[tuple[str, str], ...]  # (role, its order_by element's text)
    deadline_seconds: float  # after the study's first instance


@dataclass(frozen=True)
class RunPlan:
    """One job to create for a series run (a matched rule), or, with ``study``, the series'
    place in a study rule's inputs (its job is the study's, made later)."""

    rule: str
    model: str
    destinations: tuple[str, ...]
    preview: bool = False  # also make a Secondary Capture preview of a segmentation
    urgent: bool = False  # runs before every queued normal job
    study: StudyClaim | None = None
    card: bool = False  # also make a result card


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_instance_uid: str  # a study job: its reference role's series
    run: int
    rule: str
    model: str
    destinations: tuple[str, ...]
    state: JobState
    attempts: int
    error: str | None
    preview: bool = False
    priority: int = 0  # 1: urgent
    study_instance_uid: str | None = None  # a study job's study; None: a series job
    roles: tuple[tuple[str, str | None], ...] = ()  # a study job's (role, series UID)
    reference_role: str | None = None
    role_input: str = "channels"
    card: bool = False
    ran_on: str | None = None  # the cluster node of its last attempt; None: this machine


@dataclass(frozen=True)
class StudyMember:
    """A series of a study that a study rule matched, as of its last run."""

    series_instance_uid: str
    roles: tuple[str, ...]  # the roles its header can fill
    order_values: tuple[tuple[str, str], ...]  # (role, its order_by element's text)
    instances: int
    series_run: int
    routed_at: float
    hold_until: float | None = None  # its run started early: results held until then
    urgent: bool = False
    purged: bool = False  # its instances were purged


@dataclass(frozen=True)
class StudyWait:
    """A study rule's study that needs a decision: new members, or its deadline passed."""

    study_instance_uid: str
    rule: str
    called_ae: str
    state: str  # waiting, started, failed, overdue
    first_received: float
    deadline_at: float
    runs: int
    last_run: str | None  # the selection key of its last run
    note: str | None
    members: tuple[StudyMember, ...]


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    job_id: int
    destination: str
    files: tuple[Path, ...]
    state: DeliveryState
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class Event:
    """Something that happened, for webhooks: ``body`` carries UIDs, never patient data."""

    id: int
    kind: str  # job.done, job.failed, delivery.dead_letter
    body: dict[str, object]


@dataclass(frozen=True)
class PurgeCandidate:
    """A series (its UID) or a job (its id) whose files may be purged from ``due`` on."""

    key: str
    due: float
    files: int
    bytes: int


@dataclass(frozen=True)
class HeldBack:
    """Files kept past their time, and why: how many series or jobs, how many bytes."""

    reason: str
    count: int
    bytes: int


@dataclass(frozen=True)
class StorageUsage:
    instances: int
    instance_bytes: int
    result_jobs: int
    result_bytes: int
    held_back: list[HeldBack]


@dataclass(frozen=True)
class MetricValues:
    """Every counter and histogram the index holds (labels as pairs)."""

    counters: list[tuple[str, tuple[tuple[str, str], ...], float]]
    # name, labels, non-cumulative bucket counts (the last: above every bound), count, sum
    histograms: list[tuple[str, tuple[tuple[str, str], ...], list[int], int, float]]


# -- what each consumer sees -----------------------------------------------------------------


class ReceivingIndex(Protocol):
    """The storage SCP: associations and the instances they deliver."""

    def open_association(self, calling_ae: str, called_ae: str, source_ip: str) -> int: ...
    def close_association(self, association_id: int) -> None: ...
    def add_instance(self, record: InstanceRecord) -> None: ...
    def count(self, name: str, labels: Mapping[str, str], by: float = 1.0) -> None: ...


class SweepIndex(Protocol):
    """Finishing interrupted purges (store/retention.py's `sweep`)."""

    def series_with_purged_instances(self) -> list[str]: ...
    def remove_purged_sources(
        self, series_uid: str, remove: Callable[[Sequence[Path]], None]
    ) -> tuple[int, int]: ...
    def unneeded_results(self, job_ids: Sequence[int]) -> list[int]: ...
    def remove_purged_results(self, job_id: int, remove: Callable[[], None]) -> bool: ...


class RecoveryIndex(ReceivingIndex, SweepIndex, Protocol):
    """Recovery at start: what an earlier process left half done."""

    def close_stale_associations(self) -> int: ...
    def requeue_running_jobs(self) -> int: ...
    def unindexed(self, paths: Sequence[Path]) -> list[Path]: ...
    def series_last_association(self, series_uid: str) -> int | None: ...


class SchedulingIndex(Protocol):
    """The scheduler: pending series, runs, jobs and their outcomes."""

    def version(self) -> tuple[int, int]: ...
    def pending_series(self) -> list[PendingSeries]: ...
    def series_instance_paths(self, series_uid: str, skip: int = 0) -> list[Path]: ...
    def series_senders(self, series_uid: str) -> list[Sender]: ...
    def start_run(
        self,
        series_uid: str,
        plans: Sequence[RunPlan],
        note: str,
        hold_until: float | None = None,
        claimed: bool = True,
    ) -> list[int]: ...
    def purged_shortfall(self, series_uid: str) -> tuple[int, float | None]: ...
    def studies_to_decide(self, now: float) -> list[StudyWait]: ...
    def next_study_deadline(self) -> float: ...
    def start_study_run(
        self,
        study: StudyWait,
        roles: Sequence[tuple[str, str | None]],
        reference_role: str,
        role_input: str,
        selection_key: str,
        note: str,
        hold_until: float | None = None,
    ) -> int: ...
    def settle_study(self, study: StudyWait, state: str, note: str) -> int | None: ...
    def claim_pending_jobs(
        self, limit: int, max_concurrent: Mapping[str, int] | None = None
    ) -> list[JobRecord]: ...
    def job(self, job_id: int) -> JobRecord: ...
    def finish_job(
        self,
        job_id: int,
        files: Sequence[Path],
        destinations: Sequence[str],
        stages: Mapping[str, float] | None = None,
        ran_on: str | None = None,
    ) -> None: ...
    def fail_job(
        self, job_id: int, reason: str, retry: bool, ran_on: str | None = None
    ) -> None: ...


class DeliveryIndex(Protocol):
    """The deliverer: deliveries that are due, and each attempt's outcome."""

    def due_deliveries(self, now: float) -> list[DeliveryRecord]: ...
    def delivery_succeeded(self, delivery_id: int) -> None: ...
    def delivery_failed(
        self, delivery_id: int, error: str, next_attempt_at: float | None
    ) -> None: ...


class StatusIndex(Protocol):
    """The operator: counts, failures, dead letters, and resubmitting them."""

    def counts(self) -> dict[str, int]: ...
    def jobs(self, state: JobState | None = None) -> list[JobRecord]: ...
    def deliveries(self, state: DeliveryState | None = None) -> list[DeliveryRecord]: ...
    def resubmit_dead(self) -> int: ...
    def resubmit_delivery(self, delivery_id: int) -> bool: ...
    def rerun_job(self, job_id: int) -> bool: ...
    def cluster_jobs(self, limit: int = 20) -> list[JobRecord]: ...


class EventIndex(Protocol):
    """The webhook sender: events in order, and how far each URL got."""

    def events_after(self, event_id: int, limit: int = 100) -> list[Event]: ...
    def webhook_cursor(self, url: str) -> tuple[int, float]: ...
    def webhook_sent(self, url: str, event_id: int) -> None: ...
    def webhook_failed(self, url: str, error: str, next_attempt_at: float) -> None: ...


# -- the index -------------------------------------------------------------------------------

_State = TypeVar("_State", JobState, DeliveryState)

_JOBS = (
    "SELECT id, series_instance_uid, run, rule, model, destinations, state, attempts, error, "
    "preview, priority, study_instance_uid, inputs, card, ran_on FROM jobs"
)
_DELIVERIES = (
    "SELECT d.id, d.job_id, d.destination, d.files, d.state, d.attempts, d.last_error "
    "FROM deliveries d"
)


class Index:
    """Thread-safe access to the node's SQLite index (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._commits = 0  # this connection's; other connections' show in data_version
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        # Takes effect only on a new database: free pages can then be given back in steps
        # (store/retention.py); an older one is converted by one VACUUM there.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        # After a checkpoint the WAL file is cut back to this, so a burst does not keep it
        # large for good (retention's `compact` truncates it to nothing).
        self._db.execute(f"PRAGMA journal_size_limit={64 << 20}")
        # NORMAL: a commit survives a process crash (kill -9) but not power loss; the
        # instance file itself is fsynced before Success, and `unindexed` finds files a
        # power loss took out of the index, so nothing acknowledged is lost. A purge's
        # mark commits FULL (`_tx(durable=True)`): on disk before any file it names goes.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        # BEGIN IMMEDIATE: a receiver process opening the index at the same time waits.
        with self._tx() as db:
            (seen,) = db.execute("PRAGMA user_version").fetchone()
            for number, migration in MIGRATIONS:
                if number > seen:
                    migration(db)
            latest = MIGRATIONS[-1][0]
            if seen < latest:
                db.execute(f"PRAGMA user_version = {latest}")

    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable``: its commit is synced (FULL) before it returns."""
        with self._lock:
            try:
                changes = self._db.total_changes
                if durable:
                    self._db.execute("PRAGMA synchronous=FULL")
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        yield self._db
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
                finally:
                    if durable:
                        self._db.execute("PRAGMA synchronous=NORMAL")
                # A transaction that changed nothing (no pending job to claim) leaves the
                # version alone, so what was read before stays current.
                if self._db.total_changes != changes:
                    self._commits += 1
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):  # SQLITE_FULL: the index's disk is full
                    raise OutOfSpaceError(f"index: {exc}") from exc
                raise

    def version(self) -> tuple[int, int]:
        """Changes when anything is committed to the index, by this process or another
        (a receiver process): what was read before is still current while it is equal."""
        with self._lock:
            (data_version,) = self._db.execute("PRAGMA data_version").fetchone()
            return self._commits, int(data_version)

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _move(
        db: sqlite3.Connection,
        table: str,
        where: str,
        args: Sequence[object],
        new: _State,
        assign: str = "",
        assign_args: Sequence[object] = (),
    ) -> list[int]:
        """Move the rows of ``table`` (jobs or deliveries) that ``where`` selects to ``new``,
        each move checked; ``assign``: more columns to set. The ids moved."""
        rows = db.execute(
            f"SELECT id, state FROM {table} WHERE {where} ORDER BY id", args
        ).fetchall()
        kind = type(new)
        for row in rows:
            check(kind(row["state"]), new, f"{row['id']}")
        ids = [int(row["id"]) for row in rows]
        db.executemany(
            f"UPDATE {table} SET state = ?{assign} WHERE id = ?",
            [(new.value, *assign_args, row_id) for row_id in ids],
        )
        return ids

    # -- receiving ---------------------------------------------------------------------------

    def open_association(self, calling_ae: str, called_ae: str, source_ip: str) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO associations (calling_ae, called_ae, source_ip, opened_at) "
                "VALUES (?, ?, ?, ?)",
                (calling_ae, called_ae, source_ip, time.time()),
            )
            return int(cur.lastrowid or 0)

    def close_association(self, association_id: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE associations SET closed_at = ? WHERE id = ? AND closed_at IS NULL",
                (time.time(), association_id),
            )

    def add_instance(self, record: InstanceRecord) -> None:
        """Index a durable instance file; the series becomes due for a (new) run."""
        now = time.time()
        with self._tx() as db:
            check(
                _series_state(db, record.series_instance_uid),
                SeriesState.PENDING,
                record.series_instance_uid,
            )
            _check_not_purged_under(db, record)
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_instance_uid, "
                "study_instance_uid, sop_class_uid, path, association_id, received_at, size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.sop_instance_uid,
                    record.series_instance_uid,
                    record.study_instance_uid,
                    record.sop_class_uid,
                    str(record.path),
                    record.association_id,
                    now,
                    record.size,
                ),
            )
            db.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality, "
                "first_received, last_received, dirty, last_association_id) "
                "VALUES (?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT(series_instance_uid) DO UPDATE SET "
                "last_received = excluded.last_received, dirty = 1, has_sources = 1, "
                "last_association_id = excluded.last_association_id",
                (
                    record.series_instance_uid,
                    record.study_instance_uid,
                    record.modality,
                    now,
                    now,
                    record.association_id,
                ),
            )
            db.execute(
                "INSERT OR IGNORE INTO series_associations (series_instance_uid, "
                "association_id) VALUES (?, ?)",
                (record.series_instance_uid, record.association_id),
            )
            # Also the instances-received counter (its sum), for the dashboard and /metrics.
            db.execute(
                "INSERT INTO received_hourly (hour, instances) VALUES (?, 1) "
                "ON CONFLICT(hour) DO UPDATE SET instances = instances + 1",
                (int(now // 3600),),
            )

    def count(self, name: str, labels: Mapping[str, str], by: float = 1.0) -> None:
        """Add ``by`` to a counter (metrics.py names it)."""
        with self._tx() as db:
            _count(db, name, labels, by)

    # -- recovery ----------------------------------------------------------------------------

    def close_stale_associations(self) -> int:
        """On start: no association of an earlier process is still open."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE associations SET closed_at = ? WHERE closed_at IS NULL", (time.time(),)
            )
            return cur.rowcount

    def requeue_running_jobs(self) -> int:
        """On start: a job that was running when the node stopped runs again."""
        with self._tx() as db:
            moved = self._move(
                db,
                "jobs",
                "state = ?",
                (JobState.RUNNING.value,),
                JobState.PENDING,
                ", updated_at = ?",
                (time.time(),),
            )
            return len(moved)

    def unindexed(self, paths: Sequence[Path]) -> list[Path]:
        """Those of ``paths`` that no instance row points to."""
        known = {str(r["path"]) for r in self._query("SELECT path FROM instances")}
        return [p for p in paths if str(p) not in known]

    def series_last_association(self, series_uid: str) -> int | None:
        rows = self._query(
            "SELECT last_association_id FROM series WHERE series_instance_uid = ?", (series_uid,)
        )
        return int(rows[0]["last_association_id"]) if rows else None

    # -- assembly and routing ----------------------------------------------------------------

    def pending_series(self) -> list[PendingSeries]:
        rows = self._query(
            "SELECT s.series_instance_uid AS uid, s.last_received AS last_received, "
            "  SUM(CASE WHEN a.closed_at IS NULL THEN 1 ELSE 0 END) AS open_associations, "
            "  MAX(a.closed_at) AS last_closed_at, COUNT(*) AS batch_associations, "
            "  (SELECT COUNT(*) FROM instances i "
            "    WHERE i.series_instance_uid = s.series_instance_uid AND i.association_id IN "
            "    (SELECT association_id FROM series_associations "
            "     WHERE series_instance_uid = s.series_instance_uid)) AS batch_instances "
            "FROM series s "
            "JOIN series_associations sa ON sa.series_instance_uid = s.series_instance_uid "
            "JOIN associations a ON a.id = sa.association_id "
            "WHERE s.dirty = 1 GROUP BY s.series_instance_uid"
        )
        return [
            PendingSeries(
                series_instance_uid=str(r["uid"]),
                last_received=float(r["last_received"]),
                open_associations=int(r["open_associations"]),
                last_closed_at=None if r["last_closed_at"] is None else float(r["last_closed_at"]),
                batch_associations=int(r["batch_associations"]),
                batch_instances=int(r["batch_instances"]),
            )
            for r in rows
        ]

    def series_instance_paths(self, series_uid: str, skip: int = 0) -> list[Path]:
        """The series' instance files in the order received; ``skip``: leave out the first."""
        rows = self._query(
            "SELECT path FROM instances WHERE series_instance_uid = ? ORDER BY received_at "
            "LIMIT -1 OFFSET ?",
            (series_uid, skip),
        )
        return [Path(str(r["path"])) for r in rows]

    def series_senders(self, series_uid: str) -> list[Sender]:
        """Each association that delivered the series' current batch, first come first; the
        last association when the batch has none."""
        rows = self._query(
            "SELECT DISTINCT a.calling_ae, a.called_ae, a.source_ip FROM series_associations sa "
            "JOIN associations a ON a.id = sa.association_id "
            "WHERE sa.series_instance_uid = ? ORDER BY a.id",
            (series_uid,),
        ) or self._query(
            "SELECT a.calling_ae, a.called_ae, a.source_ip FROM series s "
            "JOIN associations a ON a.id = s.last_association_id WHERE s.series_instance_uid = ?",
            (series_uid,),
        )
        return [
            Sender(str(r["calling_ae"]), str(r["called_ae"]), str(r["source_ip"])) for r in rows
        ]

    def start_run(
        self,
        series_uid: str,
        plans: Sequence[RunPlan],
        note: str,
        hold_until: float | None = None,
        claimed: bool = True,
    ) -> list[int]:
        """Close the series' current batch of instances into a run with one job per plan.

        ``hold_until``: the run starts before the series is known complete; its results
        are held until then (assembly.py has the rule). A new run supersedes the held
        results of earlier runs. ``claimed``: False when no rule claimed the series (its
        files are kept ``keep_unrouted_hours``). A run with jobs on a series whose earlier
        instances were purged needs them all back (`purged_shortfall`); it then starts
        afresh.
        """
        now = time.time()
        with self._tx() as db:
            check(_series_state(db, series_uid), SeriesState.ROUTED, series_uid)
            (runs,) = db.execute(
                "SELECT runs FROM series WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()
            run = int(runs) + 1
            db.execute(
                "UPDATE series SET dirty = 0, runs = ?, routed_note = ?, routed_at = ?, "
                "claimed = ? WHERE series_instance_uid = ?",
                (run, note, now, int(claimed or bool(plans)), series_uid),
            )
            if plans:
                if _purged_shortfall(db, series_uid):
                    raise IllegalTransition(
                        f"series {series_uid}: a run on part of a purged series"
                    )
                db.execute(
                    "UPDATE series SET sources_purged_at = NULL, purged_instances = 0, "
                    "purged_sops = NULL "
                    "WHERE series_instance_uid = ?",
                    (series_uid,),
                )
            db.execute(
                "DELETE FROM series_associations WHERE series_instance_uid = ?", (series_uid,)
            )
            self._supersede_held(db, series_uid, run)
            state = check(None, JobState.PENDING)
            job_ids = []
            for plan in plans:
                if plan.study is not None:
                    _join_study(db, series_uid, run, plan, plan.study, hold_until, now)
                    continue
                cur = db.execute(
                    "INSERT INTO jobs (series_instance_uid, run, rule, model, destinations, state, "
                    "created_at, updated_at, preview, hold_until, subject, priority, card) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        series_uid,
                        run,
                        plan.rule,
                        plan.model,
                        json.dumps(plan.destinations),
                        state.value,
                        now,
                        now,
                        int(plan.preview),
                        hold_until,
                        series_uid,
                        int(plan.urgent),
                        int(plan.card),
                    ),
                )
                job_ids.append(int(cur.lastrowid or 0))
            return job_ids

    def _supersede_held(self, db: sqlite3.Connection, subject: str, run: int) -> None:
        """A new run supersedes the held, undelivered results of the subject's earlier runs."""
        self._move(
            db,
            "deliveries",
            "state = ? AND job_id IN (SELECT id FROM jobs "
            "WHERE subject = ? AND run < ? AND hold_until IS NOT NULL)",
            (DeliveryState.PENDING.value, subject, run),
            DeliveryState.SUPERSEDED,
            ", last_error = ?",
            (f"held, then superseded by run {run}",),
        )

    # -- studies (routing/studies.py decides; these store) -----------------------------------

    def studies_to_decide(self, now: float) -> list[StudyWait]:
        """Studies with members that changed since the last decision, and waiting ones
        whose deadline passed."""
        rows = self._query(
            "SELECT * FROM studies WHERE dirty = 1 OR (state = 'waiting' AND deadline_at <= ?) "
            "ORDER BY first_received",
            (now,),
        )
        return [self._study_wait(row) for row in rows]

    def next_study_deadline(self) -> float:
        """The earliest deadline of the studies waiting for roles (inf: none waits)."""
        (deadline,) = self._query("SELECT MIN(deadline_at) FROM studies WHERE state = 'waiting'")[0]
        return math.inf if deadline is None else float(deadline)

    def studies(
        self, states: Sequence[str] = ("waiting", "overdue", "failed", "started"), limit: int = 50
    ) -> list[StudyWait]:
        """Studies of study rules, newest first, in ``states``."""
        rows = self._query(
            "SELECT * FROM studies WHERE state IN (SELECT value FROM json_each(?)) "
            "ORDER BY first_received DESC LIMIT ?",
            (json.dumps(list(states)), limit),
        )
        return [self._study_wait(row) for row in rows]

    def _study_wait(self, row: sqlite3.Row) -> StudyWait:
        members = self._query(
            "SELECT m.*, COALESCE(s.sources_purged_at IS NOT NULL AND s.has_sources = 0, 0) "
            "AS purged FROM study_members m LEFT JOIN series s "
            "ON s.series_instance_uid = m.series_instance_uid "
            "WHERE m.study_instance_uid = ? AND m.rule = ? ORDER BY m.routed_at",
            (row["study_instance_uid"], row["rule"]),
        )
        return StudyWait(
            study_instance_uid=str(row["study_instance_uid"]),
            rule=str(row["rule"]),
            called_ae=str(row["called_ae"]),
            state=str(row["state"]),
            first_received=float(row["first_received"]),
            deadline_at=float(row["deadline_at"]),
            runs=int(row["runs"]),
            last_run=row["last_run"],
            note=row["note"],
            members=tuple(
                StudyMember(
                    series_instance_uid=str(m["series_instance_uid"]),
                    roles=tuple(json.loads(str(m["roles"]))),
                    order_values=tuple(
                        (str(k), str(v)) for k, v in json.loads(str(m["order_values"]))
                    ),
                    instances=int(m["instances"]),
                    series_run=int(m["series_run"]),
                    routed_at=float(m["routed_at"]),
                    hold_until=None if m["hold_until"] is None else float(m["hold_until"]),
                    urgent=bool(m["urgent"]),
                    purged=bool(m["purged"]),
                )
                for m in members
            ),
        )

    def start_study_run(
        self,
        study: StudyWait,
        roles: Sequence[tuple[str, str | None]],
        reference_role: str,
        role_input: str,
        selection_key: str,
        note: str,
        hold_until: float | None = None,
    ) -> int:
        """A run of the study on these roles' series (role order; None: a missing optional
        role): one job, on the reference role's series. Supersedes the held results of the
        study's earlier runs. The job's id."""
        now = time.time()
        reference = dict(roles)[reference_role]
        if reference is None:
            raise ValueError(f"study {study.study_instance_uid}: no series for {reference_role}")
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM studies WHERE study_instance_uid = ? AND rule = ?",
                (study.study_instance_uid, study.rule),
            ).fetchone()
            run = int(row["runs"]) + 1
            subject = _study_subject(study.study_instance_uid, study.rule)
            urgent = any(m.urgent for m in study.members)
            db.execute(
                "UPDATE studies SET runs = ?, state = 'started', last_run = ?, note = ?, "
                "dirty = 0, updated_at = ? WHERE study_instance_uid = ? AND rule = ?",
                (run, selection_key, note, now, study.study_instance_uid, study.rule),
            )
            self._supersede_held(db, subject, run)
            return self._insert_study_job(
                db,
                row,
                run,
                roles,
                reference,
                reference_role,
                role_input,
                JobState.PENDING,
                None,
                hold_until,
                urgent,
                now,
            )

    def settle_study(self, study: StudyWait, state: str, note: str) -> int | None:
        """Record a decision that starts nothing: ``waiting`` or ``overdue`` with why, or
        ``failed``: a failed job (its error the note) says so where failed jobs are seen.
        The failed job's id, if one was made."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM studies WHERE study_instance_uid = ? AND rule = ?",
                (study.study_instance_uid, study.rule),
            ).fetchone()
            run = int(row["runs"]) + (state == "failed")
            db.execute(
                "UPDATE studies SET state = ?, note = ?, dirty = 0, runs = ?, updated_at = ? "
                "WHERE study_instance_uid = ? AND rule = ?",
                (state, note, run, now, study.study_instance_uid, study.rule),
            )
            if state != "failed" or not study.members:
                return None
            reference = study.members[-1].series_instance_uid
            job_id = self._insert_study_job(
                db,
                row,
                run,
                (),
                reference,
                None,
                "channels",
                JobState.FAILED,
                note,
                None,
                False,
                now,
            )
            _count(db, metrics.JOBS, {"model": str(row["model"]), "state": "failed"})
            _event(db, "job.failed", job_id)
            return job_id

    @staticmethod
    def _insert_study_job(
        db: sqlite3.Connection,
        study: sqlite3.Row,
        run: int,
        roles: Sequence[tuple[str, str | None]],
        reference: str,
        reference_role: str | None,
        role_input: str,
        state: JobState,
        error: str | None,
        hold_until: float | None,
        urgent: bool,
        now: float,
    ) -> int:
        check(None, state)
        inputs = {
            "reference": reference_role,
            "input": role_input,
            "roles": [list(pair) for pair in roles],
            "series": [uid for _, uid in roles if uid is not None],
        }
        cur = db.execute(
            "INSERT INTO jobs (series_instance_uid, run, rule, model, destinations, state, "
            "error, created_at, updated_at, finished_at, preview, hold_until, subject, "
            "priority, study_instance_uid, inputs, card) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                reference,
                run,
                study["rule"],
                study["model"],
                study["destinations"],
                state.value,
                error,
                now,
                now,
                now if state is JobState.FAILED else None,
                study["preview"],
                hold_until,
                _study_subject(str(study["study_instance_uid"]), str(study["rule"])),
                int(urgent),
                study["study_instance_uid"],
                json.dumps(inputs),
                study["card"],
            ),
        )
        return int(cur.lastrowid or 0)

    # -- jobs --------------------------------------------------------------------------------

    def claim_pending_jobs(
        self, limit: int, max_concurrent: Mapping[str, int] | None = None
    ) -> list[JobRecord]:
        """Move up to ``limit`` pending jobs to running and return them: urgent ones first,
        then oldest first; a model at its ``max_concurrent`` running jobs is passed over."""
        if limit <= 0:
            return []
        now = time.time()
        caps = dict(max_concurrent or {})
        with self._tx() as db:
            if caps:
                running: dict[str, int] = {
                    str(r[0]): int(r[1])
                    for r in db.execute(
                        "SELECT model, COUNT(*) FROM jobs WHERE state = ? GROUP BY model",
                        (JobState.RUNNING.value,),
                    )
                }
                chosen: list[int] = []
                for row in db.execute(
                    "SELECT id, model FROM jobs WHERE state = ? ORDER BY priority DESC, id",
                    (JobState.PENDING.value,),
                ):
                    model = str(row["model"])
                    if model in caps and running.get(model, 0) >= caps[model]:
                        continue
                    running[model] = running.get(model, 0) + 1
                    chosen.append(int(row["id"]))
                    if len(chosen) == limit:
                        break
                where, args = "id IN (SELECT value FROM json_each(?))", (json.dumps(chosen),)
            else:
                where = (
                    "id IN (SELECT id FROM jobs WHERE state = ? ORDER BY priority DESC, id LIMIT ?)"
                )
                args = (JobState.PENDING.value, limit)  # type: ignore[assignment]
            ids = self._move(
                db,
                "jobs",
                where,
                args,
                JobState.RUNNING,
                ", attempts = attempts + 1, updated_at = ?, started_at = ?",
                (now, now),
            )
            jobs = {i: _job(db.execute(_JOBS + " WHERE id = ?", (i,)).fetchone()) for i in ids}
            # Handed out in queue order: the first idle worker gets the most urgent.
            return sorted(jobs.values(), key=lambda j: (-j.priority, j.id))

    def job(self, job_id: int) -> JobRecord:
        (row,) = self._query(_JOBS + " WHERE id = ?", (job_id,))
        return _job(row)

    def jobs(self, state: JobState | None = None) -> list[JobRecord]:
        rows = (
            self._query(_JOBS + " WHERE state = ? ORDER BY id", (JobState(state).value,))
            if state
            else self._query(_JOBS + " ORDER BY id")
        )
        return [_job(r) for r in rows]

    def cluster_jobs(self, limit: int = 20) -> list[JobRecord]:
        """The latest ``limit`` jobs that ran on a cluster node, oldest first."""
        rows = self._query(_JOBS + " WHERE ran_on IS NOT NULL ORDER BY id DESC LIMIT ?", (limit,))
        return [_job(r) for r in reversed(rows)]

    def finish_job(
        self,
        job_id: int,
        files: Sequence[Path],
        destinations: Sequence[str],
        stages: Mapping[str, float] | None = None,
        ran_on: str | None = None,
    ) -> None:
        """Record a job's result files and queue one delivery per destination, atomically.

        Results of one series and model share their UIDs, so the last delivered one is what
        the PACS keeps. A run must never overwrite a later run's results: finishing a job
        supersedes the undelivered deliveries of earlier runs (a delivery backing off after
        a failure would otherwise go out after this one), and a job that finishes after a
        later run's job has its deliveries superseded at once. ``stages``: seconds per stage
        (load, infer, encode), kept with the job and counted in the metrics; ``ran_on``:
        the cluster node that ran it (None: this machine).
        """
        now = time.time()
        encoded = json.dumps([str(f) for f in files])
        stages = dict(stages or {})
        size = sum(_size(f) for f in files)
        with self._tx() as db:
            self._move(
                db,
                "jobs",
                "id = ?",
                (job_id,),
                JobState.DONE,
                ", result_files = ?, error = NULL, updated_at = ?, finished_at = ?, stages = ?, "
                "result_bytes = ?, results_purged_at = NULL, ran_on = ?",
                (encoded, now, now, json.dumps(stages), size, ran_on),
            )
            model_id = _job_model(db, job_id)
            _count(db, metrics.JOBS, {"model": model_id, "state": "done"})
            for stage, seconds in stages.items():
                _observe(
                    db, metrics.JOB_STAGE_SECONDS, {"model": model_id, "stage": stage}, seconds
                )
            _event(db, "job.done", job_id)
            job = db.execute(
                "SELECT subject, model, run, hold_until IS NOT NULL AS held FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            subject, model, run = job["subject"], job["model"], job["run"]
            later = db.execute(
                "SELECT MAX(run) AS run FROM jobs WHERE subject = ? AND model = ? "
                "AND run > ? AND (state = ? OR ?)",
                # Held results of a run that a later run has replaced never go out.
                (subject, model, run, JobState.DONE.value, bool(job["held"])),
            ).fetchone()["run"]
            state = check(
                None, DeliveryState.PENDING if later is None else DeliveryState.SUPERSEDED
            )
            for destination in destinations:
                db.execute(
                    "INSERT INTO deliveries (job_id, destination, files, state, "
                    "attempts, next_attempt_at, last_error) VALUES (?, ?, ?, ?, 0, ?, ?)",
                    (
                        job_id,
                        destination,
                        encoded,
                        state.value,
                        now,
                        None if later is None else f"superseded by run {later}",
                    ),
                )
                if later is None:
                    self._move(
                        db,
                        "deliveries",
                        "destination = ? AND state IN (?, ?) AND job_id IN "
                        "(SELECT id FROM jobs WHERE subject = ? AND model = ? "
                        "AND run < ?)",
                        (
                            destination,
                            DeliveryState.PENDING.value,
                            DeliveryState.DEAD.value,
                            subject,
                            model,
                            run,
                        ),
                        DeliveryState.SUPERSEDED,
                        ", last_error = ?",
                        (f"superseded by run {run}",),
                    )

    def fail_job(self, job_id: int, reason: str, retry: bool, ran_on: str | None = None) -> None:
        now = time.time()
        new = JobState.PENDING if retry else JobState.FAILED
        with self._tx() as db:
            (old,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if old != JobState.RUNNING.value:  # failed -> pending is an operator's rerun only
                raise IllegalTransition(f"job {job_id}: {old} -> {new.value} is not allowed")
            self._move(
                db,
                "jobs",
                "id = ?",
                (job_id,),
                new,
                ", error = ?, updated_at = ?, finished_at = ?, ran_on = COALESCE(?, ran_on)",
                (reason, now, None if retry else now, ran_on),
            )
            state = "retried" if retry else "failed"
            _count(db, metrics.JOBS, {"model": _job_model(db, job_id), "state": state})
            if not retry:
                _event(db, "job.failed", job_id)

    def rerun_job(self, job_id: int) -> bool:
        """An operator runs a failed job again, with a fresh attempt budget; False when it
        has not failed, when its series' instances were purged (a run on what is left
        would replace results made from all of it), or when it is a study job that failed
        for a missing role (the study runs again when the role's series comes)."""
        with self._tx() as db:
            moved = self._move(
                db,
                "jobs",
                "id = ? AND state = ? AND NOT EXISTS (SELECT 1 FROM series s "
                "WHERE s.series_instance_uid = jobs.series_instance_uid "
                "AND s.sources_purged_at IS NOT NULL) "
                # A study job: none of its inputs purged, and it had inputs (one that
                # failed at its deadline for a missing role has none to run on).
                "AND (jobs.inputs IS NULL OR (json_array_length(jobs.inputs, '$.roles') > 0 "
                "AND NOT EXISTS (SELECT 1 FROM json_each(jobs.inputs, '$.series') je "
                "JOIN series s ON s.series_instance_uid = je.value "
                "WHERE s.sources_purged_at IS NOT NULL)))",
                (job_id, JobState.FAILED.value),
                JobState.PENDING,
                ", attempts = 0, error = NULL, updated_at = ?, started_at = NULL, "
                "finished_at = NULL, results_purged_at = NULL",
                (time.time(),),
            )
            return bool(moved)

    def purged_shortfall(self, series_uid: str) -> tuple[int, float | None]:
        """How many of the instances purged from the series have not been received again
        (0: none were purged, or all came back), and when its sources were last purged."""
        with self._lock:
            missing = _purged_shortfall(self._db, series_uid)
            row = self._db.execute(
                "SELECT sources_purged_at FROM series WHERE series_instance_uid = ?",
                (series_uid,),
            ).fetchone()
        return missing, None if row is None or row[0] is None else float(row[0])

    # -- deliveries --------------------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DeliveryRecord]:
        """Pending deliveries whose next attempt is due. Held results (an early start, see
        assembly.py) are due from their hold time on, and only while nothing of the series
        came since and no later run started."""
        rows = self._query(
            _DELIVERIES + " JOIN jobs j ON j.id = d.job_id "
            "JOIN series s ON s.series_instance_uid = j.series_instance_uid "
            "WHERE d.state = ? AND d.next_attempt_at <= ? AND (j.hold_until IS NULL "
            "  OR (j.hold_until <= ? AND j.inputs IS NULL AND s.dirty = 0 AND s.runs = j.run) "
            # A study job's: its study has no newer run or members, and no input series
            # has instances newer than its run.
            "  OR (j.hold_until <= ? AND j.inputs IS NOT NULL AND EXISTS (SELECT 1 FROM "
            "    studies st WHERE st.study_instance_uid = j.study_instance_uid "
            "    AND st.rule = j.rule AND st.runs = j.run AND st.dirty = 0) "
            "    AND NOT EXISTS (SELECT 1 FROM json_each(j.inputs, '$.series') je "
            "    JOIN series s2 ON s2.series_instance_uid = je.value WHERE s2.dirty = 1))) "
            "ORDER BY d.next_attempt_at",
            (DeliveryState.PENDING.value, now, now, now),
        )
        return [_delivery(r) for r in rows]

    def deliveries(self, state: DeliveryState | None = None) -> list[DeliveryRecord]:
        rows = (
            self._query(
                _DELIVERIES + " WHERE d.state = ? ORDER BY d.id", (DeliveryState(state).value,)
            )
            if state
            else self._query(_DELIVERIES + " ORDER BY d.id")
        )
        return [_delivery(r) for r in rows]

    def delivery_succeeded(self, delivery_id: int) -> None:
        now = time.time()
        with self._tx() as db:
            self._move(
                db,
                "deliveries",
                "id = ?",
                (delivery_id,),
                DeliveryState.DELIVERED,
                ", attempts = attempts + 1, delivered_at = ?, last_error = NULL",
                (now,),
            )
            db.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, ok) VALUES (?, ?, 1)",
                (delivery_id, now),
            )
            row = db.execute(
                "SELECT d.destination, j.model, s.last_received FROM deliveries d "
                "JOIN jobs j ON j.id = d.job_id "
                "JOIN series s ON s.series_instance_uid = j.series_instance_uid WHERE d.id = ?",
                (delivery_id,),
            ).fetchone()
            _count(db, metrics.DELIVERIES, {"destination": row[0], "state": "delivered"})
            _observe(db, metrics.RESULT_LATENCY_SECONDS, {"model": row[1]}, now - float(row[2]))

    def delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt; ``None`` for the next attempt parks it as dead letter."""
        with self._tx() as db:
            self._move(
                db,
                "deliveries",
                # A delivery superseded while it was being sent stays superseded.
                "id = ? AND state = ?",
                (delivery_id, DeliveryState.PENDING.value),
                DeliveryState.DEAD if next_attempt_at is None else DeliveryState.PENDING,
                ", attempts = attempts + 1, last_error = ?, next_attempt_at = ?",
                (error, next_attempt_at or 0.0),
            )
            db.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, ok, error) VALUES (?, ?, 0, ?)",
                (delivery_id, time.time(), error),
            )
            (destination,) = db.execute(
                "SELECT destination FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
            dead = next_attempt_at is None
            state = "dead_letter" if dead else "failed"
            _count(db, metrics.DELIVERIES, {"destination": destination, "state": state})
            if dead:
                _event(db, "delivery.dead_letter", None, delivery_id)

    def resubmit_dead(self) -> int:
        """Dead letters go back to pending with a fresh attempt budget."""
        with self._tx() as db:
            moved = self._move(
                db,
                "deliveries",
                "state = ?",
                (DeliveryState.DEAD.value,),
                DeliveryState.PENDING,
                ", attempts = 0, next_attempt_at = ?",
                (time.time(),),
            )
            return len(moved)

    def resubmit_delivery(self, delivery_id: int) -> bool:
        """One dead letter back to pending; False when it is not a dead letter."""
        return self._move_dead_letter(
            delivery_id, DeliveryState.PENDING, ", attempts = 0, next_attempt_at = ?", time.time()
        )

    def discard_delivery(self, delivery_id: int) -> bool:
        """An operator gives up one dead letter: its results may then be purged. False when
        it is not a dead letter."""
        return self._move_dead_letter(
            delivery_id,
            DeliveryState.DISCARDED,
            ", last_error = COALESCE(last_error, '') || ' (discarded)'",
        )

    def _move_dead_letter(
        self, delivery_id: int, new: DeliveryState, assign: str, *assign_args: object
    ) -> bool:
        with self._tx() as db:
            moved = self._move(
                db,
                "deliveries",
                "id = ? AND state = ?",
                (delivery_id, DeliveryState.DEAD.value),
                new,
                assign,
                assign_args,
            )
            return bool(moved)

    # -- retention (store/retention.py) ------------------------------------------------------

    def sources_due(
        self,
        now: float,
        keep_seconds: float,
        keep_unrouted_seconds: float,
        limit: int,
        any_age: bool = False,
    ) -> list[PurgeCandidate]:
        """Series whose instance files may go, oldest first: routed, no job pending or
        running, no delivery pending or dead letter, and kept long enough (``any_age``:
        whatever their age, for disk pressure)."""
        rows = self._query(
            "SELECT uid, due, files, bytes FROM ("
            " SELECT s.series_instance_uid AS uid,"
            "  MAX(COALESCE(s.routed_at, s.last_received),"
            "   COALESCE((SELECT MAX(j.finished_at) FROM jobs j"
            "     WHERE j.series_instance_uid = s.series_instance_uid), 0),"
            "   COALESCE((SELECT MAX(d.delivered_at) FROM deliveries d JOIN jobs j"
            "     ON j.id = d.job_id WHERE j.series_instance_uid = s.series_instance_uid), 0))"
            "  + CASE WHEN s.claimed = 0 AND NOT EXISTS (SELECT 1 FROM jobs j"
            "     WHERE j.series_instance_uid = s.series_instance_uid) THEN ? ELSE ? END"
            "  AS due,"
            "  (SELECT COUNT(*) FROM instances i WHERE i.series_instance_uid ="
            "   s.series_instance_uid AND i.purged = 0) AS files,"
            "  (SELECT COALESCE(SUM(size), 0) FROM instances i WHERE i.series_instance_uid ="
            "   s.series_instance_uid AND i.purged = 0) AS bytes"
            " FROM series s WHERE s.has_sources = 1 AND s.dirty = 0 AND " + _SOURCES_FREE + ")"
            " WHERE ? OR due <= ? ORDER BY due LIMIT ?",
            (keep_unrouted_seconds, keep_seconds, int(any_age), now, limit),
        )
        return [
            PurgeCandidate(str(r["uid"]), float(r["due"]), int(r["files"]), int(r["bytes"]))
            for r in rows
        ]

    def results_due(
        self, now: float, keep_seconds: float, limit: int, any_age: bool = False
    ) -> list[PurgeCandidate]:
        """Jobs whose result files may go, oldest first: done or failed, every delivery
        delivered, superseded or discarded, and kept long enough (``any_age``: whatever
        their age)."""
        rows = self._query(
            "SELECT id, due, bytes FROM ("
            " SELECT j.id AS id, j.result_bytes AS bytes,"
            "  MAX(COALESCE(j.finished_at, j.updated_at), COALESCE((SELECT MAX(d.delivered_at)"
            "   FROM deliveries d WHERE d.job_id = j.id), 0)) + ? AS due"
            " FROM jobs j WHERE j.results_purged_at IS NULL AND " + _RESULTS_FREE + ")"
            " WHERE ? OR due <= ? ORDER BY due LIMIT ?",
            (keep_seconds, int(any_age), now, limit),
        )
        return [PurgeCandidate(str(r["id"]), float(r["due"]), 0, int(r["bytes"])) for r in rows]

    def mark_sources_purged(self, series_uids: Sequence[str]) -> list[str]:
        """The first step of a purge: mark the series' instance rows, checking again that
        nothing needs them. Committed before any file is deleted. The series marked."""
        now = time.time()
        marked = []
        with self._tx(durable=True) as db:
            for uid in series_uids:
                free = db.execute(
                    "SELECT 1 FROM series s WHERE s.series_instance_uid = ? AND s.dirty = 0 AND "
                    + _SOURCES_FREE,
                    (uid,),
                ).fetchone()
                if free is None:
                    continue
                sops = [
                    str(r[0])
                    for r in db.execute(
                        "SELECT sop_instance_uid FROM instances "
                        "WHERE series_instance_uid = ? AND purged = 0",
                        (uid,),
                    )
                ]
                db.execute(
                    "UPDATE instances SET purged = 1 WHERE series_instance_uid = ? AND purged = 0",
                    (uid,),
                )
                (before,) = db.execute(
                    "SELECT purged_sops FROM series WHERE series_instance_uid = ?", (uid,)
                ).fetchone()
                digests = bytes(before or b"") + b"".join(_sop_digest(sop) for sop in sops)
                db.execute(
                    "UPDATE series SET has_sources = 0, sources_purged_at = ?, "
                    "purged_instances = purged_instances + ?, purged_sops = ? "
                    "WHERE series_instance_uid = ?",
                    (now, len(sops), digests, uid),
                )
                marked.append(uid)
        return marked

    def remove_purged_sources(
        self, series_uid: str, remove: Callable[[Sequence[Path]], None]
    ) -> tuple[int, int]:
        """The second step: ``remove`` the files of the series' marked rows, then the rows,
        in one transaction. A receiver that wrote one of these files again meanwhile finds
        it gone when it indexes it, and answers a failure (`add_instance`). Files, bytes."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT path, size FROM instances WHERE series_instance_uid = ? AND purged = 1",
                (series_uid,),
            ).fetchall()
            remove([Path(str(r["path"])) for r in rows])
            db.execute(
                "DELETE FROM instances WHERE series_instance_uid = ? AND purged = 1",
                (series_uid,),
            )
            size = sum(int(r["size"]) for r in rows)
            _count(db, metrics.PURGED_BYTES, {"kind": "sources"}, size)
            return len(rows), size

    def not_run_for_purge(self, limit: int = 20) -> list[tuple[str, int, int]]:
        """Series holding instances that came after their series was purged, not run until
        the rest comes back: UID, instances here, purged instances still missing."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.series_instance_uid, (SELECT COUNT(*) FROM instances i "
                "WHERE i.series_instance_uid = s.series_instance_uid AND i.purged = 0) "
                "FROM series s WHERE s.has_sources = 1 AND s.sources_purged_at IS NOT NULL "
                "ORDER BY s.last_received DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [(str(r[0]), int(r[1]), _purged_shortfall(self._db, str(r[0]))) for r in rows]

    def series_with_purged_instances(self) -> list[str]:
        """Series whose purge was marked and not finished (a crash in between)."""
        rows = self._query("SELECT DISTINCT series_instance_uid FROM instances WHERE purged = 1")
        return [str(r[0]) for r in rows]

    def mark_results_purged(self, job_ids: Sequence[int]) -> list[int]:
        """The first step of a results purge, as `mark_sources_purged`. The jobs marked."""
        now = time.time()
        marked = []
        with self._tx(durable=True) as db:
            for job_id in job_ids:
                cur = db.execute(
                    "UPDATE jobs SET results_purged_at = ? WHERE id IN (SELECT j.id FROM jobs j "
                    "WHERE j.id = ? AND j.results_purged_at IS NULL AND " + _RESULTS_FREE + ")",
                    (now, job_id),
                )
                if cur.rowcount:
                    marked.append(job_id)
        return marked

    def remove_purged_results(self, job_id: int, remove: Callable[[], None]) -> bool:
        """The second step: ``remove`` the job's result files if its mark still stands (an
        operator's rerun clears it) or its rows were pruned. False when it does not."""
        with self._tx() as db:
            row = db.execute(
                "SELECT results_purged_at, result_bytes FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is not None and row[0] is None:
                return False
            remove()
            if row is not None:
                _count(db, metrics.PURGED_BYTES, {"kind": "results"}, float(row[1]))
            return True

    def unneeded_results(self, job_ids: Sequence[int]) -> list[int]:
        """Of ``job_ids`` (result folders found on disk), those whose results were purged or
        whose job is gone: orphans for the sweep."""
        known = {
            int(r["id"]): r["results_purged_at"] is not None
            for r in self._query(
                "SELECT id, results_purged_at FROM jobs WHERE id IN "
                "(SELECT value FROM json_each(?))",
                (json.dumps(list(job_ids)),),
            )
        }
        return [j for j in job_ids if known.get(j, True)]

    def prune_records(
        self, cutoff: float, limit: int = 500, dry_run: bool = False
    ) -> dict[str, int]:
        """Delete the rows of series whose files are all gone and that have not changed
        since ``cutoff`` (their jobs, deliveries and attempts with them), closed associations
        nothing points to, and events, all older than ``cutoff``. The newest row of each
        table stays, so SQLite never gives its id again (a webhook cursor, an audit line
        and a result folder name ids). Rows deleted, per table; ``dry_run``: counted, and
        rolled back (every row that would go, not ``limit``)."""
        deleted: dict[str, int] = {}
        if dry_run:
            limit = -1
        try:
            with self._tx() as db:
                self._prune(db, cutoff, limit, deleted)
                if dry_run:
                    raise _RolledBack
        except _RolledBack:
            pass
        return deleted

    @staticmethod
    def _prune(db: sqlite3.Connection, cutoff: float, limit: int, deleted: dict[str, int]) -> None:
        uids = [
            str(r[0])
            for r in db.execute(
                "SELECT s.series_instance_uid FROM series s "
                "WHERE s.sources_purged_at < ? AND s.has_sources = 0 AND s.dirty = 0 "
                "AND NOT EXISTS (SELECT 1 FROM instances i "
                "  WHERE i.series_instance_uid = s.series_instance_uid) "
                "AND NOT EXISTS (SELECT 1 FROM jobs j "
                "  WHERE j.series_instance_uid = s.series_instance_uid AND ("
                "  j.results_purged_at IS NULL OR j.results_purged_at >= ? "
                "  OR j.id >= (SELECT MAX(id) FROM jobs) OR EXISTS (SELECT 1 FROM "
                "  deliveries d WHERE d.job_id = j.id AND "
                "  d.id >= (SELECT MAX(id) FROM deliveries)))) "
                "ORDER BY s.sources_purged_at LIMIT ?",
                (cutoff, cutoff, limit),
            )
        ]
        for table, sql in (
            (
                "delivery_attempts",
                "DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT d.id FROM "
                "deliveries d JOIN jobs j ON j.id = d.job_id WHERE j.series_instance_uid = ?)",
            ),
            (
                "deliveries",
                "DELETE FROM deliveries WHERE job_id IN "
                "(SELECT id FROM jobs WHERE series_instance_uid = ?)",
            ),
            ("jobs", "DELETE FROM jobs WHERE series_instance_uid = ?"),
            (
                "series_associations",
                "DELETE FROM series_associations WHERE series_instance_uid = ?",
            ),
            ("study_members", "DELETE FROM study_members WHERE series_instance_uid = ?"),
            ("series", "DELETE FROM series WHERE series_instance_uid = ?"),
        ):
            deleted[table] = sum(db.execute(sql, (uid,)).rowcount for uid in uids)
        deleted["studies"] = db.execute(
            "DELETE FROM studies WHERE updated_at < ? AND NOT EXISTS (SELECT 1 FROM "
            "study_members m WHERE m.study_instance_uid = studies.study_instance_uid "
            "AND m.rule = studies.rule)",
            (cutoff,),
        ).rowcount
        deleted["associations"] = db.execute(
            "DELETE FROM associations WHERE id IN (SELECT a.id FROM associations a "
            "WHERE a.closed_at < ? AND a.id < (SELECT MAX(id) FROM associations) "
            "AND a.id NOT IN (SELECT last_association_id FROM series) "
            "AND a.id NOT IN (SELECT association_id FROM series_associations) "
            "AND a.id NOT IN (SELECT association_id FROM instances) LIMIT ?)",
            (cutoff, limit * 10),
        ).rowcount
        deleted["events"] = db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ? "
            "AND id < (SELECT MAX(id) FROM events) LIMIT ?)",
            (cutoff, limit * 10),
        ).rowcount

    def compact(self) -> None:
        """Give the pages of deleted rows back to the filesystem and bring the WAL file back
        to empty. An index made before auto_vacuum was set is converted by one VACUUM."""
        with self._lock:
            (mode,) = self._db.execute("PRAGMA auto_vacuum").fetchone()
            if int(mode) == 0:
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")
            else:
                self._db.execute("PRAGMA incremental_vacuum").fetchall()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def storage_usage(self) -> StorageUsage:
        """What the spool holds by the index's account, and what is held back and why."""
        (sources,) = self._query(
            "SELECT COUNT(*) AS files, COALESCE(SUM(size), 0) AS bytes FROM instances"
        )
        (results,) = self._query(
            "SELECT COUNT(*) AS jobs, COALESCE(SUM(result_bytes), 0) AS bytes FROM jobs "
            "WHERE results_purged_at IS NULL AND result_files IS NOT NULL"
        )
        held = [
            HeldBack(str(r["reason"]), int(r["series"]), int(r["bytes"]))
            for r in self._query(
                "SELECT reason, COUNT(*) AS series, SUM(bytes) AS bytes FROM ("
                " SELECT CASE"
                "  WHEN s.dirty = 1 THEN 'sources: series still receiving or not yet routed'"
                "  WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid ="
                "   s.series_instance_uid AND j.state IN ('pending', 'running'))"
                "   THEN 'sources: a job pending or running'"
                "  WHEN EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id"
                "   WHERE j.series_instance_uid = s.series_instance_uid AND d.state = 'dead')"
                "   THEN 'sources: a delivery in dead letter'"
                "  WHEN EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id"
                "   WHERE j.series_instance_uid = s.series_instance_uid AND d.state = 'pending')"
                "   THEN 'sources: a delivery pending or backing off'"
                "  ELSE NULL END AS reason,"
                "  (SELECT COALESCE(SUM(size), 0) FROM instances i"
                "   WHERE i.series_instance_uid = s.series_instance_uid) AS bytes"
                " FROM series s WHERE s.has_sources = 1)"
                " WHERE reason IS NOT NULL GROUP BY reason"
                " UNION ALL "
                "SELECT reason, COUNT(*), SUM(bytes) FROM ("
                " SELECT CASE WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id"
                "   AND d.state = 'dead') THEN 'results: a delivery in dead letter'"
                "  ELSE 'results: a delivery pending or backing off' END AS reason,"
                "  j.result_bytes AS bytes"
                " FROM jobs j WHERE j.results_purged_at IS NULL AND EXISTS (SELECT 1 FROM"
                "  deliveries d WHERE d.job_id = j.id AND d.state IN ('pending', 'dead')))"
                " GROUP BY reason ORDER BY reason"
            )
        ]
        return StorageUsage(
            int(sources["files"]),
            int(sources["bytes"]),
            int(results["jobs"]),
            int(results["bytes"]),
            held,
        )

    # -- events and metrics ------------------------------------------------------------------

    def events_after(self, event_id: int, limit: int = 100) -> list[Event]:
        rows = self._query(
            "SELECT id, kind, body FROM events WHERE id > ? ORDER BY id LIMIT ?", (event_id, limit)
        )
        return [Event(int(r["id"]), str(r["kind"]), json.loads(str(r["body"]))) for r in rows]

    def webhook_cursor(self, url: str) -> tuple[int, float]:
        """The last event sent to ``url`` and when to try the next; a URL seen for the first
        time starts at the events to come, not the whole history."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO webhook_cursors (url, last_event_id) "
                "SELECT ?, COALESCE(MAX(id), 0) FROM events",
                (url,),
            )
            row = db.execute(
                "SELECT last_event_id, next_attempt_at FROM webhook_cursors WHERE url = ?", (url,)
            ).fetchone()
            return int(row[0]), float(row[1])

    def webhook_sent(self, url: str, event_id: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE webhook_cursors SET last_event_id = MAX(last_event_id, ?), attempts = 0,"
                " next_attempt_at = 0, last_error = NULL WHERE url = ?",
                (event_id, url),
            )

    def webhook_failed(self, url: str, error: str, next_attempt_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE webhook_cursors SET attempts = attempts + 1, next_attempt_at = ?, "
                "last_error = ? WHERE url = ?",
                (next_attempt_at, error, url),
            )

    def record_model_check(self, model_id: str, state: str, verdict: str | None) -> None:
        """What the start-time check of a model found: checking, ok, broken, inconclusive."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO model_checks (model, state, verdict, checked_at) "
                "VALUES (?, ?, ?, ?)",
                (model_id, state, verdict, time.time()),
            )

    def metric_values(self) -> MetricValues:
        counters = [
            (str(r["name"]), _label_pairs(r["labels"]), float(r["value"]))
            for r in self._query("SELECT name, labels, value FROM counters ORDER BY name, labels")
        ]
        (received,) = self._query("SELECT COALESCE(SUM(instances), 0) FROM received_hourly")[0]
        counters.append((metrics.INSTANCES_RECEIVED, (), float(received)))
        histograms = [
            (
                str(r["name"]),
                _label_pairs(r["labels"]),
                [int(n) for n in json.loads(str(r["buckets"]))],
                int(r["count"]),
                float(r["sum"]),
            )
            for r in self._query(
                "SELECT name, labels, buckets, count, sum FROM histograms ORDER BY name, labels"
            )
        ]
        return MetricValues(counters, histograms)

    def queue_depth(self) -> int:
        """Jobs waiting for a worker (pending), for the queue depth gauge."""
        rows = self._query("SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState.PENDING.value,))
        return int(rows[0][0])

    # -- status ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for table in ("instances", "series"):
            out[table] = int(self._query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
        for table in ("jobs", "deliveries"):
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            for r in rows:
                out[f"{table}.{r['state']}"] = int(r["n"])
        return out


# Nothing of the series is still needed: no job to run, no delivery to make or resubmit.
_SOURCES_FREE = (
    "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = s.series_instance_uid "
    "AND j.state IN ('pending', 'running')) "
    "AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id "
    "WHERE j.series_instance_uid = s.series_instance_uid AND d.state IN ('pending', 'dead')) "
    # An input of a study job still to run, or of a study still waiting for its roles.
    "AND NOT EXISTS (SELECT 1 FROM jobs j, json_each(j.inputs, '$.series') je "
    "WHERE j.state IN ('pending', 'running') AND j.inputs IS NOT NULL "
    "AND je.value = s.series_instance_uid) "
    "AND NOT EXISTS (SELECT 1 FROM study_members m JOIN studies st "
    "ON st.study_instance_uid = m.study_instance_uid AND st.rule = m.rule "
    "WHERE m.series_instance_uid = s.series_instance_uid "
    "AND (st.dirty = 1 OR st.state IN ('waiting', 'overdue')))"
)
# The job's results are no longer needed: it will not run again by itself, and every
# delivery went out, was superseded or was discarded.
_RESULTS_FREE = (
    "j.state IN ('done', 'failed') AND NOT EXISTS (SELECT 1 FROM deliveries d "
    "WHERE d.job_id = j.id AND d.state IN ('pending', 'dead'))"
)


def _join_study(
    db: sqlite3.Connection,
    series_uid: str,
    run: int,
    plan: RunPlan,
    claim: StudyClaim,
    hold_until: float | None,
    now: float,
) -> None:
    """The series (this run of it) becomes a member of the plan's study rule: the study
    is looked at again (`Index.studies_to_decide`)."""
    series = db.execute(
        "SELECT study_instance_uid FROM series WHERE series_instance_uid = ?", (series_uid,)
    ).fetchone()
    study_uid = str(series["study_instance_uid"])
    (first,) = db.execute(
        "SELECT MIN(first_received) FROM series WHERE study_instance_uid = ?", (study_uid,)
    ).fetchone()
    db.execute(
        "INSERT INTO studies (study_instance_uid, rule, called_ae, model, destinations, "
        "preview, first_received, deadline_at, state, dirty, updated_at, card) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'waiting', 1, ?, ?) "
        "ON CONFLICT(study_instance_uid, rule) DO UPDATE SET dirty = 1, "
        "called_ae = excluded.called_ae, model = excluded.model, "
        "destinations = excluded.destinations, preview = excluded.preview, "
        "card = excluded.card, "
        "deadline_at = excluded.deadline_at, updated_at = excluded.updated_at",
        (
            study_uid,
            plan.rule,
            claim.called_ae,
            plan.model,
            json.dumps(plan.destinations),
            int(plan.preview),
            float(first),
            float(first) + claim.deadline_seconds,
            now,
            int(plan.card),
        ),
    )
    (instances,) = db.execute(
        "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ? AND purged = 0",
        (series_uid,),
    ).fetchone()
    db.execute(
        "INSERT OR REPLACE INTO study_members (study_instance_uid, rule, series_instance_uid, "
        "roles, order_values, instances, series_run, routed_at, hold_until, urgent) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            study_uid,
            plan.rule,
            series_uid,
            json.dumps(claim.roles),
            json.dumps([list(pair) for pair in claim.order_values]),
            int(instances),
            run,
            now,
            hold_until,
            int(plan.urgent),
        ),
    )


class _RolledBack(Exception):
    """Raised inside a transaction to roll it back on purpose (a dry run)."""


def _sop_digest(sop_instance_uid: str) -> bytes:
    return hashlib.blake2b(sop_instance_uid.encode(), digest_size=8).digest()


def _purged_shortfall(db: sqlite3.Connection, series_uid: str) -> int:
    """How many of the series' purged instances have not been received again."""
    row = db.execute(
        "SELECT purged_sops FROM series WHERE series_instance_uid = ? "
        "AND sources_purged_at IS NOT NULL",
        (series_uid,),
    ).fetchone()
    if row is None or not row[0]:
        return 0
    blob = bytes(row[0])
    purged = {blob[n : n + 8] for n in range(0, len(blob), 8)}
    back = {
        _sop_digest(str(r[0]))
        for r in db.execute(
            "SELECT sop_instance_uid FROM instances WHERE series_instance_uid = ? AND purged = 0",
            (series_uid,),
        )
    }
    return len(purged - back)


def _check_not_purged_under(db: sqlite3.Connection, record: InstanceRecord) -> None:
    """A file written while a purge of its series ran may have been deleted by it: where a
    purge touched the series, the file must still be there before it is acknowledged."""
    touched = db.execute(
        "SELECT 1 FROM series WHERE series_instance_uid = ? AND sources_purged_at IS NOT NULL",
        (record.series_instance_uid,),
    ).fetchone()
    if touched is not None and not record.path.exists():
        raise StorageError(
            f"{record.path.name} was removed by a purge of its series before it was indexed; "
            "not stored, send it again"
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _job_model(db: sqlite3.Connection, job_id: int) -> str:
    return str(db.execute("SELECT model FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


def _labels(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


def _label_pairs(encoded: object) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(str(encoded)).items())


def _count(db: sqlite3.Connection, name: str, labels: Mapping[str, str], by: float = 1.0) -> None:
    db.execute(
        "INSERT INTO counters (name, labels, value) VALUES (?, ?, ?) "
        "ON CONFLICT(name, labels) DO UPDATE SET value = value + excluded.value",
        (name, _labels(labels), by),
    )


def _observe(db: sqlite3.Connection, name: str, labels: Mapping[str, str], value: float) -> None:
    bounds = metrics.HISTOGRAMS[name].buckets
    key = _labels(labels)
    row = db.execute(
        "SELECT buckets FROM histograms WHERE name = ? AND labels = ?", (name, key)
    ).fetchone()
    buckets = [0] * (len(bounds) + 1) if row is None else json.loads(str(row[0]))
    buckets[bisect.bisect_left(bounds, value)] += 1  # the first bound >= value (le)
    db.execute(
        "INSERT INTO histograms (name, labels, buckets, count, sum) VALUES (?, ?, ?, 1, ?) "
        "ON CONFLICT(name, labels) DO UPDATE SET buckets = excluded.buckets, "
        "count = count + 1, sum = sum + excluded.sum",
        (name, key, json.dumps(buckets), value),
    )


def _event(
    db: sqlite3.Connection, kind: str, job_id: int | None, delivery_id: int | None = None
) -> None:
    """An event row for webhooks: UIDs, model, rule, state and timings; no patient data."""
    body: dict[str, object] = {"event": kind}
    if delivery_id is not None:
        d = db.execute(
            "SELECT job_id, destination, state, attempts, last_error FROM deliveries WHERE id = ?",
            (delivery_id,),
        ).fetchone()
        job_id = int(d["job_id"])
        body["delivery"] = {
            "id": delivery_id,
            "destination": d["destination"],
            "state": d["state"],
            "attempts": d["attempts"],
            "error": d["last_error"],
        }
    j = db.execute(
        "SELECT j.id, j.series_instance_uid, s.study_instance_uid, j.run, j.rule, j.model, "
        "j.state, j.attempts, j.error, j.created_at, j.started_at, j.finished_at, j.stages, "
        "j.inputs, j.priority "
        "FROM jobs j JOIN series s ON s.series_instance_uid = j.series_instance_uid "
        "WHERE j.id = ?",
        (job_id,),
    ).fetchone()
    now = time.time()
    body.update(
        study_instance_uid=j["study_instance_uid"],
        series_instance_uid=j["series_instance_uid"],
        job={
            "id": j["id"],
            "state": j["state"],
            "model": j["model"],
            "rule": j["rule"],
            "run": j["run"],
            "attempts": j["attempts"],
            "error": j["error"],
            "created_at": j["created_at"],
            "started_at": j["started_at"],
            "finished_at": j["finished_at"],
            "stages": json.loads(j["stages"]) if j["stages"] else {},
            "urgent": bool(j["priority"]),
        },
        created_at=now,
    )
    if j["inputs"]:  # a study job: the series it read, by role
        inputs = json.loads(j["inputs"])
        body["job"]["roles"] = dict(inputs["roles"])  # type: ignore[index]
    db.execute(
        "INSERT INTO events (kind, body, created_at) VALUES (?, ?, ?)",
        (kind, json.dumps(body), now),
    )


def _series_state(db: sqlite3.Connection, series_uid: str) -> SeriesState | None:
    row = db.execute(
        "SELECT dirty FROM series WHERE series_instance_uid = ?", (series_uid,)
    ).fetchone()
    if row is None:
        return None
    return SeriesState.PENDING if row["dirty"] else SeriesState.ROUTED


def _job(row: sqlite3.Row) -> JobRecord:
    inputs = json.loads(str(row["inputs"])) if row["inputs"] else {}
    return JobRecord(
        id=int(row["id"]),
        series_instance_uid=str(row["series_instance_uid"]),
        run=int(row["run"]),
        rule=str(row["rule"]),
        model=str(row["model"]),
        destinations=tuple(json.loads(str(row["destinations"]))),
        state=JobState(row["state"]),
        attempts=int(row["attempts"]),
        error=None if row["error"] is None else str(row["error"]),
        preview=bool(row["preview"]),
        priority=int(row["priority"]),
        study_instance_uid=row["study_instance_uid"],
        roles=tuple((str(role), uid) for role, uid in inputs.get("roles", ())),
        reference_role=inputs.get("reference"),
        role_input=str(inputs.get("input", "channels")),
        card=bool(row["card"]),
        ran_on=row["ran_on"],
    )


def _study_subject(study_uid: str, rule: str) -> str:
    return f"study/{study_uid}/{rule}"


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        id=int(row["id"]),
        job_id=int(row["job_id"]),
        destination=str(row["destination"]),
        files=tuple(Path(p) for p in json.loads(str(row["files"]))),
        state=DeliveryState(row["state"]),
        attempts=int(row["attempts"]),
        last_error=None if row["last_error"] is None else str(row["last_error"]),
    )
