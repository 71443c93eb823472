"""A circuit breaker: stop calling a backend that keeps failing, probe it again after a cooldown.

closed --(failure_threshold consecutive failures)--> open --(cooldown_s)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open (cooldown restarts)

The breaker only counts; callers decide what a failure is (`call` counts recoverable and backend
errors, the categories that say something about the backend's health) and what to do when it is
open (the engine moves requests to the NumPy backend).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from workbench.errors import BackendError, UserError, WorkbenchError

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)
TRIPPING_CATEGORIES = ("recoverable", "backend")  # what `call` counts as a failure


@dataclass(frozen=True)
class Transition:
    breaker: str
    old: str
    new: str
    at: float  # the breaker's clock
    reason: str  # "threshold", "cooldown", "probe_succeeded", "probe_failed", "reset"


Listener = Callable[[Transition], None]


class CircuitBreaker:
    """Thread-safe; listeners are called after every transition, outside the lock."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise _bad(f"name must be a non-empty string, not {name!r}")
        for arg, v in (
            ("failure_threshold", failure_threshold),
            ("half_open_max_calls", half_open_max_calls),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(f"{arg} must be an int >= 1, not {v!r}", breaker=name)
        if (
            isinstance(cooldown_s, bool)
            or not isinstance(cooldown_s, (int, float))
            or not math.isfinite(cooldown_s)
            or cooldown_s < 0
        ):
            raise _bad(f"cooldown_s must be a finite number >= 0, not {cooldown_s!r}", breaker=name)
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = float(cooldown_s)
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probes = 0  # probe calls admitted and not yet reported in half_open
        self._counts = {"successes": 0, "failures": 0, "rejected": 0, "opened": 0}

    # -- state -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The current state (an open breaker past its cooldown reads half_open)."""
        with self._lock:
            events = self._tick()
            state = self._state
        self._notify(events)
        return state

    def allow(self) -> bool:
        """May a call go to the backend now? In half_open, True for at most
        ``half_open_max_calls`` probes until one reports back."""
        with self._lock:
            events = self._tick()
            if self._state == CLOSED:
                ok = True
            elif self._state == HALF_OPEN and self._probes < self.half_open_max_calls:
                self._probes += 1
                ok = True
            else:
                self._counts["rejected"] += 1
                ok = False
        self._notify(events)
        return ok

    def record_success(self) -> None:
        with self._lock:
            events = self._tick()
            self._counts["successes"] += 1
            self._consecutive = 0
            if self._state == HALF_OPEN:
                events.append(self._move(CLOSED, "probe_succeeded"))
        self._notify(events)

    def record_failure(self) -> None:
        with self._lock:
            events = self._tick()
            self._counts["failures"] += 1
            self._consecutive += 1
            if self._state == HALF_OPEN:
                events.append(self._move(OPEN, "probe_failed"))
            elif self._state == CLOSED and self._consecutive >= self.failure_threshold:
                events.append(self._move(OPEN, "threshold"))
        self._notify(events)

    def trip(self, reason: str) -> None:
        """Open now, whatever the count: for a failure that later calls cannot survive (a lost
        device context). The cooldown and probes apply as after any opening."""
        with self._lock:
            events = self._tick()
            self._counts["failures"] += 1
            self._consecutive += 1
            if self._state != OPEN:
                events.append(self._move(OPEN, reason))
        self._notify(events)

    def reset(self) -> None:
        """Back to closed, failures forgotten (an operator's override)."""
        with self._lock:
            events = [self._move(CLOSED, "reset")] if self._state != CLOSED else []
            self._consecutive = 0
        self._notify(events)

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open); for Retry-After."""
        with self._lock:
            events = self._tick()
            if self._state != OPEN or self._opened_at is None:
                left = 0.0
            else:
                left = max(0.0, self._opened_at + self.cooldown_s - self._clock())
        self._notify(events)
        return left

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` through the breaker: `BackendError` ``backend.circuit_open`` when it is not
        allowed; recoverable and backend errors count as failures, a return as a success; other
        errors (user, model, internal) say nothing about the backend and only release a probe."""
        if not self.allow():
            raise BackendError(
                "backend.circuit_open",
                f"the {self.name} backend's circuit breaker is open after repeated failures; "
                f"retry in {self.retry_after_s():.1f} s",
                backend=self.name,
                retry_after_s=self.retry_after_s(),
            )
        try:
            result = fn()
        except WorkbenchError as e:
            if e.category in TRIPPING_CATEGORIES:
                self.record_failure()
            else:
                self._release_probe()
            raise
        except BaseException:
            self._release_probe()
            raise
        self.record_success()
        return result

    def snapshot(self) -> dict[str, Any]:
        """Plain data: name, state, settings, consecutive failures, totals, retry_after_s."""
        with self._lock:
            events = self._tick()
            now = self._clock()
            left = 0.0
            if self._state == OPEN and self._opened_at is not None:
                left = max(0.0, self._opened_at + self.cooldown_s - now)
            snap = {
                "name": self.name,
                "state": self._state,
                "consecutive_failures": self._consecutive,
                "failure_threshold": self.failure_threshold,
                "cooldown_s": self.cooldown_s,
                "half_open_max_calls": self.half_open_max_calls,
                "opened_at": self._opened_at,
                "retry_after_s": left,
                **self._counts,
            }
        self._notify(events)
        return snap

    # -- listeners ---------------------------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(transition)`` after every state change."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.remove(fn)

    # -- internals (called with the lock held, except _notify) ---------------------------------
    def _tick(self) -> list[Transition]:
        if (
            self._state == OPEN
            and self._opened_at is not None
            and self._clock() - self._opened_at >= self.cooldown_s
        ):
            return [self._move(HALF_OPEN, "cooldown")]
        return []

    def _move(self, new: str, reason: str) -> Transition:
        old, now = self._state, self._clock()
        self._state = new
        self._probes = 0
        if new == OPEN:
            self._opened_at = now
            self._counts["opened"] += 1
        elif new == CLOSED:
            self._opened_at = None
            self._consecutive = 0
        return Transition(self.name, old, new, now, reason)

    def _release_probe(self) -> None:
        with self._lock:
            if self._state == HALF_OPEN and self._probes > 0:
                self._probes -= 1

    def _notify(self, events: list[Transition]) -> None:
        if not events:
            return
        with self._lock:
            listeners = list(self._listeners)
        for t in events:
            for fn in listeners:
                fn(t)


def _bad(message: str, **context: Any) -> UserError:
    return UserError("user.bad_breaker", message, **context)
