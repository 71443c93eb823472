"""Issue 15's tracing bars: spans reach a real OTLP/HTTP endpoint with the request -> queue,
generation -> prefill, decode structure, under the client's ``traceparent``; GenAI attributes;
no prompt or completion text unless asked; trace ids in logs and problems."""

from __future__ import annotations

import gzip
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.test_server import LiveServer
from workbench.engine.generate import Engine, GenerationConfig
from workbench.errors import UserError
from workbench.observe import tracing
from workbench.observe.logs import configure as configure_logs
from workbench.server.problems import ServerSettings

GREEDY = GenerationConfig(max_tokens=5, temperature=0)


class Receiver:
    """An OTLP/HTTP trace endpoint on localhost: decodes every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces"
                if ok:
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    with receiver.lock:
                        receiver.requests.append(req)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self, trace_id: str) -> list[tuple[Any, dict[str, Any]]]:
        """(span, its resource's attributes) of one trace, as received so far."""
        out = []
        with self.lock:
            requests = list(self.requests)
        for req in requests:
            for rs in req.resource_spans:
                resource = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    out += [(s, resource) for s in ss.spans if s.trace_id.hex() == trace_id]
        return out

    def raw(self) -> bytes:
        with self.lock:
            return b"".join(r.SerializeToString() for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind)


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


def wait_for(receiver: Receiver, trace_id: str, names: set[str]) -> dict[str, Any]:
    """The trace's spans by name once every one of ``names`` has arrived (deadline 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        tracing.flush()
        got = {s.name: s for s, _ in receiver.spans(trace_id)}
        if names <= set(got):
            return got
        assert time.monotonic() < deadline, f"spans received: {sorted(got)}, wanted {names}"
        time.sleep(0.05)


@pytest.fixture
def otlp() -> Iterator[Receiver]:
    receiver = Receiver()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "wb-test"}
    assert tracing.configure_from_env(env)
    try:
        yield receiver
    finally:
        tracing.shutdown()
        receiver.close()


@pytest.fixture
def recorder() -> Iterator[tracing.SpanRecorder]:
    tracing.configure()
    try:
        yield tracing.recorder()
    finally:
        tracing.shutdown()


def traceparent(rng: Any) -> tuple[str, str, str]:
    trace_id = rng.bytes(16).hex()
    parent = rng.bytes(8).hex()
    return f"00-{trace_id}-{parent}-01", trace_id, parent


@pytest.mark.parametrize("max_batch", [1, 2], ids=["single", "batched"])
def test_request_spans_reach_an_otlp_endpoint(
    otlp: Receiver, tiny_model: Path, rng: Any, max_batch: int
) -> None:
    header, trace_id, parent = traceparent(rng)
    secret = f"zebra{rng.integers(1 << 30)}"
    settings = ServerSettings(max_batch=max_batch, warmup=False)
    with LiveServer(lambda: Engine(tiny_model, backend="numpy"), settings) as server:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": server.worker.engine.model.name,
                "messages": [{"role": "user", "content": f"say {secret}"}],
                "max_tokens": 6,
                "temperature": 0,
            },
            headers={"traceparent": header},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        model = server.worker.engine.model.name
    body = r.json()
    op = f"chat {model}"
    spans = wait_for(
        otlp, trace_id, {"POST /v1/chat/completions", "queue", op, "prefill", "decode"}
    )
    http, queue, gen = spans["POST /v1/chat/completions"], spans["queue"], spans[op]
    assert http.parent_span_id.hex() == parent  # the client's span is the parent
    assert http.kind == http.SPAN_KIND_SERVER
    assert queue.parent_span_id == http.span_id
    assert gen.parent_span_id == http.span_id
    for phase in ("prefill", "decode"):
        assert spans[phase].parent_span_id == gen.span_id, phase
    assert spans["prefill"].end_time_unix_nano <= spans["decode"].start_time_unix_nano
    assert queue.end_time_unix_nano <= spans["prefill"].start_time_unix_nano

    a = attrs(gen.attributes)
    usage = body["usage"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    assert (
        attrs(spans["decode"].attributes)["gen_ai.usage.output_tokens"]
        == (usage["completion_tokens"])
    )
    assert attrs(http.attributes)["http.response.status_code"] == 200
    assert {res["service.name"] for _, res in otlp.spans(trace_id)} == {"wb-test"}
    raw = otlp.raw()  # every span, attribute and event as it went over the wire
    assert secret.encode() not in raw
    answer = body["choices"][0]["message"]["content"].strip()
    assert len(answer) < 4 or answer.encode() not in raw


def test_trace_id_in_problems_and_json_logs(otlp: Receiver, tiny_model: Path, rng: Any) -> None:
    header, trace_id, _ = traceparent(rng)
    logger = logging.getLogger("workbench")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    out = io.StringIO()
    configure_logs(level="info", fmt="json", stream=out)
    try:
        with LiveServer(
            lambda: Engine(tiny_model, backend="numpy"), ServerSettings(warmup=False)
        ) as server:
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
                headers={"traceparent": header},
            )
    finally:
        for h in logger.handlers:
            if h not in saved[0]:
                logger.removeHandler(h)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    assert r.status_code == 404
    assert r.json()["trace_id"] == trace_id
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    mine = [rec for rec in records if rec.get("request_id") == r.headers["x-request-id"]]
    assert mine and all(rec["trace_id"] == trace_id for rec in mine), records
    spans = wait_for(otlp, trace_id, {"POST /v1/chat/completions"})
    http = spans["POST /v1/chat/completions"]
    assert attrs(http.attributes)["workbench.error_code"] == "user.unknown_model"


def test_a_client_trace_id_is_kept_while_tracing_is_off(tiny_model: Path, rng: Any) -> None:
    header, trace_id, _ = traceparent(rng)
    assert not tracing.enabled()
    with LiveServer(
        lambda: Engine(tiny_model, backend="numpy"), ServerSettings(warmup=False)
    ) as server:
        r = httpx.post(f"{server.url}/v1/completions", json={}, headers={"traceparent": header})
        plain = httpx.post(f"{server.url}/v1/completions", json={})
    assert r.status_code == 400 and r.json()["trace_id"] == trace_id
    assert "trace_id" not in plain.json()  # no trace: nothing invented


def test_generation_spans_engine_only(recorder: tracing.SpanRecorder, tiny_model: Path) -> None:
    engine = Engine(tiny_model, backend="numpy")
    gen = engine.generate("the cat sat", GREEDY)
    result = gen.run()
    spans = {s.name: s for s in recorder.spans(gen.trace.trace_id)}
    op = spans[f"text_completion {engine.model.name}"]
    assert op.parent is None  # no caller span: the generation is the root
    assert op.attributes["gen_ai.usage.output_tokens"] == len(result.token_ids)
    assert "decode_step" not in spans  # only when asked for
    launches = [e for e in spans["prefill"].events if "workbench.launch.backend" in e.attributes]
    assert launches, "the profiler's launches are events of the phase they ran in"
    assert all(e.attributes["workbench.launch.backend"] == "numpy" for e in launches)


def test_batched_sequences_each_get_their_spans(
    recorder: tracing.SpanRecorder, tiny_model: Path
) -> None:
    engine = Engine(tiny_model, backend="numpy", max_batch=3)
    parent = tracing.start_span("caller")
    with tracing.attached(tracing.with_span(parent)):
        gens = [engine.submit("a b c " * (i + 1), GREEDY) for i in range(3)]
    for gen in gens:
        gen.run()
    parent.end()
    trace_ids = {g.trace.trace_id for g in gens}
    assert len(trace_ids) == 1  # all three under the caller's span
    spans = recorder.spans(trace_ids.pop())
    for gen in gens:
        op = next(s for s in spans if s.attributes.get("workbench.request_id") == gen.request_id)
        assert op.parent.span_id == parent.get_span_context().span_id
        children = {s.name for s in spans if s.parent and s.parent.span_id == op.context.span_id}
        assert children >= {"batch_queue", "prefill"}, children
        assert op.attributes["gen_ai.usage.output_tokens"] == len(gen.result.token_ids)
        if len(gen.result.token_ids) > 0:
            assert "decode" in children


def test_step_spans_and_content_only_when_asked(tiny_model: Path) -> None:
    tracing.configure(steps=True, content=True)
    rec = tracing.recorder()
    try:
        engine = Engine(tiny_model, backend="numpy")
        gen = engine.chat([{"role": "user", "content": "hello there"}], GREEDY)
        result = gen.run()
    finally:
        tracing.shutdown()
    spans = rec.spans(gen.trace.trace_id)
    decode = next(s for s in spans if s.name == "decode")
    steps = [s for s in spans if s.name == "decode_step"]
    assert len(steps) == max(0, len(result.token_ids) - 1)
    assert all(s.parent.span_id == decode.context.span_id for s in steps)
    op = next(s for s in spans if s.name.startswith("chat "))
    assert "hello there" in op.attributes["gen_ai.input.messages"]
    assert json.loads(op.attributes["gen_ai.output.messages"])[0]["parts"][0]["content"] == (
        result.text
    )


def test_context_crosses_threads_as_headers(recorder: tracing.SpanRecorder) -> None:
    parent = tracing.start_span("sweep")
    with tracing.attached(tracing.with_span(parent)):
        carrier = tracing.inject_context()
    assert set(carrier) >= {"traceparent"}
    done: list[Any] = []

    def task() -> None:
        with tracing.attach_context(carrier):
            child = tracing.start_span("task")
            child.end()
            done.append(child)

    t = threading.Thread(target=task)
    t.start()
    t.join()
    parent.end()
    child = done[0]
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.get_span_context().trace_id == parent.get_span_context().trace_id
    with tracing.attach_context({}):  # no carrier: no trace, no error
        assert tracing.current_trace_id() is None


def test_configure_from_env() -> None:
    assert not tracing.configure_from_env({})
    assert not tracing.enabled()
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    assert not tracing.configure_from_env(off)
    for bad in (
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        },
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "localhost:4318"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_TRACES_EXPORTER": "zipkin"},
    ):
        with pytest.raises(UserError) as e:
            tracing.configure_from_env(bad)
        assert e.value.code == "user.bad_otel_setting"
    assert not tracing.enabled()
    # While off, instrumented code gets shared do-nothing objects.
    assert tracing.start_span("x") is tracing.start_span("y")
    assert not tracing.start_span("x").is_recording()


def test_breaker_transitions_and_fallbacks_are_events(recorder: tracing.SpanRecorder, tiny_model):
    from workbench.runtime.faults import FaultInjector

    engine = Engine(tiny_model, backend="emulator", faults=FaultInjector.from_spec("launch:always"))
    # The breaker opens at its third failure (threshold 3): one failed forward per request.
    gens = [engine.generate(p, GREEDY) for p in ("the cat", "on the mat", "an", "in the")]
    for gen in gens:
        gen.run()
    assert engine.fallback_active
    events = [
        (e.name, dict(e.attributes))
        for gen in gens
        for s in recorder.spans(gen.trace.trace_id)
        for e in s.events
        if e.name.startswith("workbench.")
    ]
    fallbacks = [a for n, a in events if n == "workbench.fallback"]
    assert fallbacks and fallbacks[0] == {"from": "emulator", "to": "numpy"}
    opened = [a for n, a in events if n == "workbench.breaker" and a["new"] == "open"]
    assert opened and opened[0]["breaker"] == "emulator", events


def test_sweep_jobs_in_pool_workers_continue_the_callers_trace(
    otlp: Receiver, monkeypatch: pytest.MonkeyPatch, rng: Any
) -> None:
    from workbench.engine.sweep import SweepGrid, sweep

    # Spawned workers set tracing up from their own environment, as on another node.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "wb-test")
    header, trace_id, parent = traceparent(rng)
    grid = SweepGrid(kernels=["add"], warps=[32, 64], kinds=["time"], rep_ms=1)
    with tracing.attach_context({"traceparent": header}):
        rows = sweep(grid, workers=2)
    assert list(rows["status"]) == ["ok", "ok"]
    wait_for(otlp, trace_id, {"workbench.sweep", "workbench.job"})
    deadline = time.monotonic() + 30
    while len(jobs := [s for s, _ in otlp.spans(trace_id) if s.name == "workbench.job"]) < 2:
        assert time.monotonic() < deadline, f"{len(jobs)} job spans arrived, wanted 2"
        time.sleep(0.05)
    root = next(s for s, _ in otlp.spans(trace_id) if s.name == "workbench.sweep")
    assert root.parent_span_id.hex() == parent
    assert attrs(root.attributes)["workbench.sweep.jobs"] == 2
    assert {s.parent_span_id for s in jobs} == {root.span_id}
    assert sorted(attrs(s.attributes)["workbench.warp"] for s in jobs) == [32, 64]
    assert {attrs(s.attributes)["workbench.kernel"] for s in jobs} == {"add"}
