"""Retrying transient faults: a backoff policy and per-operation statistics.

Only `RecoverableError` is retried; every other error propagates at once. Delays use "full
jitter" (a uniform draw below the exponential cap, as in the AWS architecture blog's "Exponential
Backoff and Jitter"), so callers that fail together do not retry together. Sleep, clock and random
source are injectable: tests check the delays without ever sleeping.
"""

from __future__ import annotations

import bisect
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from workbench.errors import RecoverableError, UserError

if TYPE_CHECKING:
    import pandas as pd

    from workbench.runtime.errorlog import ErrorLog

T = TypeVar("T")

JITTERS = ("full", "none")
OUTCOMES = ("ok", "recovered", "exhausted", "failed")
# Upper bounds (seconds) of the delay histogram's buckets; the last catches everything above.
DELAY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
MAX_DELAYS_KEPT = 1000  # per operation: the most recent delays, for plots

RetryFn = Callable[
    [int, RecoverableError, float], None
]  # (failed attempt, error, delay before next)


def _bad(message: str, **context: Any) -> UserError:
    return UserError("user.bad_retry_policy", message, **context)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    ``max_attempts`` counts the first try (1 = no retries). Before attempt ``n + 1`` the policy
    waits `delay` (n); ``deadline_s`` (optional) bounds the whole call: no retry starts whose delay
    would end past it.
    """

    max_attempts: int = 3
    initial_delay_s: float = 0.05
    multiplier: float = 2.0
    max_delay_s: float = 2.0
    jitter: str = "full"
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        a = self.max_attempts
        if isinstance(a, bool) or not isinstance(a, int) or a < 1:
            raise _bad(f"max_attempts must be an int >= 1, not {a!r}", max_attempts=a)
        for name in ("initial_delay_s", "multiplier", "max_delay_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _bad(f"{name} must be a finite number, not {v!r}", **{name: v})
        if self.initial_delay_s < 0:
            raise _bad(f"initial_delay_s must be >= 0, not {self.initial_delay_s!r}")
        if self.multiplier < 1:
            raise _bad(f"multiplier must be >= 1 (delays never shrink), not {self.multiplier!r}")
        if self.max_delay_s < self.initial_delay_s:
            raise _bad(
                f"max_delay_s ({self.max_delay_s!r}) must be >= initial_delay_s "
                f"({self.initial_delay_s!r})"
            )
        if self.jitter not in JITTERS:
            raise _bad(f"jitter must be one of {JITTERS}, not {self.jitter!r}")
        d = self.deadline_s
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0 or math.isnan(d)
        ):
            raise _bad(f"deadline_s must be a positive number or None, not {d!r}")

    def cap(self, attempt: int) -> float:
        """The largest delay after failed attempt ``attempt`` (1-based): min(max, initial *
        multiplier ** (attempt - 1))."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise UserError("user.bad_argument", f"attempt must be an int >= 1, not {attempt!r}")
        # cap the exponent so huge attempt numbers cannot overflow a float
        exponent = min(attempt - 1, 1024)
        try:
            raw = self.initial_delay_s * self.multiplier**exponent
        except OverflowError:
            raw = math.inf
        return min(self.max_delay_s, raw)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt ``attempt``: uniform(0, `cap`) with full jitter, else the
        cap itself."""
        cap = self.cap(attempt)
        if self.jitter == "none":
            return cap
        return (rng or _rng).uniform(0.0, cap)

    def call(
        self,
        fn: Callable[[], T],
        *,
        operation: str,
        stats: RetryStats | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_retry: RetryFn | None = None,
        log: ErrorLog | None = None,
        kernel: str | None = None,
        request_id: str | None = None,
    ) -> T:
        """Call ``fn()`` until it returns, retrying `RecoverableError` per the policy.

        Any other exception propagates at once. After the last attempt the last error is raised
        with ``attempts`` and ``exhausted=True`` added to its context. ``on_retry(attempt, error,
        delay)`` runs before each wait. ``stats`` gets one record per call; ``log`` gets one
        record per failed attempt, marked ``recovered`` once the outcome is known.
        """
        if not isinstance(operation, str) or not operation:
            raise UserError(
                "user.bad_argument", f"operation must be a non-empty string, not {operation!r}"
            )
        start = clock()
        delays: list[float] = []
        failed: list[RecoverableError] = []
        attempt = 0
        outcome = "failed"
        try:
            while True:
                attempt += 1
                try:
                    result = fn()
                except RecoverableError as e:
                    failed.append(e)
                    e.context.setdefault("operation", operation)
                    if attempt >= self.max_attempts:
                        outcome = "exhausted"
                        _mark_exhausted(e, attempt)
                        raise
                    wait = self.delay(attempt, rng)
                    if self.deadline_s is not None and clock() + wait - start > self.deadline_s:
                        outcome = "exhausted"
                        e.context["deadline_s"] = self.deadline_s
                        _mark_exhausted(e, attempt)
                        raise
                    if on_retry is not None:
                        on_retry(attempt, e, wait)
                    sleep(wait)
                    delays.append(wait)
                    continue
                outcome = "recovered" if attempt > 1 else "ok"
                return result
        finally:
            if stats is not None:
                stats.record(
                    operation,
                    attempts=attempt,
                    outcome=outcome,
                    delays=delays,
                    failures=len(failed),
                )
            if log is not None:
                recovered = outcome == "recovered"
                for i, e in enumerate(failed, 1):
                    log.record(
                        e,
                        operation=operation,
                        kernel=kernel,
                        request_id=request_id,
                        attempts=i,
                        recovered=recovered,
                    )


def _mark_exhausted(e: RecoverableError, attempts: int) -> None:
    e.context["attempts"] = attempts
    e.context["exhausted"] = True


_rng = random.Random()


@dataclass
class _OpStats:
    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0  # attempts that raised RecoverableError
    succeeded: int = 0  # calls that returned (first try or after retries)
    recovered: int = 0  # calls that returned after >= 1 retry
    exhausted: int = 0  # calls that ran out of attempts (or deadline)
    failed: int = 0  # calls ended by an error that is not retried
    delay_total_s: float = 0.0

    def __post_init__(self) -> None:
        self.delay_buckets = [0] * len(DELAY_BUCKETS_S)
        self.delays: deque[float] = deque(maxlen=MAX_DELAYS_KEPT)


StatsListener = Callable[
    [str, str, int, list[float]], None
]  # (operation, outcome, attempts, delays)


class RetryStats:
    """Thread-safe counters per operation. Invariants, per operation: ``calls == succeeded +
    exhausted + failed``, ``attempts == calls + retries``, and ``failures == retries + exhausted``
    (except for calls interrupted while waiting to retry, e.g. by KeyboardInterrupt)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, _OpStats] = {}
        self._listeners: list[StatsListener] = []

    def record(
        self,
        operation: str,
        *,
        attempts: int,
        outcome: str,
        delays: list[float] | tuple[float, ...] = (),
        failures: int | None = None,
    ) -> None:
        """Account for one finished call (`RetryPolicy.call` does this)."""
        if outcome not in OUTCOMES:
            raise UserError(
                "user.bad_argument", f"outcome must be one of {OUTCOMES}, not {outcome!r}"
            )
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise UserError("user.bad_argument", f"attempts must be an int >= 1, not {attempts!r}")
        if len(delays) != attempts - 1:
            raise UserError(
                "user.bad_argument",
                f"a call of {attempts} attempt(s) has {attempts - 1} delay(s), not {len(delays)}",
            )
        if failures is None:  # every attempt failed recoverably except a successful or fatal last
            failures = attempts if outcome == "exhausted" else attempts - 1
        with self._lock:
            s = self._ops.setdefault(operation, _OpStats())
            s.calls += 1
            s.attempts += attempts
            s.retries += attempts - 1
            s.failures += failures
            if outcome in ("ok", "recovered"):
                s.succeeded += 1
            if outcome != "ok":
                setattr(s, outcome, getattr(s, outcome) + 1)
            for d in delays:
                s.delay_total_s += d
                s.delay_buckets[bisect.bisect_left(DELAY_BUCKETS_S, d)] += 1
                s.delays.append(d)
            listeners = list(self._listeners)
        for fn in listeners:
            fn(operation, outcome, attempts, list(delays))

    def add_listener(self, fn: StatsListener) -> None:
        """Call ``fn(operation, outcome, attempts, delays)`` after every recorded call."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: StatsListener) -> None:
        with self._lock:
            self._listeners.remove(fn)

    def operations(self) -> list[str]:
        with self._lock:
            return sorted(self._ops)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{operation: {calls, attempts, ..., delay_histogram: {upper bound: count}, delays}}``;
        plain data, safe to keep (a copy)."""
        with self._lock:
            return {op: _snap(s) for op, s in sorted(self._ops.items())}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per operation with the counters (pandas is imported here, lazily)."""
        import pandas as pd

        rows = [
            {
                "operation": op,
                **{k: v for k, v in s.items() if k not in ("delay_histogram", "delays")},
            }
            for op, s in self.snapshot().items()
        ]
        columns = ["operation", *_COUNTERS, "delay_total_s"]
        return pd.DataFrame(rows, columns=columns)

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()


_COUNTERS = (
    "calls",
    "attempts",
    "retries",
    "failures",
    "succeeded",
    "recovered",
    "exhausted",
    "failed",
)


def _snap(s: _OpStats) -> dict[str, Any]:
    d: dict[str, Any] = {k: getattr(s, k) for k in _COUNTERS}
    d["delay_total_s"] = s.delay_total_s
    d["delay_histogram"] = dict(zip(DELAY_BUCKETS_S, s.delay_buckets))
    d["delays"] = list(s.delays)
    return d


_default_stats = RetryStats()


def default_stats() -> RetryStats:
    """The process-wide statistics (what `store.pull` records into unless given its own)."""
    return _default_stats
