"""The audit log: one SQLite row per API request, counts and codes only, never text.

A row holds the request id, the time, model, backend, endpoint, duration, HTTP status, prompt and
completion token counts, finish reason and error code. The schema has no column a prompt or a
completion could go into; that is the guarantee, not a filter. Rows older than the retention are
pruned (`prune`; the server calls it at startup and hourly).
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
"""


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

    def __init__(self, path: str | Path, *, retention_days: float = DEFAULT_RETENTION_DAYS) -> None:
        if not retention_days > 0:
            raise UserError(
                "user.bad_retention", f"audit retention must be > 0 days, got {retention_days}"
            )
        self.path = Path(path)
        self.retention_days = retention_days
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise UserError("user.bad_audit_db", f"cannot open audit log {self.path}: {e}") from e

    def record(self, rec: AuditRecord) -> None:
        values = [getattr(rec, c) for c in _COLUMNS]
        with self._lock:
            self._db.execute(
                f"INSERT INTO requests ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                values,
            )

    def prune(self, now: float | None = None) -> int:
        """Delete rows older than the retention; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        with self._lock:
            cur = self._db.execute("DELETE FROM requests WHERE ts < ?", (cutoff,))
        return cur.rowcount

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
