"""A long prompt cannot hold the server: prefill runs in chunks and stops between them.

The engine side: chunked prefill gives the logits and greedy tokens of one pass, and a cancelled
or expired generation stops between chunks. The server side, over a real socket: a 5,000-token
prompt whose client has gone (or whose deadline has passed) frees the worker within one chunk, so
the next request starts within a second. The engine here paces each forward pass (1 ms a token)
so that the unchunked prefill would hold the worker for 5 s, and records when each pass starts:
the checks are on that order of events, and on the one time the bar names.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.synth import TinyConfig, write_tiny_llama
from tests.test_server import LiveServer, assert_problem
from workbench.engine.generate import Engine, GenerationConfig
from workbench.server import ServerSettings

LONG_PROMPT = 5000
CHUNK = 64  # the engine's default
PER_TOKEN_S = 0.001  # pacing: the whole 5,000-token prefill would hold the worker for 5 s
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "tiny-long.gguf"
    return write_tiny_llama(path, TinyConfig(context_length=8192), seed=3)


class PacedEngine(Engine):
    """Each forward pass takes PER_TOKEN_S a token longer and is recorded as
    (request id, tokens, start time) before it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[tuple[str, int, float]] = []
        self._lock = threading.Lock()

    def _forward(self, run: Any, tokens: list[int]) -> Any:
        with self._lock:
            self.passes.append((run.request_id, len(tokens), time.monotonic()))
        time.sleep(PER_TOKEN_S * len(tokens))
        return super()._forward(run, tokens)

    def of(self, rid: str) -> list[tuple[int, float]]:
        with self._lock:
            return [(n, t) for r, n, t in self.passes if r == rid]


def _poll(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the engine ---------------------------------------------------------------------------------


def test_chunked_prefill_equals_one_pass(tiny_model: Path) -> None:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    one = Engine(tiny_model, backend="numpy", prefill_chunk=10_000)
    vocab = one.spec.vocab_size
    ids = [int(i) for i in rng.integers(0, vocab, 70)]
    tf = one.transformer
    whole = tf.forward(np.asarray(ids), tf.new_cache(96))
    for chunk in (1, 7, 32):
        cache = tf.new_cache(96)
        for s in range(0, len(ids), chunk):
            logits = tf.forward(np.asarray(ids[s : s + chunk]), cache)
        np.testing.assert_allclose(
            logits, whole, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}, chunk {chunk}"
        )
    config = GenerationConfig(max_tokens=20, **GREEDY)
    want = one.generate(ids, config).run().token_ids
    for chunk in (1, 7, 32):
        got = Engine(tiny_model, backend="numpy", prefill_chunk=chunk).generate(ids, config).run()
        assert got.token_ids == want, f"seed {seed}, chunk {chunk}"


def test_prefill_stops_between_chunks(tiny_model: Path) -> None:
    engine = Engine(tiny_model, backend="numpy", prefill_chunk=8)
    calls: list[int] = []
    forward = engine._forward

    def counting(run: Any, tokens: list[int]) -> Any:
        calls.append(len(tokens))
        if len(calls) == 2:
            gen.cancel()  # as another thread would, while the second chunk runs
        return forward(run, tokens)

    engine._forward = counting  # type: ignore[method-assign]
    gen = engine.generate(list(range(3, 60)), GenerationConfig(max_tokens=5, **GREEDY))
    result = gen.run()
    assert calls == [8, 8]  # the chunk in progress finished; no further chunk ran
    assert result.finish_reason == "cancelled" and result.token_ids == []

    calls.clear()
    gen = engine.generate(list(range(3, 60)), GenerationConfig(max_tokens=5, **GREEDY))
    gen.deadline = time.monotonic() - 1.0  # already past
    result = gen.run()
    assert calls == [] and result.finish_reason == "cancelled"
    with pytest.raises(Exception, match="prefill_chunk"):
        Engine(tiny_model, backend="numpy", prefill_chunk=0)


# -- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paced(long_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("paced") / "audit.sqlite3"
    settings = ServerSettings(request_timeout_s=60, audit_db=db, warmup=False)
    engine = PacedEngine(long_model, backend="numpy", prefill_chunk=CHUNK)
    with LiveServer(engine, settings) as server:
        yield server


def _long_body(stream: bool) -> dict[str, Any]:
    ids = [3 + (i * 7) % 200 for i in range(LONG_PROMPT)]
    return {"model": "tiny-test-llama", "prompt": ids, "max_tokens": 4, "stream": stream}


def _engine(server: LiveServer) -> PacedEngine:
    return server.worker.engine


def _next_request_starts(server: LiveServer, gone_at: float, rid: str) -> float:
    """Send a short request now; return when its first forward pass started."""
    body = {"model": "tiny-test-llama", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    out: dict[str, Any] = {}

    def send() -> None:
        out["r"] = httpx.post(
            f"{server.url}/v1/completions", json=body, headers={"X-Request-ID": rid}, timeout=60
        )

    t = threading.Thread(target=send)
    t.start()
    engine = _engine(server)
    _poll(lambda: engine.of(rid), "the next request to start")
    t.join(60)
    assert out["r"].status_code == 200, out["r"].text
    return engine.of(rid)[0][1] - gone_at


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_in_prefill_frees_the_worker(paced: LiveServer, stream: bool) -> None:
    engine = _engine(paced)
    rid = f"long-gone-{stream}"
    body = json.dumps(_long_body(stream)).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{paced.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-ID: {rid}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", paced.port)) as sock:
        sock.sendall(head + body)
        _poll(lambda: len(engine.of(rid)) >= 2, "the long prefill to be under way")
    gone_at = time.monotonic()  # hung up in the middle of the prefill
    waited = _next_request_starts(paced, gone_at, f"after-{rid}")
    chunks = engine.of(rid)
    after = [t for _, t in chunks if t > gone_at]
    assert len(after) <= 1, f"{len(after)} prefill chunks started after the client left"
    assert sum(n for n, _ in chunks) < LONG_PROMPT  # it never finished its prefill
    assert waited < 1.0, f"the next request started {waited:.2f} s after the client left"
    _poll(lambda: rid in {r.request_id for r in paced.app.state.server.audit.query()}, "audit")
    rows = {row.request_id: row for row in paced.app.state.server.audit.query()}
    assert rows[rid].status == 499


def test_a_prompt_past_its_deadline_frees_the_worker(long_model: Path, tmp_path: Path) -> None:
    settings = ServerSettings(request_timeout_s=1.0, warmup=False)
    engine = PacedEngine(long_model, backend="numpy", prefill_chunk=CHUNK)
    with LiveServer(engine, settings) as server:
        rid = "long-deadline"
        r = httpx.post(
            f"{server.url}/v1/completions",
            json=_long_body(False),
            headers={"X-Request-ID": rid},
            timeout=60,
        )
        answered = time.monotonic()
        assert_problem(r, 503, "server.timeout")
        waited = _next_request_starts(server, answered, "after-deadline")
        chunks = engine.of(rid)
        assert chunks and all(t <= answered for _, t in chunks)  # none began past the deadline
        assert sum(n for n, _ in chunks) < LONG_PROMPT
        assert waited < 1.0, f"the next request started {waited:.2f} s after the timeout"
