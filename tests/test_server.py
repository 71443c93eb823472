"""The HTTP server, live on loopback, driven by the official `openai` client and by httpx.

Servers run uvicorn in a background thread on a socket bound to 127.0.0.1:0. Outputs are checked
against the library itself: at temperature 0 the server must return exactly what `Engine` does.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from workbench.engine.generate import Engine, GenerationConfig
from workbench.server import ServerSettings, create_app
from workbench.server.serving import DrainingServer, uvicorn_config

KEY = "sk-test-0123456789"
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}


class SlowGeneration:
    """A Generation whose tokens arrive ``delay_s`` apart (for timeouts, disconnects, drains)."""

    def __init__(self, gen: Any, delay_s: float) -> None:
        self._gen = gen
        self.delay_s = delay_s
        self.prompt_token_ids = gen.prompt_token_ids

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("deadline", "queued_s"):  # set by the worker: the engine reads them
            setattr(self._gen, name, value)
        else:
            super().__setattr__(name, value)

    def __iter__(self) -> Iterator[Any]:
        for event in self._gen:
            time.sleep(self.delay_s)
            yield event

    def cancel(self) -> None:
        self._gen.cancel()

    def run(self) -> Any:
        for _ in self:
            pass
        return self.result

    @property
    def cancelled(self) -> bool:
        return self._gen.cancelled

    @property
    def result(self) -> Any:
        return self._gen.result


class SlowEngine(Engine):
    delay_s = 0.0

    def generate(self, prompt: Any, config: Any = None, *, request_id: str | None = None) -> Any:
        return SlowGeneration(super().generate(prompt, config, request_id=request_id), self.delay_s)

    def chat(self, messages: Any, config: Any = None, *, request_id: str | None = None) -> Any:
        return SlowGeneration(super().chat(messages, config, request_id=request_id), self.delay_s)


def slow_engine(model: Path, delay_s: float) -> SlowEngine:
    engine = SlowEngine(model, backend="numpy")
    engine.delay_s = delay_s
    return engine


class LiveServer:
    """`create_app(engine, settings)` on 127.0.0.1 in a thread, with the uvicorn configuration
    and the draining server `serve` uses (signals aside: `drain()` does what SIGTERM does)."""

    def __init__(self, engine: Any, settings: ServerSettings, *, wait_ready: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(engine, settings)
        config = uvicorn_config(self.app, settings)
        self.server = DrainingServer(config, self.app.state.server, settings.drain_grace_s)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready()

    @property
    def worker(self) -> Any:
        return self.app.state.server.worker

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready").status_code != 200:
            assert self.worker.load_error is None, self.worker.load_error
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)

    def drain(self) -> None:
        self.server.request_drain()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.sock.close()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", headers=_auth(url)).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


_KEYS: dict[str, str] = {}


def _auth(url: str) -> dict[str, str]:
    key = _KEYS.get(url)
    return {"Authorization": f"Bearer {key}"} if key else {}


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["request_id"] == r.headers["x-request-id"]
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    """The library side of the comparisons (its own Engine, never the server's)."""
    return Engine(tiny_model, backend="numpy")


@pytest.fixture(scope="module")
def live(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("audit") / "audit.sqlite3"
    settings = ServerSettings(max_queue=4, audit_db=db, max_body_bytes=64 * 1024)
    with LiveServer(lambda: Engine(tiny_model, backend="numpy"), settings) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[LiveServer]:
    with LiveServer(
        lambda: Engine(tiny_model, backend="numpy"), ServerSettings(api_key=KEY)
    ) as server:
        _KEYS[server.url] = KEY
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


MESSAGES = [{"role": "user", "content": "Say the alphabet"}]


def _greedy_chat(engine: Engine, n: int, **kw: Any) -> Any:
    return engine.chat(MESSAGES, GenerationConfig(max_tokens=n, temperature=0.0, **kw)).run()


def test_models_lists_the_served_model(client: openai.OpenAI, engine: Engine) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == engine.model.name
    assert "tiny-Q8_0" in ids  # the file's stem is accepted too


def test_chat_matches_the_engine(client: openai.OpenAI, model_id: str, engine: Engine) -> None:
    want = _greedy_chat(engine, 12, top_k=0, top_p=1.0, min_p=0.0)
    r = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_matches_the_engine(
    client: openai.OpenAI, model_id: str, engine: Engine
) -> None:
    config = GenerationConfig(max_tokens=10, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    want = engine.generate("The quick brown fox", config).run()
    r = client.completions.create(
        model=model_id, prompt="The quick brown fox", max_tokens=10, temperature=0
    )
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(engine.encode_prompt("The quick brown fox"))
    assert r.usage.completion_tokens == len(want.token_ids)


def test_token_id_prompt(client: openai.OpenAI, model_id: str, engine: Engine) -> None:
    ids = engine.encode_prompt("hello there")
    config = GenerationConfig(max_tokens=6, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    want = engine.generate(ids, config).run()
    r = client.completions.create(model=model_id, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(ids)


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, model_id: str) -> None:
    def once() -> str:
        r = client.chat.completions.create(
            model=model_id, messages=MESSAGES, max_tokens=12, temperature=1.5, seed=7,
            extra_body={"top_k": 50, "min_p": 0.01, "repeat_penalty": 1.1},
        )  # fmt: skip
        return r.choices[0].message.content or ""

    assert once() == once()


def test_streaming_chat_equals_the_whole_answer(
    client: openai.OpenAI, model_id: str, engine: Engine
) -> None:
    want = _greedy_chat(engine, 12, top_k=0, top_p=1.0, min_p=0.0)
    stream = client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == want.text
    assert finishes[-1] == want.finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_streaming_completion(client: openai.OpenAI, model_id: str, engine: Engine) -> None:
    config = GenerationConfig(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    want = engine.generate("Once upon", config).run()
    chunks = list(
        client.completions.create(
            model=model_id, prompt="Once upon", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks


def test_stop_string(client: openai.OpenAI, model_id: str, engine: Engine) -> None:
    full = _greedy_chat(engine, 16, top_k=0, top_p=1.0, min_p=0.0).text
    assert len(full) >= 6, full
    stop = full[3:5]
    r = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.find(stop)]


def test_errors_are_openai_exceptions(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert e.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=5)
    assert "temperature" in e.value.message  # OpenAI's error object, not "Error code: 400"
    assert e.value.param == "temperature" and e.value.code == "user.invalid_request"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="word " * 200, max_tokens=4)
    assert e.value.body["code"] == "user.prompt_too_long"


# -- bad input, one test each ------------------------------------------------------------------


def _post(live: LiveServer, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", timeout=30, **kw)


def test_malformed_json(live: LiveServer) -> None:
    r = _post(
        live,
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert_problem(r, 400, "user.malformed_json")


@pytest.mark.parametrize(
    "patch",
    [
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": 5}]},
        {"max_tokens": "many"},
        {"stream": "sometimes"},
        {"model": 3},
    ],
)
def test_wrong_types(live: LiveServer, model_id: str, patch: dict[str, Any]) -> None:
    body = {"model": model_id, "messages": MESSAGES, **patch}
    problem = assert_problem(_post(live, "/v1/chat/completions", json=body), 400)
    assert problem["errors"] and all("input" not in e for e in problem["errors"])
    assert problem["error"]["param"].startswith(next(iter(patch))), problem


def test_missing_field(live: LiveServer) -> None:
    problem = assert_problem(_post(live, "/v1/completions", json={"prompt": "x"}), 400)
    assert problem["error"]["param"] == "model"


def test_unknown_model(live: LiveServer) -> None:
    body = {"model": "nope", "prompt": "hi", "max_tokens": 2}
    problem = assert_problem(_post(live, "/v1/completions", json=body), 404, "user.unknown_model")
    assert problem["instance"] == "/v1/completions"


def test_max_tokens_beyond_the_context(live: LiveServer, model_id: str, engine: Engine) -> None:
    ctx = engine.spec.context_length
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": ctx}
    assert_problem(_post(live, "/v1/chat/completions", json=body), 400, "user.max_tokens_too_large")
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 0}
    assert_problem(_post(live, "/v1/chat/completions", json=body), 400, "user.invalid_request")


@pytest.mark.parametrize(
    "sampler",
    [
        {"temperature": -0.5},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 1.5},
        {"repeat_penalty": 0},
        {"n": 2},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [""]},
    ],
)
def test_invalid_sampler_values(live: LiveServer, model_id: str, sampler: dict[str, Any]) -> None:
    body = {"model": model_id, "prompt": "hi", "max_tokens": 2, **sampler}
    assert_problem(_post(live, "/v1/completions", json=body), 400, "user.invalid_request")


def test_oversized_body(live: LiveServer, model_id: str) -> None:
    big = {"model": model_id, "prompt": "x" * (70 * 1024), "max_tokens": 2}
    assert_problem(_post(live, "/v1/completions", json=big), 413, "server.body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "m", "prompt": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    r = _post(
        live, "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_problem(r, 413, "server.body_too_large")


def test_api_key(keyed: LiveServer) -> None:
    body = {"model": "tiny-test-llama", "prompt": "hi", "max_tokens": 2}
    r = _post(keyed, "/v1/completions", json=body)
    assert_problem(r, 401, "server.unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    r = _post(keyed, "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert_problem(r, 401, "server.unauthorized")
    assert_problem(httpx.get(f"{keyed.url}/metrics"), 401)
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # liveness stays open
    good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    model = good.models.list().data[0].id
    assert good.completions.create(model=model, prompt="hi", max_tokens=2).usage is not None
    bad = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_route_and_method(live: LiveServer) -> None:
    assert_problem(httpx.get(f"{live.url}/v1/nothing"), 404)
    assert_problem(httpx.get(f"{live.url}/v1/completions"), 405)


# -- request ids, health, readiness, metrics ---------------------------------------------------


def test_request_id_is_echoed_when_sane(live: LiveServer) -> None:
    r = httpx.get(f"{live.url}/health", headers={"X-Request-ID": "client-42.a:b"})
    assert r.headers["x-request-id"] == "client-42.a:b"
    for bad in ("has space", "x" * 200, "<script>"):
        r = httpx.get(f"{live.url}/health", headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"].startswith("req-")
    body = {"model": "nope", "prompt": "hi"}
    r = _post(live, "/v1/completions", json=body, headers={"X-Request-ID": "mine-1"})
    assert assert_problem(r, 404)["request_id"] == "mine-1"


def test_health_details(live: LiveServer) -> None:
    h = httpx.get(f"{live.url}/health").json()
    assert h["status"] == "ok" and h["ready"] is True
    assert h["requests"] == {"running": 0, "queued": 0, "max_queue": 4, "max_batch": 1}
    eng = h["engine"]
    assert eng["model"] == "tiny-test-llama" and eng["backend"] == "numpy"
    assert {"used_tokens", "capacity_tokens", "bytes"} <= set(eng["kv_cache"])
    assert "breaker" in eng and "device_memory" in eng


def test_metrics_endpoint(live: LiveServer, client: openai.OpenAI, model_id: str) -> None:
    r = httpx.get(f"{live.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    before = metric(live.url, "workbench_requests_completed_total")
    client.completions.create(model=model_id, prompt="count me", max_tokens=3)
    assert metric(live.url, "workbench_requests_completed_total") == before + 1
    assert metric(live.url, "workbench_requests_queued") == 0


def test_ready_waits_for_the_model(tiny_model: Path) -> None:
    release = threading.Event()

    def factory() -> Engine:
        release.wait(20)
        return Engine(tiny_model, backend="numpy")

    with LiveServer(factory, ServerSettings(), wait_ready=False) as server:
        r = httpx.get(f"{server.url}/ready")
        assert_problem(r, 503, "server.not_ready")
        assert int(r.headers["retry-after"]) >= 1
        assert httpx.get(f"{server.url}/health").json()["status"] == "loading"
        body = {"model": "tiny-test-llama", "prompt": "hi"}
        assert_problem(httpx.post(f"{server.url}/v1/completions", json=body), 503)
        release.set()
        server.wait_ready()
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200


def test_load_failure_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with LiveServer(lambda: Engine(bad, backend="numpy"), ServerSettings(), wait_ready=False) as s:
        deadline = time.monotonic() + 10
        while httpx.get(f"{s.url}/health").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert_problem(httpx.get(f"{s.url}/ready"), 503, "server.load_failed")
        body = {"model": "x", "prompt": "hi"}
        r = httpx.post(f"{s.url}/v1/completions", json=body)
        assert r.status_code == 422 and r.json()["code"].startswith("model.")


# -- timeouts and cancellation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("slow") / "audit.sqlite3"
    settings = ServerSettings(request_timeout_s=0.5, audit_db=db)
    with LiveServer(lambda: slow_engine(tiny_model, 0.05), settings) as server:
        yield server


def _wait_idle(server: LiveServer) -> None:
    deadline = time.monotonic() + 10
    while not server.worker.idle():
        assert time.monotonic() < deadline, "the worker never went idle"
        time.sleep(0.02)


def test_request_timeout(slow: LiveServer) -> None:
    before = metric(slow.url, "workbench_requests_cancelled_total")
    tokens = metric(slow.url, "workbench_generated_tokens_total")
    body = {"model": "tiny-test-llama", "prompt": "hi", "max_tokens": 60, "temperature": 0}
    r = httpx.post(f"{slow.url}/v1/completions", json=body, timeout=10)
    assert_problem(r, 503, "server.timeout")
    assert int(r.headers["retry-after"]) >= 1
    _wait_idle(slow)
    assert metric(slow.url, "workbench_requests_cancelled_total") == before + 1
    # Cancelled at the deadline (0.5 s), long before its 60 tokens (3 s).
    assert metric(slow.url, "workbench_generated_tokens_total") - tokens < 30


def test_stream_disconnect_cancels_and_frees_the_cache(slow: LiveServer) -> None:
    before = metric(slow.url, "workbench_requests_cancelled_total")
    tokens = metric(slow.url, "workbench_generated_tokens_total")
    body = {"model": "tiny-test-llama", "prompt": "hi", "max_tokens": 60, "stream": True}
    with httpx.stream(
        "POST", f"{slow.url}/v1/completions", json=body, headers={"X-Request-ID": "gone-1"}
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one token arrived; now hang up
    _wait_idle(slow)
    # Stopped long before its 60 tokens (3 s); the audit row below says the hang-up did it.
    assert metric(slow.url, "workbench_generated_tokens_total") - tokens < 30
    assert metric(slow.url, "workbench_requests_cancelled_total") == before + 1
    assert httpx.get(f"{slow.url}/health").json()["engine"]["kv_cache"]["used_tokens"] == 0
    rows = slow.app.state.server.audit.query()
    row = next(r for r in rows if r.request_id == "gone-1")
    assert row.status == 499 and row.finish_reason == "cancelled"


def test_non_streaming_disconnect_cancels(slow: LiveServer) -> None:
    before = metric(slow.url, "workbench_requests_cancelled_total")
    body = {"model": "tiny-test-llama", "prompt": "hi", "max_tokens": 60}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow.url}/v1/completions", json=body, timeout=0.2)
    _wait_idle(slow)
    assert metric(slow.url, "workbench_requests_cancelled_total") == before + 1


def test_stream_timeout_ends_with_an_error_event(slow: LiveServer) -> None:
    body = {"model": "tiny-test-llama", "messages": MESSAGES, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{slow.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "server.timeout"
    assert "[DONE]" not in events


def run_in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Call ``fn(i)`` for i in range(n) from n threads released together; results in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # the caller asserts on it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return out


def test_serve_reads_its_settings_once_at_the_edge(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workbench.server
    from workbench.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        workbench.server, "serve", lambda app, settings: seen.update(app=app, settings=settings)
    )
    monkeypatch.setenv("WORKBENCH_API_KEY", "from-env")
    db = tmp_path / "a.sqlite3"
    args = ["serve", "--model", str(tiny_model), "--max-queue", "3", "--audit-db", str(db)]
    assert main([*args, "--request-timeout", "7", "--audit-retention-days", "2"]) == 0
    s = seen["settings"]
    assert (s.host, s.port, s.api_key, s.max_queue) == ("127.0.0.1", 8000, "from-env", 3)
    assert (s.request_timeout_s, s.audit_db, s.audit_retention_days) == (7.0, db, 2.0)
    assert main([*args, "--api-key", "flag-wins"]) == 0
    assert seen["settings"].api_key == "flag-wins"
    assert main(["serve", "--model", str(tiny_model), "--max-queue", "-1"]) == 2
