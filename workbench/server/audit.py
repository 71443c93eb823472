"""The audit log: one SQLite row per API request, counts and codes only, never text.

A row holds the request id, the time, model, backend, endpoint, duration, HTTP status, prompt and
completion token counts, finish reason and error code. The schema has no column a prompt or a
completion could go into; that is the guarantee, not a filter. Rows older than the retention are
pruned (`prune`; the server calls it at startup and hourly).

What a refused request (code in `REFUSED_CODES`: no key, unknown route, body too large or too
slow, untrusted Host, too many connections) can write is bounded: it is counted in ``refused``,
one row per minute, endpoint, status and code, never a row of its own, so 5,000 unauthenticated
requests add a few hundred bytes, not megabytes. Endpoints are the server's route templates (an
unknown path is ``*``), and every text field is cut to `MAX_FIELD` characters. The file itself
is capped at ``max_bytes``: past it, the oldest rows go (SQLite reuses their pages), and the
write-ahead log is checkpointed and truncated often.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workbench.errors import UserError

DB_NAME = "audit.sqlite3"
DEFAULT_RETENTION_DAYS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    model TEXT,
    backend TEXT,
    endpoint TEXT NOT NULL,
    duration_s REAL NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    error_code TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS refused (
    minute INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    error_code TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_request_id TEXT NOT NULL,
    PRIMARY KEY (minute, endpoint, status, error_code)
) WITHOUT ROWID;
"""
# Refusals at the edge, before any work (see the module docstring): counted, not rows.
REFUSED_CODES = frozenset(
    {
        "server.unauthorized",
        "server.not_found",
        "server.method_not_allowed",
        "server.body_too_large",
        "server.body_timeout",
        "server.untrusted_host",
        "server.overloaded",
    }
)
MAX_FIELD = 64  # characters kept of any text field
DEFAULT_MAX_BYTES = 64 << 20
MIN_MAX_BYTES = 64 << 10
_SIZE_CHECK_EVERY = 256  # writes between checks of the file's size
_WAL_PAGES = 64  # checkpoint the write-ahead log every this many pages (256 KB)


@dataclass(frozen=True)
class RefusedCount:
    minute: float  # start of the minute (seconds since the epoch)
    endpoint: str
    status: int
    error_code: str
    count: int
    last_request_id: str


@dataclass(frozen=True)
class AuditRecord:
    request_id: str
    ts: float  # seconds since the epoch when the request arrived
    endpoint: str
    duration_s: float
    status: int  # HTTP status sent
    model: str | None = None
    backend: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout"
    error_code: str | None = None  # the workbench error code when the request failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = tuple(AuditRecord.__dataclass_fields__)


def default_path(home: Path) -> Path:
    return home / DB_NAME


class AuditLog:
    """Thread-safe writer and reader of the audit database."""

    def __init__(
        self,
        path: str | Path,
        *,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if not retention_days > 0:
            raise UserError(
                "user.bad_retention", f"audit retention must be > 0 days, got {retention_days}"
            )
        if max_bytes < MIN_MAX_BYTES:
            raise UserError(
                "user.bad_audit_size",
                f"the audit log's cap must be >= {MIN_MAX_BYTES} bytes, got {max_bytes}",
            )
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._writes = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; no fsync a row
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_PAGES * 4096}")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise UserError("user.bad_audit_db", f"cannot open audit log {self.path}: {e}") from e

    def record(self, rec: AuditRecord) -> None:
        """One row for a served request; a count for a refused one (`REFUSED_CODES`)."""
        values = [_cap(getattr(rec, c)) for c in _COLUMNS]
        with self._lock:
            if rec.error_code in REFUSED_CODES:
                self._db.execute(
                    "INSERT INTO refused VALUES (?, ?, ?, ?, 1, ?) "
                    "ON CONFLICT (minute, endpoint, status, error_code) "
                    "DO UPDATE SET count = count + 1, last_request_id = excluded.last_request_id",
                    (
                        int(rec.ts // 60 * 60),
                        _cap(rec.endpoint),
                        rec.status,
                        _cap(rec.error_code or ""),
                        _cap(rec.request_id),
                    ),
                )
            else:
                self._db.execute(
                    f"INSERT INTO requests ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                    values,
                )
            self._writes += 1
            if self._writes % _SIZE_CHECK_EVERY == 0:
                self._enforce_cap()

    def size_bytes(self) -> int:
        """Bytes the database's pages take (the file, less nothing: free pages are reused)."""
        page_count = self._db.execute("PRAGMA page_count").fetchone()[0]
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (page_count - free) * page_size

    def _enforce_cap(self) -> None:
        """Past ``max_bytes`` in use, delete the oldest tenth of each table (under the lock)."""
        while self.size_bytes() > self.max_bytes:
            removed = 0
            for table, order in (("requests", "id"), ("refused", "minute")):
                (n,) = self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
                if n:
                    cur = self._db.execute(
                        f"DELETE FROM {table} WHERE rowid IN "
                        f"(SELECT rowid FROM {table} ORDER BY {order} LIMIT ?)"
                        if table == "requests"
                        else f"DELETE FROM {table} WHERE minute IN "
                        f"(SELECT DISTINCT minute FROM {table} ORDER BY minute LIMIT ?)",
                        (max(1, n // 10),),
                    )
                    removed += cur.rowcount
            if not removed:
                return

    def refused(self, *, since: float | None = None) -> list[RefusedCount]:
        """The counts of refused requests, oldest minute first."""
        sql = "SELECT minute, endpoint, status, error_code, count, last_request_id FROM refused"
        args: list[Any] = []
        if since is not None:
            sql += " WHERE minute >= ?"
            args.append(int(since // 60 * 60))
        sql += " ORDER BY minute, status, endpoint"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [RefusedCount(*row) for row in rows]

    def prune(self, now: float | None = None) -> int:
        """Delete rows older than the retention; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        with self._lock:
            cur = self._db.execute("DELETE FROM requests WHERE ts < ?", (cutoff,))
            old = self._db.execute("DELETE FROM refused WHERE minute < ?", (int(cutoff),))
        return cur.rowcount + old.rowcount

    def query(
        self,
        *,
        since: float | None = None,
        status: int | str | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Rows, oldest first; ``status`` as `status_range` reads it."""
        where, args = [], []
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if status is not None:
            lo, hi = status_range(status)
            where.append("status BETWEEN ? AND ?")
            args += [lo, hi]
        sql = f"SELECT {', '.join(_COLUMNS)} FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [AuditRecord(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def escape(text: str, limit: int) -> str:
    """Printable ASCII as it is; anything else (control characters, newlines, escapes, other
    scripts) as a backslash escape, cut to ``limit`` characters. For text a client controls
    that goes into logs or onto a terminal."""
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if 32 <= ord(c) < 127 else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _cap(value: Any) -> Any:
    return value[:MAX_FIELD] if isinstance(value, str) else value


def status_range(status: int | str) -> tuple[int, int]:
    """404 -> (404, 404); "4xx" -> (400, 499); "ok" -> (200, 399); "error" -> (400, 599)."""
    s = str(status).strip().lower()
    named = {"ok": (200, 399), "error": (400, 599)}
    if s in named:
        return named[s]
    if len(s) == 3 and s[0] in "12345" and s[1:] == "xx":
        base = int(s[0]) * 100
        return base, base + 99
    if s.isdigit() and 100 <= int(s) <= 599:
        return int(s), int(s)
    raise UserError(
        "user.bad_status_filter",
        f"status must be an HTTP status (404), a class (4xx), ok or error; got {status!r}",
    )
