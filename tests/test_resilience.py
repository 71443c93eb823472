"""Issue 4's bars: transient faults are retried away, persistent ones fall back to NumPy."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from workbench.engine.generate import Engine, GenerationConfig
from workbench.runtime.faults import FaultInjector

GREEDY = GenerationConfig(max_tokens=6, temperature=0)
PROMPTS = ["the cat", "an", "on the mat", "re", "in the"]


def samples(engine: Engine) -> dict[tuple[str, tuple], float]:
    text = engine.metrics.exposition().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(engine: Engine, name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in samples(engine).items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    )  # fmt: skip


@pytest.fixture(scope="module")
def fault_free(tiny_model):
    engine = Engine(tiny_model, backend="emulator")
    return {p: engine.generate(p, GREEDY).run().token_ids for p in PROMPTS}


def test_launch_faults_are_retried_to_the_fault_free_tokens(tiny_model, fault_free, seed):
    injector = FaultInjector.from_spec("launch:0.05", seed=seed)
    engine = Engine(tiny_model, backend="emulator", faults=injector)
    for i in range(100):
        prompt = PROMPTS[i % len(PROMPTS)]
        assert engine.generate(prompt, GREEDY).run().token_ids == fault_free[prompt], i
    stats = engine.retry_stats.snapshot()["launch"]
    injected = injector.injected("launch")
    assert injected > 50, "5% of thousands of launches"
    assert stats["failures"] == injected  # every injected fault is accounted for
    # Five attempts at a 5% rate fail together with probability 3e-7 a launch, over about 11,000
    # launches: some seeds draw that once (2665844352263181554, 134918125373488547). That
    # request then continues on NumPy with the same tokens (checked above), the breaker closed.
    assert stats["recovered"] > 0 and stats["exhausted"] <= 1
    assert not engine.fallback_active
    assert metric(engine, "workbench_retries_total", outcome="retry") == stats["retries"]
    log = engine.error_log  # bounded: the oldest records are dropped, and counted
    # Every failed attempt once (a fallback logs its cause again, as operation "forward")
    launches = log.query(code="device.launch_failed", operation="launch")
    assert len(launches) + log.dropped == injected


def test_persistent_device_failure_opens_the_breaker_and_falls_back(tiny_model, fault_free):
    injector = FaultInjector.from_spec("launch:always")
    engine = Engine(tiny_model, backend="emulator", faults=injector)
    for prompt in PROMPTS[:4]:
        assert engine.generate(prompt, GREEDY).run().token_ids == fault_free[prompt]
    state = engine.state()
    assert state["fallback_active"] and state["backend"] == "numpy"
    assert state["requested_backend"] == "emulator"
    assert state["breaker"]["state"] == "open"
    assert metric(engine, "workbench_fallbacks_total", from_backend="emulator") >= 1
    assert metric(engine, "workbench_breaker_state", backend="emulator") == 2
    assert metric(engine, "workbench_requests_completed_total") == 4
    assert engine.retry_stats.snapshot()["launch"]["exhausted"] >= 1
    assert engine.error_log.query(operation="forward"), "the fallback's cause is logged"


def test_every_launch_is_profiled_per_request_and_phase(tiny_model):
    engine = Engine(tiny_model, backend="emulator")
    gen = engine.generate("the cat", GREEDY, request_id="req-42")
    r = gen.run()
    recs = engine.profiler.records(request_id="req-42")
    names = {rec.name for rec in recs}
    assert {"get_rows_q8_0", "matmul_q8_0", "matvec_q8_0", "rmsnorm", "rope_norm"} <= names
    assert {"attention_prefill", "attention_decode", "swiglu", "add", "kv_append"} <= names
    phases = {rec.phase for rec in recs}
    assert phases == ({"prefill", "decode"} if len(r.token_ids) > 1 else {"prefill"})
    layers = engine.spec.n_layers
    decode_steps = len(r.token_ids) - 1 + (r.finish_reason == "stop")
    # decode: the fused products (Q/K/V, output + residual, gate/up, down + residual) + logits
    fused = [x for x in recs if x.name == "matvec_fused_q8_0" and x.phase == "decode"]
    assert len(fused) == decode_steps * (4 * layers + 1)
    decode = [x for x in recs if x.phase == "decode"]
    assert sum(x.launches for x in decode) == decode_steps * (7 * layers + 4)
    summary = {row["name"]: row for row in engine.profiler.summary()}
    assert summary["matvec_q8_0"]["gb_s"] > 0
    assert metric(engine, "workbench_kernel_launch_duration_seconds_count", kernel="rmsnorm") > 0


def test_request_metrics_count_tokens(tiny_model):
    engine = Engine(tiny_model, backend="numpy")
    r = engine.generate("the cat", GenerationConfig(max_tokens=5, temperature=0)).run()
    assert metric(engine, "workbench_requests_started_total") == 1
    assert metric(engine, "workbench_requests_completed_total") == 1
    assert metric(engine, "workbench_generated_tokens_total") == len(r.token_ids)
    assert metric(engine, "workbench_prompt_tokens_total") == len(r.prompt_token_ids)
    assert metric(engine, "workbench_time_to_first_token_seconds_count") == 1


def test_cancelled_and_failed_requests_are_counted(tiny_model):
    engine = Engine(tiny_model, backend="numpy")
    gen = engine.generate("in", GenerationConfig(max_tokens=20, temperature=1.0, seed=1))
    for _ in gen:
        gen.cancel()
    assert gen.result.finish_reason == "cancelled"
    assert metric(engine, "workbench_requests_cancelled_total") == 1


@pytest.mark.parametrize("spec", ["alloc:0.05", "sync:0.05", "compile:once"])
def test_every_device_fault_site_is_retried(tiny_model, fault_free, spec, seed):
    from workbench.runtime import faults

    injector = FaultInjector.from_spec(spec, seed=seed)
    site = spec.split(":")[0]
    with faults.injecting(injector):  # the compile site runs while the backend is built
        engine = Engine(tiny_model, backend="emulator", faults=injector)
        for prompt in PROMPTS[:3]:
            assert engine.generate(prompt, GREEDY).run().token_ids == fault_free[prompt]
    assert injector.injected(site) >= 1
    assert not engine.fallback_active


def test_a_foreign_device_error_is_classified_and_retried(tiny_model, fault_free):
    engine = Engine(tiny_model, backend="emulator")
    backend = engine.transformer.backend.backend
    real, calls = backend.rmsnorm, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("host allocation failed")  # not a WorkbenchError
        return real(*args)

    backend.rmsnorm = flaky
    engine.transformer.backend.rmsnorm = engine.transformer.backend._wrap("rmsnorm", flaky)
    assert engine.generate(PROMPTS[0], GREEDY).run().token_ids == fault_free[PROMPTS[0]]
    (rec,) = engine.error_log.query(code="host.out_of_memory")
    assert rec.recovered and rec.kernel == "rmsnorm"
