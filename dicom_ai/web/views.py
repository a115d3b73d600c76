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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_ai.errors import BadRequest, ConfigError
from dicom_ai.routing import RuleSet, load_rules
from dicom_ai.routing.rules import Study
from dicom_ai.routing.studies import select_roles
from dicom_ai.store.index import StudyMember
from dicom_ai.store.states import DeliveryState, JobState, SeriesState

__all__ = ["STUDY_STATES", "ConsoleView", "Page", "SeriesFilter", "study_state"]

# A study rule's study (index.py's ``studies.state``).
STUDY_STATES = ("waiting", "overdue", "started", "failed", "dropped")


def study_state(value: str | None) -> str | None:
    """A study state to filter by (None: any); `BadRequest` naming the states otherwise."""
    if value is None or value == "":
        return None
    if value not in STUDY_STATES:
        raise BadRequest(f"state {value[:30]!r}: one of {', '.join(sorted(STUDY_STATES))}")
    return value


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
    inputs = json.loads(row["inputs"]) if row["inputs"] else {}
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
        "priority": row["priority"],
        "urgent": row["priority"] == 1,
        # The Ray cluster node of its last attempt, "<node id> (<address>)"; None: here.
        "ran_on": row["ran_on"],
        # A study job: its study, and each role's series (None: an optional role that
        # did not come) in the rule's order; its series_instance_uid is the reference's.
        "study_instance_uid": row["study_instance_uid"],
        "reference_role": inputs.get("reference"),
        "role_input": inputs.get("input"),
        "roles": [
            {"role": role, "series_instance_uid": uid} for role, uid in inputs.get("roles", ())
        ],
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
    # The series' own jobs: a study job's run is the study's (studies_page shows those).
    " (SELECT GROUP_CONCAT(j.state) FROM jobs j"
    "  WHERE j.series_instance_uid = s.series_instance_uid AND j.run = s.runs"
    "  AND j.study_instance_uid IS NULL) AS job_states"
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


def _member(row: sqlite3.Row) -> StudyMember:
    return StudyMember(
        series_instance_uid=str(row["series_instance_uid"]),
        roles=tuple(json.loads(str(row["roles"]))),
        order_values=tuple((str(k), str(v)) for k, v in json.loads(str(row["order_values"]))),
        instances=int(row["instances"]),
        series_run=int(row["series_run"]),
        routed_at=float(row["routed_at"]),
        hold_until=None if row["hold_until"] is None else float(row["hold_until"]),
        urgent=bool(row["urgent"]),
        purged=bool(row["purged"]),
    )


Roles = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]


def _roles(
    state: str, rule: Study | None, members: Sequence[StudyMember], last_job: dict[str, Any] | None
) -> Roles:
    """(roles found, roles missing or None when unknown, where they come from)."""
    required = {role.name: role.required for role in rule.roles} if rule is not None else {}
    if state == "started" and last_job is not None and last_job["roles"]:
        # What the running (or last) job was given; a started job lacks only optional roles.
        pairs = last_job["roles"]
        return (
            [p for p in pairs if p["series_instance_uid"] is not None],
            [
                {"role": p["role"], "required": required.get(p["role"], False)}
                for p in pairs
                if p["series_instance_uid"] is None
            ],
            "last job",
        )
    if rule is not None:
        # The scheduler's own selection (routing/studies.py) under the running rules.
        selection = select_roles(rule, members)
        return (
            [
                {"role": role, "series_instance_uid": member.series_instance_uid}
                for role, member in selection.chosen
                if member is not None
            ],
            [
                {"role": role, "required": role in selection.missing_required}
                for role, member in selection.chosen
                if member is None
            ],
            "rule",
        )
    # The rule is gone or its file does not load: the roles the members can fill (the
    # latest member for each); what is missing only the note says.
    latest: dict[str, str] = {}
    for member in sorted(members, key=lambda m: m.routed_at):
        for role in member.roles:
            if not member.purged:
                latest[role] = member.series_instance_uid
    return (
        [{"role": role, "series_instance_uid": uid} for role, uid in latest.items()],
        None,
        "members",
    )


class ConsoleView:
    """Read-only queries on the index at ``path`` for the console's pages and API."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        # rules file -> ((mtime, size), its rules or None when they do not load)
        self._rule_files: dict[Path, tuple[tuple[int, int], RuleSet | None]] = {}

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
        # Its own jobs and the jobs of the studies it is a member of (through the
        # jobs_subject index: a study job's subject is "study/<study UID>/<rule>").
        jobs = [
            _job(r)
            for r in self._query(
                "SELECT * FROM jobs WHERE series_instance_uid = ? UNION"
                " SELECT j.* FROM study_members m JOIN jobs j"
                " ON j.subject = 'study/' || m.study_instance_uid || '/' || m.rule"
                " WHERE m.series_instance_uid = ? ORDER BY id",
                (uid, uid),
            )
        ]
        job_ids = [int(job["id"]) for job in jobs]
        deliveries = self._query(
            "SELECT d.* FROM deliveries d WHERE d.job_id IN (SELECT value FROM json_each(?))"
            " ORDER BY d.id",
            (json.dumps(job_ids),),
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

    # -- studies -----------------------------------------------------------------------------

    def studies_page(
        self,
        state: str | None,
        page: int,
        per_page: int,
        rule_files: Mapping[str, Path] | None = None,
        now: float | None = None,
    ) -> Page:
        """Study rules' studies, newest first (by first instance received): state, runs,
        the deadline, roles found and missing, members and jobs. ``rule_files`` (called
        AE -> rules file) tell which roles each rule asks for; a study whose rule is not
        there shows the roles of its last job or its members, and its note."""
        condition, args = ("WHERE state = ?", [state]) if state else ("", [])
        (total,) = self._query(f"SELECT COUNT(*) FROM studies {condition}", args)[0]
        rows = self._query(
            f"SELECT * FROM studies {condition}"
            " ORDER BY first_received DESC, study_instance_uid, rule LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page],
        )
        rules = self._study_rules(rule_files or {})
        at = time.time() if now is None else now
        return Page([self._study(r, rules, at) for r in rows], page, per_page, int(total))

    def _study(
        self, row: sqlite3.Row, rules: Mapping[tuple[str, str], Study], now: float
    ) -> dict[str, Any]:
        study_uid, rule = str(row["study_instance_uid"]), str(row["rule"])
        members = [
            _member(m)
            for m in self._query(
                "SELECT m.*, COALESCE(s.sources_purged_at IS NOT NULL AND s.has_sources = 0, 0)"
                " AS purged FROM study_members m LEFT JOIN series s"
                " ON s.series_instance_uid = m.series_instance_uid"
                " WHERE m.study_instance_uid = ? AND m.rule = ? ORDER BY m.routed_at",
                (study_uid, rule),
            )
        ]
        # index.py's subject of a study's jobs (its runs count and supersede on it).
        jobs = [
            _job(j)
            for j in self._query(
                "SELECT * FROM jobs WHERE subject = ? ORDER BY id DESC LIMIT 20",
                (f"study/{study_uid}/{rule}",),
            )
        ]
        state = str(row["state"])
        found, missing, source = _roles(
            state, rules.get((str(row["called_ae"]), rule)), members, jobs[0] if jobs else None
        )
        deadline_at = float(row["deadline_at"])
        return {
            "study_instance_uid": study_uid,
            "rule": rule,
            "called_ae": row["called_ae"],
            "model": row["model"],
            "destinations": json.loads(row["destinations"]),
            "state": state,
            "runs": row["runs"],
            "urgent": any(m.urgent for m in members),
            "first_received": row["first_received"],
            "deadline_at": deadline_at,
            "deadline_in_seconds": round(deadline_at - now, 1),
            "deadline_passed": now >= deadline_at,
            "note": row["note"],
            "updated_at": row["updated_at"],
            "roles_found": found,
            "roles_missing": missing,
            "roles_from": source,
            "members": [
                {
                    "series_instance_uid": m.series_instance_uid,
                    "roles": list(m.roles),
                    "instances": m.instances,
                    "series_run": m.series_run,
                    "routed_at": m.routed_at,
                    "hold_until": m.hold_until,
                    "urgent": m.urgent,
                    "purged": m.purged,
                }
                for m in members
            ],
            "jobs": jobs,
        }

    def _study_rules(self, files: Mapping[str, Path]) -> dict[tuple[str, str], Study]:
        """(called AE, rule name) -> the rule's study block, for each study rule."""
        found: dict[tuple[str, str], Study] = {}
        for called_ae, path in files.items():
            rules = self._rules(path)
            for rule in rules.rules if rules is not None else ():
                if rule.study is not None:
                    found[(called_ae, rule.name)] = rule.study
        return found

    def _rules(self, path: Path) -> RuleSet | None:
        """The rules file at ``path``, parsed again only when it changed (pages poll)."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._rule_files.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            rules: RuleSet | None = load_rules(path)
        except (ConfigError, OSError):
            rules = None
        self._rule_files[path] = (key, rules)
        return rules

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
        studies = {
            str(r[0]): int(r[1])
            for r in self._query("SELECT state, COUNT(*) FROM studies GROUP BY state")
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
            "studies": {state: studies.get(state, 0) for state in STUDY_STATES},
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
