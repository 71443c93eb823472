"""`workbench audit`: read the server's audit log (one row per API request, never any text)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from workbench.cli.serve import add_audit_db_arg
from workbench.errors import UserError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_COLUMNS = (
    ("time", 19),
    ("request_id", 36),
    ("endpoint", 24),
    ("status", 6),
    ("ms", 7),
    ("prompt", 6),
    ("compl", 5),
    ("finish", 9),
    ("error", 0),
)
_REFUSED_COLUMNS = (
    ("minute", 16),
    ("endpoint", 24),
    ("status", 6),
    ("error", 22),
    ("count", 7),
    ("last_request_id", 0),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="show the server's audit log",
        description="Show the audit log `workbench serve` writes: one row per API request with "
        "its id, time, model, backend, endpoint, duration, status, token counts and error code. "
        "It never holds prompt or completion text. Control characters in any field are shown "
        "escaped (\\x1b), so a row cannot drive the terminal.",
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only rows from this time on: a duration back from now (30m, 2h, 7d) or an ISO "
        "8601 time (2025-01-31, 2025-01-31T12:00, UTC unless it has an offset)",
    )
    p.add_argument(
        "--status",
        metavar="STATUS",
        help="only rows with this HTTP status (503), class (4xx), 'ok' (2xx-3xx) or 'error'",
    )
    p.add_argument("--limit", type=int, help="show at most this many rows (the oldest first)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument(
        "--refused",
        action="store_true",
        help="show the counts of requests refused at the edge (no key, unknown route, body too "
        "large or slow, untrusted Host, too many connections: one row per minute, endpoint, "
        "status and code) instead of the request rows",
    )
    add_audit_db_arg(p)
    p.set_defaults(func=cmd_audit)


def parse_since(text: str, now: float | None = None) -> float:
    """A duration back from ``now`` ("30m", "2h", "7d") or an ISO 8601 time -> epoch seconds."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(
            "user.bad_since",
            f"--since takes a duration (30m, 2h, 7d) or an ISO 8601 time, not {text!r}",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def cmd_audit(args: argparse.Namespace) -> int:
    from workbench import store
    from workbench.server.audit import AuditLog, default_path, escape

    since = parse_since(args.since) if args.since else None
    path = args.audit_db or default_path(store.default_home())
    if not path.exists():
        raise UserError("user.no_audit_log", f"no audit log at {path} (has the server run?)")
    out = sys.stdout
    if args.refused:
        with AuditLog(path) as audit:
            counts = audit.refused(since=since)
        return _print_refused(counts, args.json, out)
    with AuditLog(path) as audit:
        rows = audit.query(since=since, status=args.status, limit=args.limit)
    if args.json:
        for row in rows:
            out.write(json.dumps(row.to_dict()) + "\n")
        return 0
    out.write(" ".join(f"{name:<{width}}" for name, width in _COLUMNS).rstrip() + "\n")
    for r in rows:
        cells = (
            datetime.fromtimestamp(r.ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            r.request_id,
            r.endpoint,
            str(r.status),
            f"{r.duration_s * 1000:.0f}",
            "" if r.prompt_tokens is None else str(r.prompt_tokens),
            "" if r.completion_tokens is None else str(r.completion_tokens),
            r.finish_reason or "",
            r.error_code or "",
        )
        line = " ".join(f"{escape(c, 200):<{w}}" for c, (_, w) in zip(cells, _COLUMNS))
        out.write(line.rstrip() + "\n")
    return 0


def _print_refused(counts: list[Any], as_json: bool, out: Any) -> int:
    from workbench.server.audit import escape

    if as_json:  # json.dumps escapes control characters itself
        for c in counts:
            out.write(json.dumps(asdict(c)) + "\n")
        return 0
    out.write(" ".join(f"{n:<{w}}" for n, w in _REFUSED_COLUMNS).rstrip() + "\n")
    for c in counts:
        cells = (
            datetime.fromtimestamp(c.minute, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            c.endpoint,
            str(c.status),
            c.error_code,
            str(c.count),
            c.last_request_id,
        )
        line = " ".join(f"{escape(x, 200):<{w}}" for x, (_, w) in zip(cells, _REFUSED_COLUMNS))
        out.write(line.rstrip() + "\n")
    return 0
