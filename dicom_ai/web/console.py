"""What the console can do, whoever asks (a page or the REST API): one method per use case.

Every parameter is validated here (a bad UID, page or state is a `BadRequest` naming it),
every permission checked (`Forbidden`), every action and every view of patient data
written to the audit log. The routes in ``api.py`` and ``pages.py`` only translate HTTP.
"""

from __future__ import annotations

import io
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_ai import __version__
from dicom_ai.config import Config, DicomDestination, DicomWebDestination
from dicom_ai.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    DeliveryError,
    Forbidden,
    NotAuthenticated,
    NotFound,
    TooManyRequests,
)
from dicom_ai.routing import Condition, RuleSet, SenderContext, load_rules, parse_rules
from dicom_ai.routing.engine import PHI_KEYWORDS
from dicom_ai.routing.replay import replay
from dicom_ai.store.index import Index
from dicom_ai.store.states import DeliveryState, JobState, SeriesState
from dicom_ai.web.accounts import Accounts, AccountsError, Role, Session, User, may
from dicom_ai.web.isolated import IsolatedError, run_isolated
from dicom_ai.web.views import ConsoleView, Page, SeriesFilter

__all__ = ["Actor", "Console"]

log = logging.getLogger(__name__)

# Used with fullmatch: a "$" would let a final newline through.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_MODALITY = re.compile(r"[A-Z0-9 _]{1,16}")
_DESTINATION = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5 AE: no backslash, no control
MAX_PER_PAGE = 500
MAX_PAGE = 10**7
MAX_ID = 2**63 - 1  # SQLite's INTEGER
MAX_REPLAY = 1000
MAX_UPLOAD = 64 << 20
REPLAY_SECONDS = 30.0  # the evaluation of a candidate rules file, in its own process


@dataclass(frozen=True)
class Actor:
    """Who asks, and from where (for the audit log)."""

    user: User
    address: str

    def require(self, permission: str) -> None:
        if not may(self.user.role, permission):
            raise Forbidden(f"role {self.user.role.value} may not do this ({permission})")


def uid(value: str, what: str = "UID") -> str:
    if len(value) > 64 or not _UID.fullmatch(value):
        raise BadRequest(f"{what} {value[:70]!r} is not a DICOM UID")
    return value


def page_args(page: int, per_page: int) -> tuple[int, int]:
    if not 1 <= page <= MAX_PAGE:
        raise BadRequest(f"page {str(page)[:20]}: between 1 and {MAX_PAGE}")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise BadRequest(f"per_page {per_page}: between 1 and {MAX_PER_PAGE}")
    return page, per_page


def row_id(value: int, what: str) -> int:
    if not 1 <= value <= MAX_ID:
        raise BadRequest(f"{what} {str(value)[:20]}: a positive integer")
    return value


def since_arg(value: str | None) -> float | None:
    """Epoch seconds, or an ISO 8601 date/time (the node's local time when it names no
    zone, as an operator reads the pages)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):  # nan, inf, 1e999
            raise BadRequest(f"since {value[:40]!r}: a finite number of epoch seconds")
        return seconds
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"since {value[:40]!r}: epoch seconds or ISO 8601 date/time") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=datetime.now().astimezone().tzinfo).timestamp()
    return parsed.timestamp()


def _enum(kind: type[Any], value: str | None, what: str, aliases: dict[str, str]) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(aliases.get(value, value))
    except ValueError:
        names = sorted({*(m.value for m in kind), *aliases} - set(aliases.values()))
        raise BadRequest(f"{what} {value[:30]!r}: one of {', '.join(names)}") from None


class Console:
    """The console's use cases over the node's config, index and accounts."""

    def __init__(self, config: Config, accounts: Accounts) -> None:
        self.config = config
        data_dir = config.node.data_dir
        self.accounts = accounts
        self.view = ConsoleView(data_dir / "index.sqlite3")
        # Opened (and created, on a node that never ran) before the first view reads it.
        self._index = Index(data_dir / "index.sqlite3")
        self.spool_dir = data_dir / "spool"

    @property
    def index(self) -> Index:
        return self._index

    def close(self) -> None:
        self.view.close()
        self._index.close()

    def _audit(self, actor: Actor, action: str, target: str = "", **detail: object) -> None:
        self.accounts.audit(actor.user.name, action, target, dict(detail), actor.address)

    # -- logging in ---------------------------------------------------------------------------

    def login(self, name: str, password: str, address: str) -> tuple[str, Session]:
        """A new session (its id for the cookie). Paused after ``web.login_attempts``
        failures for the name or from the address within ``web.login_pause_seconds``.
        An attempt counts as failed from its start, so attempts sent at once cannot all
        pass the check before the first fails."""
        web = self.config.web
        keys = [f"user:{name[:64]}", f"address:{address}"]
        if not self.accounts.login_attempt(keys, web.login_attempts, web.login_pause_seconds):
            raise TooManyRequests(
                f"too many failed logins; try again in {web.login_pause_seconds:.0f} s"
            )
        user = self.accounts.authenticate(name, password) if len(password) <= 1024 else None
        if user is None:
            # An unknown name is often a password typed in the wrong field: not kept.
            known = self.accounts.user(name) is not None
            self.accounts.audit(name if known else "(unknown)", "login.failed", "", {}, address)
            log.warning("failed console login from %s", address)
            raise NotAuthenticated("wrong user name or password")
        self.accounts.login_succeeded(keys)
        session_id, session = self.accounts.new_session(user)
        self.accounts.audit(user.name, "login", "", {}, address)
        return session_id, session

    def logout(self, session_id: str, actor: Actor) -> None:
        self.accounts.end_session(session_id)
        self._audit(actor, "logout")

    # -- health and dashboard ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        try:
            self.view.schema_version()
            index = "ok"
        except Exception as exc:  # a missing or locked index: say so, do not 500
            index = f"unavailable: {type(exc).__name__}"
        return {"status": "ok", "version": __version__, "index": index}

    def disk(self) -> dict[str, int]:
        where = self.spool_dir if self.spool_dir.exists() else self.config.node.data_dir
        usage = shutil.disk_usage(where if where.exists() else Path("."))
        return {"free_bytes": usage.free, "total_bytes": usage.total}

    def dashboard(self, actor: Actor) -> dict[str, Any]:
        actor.require("read")
        out = self.view.dashboard()
        out["disk"] = self.disk()
        usage = self.index.storage_usage()
        out["storage"] = {
            "instance_bytes": usage.instance_bytes,
            "result_bytes": usage.result_bytes,
            "held_back": [
                {"reason": h.reason, "count": h.count, "bytes": h.bytes} for h in usage.held_back
            ],
        }
        out["models"] = self.view.model_checks()
        return out

    # -- series ------------------------------------------------------------------------------

    def series_page(
        self,
        actor: Actor,
        state: str | None,
        modality: str | None,
        since: str | None,
        page: int,
        per_page: int,
    ) -> Page:
        actor.require("read")
        if modality and not _MODALITY.fullmatch(modality):
            raise BadRequest(f"modality {modality[:20]!r}: a DICOM modality such as CT or MR")
        where = SeriesFilter(
            _enum(SeriesState, state, "state", {}), modality or None, since_arg(since)
        )
        return self.view.series_page(where, *page_args(page, per_page))

    def series(self, actor: Actor, series_uid: str, patient: bool = True) -> dict[str, Any]:
        """One series; its patient's name and ID for a role that may see them, unless
        ``patient`` is False (a page's live refresh: no patient data, no audit entry)."""
        actor.require("read")
        found = self.view.series(uid(series_uid, "series UID"))
        if found is None:
            raise NotFound(f"no series {series_uid}")
        found["patient"] = None
        if patient and may(actor.user.role, "patient"):
            found["patient"] = self._patient(series_uid)
            self._audit(actor, "view.patient", series_uid)
        return found

    def _patient(self, series_uid: str) -> dict[str, str] | None:
        path = self.view.first_instance_path(series_uid)
        if path is None:
            return None
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        except (OSError, InvalidDicomError):
            return None
        return {"name": str(ds.get("PatientName", "")), "id": str(ds.get("PatientID", ""))}

    # -- jobs and deliveries -----------------------------------------------------------------

    def jobs_page(self, actor: Actor, state: str | None, page: int, per_page: int) -> Page:
        actor.require("read")
        return self.view.jobs_page(_enum(JobState, state, "state", {}), *page_args(page, per_page))

    def rerun(self, actor: Actor, job_id: int) -> dict[str, Any]:
        actor.require("act")
        job = self.view.job(row_id(job_id, "job id"))
        if job is None:
            raise NotFound(f"no job {job_id}")
        if not self.index.rerun_job(job_id):
            if (
                job["state"] == JobState.FAILED.value
                and job.get("study_instance_uid")
                and not (job.get("roles"))
            ):
                raise Conflict(
                    f"job {job_id}: the study's deadline passed with a required role missing; "
                    "it runs again by itself when that role's series comes"
                )
            if job["state"] == JobState.FAILED.value:
                raise Conflict(
                    f"job {job_id}: the instances of its series were purged "
                    "(storage.keep_sources_hours); send the series again to run it"
                )
            raise Conflict(f"job {job_id} is {job['state']}; only a failed job can be rerun")
        self._audit(actor, "job.rerun", str(job_id), series=job["series_instance_uid"])
        log.info("job %d rerun by %s", job_id, actor.user.name)
        return {"job": job_id, "state": JobState.PENDING.value}

    def deliveries_page(self, actor: Actor, state: str | None, page: int, per_page: int) -> Page:
        actor.require("read")
        parsed = _enum(DeliveryState, state, "state", {"dead_letter": DeliveryState.DEAD.value})
        return self.view.deliveries_page(parsed, *page_args(page, per_page))

    def resubmit(self, actor: Actor, delivery_id: int) -> dict[str, Any]:
        return self._dead_letter(
            actor, delivery_id, self.index.resubmit_delivery, "resubmit", DeliveryState.PENDING
        )

    def discard(self, actor: Actor, delivery_id: int) -> dict[str, Any]:
        return self._dead_letter(
            actor, delivery_id, self.index.discard_delivery, "discard", DeliveryState.DISCARDED
        )

    def _dead_letter(
        self,
        actor: Actor,
        delivery_id: int,
        move: Callable[[int], bool],
        verb: str,
        new: DeliveryState,
    ) -> dict[str, Any]:
        """What an operator does to one dead letter: ``move`` it, audited as ``verb``."""
        done = {"resubmit": "resubmitted", "discard": "discarded"}[verb]
        actor.require("act")
        delivery = self.view.delivery(row_id(delivery_id, "delivery id"))
        if delivery is None:
            raise NotFound(f"no delivery {delivery_id}")
        if not move(delivery_id):
            raise Conflict(
                f"delivery {delivery_id} is {delivery['state']}; only a dead letter can be {done}"
            )
        self._audit(actor, f"delivery.{verb}", str(delivery_id), job=delivery["job_id"])
        log.info("delivery %d %s by %s", delivery_id, done, actor.user.name)
        return {"delivery": delivery_id, "state": new.value}

    # -- destinations and models -------------------------------------------------------------

    def destinations(self, actor: Actor) -> list[dict[str, Any]]:
        actor.require("read")
        out = []
        for name, destination in sorted(self.config.destinations.items()):
            if isinstance(destination, DicomDestination):
                where = f"{destination.ae_title}@{destination.host}:{destination.port}"
                out.append(
                    {
                        "name": name,
                        "kind": "dicom",
                        "address": where,
                        "tls": destination.tls is not None,
                    }
                )
            else:
                out.append(
                    {
                        "name": name,
                        "kind": "dicomweb",
                        "address": destination.url,
                        "tls": destination.url.startswith("https"),
                    }
                )
        return out

    def echo(self, actor: Actor, name: str) -> dict[str, Any]:
        actor.require("act")
        if not _DESTINATION.fullmatch(name):
            raise BadRequest(f"destination name {name[:70]!r}: letters, digits, '_', '.', '-'")
        destination = self.config.destinations.get(name)
        if destination is None:
            raise NotFound(f"no destination {name}")
        started = time.monotonic()
        ok, detail = self._echo(destination)
        seconds = round(time.monotonic() - started, 3)
        self._audit(actor, "destination.echo", name, ok=ok)
        return {"destination": name, "ok": ok, "detail": detail, "seconds": seconds}

    def _echo(self, destination: DicomDestination | DicomWebDestination) -> tuple[bool, str]:
        if isinstance(destination, DicomDestination):
            from dicom_ai.dimse.scu import Peer, echo
            from dicom_ai.dimse.tls import client_context

            tls = client_context(destination.tls) if destination.tls else None
            peer = Peer(destination.ae_title, destination.host, destination.port)
            try:
                status = echo(peer, self.config.node.ae_title, timeout=10, tls=tls)
            except DeliveryError as exc:
                return False, str(exc)
            return status == 0, f"C-ECHO answered 0x{status:04X}"
        import requests

        try:  # QIDO-RS on the service root: any HTTP answer below 500 means it is there
            answer = requests.get(
                destination.url.rstrip("/") + "/studies",
                params={"limit": "1"},
                timeout=10,
                verify=str(destination.ca_certificates) if destination.ca_certificates else True,
            )
        except requests.RequestException as exc:
            return False, f"no answer: {type(exc).__name__}"
        return answer.status_code < 500, f"HTTP {answer.status_code}"

    def models(self, actor: Actor) -> list[dict[str, Any]]:
        actor.require("read")
        checks = self.view.model_checks()
        out = []
        for model_id in sorted(self.config.known_models()):
            model = self.config.model(model_id)
            out.append(
                {
                    "id": model_id,
                    "bundle": str(model.bundle) if model.bundle else None,
                    "builtin": model.bundle is None,
                    "device": model.device,
                    "task": model.task,
                    "check": checks.get(
                        model_id,
                        {"state": "built in" if model.bundle is None else "not checked yet"},
                    ),
                }
            )
        return out

    # -- rules -------------------------------------------------------------------------------

    def rules(self, actor: Actor) -> list[dict[str, Any]]:
        actor.require("read")
        out = []
        for title, called in self.config.called_ae_table().items():
            try:
                text = called.rules.read_text(encoding="utf-8")
            except OSError as exc:
                text = f"# cannot read {called.rules}: {exc.strerror}"
            out.append({"called_ae": title, "path": str(called.rules), "text": text})
        return out

    def _running_rules(self, called_ae: str | None) -> tuple[str, RuleSet]:
        table = self.config.called_ae_table()
        title = called_ae or next(iter(table))
        if title not in table:
            raise BadRequest(f"called AE {title[:20]!r}: one of {', '.join(table)}")
        try:
            return title, load_rules(table[title].rules)
        except ConfigError as exc:
            raise Conflict(f"the running rules do not load: {exc}") from None

    def _candidate(self, text: str) -> RuleSet:
        if len(text) > 1 << 20:
            raise BadRequest("rules text: at most 1 MiB")
        try:
            rules = parse_rules(text, "candidate")
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        unknown = sorted(m for m in rules.models if m not in self.config.known_models())
        unknown_destinations = sorted(
            d for d in rules.destinations if not self.config.has_destination(d)
        )
        problems = []
        if unknown:
            problems.append(f"unknown model(s) {', '.join(unknown)}")
        if unknown_destinations:
            problems.append(f"unknown destination(s) {', '.join(unknown_destinations)}")
        if problems:
            raise BadRequest(f"candidate: rules name {'; '.join(problems)}")
        return rules

    def _may_match_on(self, actor: Actor, rules: RuleSet) -> bool:
        """True when ``rules`` test patient data (name, ID, birth date...). Run over the
        received series, such rules tell which series match, one question at a time: only
        a role that may see patient data may run them (Forbidden for another)."""
        named = _patient_keywords(rules)
        if named and not may(actor.user.role, "patient"):
            raise Forbidden(
                f"the rules match on patient data ({', '.join(named)}); role "
                f"{actor.user.role.value} may not run them over received series"
            )
        return bool(named)

    def check_rules(self, actor: Actor, text: str) -> dict[str, Any]:
        actor.require("read")
        rules = self._candidate(text)
        return {"valid": True, "rules": len(rules.rules)}

    def test_rules(
        self,
        actor: Actor,
        *,
        upload: bytes | None = None,
        series_uid: str | None = None,
        calling_ae: str = "SCANNER",
        called_ae: str | None = None,
        source_ip: str = "127.0.0.1",
        rules_text: str | None = None,
    ) -> dict[str, Any]:
        """The trace of the running (or given) rules for an uploaded file or a received
        series."""
        actor.require("read")
        title, rules = self._running_rules(called_ae)
        if rules_text:
            rules = self._candidate(rules_text)
            if series_uid is not None:
                self._may_match_on(actor, rules)
        if upload is not None:
            if len(upload) > MAX_UPLOAD:
                raise BadRequest(f"the file is larger than {MAX_UPLOAD >> 20} MiB")
            try:
                header = dcmread(io.BytesIO(upload), stop_before_pixels=True, force=False)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                raise BadRequest("the upload is not a DICOM Part 10 file") from None
            if "SOPInstanceUID" not in header:
                raise BadRequest("the upload is not a DICOM Part 10 file")
            if not _AE.fullmatch(calling_ae):
                raise BadRequest(f"calling AE {calling_ae[:20]!r} is not an AE title")
            sender = SenderContext(calling_ae, title, source_ip)
            source = "upload"
        elif series_uid is not None:
            path = self.view.first_instance_path(uid(series_uid, "series UID"))
            if path is None:
                raise NotFound(f"no series {series_uid}")
            header = dcmread(path, stop_before_pixels=True)
            senders = self.view.series_senders(series_uid)
            sender = SenderContext(*senders[0]) if senders else SenderContext("?", title, "")
            source = series_uid
        else:
            raise BadRequest("give a DICOM file or a series UID")
        evaluation = rules.evaluate(header, sender)
        self._audit(actor, "rules.test", source)
        return {
            "called_ae": sender.called_ae,
            "calling_ae": sender.calling_ae,
            "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
            "modality": str(header.get("Modality", "")),
            "trace": [
                {
                    "rule": t.rule,
                    "priority": t.priority,
                    "matched": t.matched,
                    "routed": t.routed,
                    "reasons": list(t.reasons),
                    "shadowed_by": t.shadowed_by,
                }
                for t in evaluation.trace
            ],
            "decisions": [
                {
                    "rule": d.rule,
                    "model": d.model,
                    "destinations": list(d.destinations),
                    "reasons": list(d.reasons),
                }
                for d in evaluation.decisions
            ],
        }

    def replay(
        self, actor: Actor, text: str, count: int, called_ae: str | None = None
    ) -> dict[str, Any]:
        """The last ``count`` series received under the running rules and ``text``: which
        would route differently."""
        actor.require("read")
        if not 1 <= count <= MAX_REPLAY:
            raise BadRequest(f"count {count}: between 1 and {MAX_REPLAY}")
        title, current = self._running_rules(called_ae)
        candidate = self._candidate(text)
        patient = self._may_match_on(actor, candidate)
        inputs = []
        unreadable = 0
        for series_uid, path in self.view.recent_series(count):
            try:
                header = dcmread(path, stop_before_pixels=True)
            except (OSError, InvalidDicomError):
                unreadable += 1
                continue
            senders = self.view.series_senders(series_uid)
            sender = SenderContext(*senders[0]) if senders else SenderContext("?", title, "")
            inputs.append((series_uid, header, sender))
        try:
            rows = run_isolated(replay, current, candidate, inputs, timeout=REPLAY_SECONDS)
        except IsolatedError as exc:
            if exc.timed_out:
                raise BadRequest(
                    f"the rules took longer than {REPLAY_SECONDS:.0f} s on {len(inputs)} "
                    "series and were stopped: a regular expression that backtracks?"
                ) from None
            raise
        detail: dict[str, object] = {"series": len(rows)}
        if patient:
            detail["patient"] = True
        self._audit(actor, "rules.replay", title, **detail)
        return {
            "called_ae": title,
            "series": len(rows),
            "unreadable": unreadable,
            "changed": [
                {
                    "series_instance_uid": r.series_instance_uid,
                    "modality": r.modality,
                    "current": list(r.current),
                    "candidate": list(r.candidate),
                }
                for r in rows
                if r.changed
            ],
            "unchanged": sum(1 for r in rows if not r.changed),
        }

    # -- users and audit ---------------------------------------------------------------------

    def users(self, actor: Actor) -> list[dict[str, Any]]:
        actor.require("admin")
        return [
            {"name": u.name, "role": u.role.value, "created_at": u.created_at}
            for u in self.accounts.users()
        ]

    def add_user(self, actor: Actor, name: str, role: str, password: str) -> dict[str, Any]:
        actor.require("admin")
        try:
            user = self.accounts.add_user(name, role, password)
        except AccountsError as exc:
            raise BadRequest(str(exc)) from None
        self._audit(actor, "user.add", user.name, role=user.role.value)
        return {"name": user.name, "role": user.role.value}

    def remove_user(self, actor: Actor, name: str) -> dict[str, Any]:
        actor.require("admin")
        if name == actor.user.name:
            raise Conflict("you cannot remove yourself")
        if not self.accounts.remove_user(name):
            raise NotFound(f"no user {name[:64]!r}")
        self._audit(actor, "user.remove", name)
        return {"removed": name}

    def audit(self, actor: Actor, limit: int = 200) -> list[dict[str, Any]]:
        actor.require("admin")
        if not 1 <= limit <= 5000:
            raise BadRequest(f"limit {limit}: between 1 and 5000")
        return [
            {
                "id": e.id,
                "at": e.at,
                "user": e.user,
                "action": e.action,
                "target": e.target,
                "detail": e.detail,
                "address": e.address,
            }
            for e in self.accounts.audit_entries(limit=limit, newest_first=True)
        ]


def _patient_keywords(rules: RuleSet) -> list[str]:
    """The patient's elements (PHI_KEYWORDS, Patient*) that the rules' conditions test."""
    named: set[str] = set()
    conditions = [rule.match for rule in rules.rules if rule.match is not None]
    while conditions:
        for key, value in conditions.pop().terms():
            if isinstance(value, tuple):
                conditions.extend(value)
            elif isinstance(value, Condition):
                conditions.append(value)
            elif key in PHI_KEYWORDS or key.startswith("Patient"):
                named.add(key)
    return sorted(named)


def role_names() -> list[str]:
    return [r.value for r in Role]
