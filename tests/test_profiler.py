"""The profiler: aggregates on known durations, context grouping across threads, bounds."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from workbench.errors import UserError
from workbench.observe.profiler import Profiler, current_phase, current_request_id, percentile


def test_aggregates_match_numpy_percentiles_and_cost_rates(rng: np.random.Generator) -> None:
    prof = Profiler()
    durations = rng.uniform(1e-4, 1e-2, 101)
    for d in durations:
        prof.record("matvec", backend="emulator", duration_s=float(d), bytes=2_000, flops=500)
    prof.record("add", backend="emulator", duration_s=1e-6)
    (row, other) = prof.summary()  # most total time first
    assert row["name"] == "matvec" and other["name"] == "add"
    assert row["count"] == 101
    assert row["total_s"] == pytest.approx(durations.sum())
    assert row["mean_s"] == pytest.approx(durations.mean())
    for q in (50, 95, 99):
        assert row[f"p{q}_s"] == pytest.approx(np.percentile(durations, q))
    assert row["gb_s"] == pytest.approx(101 * 2_000 / durations.sum() / 1e9)
    assert row["gflop_s"] == pytest.approx(101 * 500 / durations.sum() / 1e9)
    assert other["bytes"] is None and other["gb_s"] is None


def test_percentile_on_known_values() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(values, 50) == 5.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile(values, 95) == pytest.approx(9.55)
    with pytest.raises(UserError):
        percentile([], 50)


def test_request_and_phase_are_inherited_per_thread() -> None:
    prof = Profiler()
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        with prof.request(f"req-{i}"):
            with prof.phase("prefill"):
                barrier.wait()  # all threads inside their contexts at once
                prof.record("matmul", backend="numpy", duration_s=0.002)
            for _ in range(i + 1):
                with prof.phase("decode"), prof.span("matvec", backend="numpy"):
                    pass
        assert current_request_id() is None and current_phase() is None

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        recs = prof.records(request_id=f"req-{i}")
        assert [r.phase for r in recs].count("prefill") == 1
        assert [r.name for r in recs if r.phase == "decode"] == ["matvec"] * (i + 1)
    rows = prof.summary(by=("request_id", "phase"))
    assert {(r["request_id"], r["phase"]): r["count"] for r in rows} == {
        **{(f"req-{i}", "prefill"): 1 for i in range(4)},
        **{(f"req-{i}", "decode"): i + 1 for i in range(4)},
    }
    assert len(prof.summary(phase="decode")) == 1
    assert prof.records(name="matmul", request_id="req-2")[0].duration_s == 0.002


def test_explicit_fields_override_context_and_span_times() -> None:
    prof = Profiler()
    with prof.request("ctx"), prof.phase("decode"):
        rec = prof.record(
            "k", backend="cupy", duration_s=1.0, request_id="x", phase="prefill", grid=[2, 1, 1]
        )
        with prof.span("s", backend="numpy", shapes={"n": 3}):
            sum(range(10_000))
    assert rec is not None and (rec.request_id, rec.phase, rec.grid) == ("x", "prefill", (2, 1, 1))
    span = prof.records(name="s")[0]
    assert span.request_id == "ctx" and span.shapes == {"n": 3} and span.duration_s > 0


def test_span_does_not_record_a_failed_operation() -> None:
    prof = Profiler()
    with pytest.raises(RuntimeError), prof.span("boom", backend="numpy"):
        raise RuntimeError("launch failed")
    assert len(prof) == 0


def test_capacity_bounds_the_store_and_counts_drops() -> None:
    prof = Profiler(capacity=10)
    for i in range(25):
        prof.record(f"k{i}", backend="numpy", duration_s=0.0)
    assert len(prof) == 10 and prof.dropped == 15
    assert [r.name for r in prof.records()] == [f"k{i}" for i in range(15, 25)]
    prof.clear()
    assert len(prof) == 0 and prof.dropped == 0


def test_disabled_profiler_records_nothing_and_calls_no_listener() -> None:
    prof = Profiler(enabled=False)
    seen: list = []
    prof.add_listener(seen.append)
    assert prof.record("k", backend="numpy", duration_s=1.0) is None
    with prof.span("s", backend="numpy"):
        pass
    assert len(prof) == 0 and seen == []
    prof.enabled = True
    prof.record("k", backend="numpy", duration_s=1.0)
    assert [r.name for r in seen] == ["k"]


def test_dataframe_has_one_row_per_record() -> None:
    prof = Profiler()
    with prof.request("r1"), prof.phase("prefill"):
        prof.record("a", backend="numpy", duration_s=0.5, shapes={"n": 4}, bytes=8)
    prof.record("b", backend="numpy", duration_s=0.25)
    df = prof.to_dataframe()
    assert list(df["name"]) == ["a", "b"]
    assert df.loc[0, "request_id"] == "r1" and df.loc[0, "phase"] == "prefill"
    assert df["duration_s"].sum() == 0.75


@pytest.mark.parametrize(
    "call",
    [
        lambda p: Profiler(capacity=0),
        lambda p: p.record("k", backend="numpy", duration_s=-1.0),
        lambda p: p.record("k", backend="numpy", duration_s=float("nan")),
        lambda p: p.phase("warmup").__enter__(),
        lambda p: p.request("").__enter__(),
        lambda p: p.summary(by=("colour",)),
    ],
)
def test_bad_input_is_a_user_error(call) -> None:
    with pytest.raises(UserError):
        call(Profiler())
