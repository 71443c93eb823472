"""The server under more requests than it runs at once, and its SIGTERM drain.

Load: 32 clients at once against --max-queue 8. Each request completes or gets 503 with
Retry-After, none hangs, /metrics counts what the clients saw, and the audit log has a row per
request without any prompt text in the database's bytes.

Drain: the real `serve` (uvicorn with the drain hook) in a subprocess; a request in flight when
SIGTERM arrives finishes, new ones are refused, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_server import LiveServer, metric, run_in_threads, slow_engine
from workbench.server import ServerSettings

CLIENTS = 32
MAX_QUEUE = 8
SECRET = "zebra-quokka-7731"  # in every prompt; must never reach the audit database


@pytest.fixture(scope="module")
def loaded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    db = tmp_path_factory.mktemp("load") / "audit.sqlite3"
    settings = ServerSettings(max_queue=MAX_QUEUE, audit_db=db, request_timeout_s=30)
    # 10 ms a token: 32 simultaneous requests cannot all fit into one running + 8 waiting.
    with LiveServer(lambda: slow_engine(tiny_model, 0.01), settings) as server:
        yield server, db


def test_32_clients_against_a_queue_of_8(loaded: Any) -> None:
    server, db = loaded
    url = server.url
    before = {
        name: metric(url, name)
        for name in (
            "workbench_requests_started_total",
            "workbench_requests_completed_total",
            "workbench_requests_failed_total",
            "workbench_generated_tokens_total",
            "workbench_prompt_tokens_total",
        )
    }

    def call(i: int) -> tuple[httpx.Response, float]:
        stream = i % 2 == 1
        body: dict[str, Any] = {
            "model": "tiny-test-llama",
            "messages": [{"role": "user", "content": f"{SECRET} request {i}"}],
            "max_tokens": 6,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        return r, time.monotonic() - t0

    t0 = time.monotonic()
    results = run_in_threads(CLIENTS, call)
    assert time.monotonic() - t0 < 30
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors

    ok, rejected, prompt_tokens, completion_tokens = [], [], 0, 0
    for r, _ in results:
        if r.status_code == 200:
            ok.append(r)
            usage = _usage(r)
            prompt_tokens += usage["prompt_tokens"]
            completion_tokens += usage["completion_tokens"]
        else:
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["code"] == "server.queue_full"
            rejected.append(r)
    assert len(ok) + len(rejected) == CLIENTS
    assert len(ok) >= MAX_QUEUE + 1  # the first wave all fits
    assert rejected, "32 requests at once should overflow a queue of 8"

    def delta(name: str) -> float:
        return metric(url, name) - before[name]

    assert delta("workbench_requests_started_total") == len(ok)
    assert delta("workbench_requests_completed_total") == len(ok)
    assert delta("workbench_requests_failed_total") == 0
    assert delta("workbench_generated_tokens_total") == completion_tokens
    assert delta("workbench_prompt_tokens_total") == prompt_tokens
    assert metric(url, "workbench_requests_queued") == 0
    assert metric(url, "workbench_requests_running") == 0

    # The audit log: a row for every request, with the status the client saw.
    rows = {row.request_id: row for row in server.app.state.server.audit.query()}
    for r, _ in results:
        row = rows[r.headers["x-request-id"]]
        assert row.status == r.status_code
        assert row.endpoint == "POST /v1/chat/completions"
        if r.status_code == 200:
            usage = _usage(r)
            assert row.prompt_tokens == usage["prompt_tokens"]
            assert row.completion_tokens == usage["completion_tokens"]
            assert row.model == "tiny-test-llama" and row.backend == "numpy"
        else:
            assert row.error_code == "server.queue_full"
    for path in (db, Path(f"{db}-wal")):
        if path.exists():
            data = path.read_bytes()
            assert SECRET.encode() not in data
            assert b"request 1" not in data


def _usage(r: httpx.Response) -> dict[str, int]:
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["usage"]
    return r.json()["usage"]


SERVE_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_server import slow_engine
from workbench.server import ServerSettings, create_app, serve

settings = ServerSettings(port={port}, drain_grace_s=10, audit_db=Path({db!r}))
serve(create_app(lambda: slow_engine(Path({model!r}), 0.02), settings), settings)
print("clean exit", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_the_request_in_flight_finish(tiny_model: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    script = tmp_path / "serve.py"
    root = str(Path(__file__).resolve().parent.parent)
    script.write_text(
        textwrap.dedent(
            SERVE_SCRIPT.format(
                root=root, port=port, db=str(tmp_path / "a.db"), model=str(tiny_model)
            )
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "server never became ready"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

        body = {"model": "tiny-test-llama", "prompt": "hi", "max_tokens": 40, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # 40 tokens at 20 ms: ~0.8 s still to go
            time.sleep(0.2)
            # New requests are refused: the listener is closed (or, on a kept-alive
            # connection, the drain hook answers 503).
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=5)
            events = [first] + [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        finish = json.loads(events[-3][6:])["choices"][0]["finish_reason"]
        assert finish in ("length", "stop")  # not cancelled: it ran to its end
        if finish == "length":
            assert usage["completion_tokens"] == 40
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "clean exit" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
