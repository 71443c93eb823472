"""The error log: a bounded, thread-safe, in-memory record of every error, for inspection.

Each record keeps the time, category, code, message, operation/kernel, context, traceback,
request id, attempts and whether a retry recovered it. The oldest records go first when the log
is full (``dropped`` counts them). Listeners see each record as it is added (a widget, a logger).
"""

from __future__ import annotations

import threading
import time
import traceback as tb
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.errors import CATEGORIES, UserError, WorkbenchError
from workbench.runtime.classify import classify

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ErrorRecord:
    time: float  # seconds since the epoch (time.time)
    category: str
    code: str
    message: str
    operation: str | None = None
    kernel: str | None = None
    request_id: str | None = None
    attempts: int | None = None
    recovered: bool | None = None  # None: not retried; True/False: a retry did/did not recover it
    context: dict[str, Any] = field(default_factory=dict)  # plain values (errors.to_dict)
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(ErrorRecord.__dataclass_fields__)
Listener = Callable[[ErrorRecord], None]


class ErrorLog:
    def __init__(self, capacity: int = 1000, *, clock: Callable[[], float] = time.time) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise UserError("user.bad_argument", f"capacity must be an int >= 1, not {capacity!r}")
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._records: deque[ErrorRecord] = deque(maxlen=capacity)
        self._listeners: list[Listener] = []
        self.dropped = 0  # records pushed out by newer ones

    def record(
        self,
        error: BaseException,
        *,
        operation: str | None = None,
        kernel: str | None = None,
        request_id: str | None = None,
        attempts: int | None = None,
        recovered: bool | None = None,
        traceback: str | bool = True,
    ) -> ErrorRecord:
        """Add a record for ``error`` and return it.

        Non-workbench exceptions are classified first (`classify`). Fields not given are taken
        from the error's context (``operation``, ``kernel``, ``request_id``, ``attempts``).
        ``traceback``: True formats the error's own traceback (if it was raised), False omits it,
        a string is kept as given.
        """
        if not isinstance(error, BaseException):
            raise UserError(
                "user.bad_argument", f"record takes an exception, not {type(error).__name__}"
            )
        err = (
            error
            if isinstance(error, WorkbenchError)
            else classify(error, operation=operation or "unknown")
        )
        ctx = err.context
        if traceback is True:
            text = _format_traceback(error)
        elif traceback is False:
            text = None
        elif isinstance(traceback, str):
            text = traceback
        else:
            raise UserError(
                "user.bad_argument", f"traceback must be a bool or a string, not {traceback!r}"
            )
        rec = ErrorRecord(
            time=self._clock(),
            category=err.category,
            code=err.code,
            message=err.message,
            operation=operation if operation is not None else _str_or_none(ctx.get("operation")),
            kernel=kernel if kernel is not None else _str_or_none(ctx.get("kernel")),
            request_id=request_id
            if request_id is not None
            else _str_or_none(ctx.get("request_id")),
            attempts=attempts if attempts is not None else ctx.get("attempts"),
            recovered=recovered,
            context=err.to_dict()["context"],
            traceback=text,
        )
        with self._lock:
            if len(self._records) == self.capacity:
                self.dropped += 1
            self._records.append(rec)
            listeners = list(self._listeners)
        for fn in listeners:
            fn(rec)
        return rec

    def query(
        self,
        *,
        category: str | None = None,
        code: str | None = None,
        since: float | None = None,
        request_id: str | None = None,
        operation: str | None = None,
    ) -> list[ErrorRecord]:
        """Records matching every filter given, oldest first; ``since`` is a `time.time` value."""
        if category is not None and category not in CATEGORIES:
            raise UserError(
                "user.bad_argument",
                f"category must be one of {', '.join(CATEGORIES)}, not {category!r}",
            )
        if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
            raise UserError(
                "user.bad_argument", f"since must be a time.time() value, not {since!r}"
            )
        with self._lock:
            records = list(self._records)
        return [
            r
            for r in records
            if (category is None or r.category == category)
            and (code is None or r.code == code)
            and (since is None or r.time >= since)
            and (request_id is None or r.request_id == request_id)
            and (operation is None or r.operation == operation)
        ]

    def counts(self) -> dict[str, int]:
        """Records held per code."""
        out: dict[str, int] = {}
        for r in self.query():
            out[r.code] = out.get(r.code, 0) + 1
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per record (pandas is imported here, lazily)."""
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.query()], columns=list(COLUMNS))

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self.dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(record)`` after every record."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.remove(fn)


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def _format_traceback(error: BaseException) -> str | None:
    if error.__traceback__ is None:
        return None
    return "".join(tb.format_exception(type(error), error, error.__traceback__))


_default = ErrorLog()


def default_log() -> ErrorLog:
    """The process-wide error log."""
    return _default
