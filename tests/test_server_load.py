"""The server under more requests than it runs at once, and its SIGTERM drain.

Load: 32 clients at once against --max-queue 8. Each request completes or gets 503 with
Retry-After, none hangs, /metrics counts what the clients saw, and the audit log has a row per
request without any prompt text in the database's bytes.

Drain: the real `serve` (uvicorn with the drain hook) in a subprocess; a request in flight when
SIGTERM arrives finishes, new ones get 503 ``server.draining``, and the process exits 0. Past the
drain grace, the running stream ends with an SSE error event and the queued request gets a 503
problem; every line the server logged is JSON, and every answer's request id is in it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
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

    results = run_in_threads(CLIENTS, call)  # every client answered (joined with a deadline)
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
from workbench.observe.logs import configure
from workbench.server import ServerSettings, create_app, serve

configure(level="info", fmt="json")
settings = ServerSettings(port={port}, drain_grace_s={grace}, audit_db=Path({db!r}))
serve(create_app(lambda: slow_engine(Path({model!r}), {delay}), settings), settings)
print("clean exit", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class ServeProcess:
    """The real `serve` (uvicorn, signal handling, drain) in a subprocess, logging JSON."""

    def __init__(self, tmp_path: Path, model: Path, *, grace: float, delay: float) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = tmp_path / "serve.py"
        root = str(Path(__file__).resolve().parent.parent)
        params = dict(root=root, port=self.port, db=str(tmp_path / "a.db"), model=str(model))
        script.write_text(textwrap.dedent(SERVE_SCRIPT.format(**params, grace=grace, delay=delay)))
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _poll(self._ready, "the server to become ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
        try:
            return httpx.get(f"{self.url}/ready").status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health").json()

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        _poll(lambda: self.health()["status"] == "draining", "the drain to begin")

    def finish(self) -> list[str]:
        """Wait for the exit; the output lines. The exit must be clean."""
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, out
        lines = out.splitlines()
        assert lines[-1] == "clean exit", out
        return lines[:-1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _log_records(lines: list[str]) -> list[dict[str, Any]]:
    """Every line the server wrote is one JSON record (uvicorn's and tracebacks included)."""
    records = [json.loads(line) for line in lines]
    assert not [r for r in records if "exc" in r or "Traceback" in r["message"]], records
    assert not [r for r in records if r["level"] in ("error", "critical")], records
    return records


def _assert_draining(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "server.draining" and body["request_id"] == r.headers["x-request-id"]
    assert int(r.headers["retry-after"]) >= 1


STREAM = {"model": "tiny-test-llama", "prompt": "hi", "stream": True, "temperature": 0,
          "stream_options": {"include_usage": True}}  # fmt: skip


def test_sigterm_lets_the_request_in_flight_finish(tiny_model: Path, tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, tiny_model, grace=30, delay=0.02)
    url = server.url
    try:
        body = {**STREAM, "max_tokens": 40}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.sigterm()  # 40 tokens at 20 ms: most of them still to come
            # New requests, on new connections, get the documented 503 (not a refusal).
            late = httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
            _assert_draining(late)
            events = [first] + [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        finish = json.loads(events[-3][6:])["choices"][0]["finish_reason"]
        assert finish == "length" and usage["completion_tokens"] == 40  # ran to its end
        records = _log_records(server.finish())
        assert late.headers["x-request-id"] in {r["request_id"] for r in records}
    finally:
        server.close()


def test_past_the_grace_every_answer_is_a_problem_or_an_error_event(
    tiny_model: Path, tmp_path: Path
) -> None:
    server = ServeProcess(tmp_path, tiny_model, grace=1.0, delay=0.05)
    url = server.url
    queued: dict[str, httpx.Response] = {}
    try:
        body = {**STREAM, "max_tokens": 90}  # 4.5 s of tokens: longer than the grace
        headers = {"X-Request-ID": "drain-stream"}
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            waiting = threading.Thread(
                target=lambda: queued.update(
                    r=httpx.post(
                        f"{url}/v1/completions",
                        json={**body, "stream": False},
                        headers={"X-Request-ID": "drain-queued"},
                        timeout=30,
                    )
                )
            )
            waiting.start()
            _poll(lambda: server.health()["requests"]["queued"] == 1, "the second to queue")
            server.sigterm()
            late = httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
            _assert_draining(late)
            events = [first] + [line for line in lines if line.startswith("data: ")]
        waiting.join(30)
        error = json.loads(events[-1][6:])["error"]  # the stream ends with an error event
        assert error["code"] == "server.draining" and error["request_id"] == "drain-stream"
        assert "data: [DONE]" not in events
        _assert_draining(queued["r"])
        records = _log_records(server.finish())
        ids = {r["request_id"] for r in records}
        assert {"drain-stream", "drain-queued", late.headers["x-request-id"]} <= ids
    finally:
        server.close()
