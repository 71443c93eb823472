"""Engine.warm_up: one-time costs are paid before the first timed generation."""

from __future__ import annotations

from numba import njit
from prometheus_client.parser import text_string_to_metric_families

from workbench.engine.generate import Engine, GenerationConfig
from workbench.engine.warmup import compile_listener
from workbench.runtime.faults import FaultInjector


def test_on_compile_is_called_once_and_only_for_a_real_compile():
    @njit  # a fresh dispatcher: its first calls compile, one signature each
    def twice(x):
        return x * 2

    calls: list[int] = []
    with compile_listener(lambda: calls.append(1)):
        assert twice(3) == 6 and twice(1.5) == 3.0  # two compiles, one notice
    assert calls == [1]
    with compile_listener(lambda: calls.append(2)):
        assert twice(4) == 8  # compiled already: nothing to say
    assert calls == [1]


def test_warm_up_is_not_recorded_and_changes_no_result(tiny_model):
    cfg = GenerationConfig(max_tokens=8, temperature=0)
    cold = Engine(tiny_model, backend="numpy")
    expected = cold.generate("the cat", cfg).run().token_ids
    engine = Engine(tiny_model, backend="numpy")
    seconds = engine.warm_up()
    assert seconds > 0
    assert engine.profiler.records() == []  # nothing of the warm-up is in the profile
    assert engine.profiler.enabled  # and recording is back on
    assert requests_started(engine) == 0  # nor in the request metrics
    r = engine.generate("the cat", cfg, request_id="first").run()
    assert r.token_ids == expected
    assert engine.profiler.records(request_id="first")


def test_warm_up_on_a_failing_device_falls_back(tiny_model):
    engine = Engine(tiny_model, backend="emulator", faults=FaultInjector.from_spec("launch:always"))
    engine.warm_up()
    assert engine.breaker is not None and engine.breaker.snapshot()["consecutive_failures"] == 1
    assert engine.error_log.query(operation="forward")  # the device's failure is logged
    assert engine._fallback is not None  # and the CPU transformer was warmed instead


def requests_started(engine: Engine) -> float:
    text = engine.metrics.exposition().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "workbench_requests_started_total"
    )


def test_warm_up_records_whether_a_kernel_was_compiled(tiny_model, monkeypatch):
    import workbench.engine.warmup as warmup

    engine = Engine(tiny_model, backend="numpy")
    monkeypatch.setattr(warmup, "warm_up", lambda tf, on_compile=None: 0.1)  # all from the cache
    engine.warm_up()
    assert engine.compiled_kernels is False

    def compiling(tf, on_compile=None):
        on_compile()
        return 0.1

    told: list[int] = []
    monkeypatch.setattr(warmup, "warm_up", compiling)
    engine.warm_up(lambda: told.append(1))
    assert engine.compiled_kernels is True and told == [1]  # the caller is still told
