"""Logging for the ``workbench`` logger tree: human-readable text (colour on a TTY) or JSON lines.

The library only calls ``logging.getLogger(__name__)``; the edge (CLI, server) calls `configure`
or `configure_from_env` once. Every record passes two filters on our handlers:

- `RequestIdFilter` sets ``record.request_id`` from the current request context. The context is
  the profiler's (`request_context` is `Profiler.request`), so the engine enters it once per
  request and logs, profiler records and errors all carry the same id. It also sets
  ``record.trace_id`` and ``record.span_id`` from the current OpenTelemetry span
  (`workbench.observe.tracing`); JSON lines carry them when there is one.
- `RedactFilter` enforces the convention that prompt and completion text is never logged above
  DEBUG: pass text only as ``extra={"prompt": ...}`` / ``extra={"completion": ...}`` (never in
  the message); above DEBUG the filter replaces those fields with their length. `redact` does the
  same for a string you must interpolate.

Environment (read only by `configure_from_env`): ``WORKBENCH_LOG_LEVEL`` (default ``warning``),
``WORKBENCH_LOG_FORMAT`` (``text`` or ``json``, default ``text``), ``WORKBENCH_LOG_FILE`` (append
to this file instead of stderr).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from workbench.errors import UserError
from workbench.observe.profiler import Profiler, current_request_id
from workbench.observe.tracing import current_ids

LOGGER = "workbench"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("text", "json")
DEFAULT_LEVEL = "warning"
SENSITIVE_FIELDS = ("prompt", "completion")

# One context for the request id: the profiler's. `with request_context("req-1"): ...`
request_context = Profiler.request

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "request_id",
    "trace_id",
    "span_id",
    "taskName",
}
_COLOURS = {
    logging.DEBUG: "\033[2m",
    logging.INFO: "\033[36m",
    logging.WARNING: "\033[33m",
    logging.ERROR: "\033[31m",
    logging.CRITICAL: "\033[1;31m",
}
_RESET = "\033[0m"


def parse_level(level: str | int) -> int:
    """ "debug".."critical" (any case) or a logging level number -> the number."""
    if isinstance(level, int) and not isinstance(level, bool):
        if level in LEVELS.values():
            return level
    elif isinstance(level, str) and level.strip().lower() in LEVELS:
        return LEVELS[level.strip().lower()]
    raise UserError(
        "user.bad_log_level", f"log level must be one of {', '.join(LEVELS)}, not {level!r}"
    )


def redact(text: str, level: int) -> str:
    """``text`` when logging at DEBUG (or below), otherwise only its length."""
    return text if level <= logging.DEBUG else f"<{len(text)} chars>"


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (None outside a request) unless ``extra`` gave one, and
    ``record.trace_id`` / ``record.span_id`` (None outside a trace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        if getattr(record, "trace_id", None) is None:
            record.trace_id, record.span_id = current_ids()
        return True


class RedactFilter(logging.Filter):
    """Above DEBUG, replaces the ``prompt`` / ``completion`` extra fields by their length."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            for name in SENSITIVE_FIELDS:
                value = record.__dict__.get(name)
                if value is not None:
                    record.__dict__[name] = redact(str(value), record.levelno)
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got from ``extra=``."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO 8601), level, logger, message, request_id,
    trace_id and span_id (when in a trace), the extra fields, and exc (the traceback) when there
    is one."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id is not None:
            obj["trace_id"] = trace_id
            obj["span_id"] = getattr(record, "span_id", None)
        for k, v in extra_fields(record).items():
            obj.setdefault(k, v)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request] message key=value ...``, the level coloured if asked."""

    def __init__(self, *, colour: bool = False) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname:<7}"
        if self.colour:
            level = f"{_COLOURS.get(record.levelno, '')}{level}{_RESET}"
        rid = getattr(record, "request_id", None)
        parts = [self.formatTime(record, self.datefmt), level, record.name]
        if rid:
            parts.append(f"[{rid}]")
        parts.append(record.getMessage())
        parts += [f"{k}={v!r}" for k, v in extra_fields(record).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(
    level: str | int = DEFAULT_LEVEL,
    fmt: str = "text",
    file: str | os.PathLike[str] | None = None,
    stream: IO[str] | None = None,
    *,
    colour: bool | None = None,
) -> logging.Logger:
    """Send the ``workbench`` loggers to ``file`` (appended) or ``stream`` (default stderr).

    Replaces the handler a previous call installed (others are left alone). ``colour``: None
    colours text when the stream is a TTY. Returns the ``workbench`` logger."""
    levelno = parse_level(level)
    if fmt not in FORMATS:
        raise UserError(
            "user.bad_log_format", f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}"
        )
    handler: logging.Handler
    if file is not None:
        try:
            handler = logging.FileHandler(Path(file), mode="a", encoding="utf-8")
        except OSError as e:
            raise UserError("user.bad_log_file", f"cannot open log file {file}: {e}") from e
        tty = False
    else:
        out = stream if stream is not None else sys.stderr
        handler = logging.StreamHandler(out)
        tty = bool(getattr(out, "isatty", lambda: False)())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(colour=tty if colour is None else colour))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter())
    handler._workbench = True  # type: ignore[attr-defined]  # ours to replace next time

    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if getattr(h, "_workbench", False)]:
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(levelno)
    logger.propagate = False
    return logger


def configure_from_env(
    environ: Mapping[str, str] | None = None, stream: IO[str] | None = None
) -> logging.Logger:
    """`configure` from WORKBENCH_LOG_LEVEL, WORKBENCH_LOG_FORMAT and WORKBENCH_LOG_FILE."""
    env = os.environ if environ is None else environ
    return configure(
        level=env.get("WORKBENCH_LOG_LEVEL") or DEFAULT_LEVEL,
        fmt=(env.get("WORKBENCH_LOG_FORMAT") or "text").strip().lower(),
        file=env.get("WORKBENCH_LOG_FILE") or None,
        stream=stream,
    )
