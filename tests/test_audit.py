"""The audit log (SQLite) and `workbench audit`."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.cli.audit import parse_since
from workbench.errors import UserError
from workbench.server.audit import AuditLog, AuditRecord, status_range

NOW = 1_750_000_000.0


def _rec(i: int, *, ts: float = NOW, status: int = 200, error: str | None = None) -> AuditRecord:
    return AuditRecord(
        request_id=f"req-{i}",
        ts=ts,
        endpoint="POST /v1/chat/completions",
        duration_s=0.25,
        status=status,
        model="tiny",
        backend="numpy",
        prompt_tokens=10 + i,
        completion_tokens=i,
        finish_reason="length" if status == 200 else None,
        error_code=error,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        log.record(_rec(1, ts=NOW - 3 * 86400))
        log.record(_rec(2, ts=NOW - 3600, status=404, error="user.unknown_model"))
        log.record(_rec(3, ts=NOW - 60, status=503, error="server.queue_full"))
        log.record(_rec(4, ts=NOW - 10))
    return path


def test_round_trip_and_filters(db: Path) -> None:
    with AuditLog(db) as log:
        rows = log.query()
        assert [r.request_id for r in rows] == ["req-1", "req-2", "req-3", "req-4"]
        assert rows[1] == _rec(2, ts=NOW - 3600, status=404, error="user.unknown_model")
        assert [r.request_id for r in log.query(since=NOW - 7200)] == ["req-2", "req-3", "req-4"]
        assert [r.request_id for r in log.query(status="4xx")] == ["req-2"]
        assert [r.request_id for r in log.query(status="error")] == ["req-2", "req-3"]
        assert [r.request_id for r in log.query(status=200)] == ["req-1", "req-4"]
        assert [r.request_id for r in log.query(status="ok", limit=1)] == ["req-1"]


def test_the_schema_has_no_place_for_text(db: Path) -> None:
    cols = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(requests)")}
    assert not cols & {"prompt", "completion", "text", "messages", "content"}
    assert {"request_id", "ts", "model", "backend", "endpoint", "duration_s", "status"} <= cols
    assert {"prompt_tokens", "completion_tokens", "error_code"} <= cols


def test_retention_prunes_old_rows(db: Path) -> None:
    with AuditLog(db, retention_days=1) as log:
        assert log.prune(now=NOW) == 1
        assert [r.request_id for r in log.query()] == ["req-2", "req-3", "req-4"]
        assert log.prune(now=NOW) == 0
    with pytest.raises(UserError):
        AuditLog(db, retention_days=0)


@pytest.mark.parametrize(
    ("text", "want"),
    [("404", (404, 404)), ("5xx", (500, 599)), ("ok", (200, 399)), ("error", (400, 599))],
)
def test_status_range(text: str, want: tuple[int, int]) -> None:
    assert status_range(text) == want


@pytest.mark.parametrize("bad", ["6xx", "abc", "99", "20x"])
def test_bad_status_filter(bad: str) -> None:
    with pytest.raises(UserError):
        status_range(bad)


def test_parse_since() -> None:
    assert parse_since("30m", now=NOW) == NOW - 1800
    assert parse_since("2h", now=NOW) == NOW - 7200
    assert parse_since("7d", now=NOW) == NOW - 7 * 86400
    assert parse_since("2025-06-15T12:00:00+00:00") == 1749988800.0
    assert parse_since("2025-06-15T12:00:00") == 1749988800.0  # naive means UTC
    with pytest.raises(UserError):
        parse_since("yesterday")


def test_cli_json_and_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--audit-db", str(db), "--json", "--status", "5xx"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in rows] == ["req-3"]
    assert rows[0]["error_code"] == "server.queue_full" and rows[0]["status"] == 503

    assert main(["audit", "--audit-db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["time", "request_id", "endpoint", "status"]
    assert len(lines) == 5 and "user.unknown_model" in lines[2]


def test_cli_since_is_relative_to_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.sqlite3"
    with AuditLog(path) as log:
        log.record(_rec(1, ts=time.time() - 7200))
        log.record(_rec(2, ts=time.time() - 60))
    assert main(["audit", "--audit-db", str(path), "--since", "1h", "--json"]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["req-2"]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--audit-db", str(tmp_path / "none.sqlite3")]) == 2
    assert "no audit log" in capsys.readouterr().err
    path = tmp_path / "a.sqlite3"
    AuditLog(path).close()
    assert main(["audit", "--audit-db", str(path), "--status", "nope"]) == 2
    assert main(["audit", "--audit-db", str(path), "--since", "nope"]) == 2


def test_refused_requests_are_counted_not_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.sqlite3"
    base = 1_750_000_020  # the start of a minute
    with AuditLog(path) as log:
        for i in range(300):
            ts = base + (i % 3) * 60 + 5  # three minutes
            code = "server.unauthorized" if i % 2 else "server.not_found"
            status = 401 if i % 2 else 404
            log.record(AuditRecord(f"req-{i}", ts, "GET *", 0.001, status, error_code=code))
        assert log.query() == []  # no row of their own
        counts = log.refused()
        assert sum(c.count for c in counts) == 300 and len(counts) == 6
        assert {c.error_code for c in counts} == {"server.unauthorized", "server.not_found"}
        assert [c.minute for c in log.refused(since=base + 120)] == [base + 120] * 2
        assert log.prune(now=base + 30 * 86400 + 90) == 4  # the two oldest minutes' counts
    assert main(["audit", "--audit-db", str(path), "--refused", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(r["count"] for r in rows) == 100 and rows[0]["endpoint"] == "GET *"
    assert main(["audit", "--audit-db", str(path), "--refused"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["minute", "endpoint", "status"] and len(lines) == 3


def test_long_fields_are_cut(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.sqlite3") as log:
        log.record(AuditRecord("r" * 500, NOW, "POST /v1/" + "x" * 500, 0.1, 200))
        (row,) = log.query()
    assert len(row.request_id) == 64 and len(row.endpoint) == 64
