"""SQLite (WAL) index: instances, series, associations, jobs, deliveries.

The index is the state machine's memory: every state a series, job or delivery can be in is a
row here, so a restart (also after ``kill -9``) resumes exactly where the node stopped.

    series:   dirty (instances since the last run) -> run started (jobs created) -> dirty again ...
    job:      pending -> running -> done | failed          (running -> pending on restart)
    delivery: pending -> delivered | dead                  (dead -> pending on resubmit)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_ai.errors import OutOfSpaceError

__all__ = [
    "DeliveryRecord",
    "Index",
    "InstanceRecord",
    "JobRecord",
    "PendingSeries",
    "RunPlan",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY,
    calling_ae TEXT NOT NULL, called_ae TEXT NOT NULL, source_ip TEXT NOT NULL,
    opened_at REAL NOT NULL, closed_at REAL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, path TEXT NOT NULL,
    association_id INTEGER NOT NULL, received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL, modality TEXT NOT NULL,
    first_received REAL NOT NULL, last_received REAL NOT NULL,
    dirty INTEGER NOT NULL, runs INTEGER NOT NULL DEFAULT 0,
    last_association_id INTEGER NOT NULL, routed_note TEXT
);
CREATE TABLE IF NOT EXISTS series_associations (
    series_instance_uid TEXT NOT NULL, association_id INTEGER NOT NULL,
    PRIMARY KEY (series_instance_uid, association_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_instance_uid TEXT NOT NULL, run INTEGER NOT NULL, rule TEXT NOT NULL,
    model TEXT NOT NULL, destinations TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    result_files TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    preview INTEGER NOT NULL DEFAULT 0, hold_until REAL,
    UNIQUE (series_instance_uid, run, rule)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL, destination TEXT NOT NULL, files TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, last_error TEXT, delivered_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_attempt_at);
"""


_JOB_COLUMNS = (
    "SELECT id, series_instance_uid, run, rule, model, destinations, state, attempts, error, "
    "preview "
    "FROM jobs"
)


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    path: Path
    association_id: int


@dataclass(frozen=True)
class PendingSeries:
    """A series with instances not yet part of a run, and what assembly needs to decide."""

    series_instance_uid: str
    last_received: float
    open_associations: int
    last_closed_at: float | None
    batch_associations: int = 1  # associations that delivered the batch
    batch_instances: int = 0  # instances they delivered


@dataclass(frozen=True)
class RunPlan:
    """One job to create for a series run (a matched rule)."""

    rule: str
    model: str
    destinations: tuple[str, ...]
    preview: bool = False  # also make a Secondary Capture preview of a segmentation


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_instance_uid: str
    run: int
    rule: str
    model: str
    destinations: tuple[str, ...]
    state: str
    attempts: int
    error: str | None
    preview: bool = False


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    job_id: int
    destination: str
    files: tuple[Path, ...]
    state: str
    attempts: int
    last_error: str | None


class Index:
    """Thread-safe access to the node's SQLite index (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._commits = 0  # this connection's; other connections' show in data_version
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a process crash (kill -9) but not power loss; the
        # instance file itself is fsynced before Success, and `unindexed` finds files a
        # power loss took out of the index, so nothing acknowledged is lost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_column("jobs", "preview", "INTEGER NOT NULL DEFAULT 0")
        self._add_column("jobs", "hold_until", "REAL")

    def _add_column(self, table: str, column: str, declaration: str) -> None:
        """Bring an index written by an older version up to the current schema."""
        with self._tx() as db:  # BEGIN IMMEDIATE: a second process opening it waits
            columns = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
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

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

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

    def close_stale_associations(self) -> None:
        """On start: no association of an earlier process is still open."""
        with self._tx() as db:
            db.execute(
                "UPDATE associations SET closed_at = ? WHERE closed_at IS NULL", (time.time(),)
            )

    def unindexed(self, paths: Sequence[Path]) -> list[Path]:
        """Those of ``paths`` that no instance row points to."""
        known = {str(r[0]) for r in self._query("SELECT path FROM instances")}
        return [p for p in paths if str(p) not in known]

    def add_instance(self, record: InstanceRecord) -> None:
        """Index a durable instance file; the series becomes due for a (new) run."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.sop_instance_uid,
                    record.series_instance_uid,
                    record.study_instance_uid,
                    record.sop_class_uid,
                    str(record.path),
                    record.association_id,
                    now,
                ),
            )
            db.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality, "
                "first_received, last_received, dirty, last_association_id) "
                "VALUES (?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT(series_instance_uid) DO UPDATE SET "
                "last_received = excluded.last_received, dirty = 1, "
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
                "INSERT OR IGNORE INTO series_associations VALUES (?, ?)",
                (record.series_instance_uid, record.association_id),
            )

    # -- assembly and routing ----------------------------------------------------------------

    def pending_series(self) -> list[PendingSeries]:
        rows = self._query(
            "SELECT s.series_instance_uid, s.last_received, "
            "  SUM(CASE WHEN a.closed_at IS NULL THEN 1 ELSE 0 END), MAX(a.closed_at), "
            "  COUNT(*), (SELECT COUNT(*) FROM instances i "
            "    WHERE i.series_instance_uid = s.series_instance_uid AND i.association_id IN "
            "    (SELECT association_id FROM series_associations "
            "     WHERE series_instance_uid = s.series_instance_uid)) "
            "FROM series s "
            "JOIN series_associations sa ON sa.series_instance_uid = s.series_instance_uid "
            "JOIN associations a ON a.id = sa.association_id "
            "WHERE s.dirty = 1 GROUP BY s.series_instance_uid"
        )
        return [
            PendingSeries(
                str(r[0]),
                float(r[1]),
                int(r[2]),
                None if r[3] is None else float(r[3]),
                int(r[4]),
                int(r[5]),
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
        return [Path(str(r[0])) for r in rows]

    def series_senders(self, series_uid: str) -> list[tuple[str, str, str]]:
        """(calling AE, called AE, source IP) of each association that delivered the series'
        current batch, first come first; the last association's when the batch has none."""
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
        return [(str(c), str(d), str(ip)) for c, d, ip in rows]

    def series_last_association(self, series_uid: str) -> int | None:
        rows = self._query(
            "SELECT last_association_id FROM series WHERE series_instance_uid = ?", (series_uid,)
        )
        return int(rows[0][0]) if rows else None

    def start_run(
        self,
        series_uid: str,
        plans: Sequence[RunPlan],
        note: str,
        hold_until: float | None = None,
    ) -> list[int]:
        """Close the series' current batch of instances into a run with one job per plan.

        ``hold_until``: the run starts before the series is known complete (speculatively);
        its results go out only from that time on, and only if no instance came since and
        no later run started (``due_deliveries``). A new run supersedes the held results of
        earlier ones.
        """
        now = time.time()
        with self._tx() as db:
            (runs,) = db.execute(
                "SELECT runs FROM series WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()
            run = int(runs) + 1
            db.execute(
                "UPDATE series SET dirty = 0, runs = ?, routed_note = ? "
                "WHERE series_instance_uid = ?",
                (run, note, series_uid),
            )
            db.execute(
                "DELETE FROM series_associations WHERE series_instance_uid = ?", (series_uid,)
            )
            db.execute(
                "UPDATE deliveries SET state = 'superseded', last_error = ? "
                "WHERE state = 'pending' AND job_id IN (SELECT id FROM jobs "
                "WHERE series_instance_uid = ? AND run < ? AND hold_until IS NOT NULL)",
                (f"held, then superseded by run {run}", series_uid, run),
            )
            job_ids = []
            for plan in plans:
                cur = db.execute(
                    "INSERT INTO jobs (series_instance_uid, run, rule, model, destinations, state, "
                    "created_at, updated_at, preview, hold_until) "
                    "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                    (
                        series_uid,
                        run,
                        plan.rule,
                        plan.model,
                        json.dumps(plan.destinations),
                        now,
                        now,
                        int(plan.preview),
                        hold_until,
                    ),
                )
                job_ids.append(int(cur.lastrowid or 0))
            return job_ids

    # -- jobs --------------------------------------------------------------------------------

    def requeue_running_jobs(self) -> int:
        """On start: a job that was running when the node stopped runs again."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'pending', updated_at = ? WHERE state = 'running'",
                (time.time(),),
            )
            return cur.rowcount

    def claim_pending_jobs(self, limit: int) -> list[JobRecord]:
        """Move up to ``limit`` pending jobs (oldest first) to running and return them."""
        if limit <= 0:
            return []
        with self._tx() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            ids = [int(r[0]) for r in rows]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? "
                    "WHERE id = ?",
                    (time.time(), job_id),
                )
        return [self.job(job_id) for job_id in ids]

    def job(self, job_id: int) -> JobRecord:
        rows = self._query(
            _JOB_COLUMNS + " WHERE id = ?",
            (job_id,),
        )
        return _job(rows[0])

    def jobs(self, state: str | None = None) -> list[JobRecord]:
        sql = _JOB_COLUMNS
        rows = (
            self._query(sql + " WHERE state = ? ORDER BY id", (state,))
            if state
            else self._query(sql + " ORDER BY id")
        )
        return [_job(r) for r in rows]

    def finish_job(self, job_id: int, files: Sequence[Path], destinations: Sequence[str]) -> None:
        """Record a job's result files and queue one delivery per destination, atomically.

        Results of one series and model share their UIDs, so the last delivered one is what
        the PACS keeps. A run must never overwrite a later run's results: finishing a job
        supersedes the undelivered deliveries of earlier runs (a delivery backing off after
        a failure would otherwise go out after this one), and a job that finishes after a
        later run's job has its deliveries superseded at once.
        """
        now = time.time()
        encoded = json.dumps([str(f) for f in files])
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'done', result_files = ?, error = NULL, updated_at = ? "
                "WHERE id = ?",
                (encoded, now, job_id),
            )
            series_uid, model, run, held = db.execute(
                "SELECT series_instance_uid, model, run, hold_until IS NOT NULL FROM jobs "
                "WHERE id = ?",
                (job_id,),
            ).fetchone()
            later = db.execute(
                "SELECT MAX(run) FROM jobs WHERE series_instance_uid = ? AND model = ? "
                "AND run > ? AND (state = 'done' OR ?)",
                # Held results of a run that a later run has replaced never go out.
                (series_uid, model, run, bool(held)),
            ).fetchone()[0]
            for destination in destinations:
                db.execute(
                    "INSERT OR REPLACE INTO deliveries (job_id, destination, files, state, "
                    "attempts, next_attempt_at, last_error) VALUES (?, ?, ?, ?, 0, ?, ?)",
                    (
                        job_id,
                        destination,
                        encoded,
                        "pending" if later is None else "superseded",
                        now,
                        None if later is None else f"superseded by run {later}",
                    ),
                )
                if later is None:
                    db.execute(
                        "UPDATE deliveries SET state = 'superseded', last_error = ? "
                        "WHERE destination = ? AND state IN ('pending', 'dead') AND job_id IN "
                        "(SELECT id FROM jobs WHERE series_instance_uid = ? AND model = ? "
                        "AND run < ?)",
                        (f"superseded by run {run}", destination, series_uid, model, run),
                    )

    def fail_job(self, job_id: int, reason: str, retry: bool) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                ("pending" if retry else "failed", reason, time.time(), job_id),
            )

    # -- deliveries --------------------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DeliveryRecord]:
        rows = self._query(
            "SELECT d.id, d.job_id, d.destination, d.files, d.state, d.attempts, d.last_error "
            "FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "JOIN series s ON s.series_instance_uid = j.series_instance_uid "
            "WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND (j.hold_until IS NULL "
            "  OR (j.hold_until <= ? AND s.dirty = 0 AND s.runs = j.run)) "
            "ORDER BY d.next_attempt_at",
            (now, now),
        )
        return [_delivery(r) for r in rows]

    def deliveries(self, state: str | None = None) -> list[DeliveryRecord]:
        sql = "SELECT id, job_id, destination, files, state, attempts, last_error FROM deliveries"
        rows = (
            self._query(sql + " WHERE state = ? ORDER BY id", (state,))
            if state
            else self._query(sql + " ORDER BY id")
        )
        return [_delivery(r) for r in rows]

    def delivery_succeeded(self, delivery_id: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, "
                "delivered_at = ?, last_error = NULL WHERE id = ?",
                (time.time(), delivery_id),
            )

    def delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt; ``None`` for the next attempt parks it as dead letter."""
        with self._tx() as db:
            db.execute(
                # A delivery superseded while it was being sent stays superseded.
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ? WHERE id = ? AND state = 'pending'",
                (
                    "dead" if next_attempt_at is None else "pending",
                    error,
                    next_attempt_at or 0.0,
                    delivery_id,
                ),
            )

    def resubmit_dead(self) -> int:
        """Dead letters go back to pending with a fresh attempt budget."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ? "
                "WHERE state = 'dead'",
                (time.time(),),
            )
            return cur.rowcount

    # -- status ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for table in ("instances", "series"):
            out[table] = int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])
        for table in ("jobs", "deliveries"):
            for state, n in self._query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state"):
                out[f"{table}.{state}"] = int(n)
        return out


def _job(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        id=int(row[0]),
        series_instance_uid=str(row[1]),
        run=int(row[2]),
        rule=str(row[3]),
        model=str(row[4]),
        destinations=tuple(json.loads(str(row[5]))),
        state=str(row[6]),
        attempts=int(row[7]),
        error=None if row[8] is None else str(row[8]),
        preview=bool(row[9]),
    )


def _delivery(row: tuple[Any, ...]) -> DeliveryRecord:
    return DeliveryRecord(
        id=int(row[0]),
        job_id=int(row[1]),
        destination=str(row[2]),
        files=tuple(Path(p) for p in json.loads(str(row[3]))),
        state=str(row[4]),
        attempts=int(row[5]),
        last_error=None if row[6] is None else str(row[6]),
    )
