"""RetryPolicy and RetryStats: delays within the policy's bounds (clock and sleep injected, never
slept), only recoverable errors retried, every attempt accounted for."""

from __future__ import annotations

import math
import random
import threading

import pytest

from workbench.errors import BackendError, InternalError, RecoverableError, UserError
from workbench.runtime.errorlog import ErrorLog
from workbench.runtime.retry import DELAY_BUCKETS_S, RetryPolicy, RetryStats


class FakeTime:
    """A clock that only moves when `sleep` is called."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


class Flaky:
    """Raises ``errors`` in order, then returns ``value``."""

    def __init__(self, *errors: Exception, value: object = "done") -> None:
        self.errors, self.value, self.calls = list(errors), value, 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def transient(n: int = 0) -> RecoverableError:
    return RecoverableError("device.launch_failed", f"launch failed #{n}")


# --- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 2.5},
        {"max_attempts": True},
        {"initial_delay_s": -0.1},
        {"initial_delay_s": math.nan},
        {"multiplier": 0.5},
        {"multiplier": "2"},
        {"max_delay_s": 0.01},  # below the initial delay
        {"max_delay_s": math.inf},
        {"jitter": "equal"},
        {"deadline_s": 0},
        {"deadline_s": -1.0},
    ],
)
def test_bad_policy_is_a_user_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(UserError) as e:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert e.value.code == "user.bad_retry_policy"
    assert next(iter(kwargs)).split("_")[0] in e.value.message


def test_cap_grows_geometrically_up_to_max() -> None:
    p = RetryPolicy(initial_delay_s=0.05, multiplier=2.0, max_delay_s=2.0)
    assert [p.cap(n) for n in range(1, 9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert p.cap(10**6) == 2.0  # no overflow
    with pytest.raises(UserError):
        p.cap(0)


def test_full_jitter_delays_stay_within_bounds_and_spread(seed: int) -> None:
    p = RetryPolicy(initial_delay_s=0.05, multiplier=3.0, max_delay_s=1.0)
    rng = random.Random(seed)
    for attempt in range(1, 8):
        cap = min(1.0, 0.05 * 3.0 ** (attempt - 1))
        draws = [p.delay(attempt, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in draws)
        # uniform over [0, cap]: the mean is near cap / 2, both halves are hit
        assert abs(sum(draws) / len(draws) - cap / 2) < 0.1 * cap
        assert min(draws) < 0.2 * cap and max(draws) > 0.8 * cap


def test_no_jitter_waits_exactly_the_cap() -> None:
    p = RetryPolicy(initial_delay_s=0.5, multiplier=2.0, max_delay_s=1.5, jitter="none")
    assert [p.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]


def test_seeded_rng_makes_delays_reproducible(seed: int) -> None:
    p = RetryPolicy()
    a = [p.delay(n, random.Random(seed)) for n in range(1, 5)]
    b = [p.delay(n, random.Random(seed)) for n in range(1, 5)]
    assert a == b


# --- call ---------------------------------------------------------------------------------------


def test_recoverable_errors_are_retried_with_policy_delays(seed: int) -> None:
    t = FakeTime()
    p = RetryPolicy(max_attempts=4, initial_delay_s=0.1, multiplier=2.0, max_delay_s=0.3)
    fn = Flaky(transient(1), transient(2), transient(3))
    retries: list[tuple[int, str, float]] = []
    stats = RetryStats()
    out = p.call(
        fn,
        operation="launch",
        stats=stats,
        sleep=t.sleep,
        clock=t.clock,
        rng=random.Random(seed),
        on_retry=lambda n, e, d: retries.append((n, e.message, d)),
    )
    assert out == "done" and fn.calls == 4
    assert [r[0] for r in retries] == [1, 2, 3]
    assert [r[1] for r in retries] == ["launch failed #1", "launch failed #2", "launch failed #3"]
    assert t.sleeps == [r[2] for r in retries]
    for n, d in zip((1, 2, 3), t.sleeps):
        assert 0.0 <= d <= min(0.3, 0.1 * 2 ** (n - 1))
    s = stats.snapshot()["launch"]
    assert (s["calls"], s["attempts"], s["retries"], s["failures"]) == (1, 4, 3, 3)
    assert (s["succeeded"], s["recovered"], s["exhausted"], s["failed"]) == (1, 1, 0, 0)
    assert s["delays"] == t.sleeps
    assert s["delay_total_s"] == pytest.approx(sum(t.sleeps))
    assert sum(s["delay_histogram"].values()) == 3


def test_success_first_time_does_not_sleep() -> None:
    t = FakeTime()
    stats = RetryStats()
    assert RetryPolicy().call(lambda: 42, operation="sync", stats=stats, sleep=t.sleep) == 42
    assert t.sleeps == []
    s = stats.snapshot()["sync"]
    assert (s["calls"], s["attempts"], s["succeeded"], s["recovered"]) == (1, 1, 1, 0)


@pytest.mark.parametrize(
    "error",
    [
        UserError("user.bad_argument", "bad"),
        BackendError("backend.unavailable", "no GPU"),
        InternalError("internal.bug", "bug"),
        RuntimeError("not a workbench error"),
    ],
)
def test_only_recoverable_errors_are_retried(error: Exception) -> None:
    t = FakeTime()
    stats = RetryStats()
    fn = Flaky(transient(), error)
    with pytest.raises(type(error)) as e:
        RetryPolicy(max_attempts=5).call(fn, operation="launch", stats=stats, sleep=t.sleep)
    assert e.value is error
    assert fn.calls == 2 and len(t.sleeps) == 1
    s = stats.snapshot()["launch"]
    assert (s["calls"], s["attempts"], s["retries"], s["failures"], s["failed"]) == (1, 2, 1, 1, 1)
    assert s["exhausted"] == 0 and s["succeeded"] == 0


def test_exhaustion_raises_the_last_error_marked() -> None:
    t = FakeTime()
    stats = RetryStats()
    errors = [transient(i) for i in range(3)]
    with pytest.raises(RecoverableError) as e:
        RetryPolicy(max_attempts=3).call(
            Flaky(*errors), operation="alloc", stats=stats, sleep=t.sleep
        )
    assert e.value is errors[-1]
    assert e.value.context["attempts"] == 3
    assert e.value.context["exhausted"] is True
    assert e.value.context["operation"] == "alloc"
    assert len(t.sleeps) == 2
    s = stats.snapshot()["alloc"]
    assert (s["calls"], s["attempts"], s["retries"], s["failures"], s["exhausted"]) == (
        1,
        3,
        2,
        3,
        1,
    )


def test_exhaustion_keeps_the_original_cause() -> None:
    cause = OSError("pipe broke")

    def fn() -> None:
        raise RecoverableError("device.sync_failed", "sync failed") from cause

    with pytest.raises(RecoverableError) as e:
        RetryPolicy(max_attempts=2).call(fn, operation="sync", sleep=lambda s: None)
    assert e.value.__cause__ is cause


def test_deadline_stops_retrying_before_overrunning() -> None:
    t = FakeTime()
    p = RetryPolicy(max_attempts=100, initial_delay_s=1.0, max_delay_s=1.0, jitter="none",
                    deadline_s=3.5)  # fmt: skip
    fn = Flaky(*[transient(i) for i in range(100)])
    with pytest.raises(RecoverableError) as e:
        p.call(fn, operation="launch", sleep=t.sleep, clock=t.clock)
    assert t.sleeps == [1.0, 1.0, 1.0]  # a 4th wait would end at 4.0 s > 3.5 s
    assert fn.calls == 4 and e.value.context["attempts"] == 4
    assert e.value.context["deadline_s"] == 3.5


def test_call_logs_each_failed_attempt_with_its_outcome() -> None:
    log = ErrorLog()
    RetryPolicy(max_attempts=3).call(
        Flaky(transient(1), transient(2)),
        operation="launch",
        sleep=lambda s: None,
        log=log,
        kernel="matvec_q4_0",
        request_id="r1",
    )
    recs = log.query()
    assert [r.attempts for r in recs] == [1, 2]
    assert all(r.recovered is True and r.kernel == "matvec_q4_0" for r in recs)
    assert all(r.request_id == "r1" and r.operation == "launch" for r in recs)
    with pytest.raises(RecoverableError):
        RetryPolicy(max_attempts=2).call(
            Flaky(transient(3), transient(4)), operation="sync", sleep=lambda s: None, log=log
        )
    assert [r.recovered for r in log.query(operation="sync")] == [False, False]


def test_call_rejects_a_missing_operation() -> None:
    with pytest.raises(UserError):
        RetryPolicy().call(lambda: 1, operation="")


# --- stats --------------------------------------------------------------------------------------


def test_stats_reject_inconsistent_records() -> None:
    stats = RetryStats()
    with pytest.raises(UserError):
        stats.record("x", attempts=1, outcome="maybe")
    with pytest.raises(UserError):
        stats.record("x", attempts=0, outcome="ok")
    with pytest.raises(UserError):
        stats.record("x", attempts=3, outcome="recovered", delays=[0.1])
    assert stats.snapshot() == {}


def test_histogram_buckets_by_upper_bound() -> None:
    stats = RetryStats()
    stats.record("x", attempts=4, outcome="recovered", delays=[0.0005, 0.05, 0.3])
    hist = stats.snapshot()["x"]["delay_histogram"]
    assert list(hist) == list(DELAY_BUCKETS_S)
    assert hist[0.001] == 1 and hist[0.05] == 1 and hist[0.5] == 1
    assert sum(hist.values()) == 3


def test_stats_listeners_and_dataframe() -> None:
    stats = RetryStats()
    seen: list[tuple[str, str, int]] = []
    stats.add_listener(lambda op, outcome, n, delays: seen.append((op, outcome, n)))
    stats.record("launch", attempts=2, outcome="recovered", delays=[0.01])
    stats.record("alloc", attempts=1, outcome="ok")
    assert seen == [("launch", "recovered", 2), ("alloc", "ok", 1)]
    df = stats.to_dataframe()
    assert list(df["operation"]) == ["alloc", "launch"]
    assert df.set_index("operation").loc["launch", "retries"] == 1
    assert stats.operations() == ["alloc", "launch"]
    stats.reset()
    assert stats.snapshot() == {}


def test_threads_hammering_one_stats_lose_nothing() -> None:
    stats = RetryStats()
    p = RetryPolicy(max_attempts=3)
    n_threads, per_thread = 8, 200

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(per_thread):
            fails = i % 3  # 0, 1 or 2 transient failures: always recovers within 3 attempts
            p.call(Flaky(*[transient() for _ in range(fails)]), operation="launch",
                   stats=stats, sleep=lambda s: None, rng=rng)  # fmt: skip

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = stats.snapshot()["launch"]
    calls = n_threads * per_thread
    retries = n_threads * sum(i % 3 for i in range(per_thread))
    assert s["calls"] == calls and s["succeeded"] == calls
    assert s["retries"] == s["failures"] == retries
    assert s["attempts"] == calls + retries
    assert s["recovered"] == n_threads * sum(1 for i in range(per_thread) if i % 3)
    assert sum(s["delay_histogram"].values()) == retries
