"""What the console shows, read from the index on a read-only connection of its own.

The node writes the index; the console only reads it here (its few actions go through
`Index`, which checks every state move). Queries are shaped for 100,000 series and more:
series are listed newest first through ``series_last_received``, a page at a time.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_ai.store.states import DeliveryState, JobState, SeriesState

__all__ = ["ConsoleView", "Page", "SeriesFilter"]


@dataclass(frozen=True)
class SeriesFilter:
    state: SeriesState | None = None
    modality: str | None = None
    since: float | None = None  # last received at or after (epoch seconds)


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    page: int
    per_page: int
    total: int

    def as_json(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "page": self.page,
            "per_page": self.per_page,
            "total": self.total,
            "pages": max(1, -(-self.total // self.per_page)),
        }


def _job(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "series_instance_uid": row["series_instance_uid"],
        "run": row["run"],
        "rule": row["rule"],
        "model": row["model"],
        "destinations": json.loads(row["destinations"]),
        "state": row["state"],
        "attempts": row["attempts"],
        "error": row["error"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "stages": json.loads(row["stages"]) if row["stages"] else {},
        "results_purged_at": row["results_purged_at"],
    }


def _delivery(row: sqlite3.Row) -> dict[str, Any]:
    state = row["state"]
    return {
        "id": row["id"],
        "job_id": row["job_id"],
        "destination": row["destination"],
        # The API says dead_letter, as the metrics and webhooks do.
        "state": "dead_letter" if state == DeliveryState.DEAD.value else state,
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "next_attempt_at": row["next_attempt_at"],
        "delivered_at": row["delivered_at"],
        "files": len(json.loads(row["files"])),
    }


_SERIES = (
    "SELECT s.series_instance_uid, s.study_instance_uid, s.modality, s.first_received,"
    " s.last_received, s.dirty, s.runs, s.routed_note, s.sources_purged_at,"
    " s.purged_instances,"
    " (SELECT COUNT(*) FROM instances i WHERE i.series_instance_uid = s.series_instance_uid)"
    "  AS instances,"
    " (SELECT GROUP_CONCAT(j.state) FROM jobs j"
    "  WHERE j.series_instance_uid = s.series_instance_uid AND j.run = s.runs) AS job_states"
    " FROM series s"
)


def _series(row: sqlite3.Row) -> dict[str, Any]:
    states = str(row["job_states"] or "").split(",") if row["job_states"] else []
    return {
        "series_instance_uid": row["series_instance_uid"],
        "study_instance_uid": row["study_instance_uid"],
        "modality": row["modality"],
        "first_received": row["first_received"],
        "last_received": row["last_received"],
        "state": SeriesState.PENDING.value if row["dirty"] else SeriesState.ROUTED.value,
        "runs": row["runs"],
        "instances": row["instances"],
        "routing": row["routed_note"],
        "jobs": {s: states.count(s) for s in sorted(set(states))},
        "sources_purged_at": row["sources_purged_at"],
        "purged_instances": row["purged_instances"],
    }


class ConsoleView:
    """Read-only queries on the index at ``path`` for the console's pages and API."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._db is None:  # the node may create the index after the console starts
                self._db = sqlite3.connect(
                    f"file:{self._path}?mode=ro", uri=True, check_same_thread=False, timeout=30
                )
                self._db.row_factory = sqlite3.Row
            return self._db.execute(sql, args).fetchall()

    def schema_version(self) -> int:
        """The index's migration count: a cheap read that the index is there and readable."""
        return int(self._query("PRAGMA user_version")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- series ------------------------------------------------------------------------------

    def series_page(self, where: SeriesFilter, page: int, per_page: int) -> Page:
        clauses: list[str] = []
        args: list[object] = []
        if where.state is not None:
            clauses.append("s.dirty = ?")
            args.append(1 if where.state is SeriesState.PENDING else 0)
        if where.modality is not None:
            clauses.append("s.modality = ?")
            args.append(where.modality)
        if where.since is not None:
            clauses.append("s.last_received >= ?")
            args.append(where.since)
        condition = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        (total,) = self._query(f"SELECT COUNT(*) FROM series s{condition}", args)[0]
        rows = self._query(
            f"{_SERIES}{condition} ORDER BY s.last_received DESC LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page],
        )
        return Page([_series(r) for r in rows], page, per_page, int(total))

    def series(self, uid: str) -> dict[str, Any] | None:
        rows = self._query(f"{_SERIES} WHERE s.series_instance_uid = ?", (uid,))
        if not rows:
            return None
        out = _series(rows[0])
        out["instance_list"] = [
            {
                "sop_instance_uid": r["sop_instance_uid"],
                "sop_class_uid": r["sop_class_uid"],
                "received_at": r["received_at"],
                "association_id": r["association_id"],
                "calling_ae": r["calling_ae"],
            }
            for r in self._query(
                "SELECT i.sop_instance_uid, i.sop_class_uid, i.received_at, i.association_id,"
                " a.calling_ae FROM instances i LEFT JOIN associations a"
                " ON a.id = i.association_id WHERE i.series_instance_uid = ?"
                " ORDER BY i.received_at LIMIT 5000",
                (uid,),
            )
        ]
        jobs = [
            _job(r)
            for r in self._query(
                "SELECT * FROM jobs WHERE series_instance_uid = ? ORDER BY id", (uid,)
            )
        ]
        deliveries = self._query(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id"
            " WHERE j.series_instance_uid = ? ORDER BY d.id",
            (uid,),
        )
        by_job: dict[int, list[dict[str, Any]]] = {}
        for row in deliveries:
            delivery = _delivery(row)
            delivery["attempt_list"] = [
                {"at": a["at"], "ok": bool(a["ok"]), "error": a["error"]}
                for a in self._query(
                    "SELECT at, ok, error FROM delivery_attempts WHERE delivery_id = ? ORDER BY id",
                    (row["id"],),
                )
            ]
            by_job.setdefault(int(row["job_id"]), []).append(delivery)
        for job in jobs:
            job["deliveries"] = by_job.get(int(job["id"]), [])
        out["job_list"] = jobs
        return out

    def first_instance_path(self, uid: str) -> Path | None:
        rows = self._query(
            "SELECT path FROM instances WHERE series_instance_uid = ? ORDER BY received_at LIMIT 1",
            (uid,),
        )
        return Path(str(rows[0][0])) if rows else None

    def recent_series(self, count: int) -> list[tuple[str, str]]:
        """The last ``count`` series received: (series UID, path of its last instance)."""
        rows = self._query(
            "SELECT s.series_instance_uid, (SELECT path FROM instances i"
            "  WHERE i.series_instance_uid = s.series_instance_uid"
            "  ORDER BY received_at DESC LIMIT 1) AS path"
            " FROM series s ORDER BY s.last_received DESC LIMIT ?",
            (count,),
        )
        return [(str(r[0]), str(r[1])) for r in rows if r[1] is not None]

    def series_senders(self, uid: str) -> list[tuple[str, str, str]]:
        rows = self._query(
            "SELECT DISTINCT a.calling_ae, a.called_ae, a.source_ip FROM instances i"
            " JOIN associations a ON a.id = i.association_id"
            " WHERE i.series_instance_uid = ? ORDER BY a.id",
            (uid,),
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    # -- jobs and deliveries -----------------------------------------------------------------

    def jobs_page(self, state: JobState | None, page: int, per_page: int) -> Page:
        condition, args = ("WHERE state = ?", [state.value]) if state else ("", [])
        (total,) = self._query(f"SELECT COUNT(*) FROM jobs {condition}", args)[0]
        rows = self._query(
            f"SELECT * FROM jobs {condition} ORDER BY id DESC LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page],
        )
        return Page([_job(r) for r in rows], page, per_page, int(total))

    def job(self, job_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def deliveries_page(self, state: DeliveryState | None, page: int, per_page: int) -> Page:
        condition, args = ("WHERE state = ?", [state.value]) if state else ("", [])
        (total,) = self._query(f"SELECT COUNT(*) FROM deliveries {condition}", args)[0]
        rows = self._query(
            f"SELECT * FROM deliveries {condition} ORDER BY id DESC LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page],
        )
        items = [_delivery(r) for r in rows]
        for item in items:
            job = self.job(int(item["job_id"]))
            item["series_instance_uid"] = job["series_instance_uid"] if job else None
            item["model"] = job["model"] if job else None
        return Page(items, page, per_page, int(total))

    def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return _delivery(rows[0]) if rows else None

    # -- models and the dashboard ------------------------------------------------------------

    def model_checks(self) -> dict[str, dict[str, Any]]:
        return {
            str(r["model"]): {
                "state": r["state"],
                "verdict": r["verdict"],
                "checked_at": r["checked_at"],
            }
            for r in self._query("SELECT model, state, verdict, checked_at FROM model_checks")
        }

    def dashboard(self, hours: int = 24) -> dict[str, Any]:
        now = time.time()
        first_hour = int(now // 3600) - hours + 1
        per_hour = {
            int(r[0]): int(r[1])
            for r in self._query(
                "SELECT hour, instances FROM received_hourly WHERE hour >= ?", (first_hour,)
            )
        }
        jobs = {
            str(r[0]): int(r[1])
            for r in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        }
        deliveries = {
            str(r[0]): int(r[1])
            for r in self._query("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        }
        latencies: dict[str, list[float]] = {}
        for row in self._query(
            "SELECT j.model, d.delivered_at - s.last_received FROM deliveries d"
            " JOIN jobs j ON j.id = d.job_id"
            " JOIN series s ON s.series_instance_uid = j.series_instance_uid"
            " WHERE d.state = ? AND d.delivered_at >= ?",
            (DeliveryState.DELIVERED.value, now - hours * 3600),
        ):
            latencies.setdefault(str(row[0]), []).append(float(row[1]))
        return {
            "received_per_hour": [
                {"hour": (first_hour + n) * 3600, "instances": per_hour.get(first_hour + n, 0)}
                for n in range(hours)
            ],
            "jobs": jobs,
            "queue": {"pending": jobs.get("pending", 0), "running": jobs.get("running", 0)},
            "failed_jobs": jobs.get("failed", 0),
            "dead_letters": deliveries.get(DeliveryState.DEAD.value, 0),
            "deliveries": {
                ("dead_letter" if k == DeliveryState.DEAD.value else k): v
                for k, v in deliveries.items()
            },
            "latency": {
                model: {
                    "count": len(values),
                    "p50": _quantile(values, 0.5),
                    "p95": _quantile(values, 0.95),
                }
                for model, values in sorted(latencies.items())
            },
        }


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(q * 100) - 1]
