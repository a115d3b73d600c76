"""Users, their roles, API tokens, browser sessions, login throttling and the audit log.

One SQLite database beside the index (``console.sqlite3``): the index's rows are pruned by
retention, the audit log never is. Passwords are hashed with Argon2id (argon2-cffi); API
tokens and session ids are random and stored only as SHA-256 digests, so a copy of the
database opens no door. The audit table refuses UPDATE and DELETE (triggers): append only.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "AUDIT_ACTIONS",
    "Accounts",
    "AccountsError",
    "AuditEntry",
    "Role",
    "Session",
    "User",
    "may",
]

# name: letters, digits and . _ - (it lands in logs and the audit log). Used with
# fullmatch: "^...$" would let a final newline through.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_PASSWORD = 8


class Role(StrEnum):
    VIEWER = "viewer"  # reads
    OPERATOR = "operator"  # reads, sees patient name/ID, acts (rerun, resubmit, echo)
    ADMIN = "admin"  # all of that, and manages users


_GRANTS: dict[Role, frozenset[str]] = {
    Role.VIEWER: frozenset({"read"}),
    Role.OPERATOR: frozenset({"read", "act", "patient"}),
    Role.ADMIN: frozenset({"read", "act", "patient", "admin"}),
}


def may(role: Role, permission: str) -> bool:
    """Whether ``role`` has ``permission``: read, act, patient (see patient data), admin."""
    return permission in _GRANTS[role]


AUDIT_ACTIONS = (
    "login",
    "login.failed",
    "logout",
    "view.patient",
    "job.rerun",
    "delivery.resubmit",
    "delivery.discard",
    "destination.echo",
    "rules.test",
    "rules.replay",
    "user.add",
    "user.remove",
    "user.token",
)


class AccountsError(ValueError):
    """A user name, role or password that cannot be used; the message says why."""


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    created_at: float


@dataclass(frozen=True)
class Session:
    user: User
    csrf_token: str
    expires_at: float


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    user: str
    action: str
    target: str
    detail: dict[str, object]
    address: str


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL,"
    " password_hash TEXT NOT NULL, created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, user TEXT NOT NULL,"
    " created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sessions (digest TEXT PRIMARY KEY, user TEXT NOT NULL,"
    " csrf TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures(key, at)",
    "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, at REAL NOT NULL,"
    " user TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL,"
    " address TEXT NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Accounts:
    """The console's users, tokens, sessions and audit log in ``path``."""

    def __init__(self, path: Path, session_seconds: float = 12 * 3600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._session_seconds = session_seconds
        self._hasher = PasswordHasher()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._tx() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- users -------------------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str) -> User:
        if not _NAME.fullmatch(name):
            raise AccountsError(f"user name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
        try:
            parsed = Role(role)
        except ValueError:
            raise AccountsError(f"role {role!r}: one of {', '.join(Role)}") from None
        if len(password) < MIN_PASSWORD:
            raise AccountsError(f"the password needs at least {MIN_PASSWORD} characters")
        hashed = self._hasher.hash(password)
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AccountsError(f"user {name!r} exists already")
            db.execute(
                "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                (name, parsed.value, hashed, now),
            )
        return User(name, parsed, now)

    def remove_user(self, name: str) -> bool:
        with self._tx() as db:
            removed = db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount
            db.execute("DELETE FROM tokens WHERE user = ?", (name,))
            db.execute("DELETE FROM sessions WHERE user = ?", (name,))
            return bool(removed)

    def user(self, name: str) -> User | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, role, created_at FROM users WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else User(str(row[0]), Role(row[1]), float(row[2]))

    def users(self) -> list[User]:
        with self._lock:
            rows = self._db.execute("SELECT name, role, created_at FROM users ORDER BY name")
            return [User(str(r[0]), Role(r[1]), float(r[2])) for r in rows.fetchall()]

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs. Hashes even for an unknown name, so the
        time taken does not tell which names exist."""
        with self._lock:
            row = self._db.execute(
                "SELECT password_hash FROM users WHERE name = ?", (name,)
            ).fetchone()
        stored = str(row[0]) if row is not None else _DUMMY_HASH
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        return self.user(name) if row is not None else None

    # -- tokens and sessions -----------------------------------------------------------------

    def new_token(self, name: str) -> str:
        """A new API token for ``name`` (printed once; only its digest is stored)."""
        if self.user(name) is None:
            raise AccountsError(f"no user {name!r}")
        token = "dai_" + secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (digest, user, created_at) VALUES (?, ?, ?)",
                (_digest(token), name, time.time()),
            )
        return token

    def token_user(self, token: str) -> User | None:
        with self._lock:
            row = self._db.execute(
                "SELECT user FROM tokens WHERE digest = ?", (_digest(token),)
            ).fetchone()
        return None if row is None else self.user(str(row[0]))

    def new_session(self, user: User) -> tuple[str, Session]:
        """A session id for the cookie, and the session (its CSRF token for the forms)."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + self._session_seconds
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            db.execute(
                "INSERT INTO sessions (digest, user, csrf, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (_digest(session_id), user.name, csrf, now, expires),
            )
        return session_id, Session(user, csrf, expires)

    def session(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute(
                "SELECT user, csrf, expires_at FROM sessions WHERE digest = ?",
                (_digest(session_id),),
            ).fetchone()
        if row is None or float(row[2]) < time.time():
            return None
        user = self.user(str(row[0]))
        return None if user is None else Session(user, str(row[1]), float(row[2]))

    def end_session(self, session_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE digest = ?", (_digest(session_id),))

    # -- login throttling --------------------------------------------------------------------

    def login_attempt(self, keys: list[str], attempts: int, window: float) -> bool:
        """Count a login attempt as a failure for each of ``keys`` (user:NAME, address:IP),
        until `login_succeeded` clears it; False, counting nothing, when one of them failed
        ``attempts`` times within the last ``window`` seconds. Check and count are one
        transaction: attempts sent at once cannot all pass the check."""
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM login_failures WHERE at < ?", (now - window,))
            for key in keys:
                (n,) = db.execute(
                    "SELECT COUNT(*) FROM login_failures WHERE key = ? AND at >= ?",
                    (key, now - window),
                ).fetchone()
                if int(n) >= attempts:
                    return False
            db.executemany(
                "INSERT INTO login_failures (key, at) VALUES (?, ?)", [(k, now) for k in keys]
            )
        return True

    def login_succeeded(self, keys: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM login_failures WHERE key = ?", [(k,) for k in keys])

    # -- audit -------------------------------------------------------------------------------

    def audit(
        self,
        user: str,
        action: str,
        target: str = "",
        detail: dict[str, object] | None = None,
        address: str = "",
    ) -> None:
        """Append one entry. ``detail`` holds identifiers, never patient data."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO audit (at, user, action, target, detail, address) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), user, action, target, json.dumps(detail or {}), address),
            )

    def audit_entries(
        self, after_id: int = 0, limit: int | None = None, newest_first: bool = False
    ) -> list[AuditEntry]:
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM audit WHERE id > ? ORDER BY id {order}"
        args: list[object] = [after_id]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            AuditEntry(
                int(r["id"]),
                float(r["at"]),
                str(r["user"]),
                str(r["action"]),
                str(r["target"]),
                json.loads(str(r["detail"])),
                str(r["address"]),
            )
            for r in rows
        ]


# Verified against when the user name is unknown, so both paths cost one Argon2 hash.
_DUMMY_HASH = PasswordHasher().hash(secrets.token_urlsafe(16))
