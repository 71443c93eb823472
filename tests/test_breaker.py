"""CircuitBreaker: closed -> open -> half_open -> closed/open, with an injected clock."""

from __future__ import annotations

import threading

import pytest

from workbench.errors import BackendError, RecoverableError, UserError
from workbench.runtime.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Transition


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kw: object) -> tuple[CircuitBreaker, list[Transition]]:
    b = CircuitBreaker("cupy", clock=clock, **{"failure_threshold": 3, "cooldown_s": 10.0, **kw})  # type: ignore[arg-type]
    seen: list[Transition] = []
    b.add_listener(seen.append)
    return b, seen


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"failure_threshold": 0},
        {"failure_threshold": 1.5},
        {"cooldown_s": -1.0},
        {"cooldown_s": float("inf")},
        {"half_open_max_calls": 0},
    ],
)
def test_bad_settings_are_user_errors(kwargs: dict[str, object]) -> None:
    args = {"name": "cupy", **kwargs}
    with pytest.raises(UserError) as e:
        CircuitBreaker(**args)  # type: ignore[arg-type]
    assert e.value.code == "user.bad_breaker"


def test_consecutive_failures_open_and_successes_reset_the_count(clock: Clock) -> None:
    b, seen = make(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # not consecutive any more
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED and b.allow()
    b.record_failure()
    assert b.state == OPEN
    assert [(t.old, t.new, t.reason) for t in seen] == [(CLOSED, OPEN, "threshold")]
    assert not b.allow() and not b.allow()
    snap = b.snapshot()
    assert snap["rejected"] == 2 and snap["opened"] == 1 and snap["failures"] == 5


def test_cooldown_then_one_probe_then_closed(clock: Clock) -> None:
    b, seen = make(clock)
    for _ in range(3):
        b.record_failure()
    clock.now = 9.9
    assert b.retry_after_s() == pytest.approx(0.1)
    assert not b.allow()
    clock.now = 10.0
    assert b.allow()  # the probe
    assert b.state == HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state == CLOSED and b.allow() and b.allow()
    assert [t.reason for t in seen] == ["threshold", "cooldown", "probe_succeeded"]
    assert [t.at for t in seen] == [0.0, 10.0, 10.0]


def test_failed_probe_reopens_and_restarts_cooldown(clock: Clock) -> None:
    b, seen = make(clock)
    for _ in range(3):
        b.record_failure()
    clock.now = 12.0
    assert b.allow()
    b.record_failure()
    assert b.state == OPEN
    assert b.retry_after_s() == pytest.approx(10.0)
    clock.now = 21.0
    assert not b.allow()
    clock.now = 22.0
    assert b.allow()
    assert [(t.new, t.reason) for t in seen] == [
        (OPEN, "threshold"),
        (HALF_OPEN, "cooldown"),
        (OPEN, "probe_failed"),
        (HALF_OPEN, "cooldown"),
    ]


def test_half_open_admits_up_to_max_probes(clock: Clock) -> None:
    b, _ = make(clock, half_open_max_calls=2)
    for _ in range(3):
        b.record_failure()
    clock.now = 10.0
    assert [b.allow() for _ in range(3)] == [True, True, False]


def test_call_counts_backend_health_errors_only(clock: Clock) -> None:
    b, _ = make(clock, failure_threshold=2)

    def fail(e: Exception) -> None:
        raise e

    with pytest.raises(UserError):
        b.call(lambda: fail(UserError("user.bad_argument", "bad")))
    with pytest.raises(RecoverableError):
        b.call(lambda: fail(RecoverableError("device.launch_failed", "x")))
    assert b.state == CLOSED
    with pytest.raises(BackendError):
        b.call(lambda: fail(BackendError("backend.compile_failed", "x")))
    assert b.state == OPEN
    with pytest.raises(BackendError) as e:
        b.call(lambda: 1)
    assert e.value.code == "backend.circuit_open"
    assert e.value.context["backend"] == "cupy"
    assert e.value.context["retry_after_s"] == pytest.approx(10.0)
    clock.now = 10.0
    assert b.call(lambda: "ok") == "ok"
    assert b.state == CLOSED


def test_a_probe_ending_in_a_user_error_frees_its_slot(clock: Clock) -> None:
    b, _ = make(clock, failure_threshold=1)
    b.record_failure()
    clock.now = 10.0

    def bad() -> None:
        raise UserError("user.bad_argument", "bad")

    with pytest.raises(UserError):
        b.call(bad)
    assert b.state == HALF_OPEN and b.allow()


def test_reset_closes(clock: Clock) -> None:
    b, seen = make(clock, failure_threshold=1)
    b.record_failure()
    b.reset()
    assert b.state == CLOSED and b.snapshot()["consecutive_failures"] == 0
    assert seen[-1].reason == "reset"


def test_listener_may_read_the_breaker(clock: Clock) -> None:
    b = CircuitBreaker("emulator", failure_threshold=1, clock=clock)
    states: list[str] = []
    b.add_listener(lambda t: states.append(b.snapshot()["state"]))  # no deadlock: called unlocked
    b.record_failure()
    assert states == [OPEN]
    b.remove_listener(b._listeners[0])
    b.reset()
    assert states == [OPEN]


def test_threads_count_every_failure_and_open_once(clock: Clock) -> None:
    b, seen = make(clock, failure_threshold=50)

    def work() -> None:
        for _ in range(500):
            b.record_failure()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = b.snapshot()
    assert snap["failures"] == 4000 and snap["opened"] == 1
    assert [t.new for t in seen] == [OPEN]
