"""Per-launch profiler: every kernel launch (and NumPy backend operation) as one `LaunchRecord`.

The engine sets the request and phase once with `Profiler.request` / `Profiler.phase` (context
variables, so each thread and asyncio task sees its own); every record made inside inherits them.
Durations come from the caller when it has better clocks (device events on a GPU:
`Profiler.record`), or from `time.perf_counter` around a block (`Profiler.span`, wall clock on the
CPU).

Records live in a bounded deque (``capacity``): a long-running server keeps the most recent ones
and counts what it dropped. Aggregates (`summary`) are computed from the records held. Listeners
(`add_listener`) see every record as it is made; the metrics layer uses one to feed its kernel
launch histogram. A disabled profiler returns at the first line of `record`, and `span` yields
without reading the clock.

This module is a foundation layer: it knows nothing of the engine or the kernels. Callers pass
bytes and FLOPs (from the registry's cost model) when they know them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from workbench.errors import UserError

PHASES = ("prefill", "decode")
DEFAULT_CAPACITY = 100_000

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "workbench_profiler_request", default=None
)
_phase: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "workbench_profiler_phase", default=None
)


@dataclass(frozen=True)
class LaunchRecord:
    name: str  # kernel registry name ("matvec_q4_1") or backend operation ("linear")
    backend: str  # "cupy", "emulator", "numpy"
    duration_s: float
    shapes: Mapping[str, Any]  # e.g. {"rows": 576, "cols": 576}
    start_s: float  # time.perf_counter() when the record was made (or the span began)
    grid: tuple[int, ...] | None = None
    block: tuple[int, ...] | None = None
    phase: str | None = None
    request_id: str | None = None
    bytes: int | None = None  # global-memory traffic from the cost model
    flops: int | None = None
    launches: int = 1  # kernels the record covers (a device operation may launch several)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = dict(self.shapes)
        return d


Listener = Callable[[LaunchRecord], None]


def current_request_id() -> str | None:
    """The request id set by the innermost `Profiler.request` (any profiler) in this context."""
    return _request_id.get()


def current_phase() -> str | None:
    return _phase.get()


class Profiler:
    """Thread-safe bounded store of launch records with per-kernel aggregates."""

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, enabled: bool = True) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise UserError("user.bad_argument", f"capacity must be an int >= 1, got {capacity!r}")
        self.enabled = enabled
        self._records: deque[LaunchRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._dropped = 0

    @property
    def capacity(self) -> int:
        return self._records.maxlen or 0

    @property
    def dropped(self) -> int:
        """Records pushed out of the store by newer ones since the last `clear`."""
        return self._dropped

    def __len__(self) -> int:
        return len(self._records)

    # -- context ---------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def request(request_id: str) -> Iterator[None]:
        """Every record made inside (in this thread or task) carries ``request_id``."""
        if not isinstance(request_id, str) or not request_id:
            raise UserError("user.bad_argument", "request_id must be a non-empty string")
        token = _request_id.set(request_id)
        try:
            yield
        finally:
            _request_id.reset(token)

    @staticmethod
    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        """Every record made inside carries phase ``name`` ("prefill" or "decode")."""
        if name not in PHASES:
            raise UserError(
                "user.bad_argument", f"phase must be one of {', '.join(PHASES)}, not {name!r}"
            )
        token = _phase.set(name)
        try:
            yield
        finally:
            _phase.reset(token)

    # -- recording -------------------------------------------------------------------------
    def record(
        self,
        name: str,
        *,
        backend: str,
        duration_s: float,
        shapes: Mapping[str, Any] | None = None,
        grid: tuple[int, ...] | None = None,
        block: tuple[int, ...] | None = None,
        phase: str | None = None,
        request_id: str | None = None,
        bytes: int | None = None,  # the cost model's field name
        flops: int | None = None,
        start_s: float | None = None,
        launches: int = 1,
    ) -> LaunchRecord | None:
        """Add one launch. ``phase`` and ``request_id`` default to the current context's.

        Returns the record, or None when the profiler is disabled."""
        if not self.enabled:
            return None
        if not duration_s >= 0 or math.isinf(duration_s):
            raise UserError(
                "user.bad_argument", f"duration_s must be finite and >= 0, got {duration_s!r}"
            )
        rec = LaunchRecord(
            name=name,
            backend=backend,
            duration_s=float(duration_s),
            shapes=shapes if shapes else {},  # shared, not copied: callers reuse one per signature
            start_s=time.perf_counter() if start_s is None else start_s,
            grid=None if grid is None else tuple(grid),
            block=None if block is None else tuple(block),
            phase=phase if phase is not None else _phase.get(),
            request_id=request_id if request_id is not None else _request_id.get(),
            bytes=bytes,
            flops=flops,
            launches=launches,
        )
        with self._lock:
            if len(self._records) == self._records.maxlen:
                self._dropped += 1
            self._records.append(rec)
            listeners = tuple(self._listeners)
        for fn in listeners:
            fn(rec)
        return rec

    @contextlib.contextmanager
    def span(
        self,
        name: str,
        *,
        backend: str,
        shapes: Mapping[str, Any] | None = None,
        grid: tuple[int, ...] | None = None,
        block: tuple[int, ...] | None = None,
        bytes: int | None = None,
        flops: int | None = None,
    ) -> Iterator[None]:
        """Time the block with ``time.perf_counter`` and record it (not recorded if it raises:
        a failed launch is the error log's business, not a timing)."""
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        self.record(
            name,
            backend=backend,
            duration_s=time.perf_counter() - t0,
            shapes=shapes,
            grid=grid,
            block=block,
            bytes=bytes,
            flops=flops,
            start_s=t0,
        )

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(record)`` after each record (outside the profiler's lock)."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.remove(fn)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._dropped = 0

    # -- queries ---------------------------------------------------------------------------
    def records(
        self,
        *,
        name: str | None = None,
        request_id: str | None = None,
        phase: str | None = None,
        backend: str | None = None,
    ) -> list[LaunchRecord]:
        """The records held, oldest first, filtered by the given fields."""
        with self._lock:
            recs = list(self._records)
        return [
            r
            for r in recs
            if (name is None or r.name == name)
            and (request_id is None or r.request_id == request_id)
            and (phase is None or r.phase == phase)
            and (backend is None or r.backend == backend)
        ]

    def summary(
        self,
        *,
        by: tuple[str, ...] = ("name", "backend"),
        request_id: str | None = None,
        phase: str | None = None,
    ) -> list[dict[str, Any]]:
        """Aggregates per group (default: kernel name and backend), most total time first.

        Each dict: the ``by`` fields, count, total_s, mean_s, p50_s, p95_s, p99_s, min_s, max_s,
        bytes, flops (sums, None when no record of the group had them), gb_s and gflop_s (sums
        over total time of the records that had them)."""
        for field in by:
            if field not in _GROUP_FIELDS:
                raise UserError(
                    "user.bad_argument",
                    f"cannot group by {field!r} (one of {', '.join(_GROUP_FIELDS)})",
                )
        groups: dict[tuple, list[LaunchRecord]] = {}
        for r in self.records(request_id=request_id, phase=phase):
            groups.setdefault(tuple(getattr(r, f) for f in by), []).append(r)
        rows = [_aggregate(dict(zip(by, key)), recs) for key, recs in groups.items()]
        rows.sort(key=lambda row: -row["total_s"])
        return rows

    def to_dataframe(self) -> Any:
        """One row per record held (pandas is imported here, not at module import)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise UserError(
                "user.missing_dependency", "to_dataframe needs pandas: pip install pandas"
            ) from e
        columns = [f for f in LaunchRecord.__dataclass_fields__]
        return pd.DataFrame([r.to_dict() for r in self.records()], columns=columns)


_GROUP_FIELDS = ("name", "backend", "phase", "request_id")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of pre-sorted values (NumPy's default method), q in 0..100."""
    if not sorted_values:
        raise UserError("user.bad_argument", "percentile of no values")
    if not 0 <= q <= 100:
        raise UserError("user.bad_argument", f"q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _aggregate(key: dict[str, Any], recs: list[LaunchRecord]) -> dict[str, Any]:
    d = sorted(r.duration_s for r in recs)
    total = sum(d)
    with_bytes = [r for r in recs if r.bytes is not None]
    with_flops = [r for r in recs if r.flops is not None]
    nbytes = sum(r.bytes for r in with_bytes) if with_bytes else None  # type: ignore[misc]
    flops = sum(r.flops for r in with_flops) if with_flops else None  # type: ignore[misc]
    t_bytes = sum(r.duration_s for r in with_bytes)
    t_flops = sum(r.duration_s for r in with_flops)
    return {
        **key,
        "count": len(d),
        "total_s": total,
        "mean_s": total / len(d),
        "p50_s": percentile(d, 50),
        "p95_s": percentile(d, 95),
        "p99_s": percentile(d, 99),
        "min_s": d[0],
        "max_s": d[-1],
        "bytes": nbytes,
        "flops": flops,
        "gb_s": nbytes / t_bytes / 1e9 if nbytes is not None and t_bytes > 0 else None,
        "gflop_s": flops / t_flops / 1e9 if flops is not None and t_flops > 0 else None,
    }
