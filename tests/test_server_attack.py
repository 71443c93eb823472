"""The server as an attacker tries it (issue 12's findings), each a regression test over a real
socket on 127.0.0.1, with the official `openai` client where it applies.

Findings 1 (prefill) and 5 (shutdown) have their own modules: test_server_prefill.py and
test_server_load.py.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.test_server import KEY, LiveServer, assert_problem, metric, slow_engine
from workbench.engine.generate import Engine
from workbench.observe.logs import configure
from workbench.server import ServerSettings
from workbench.server.serving import FOREIGN_LOGGERS, capture_foreign_logs

MODEL = "tiny-test-llama"


def _poll(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The ``workbench`` log (and uvicorn's, and warnings) as JSON lines, at INFO."""
    names = ("workbench", *FOREIGN_LOGGERS)
    saved = {
        n: (list(lg.handlers), lg.level, lg.propagate)
        for n in names
        for lg in [logging.getLogger(n)]
    }
    out = io.StringIO()
    configure(level="info", fmt="json", stream=out)
    capture_foreign_logs()
    try:
        yield out
    finally:
        logging.captureWarnings(False)
        for n, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def _records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _raw(port: int, data: bytes, *, read_s: float = 30.0) -> bytes:
    """Send ``data`` on a new connection; read until the server closes it (bounded)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.settimeout(read_s)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def _raw_problem(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["code"] == code and problem["request_id"] == headers["x-request-id"]
    return problem


@pytest.fixture(scope="module")
def keyed_audit(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    db = tmp_path_factory.mktemp("attack") / "audit.sqlite3"
    settings = ServerSettings(api_key=KEY, audit_db=db)
    with LiveServer(lambda: Engine(tiny_model, backend="numpy"), settings) as server:
        yield server, db


# -- 2: log and terminal injection ----------------------------------------------------------------


def test_paths_cannot_forge_log_lines_or_reach_the_terminal(
    keyed_audit: Any, log_lines: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    server, db = keyed_audit
    forged = "/v1/x%0A06:00:00 ERROR workbench FAKE"
    clear = "/v1/%1B[2J%1B[31mred"
    for path in (forged, clear):
        r = httpx.get(f"{server.url}{path}")
        assert_problem(r, 401, "server.unauthorized")
        r = httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"})
        assert_problem(r, 404, "server.not_found")
    text = log_lines.getvalue()
    assert "\x1b" not in text
    assert all(line.startswith("{") for line in text.splitlines())  # no forged line
    messages = [r["message"] for r in _records(log_lines) if r["logger"] == "workbench.server.edge"]
    assert any("x\\x0a06:00:00 ERROR" in m for m in messages), messages  # escaped, kept
    raw = sqlite3.connect(db).execute("SELECT * FROM refused").fetchall()
    assert raw and all("\x1b" not in str(row) and "\n" not in str(row) for row in raw)
    assert {row[1] for row in raw} == {"GET *"}  # an unknown path is not stored at all

    # A row holding control characters (from an older version) is escaped on the terminal.
    from workbench.cli import main
    from workbench.server.audit import AuditLog, AuditRecord

    evil = tmp = db.parent / "evil.sqlite3"
    with AuditLog(tmp) as log:
        log.record(AuditRecord("req-\x1b[2J", time.time(), "GET /v1/\x1b[31m\n", 0.1, 200))
    capsys.readouterr()
    assert main(["audit", "--audit-db", str(evil)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out and len(out.splitlines()) == 2


# -- 3: unauthenticated requests cannot fill the disk -------------------------------------------

FLOOD = 5000


def _db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def test_5000_unauthenticated_requests_grow_the_audit_db_by_under_1_mb(keyed_audit: Any) -> None:
    server, db = keyed_audit
    before = _db_bytes(db)
    paths = ["/v1/chat/completions", "/v1/models", "/v1/nothing", "/v1/a%0Ab"]
    body = json.dumps({"model": "x" * 500}).encode()
    batch = 50  # requests pipelined on one connection (cheap for the client, same for us)
    counts = [0] * 4

    def flood(i: int) -> None:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.settimeout(60)
            for n in range(0, FLOOD // 4, batch):
                s.sendall(
                    b"".join(
                        f"POST {paths[(n + k) % 4]} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                        f"X-Request-ID: flood-{i}-{n + k}\r\n\r\n".encode()
                        + body
                        for k in range(batch)
                    )
                )
                got = b""
                while got.count(b"HTTP/1.1 ") < batch:
                    chunk = s.recv(1 << 16)
                    assert chunk, "the server closed the connection"
                    got += chunk
                assert got.count(b"HTTP/1.1 401 ") == batch
                counts[i] += batch

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sum(counts) == FLOOD
    grown = _db_bytes(db) - before
    assert grown < 1 << 20, f"{FLOOD} refused requests grew the audit database by {grown} bytes"
    refused = server.app.state.server.audit.refused()
    assert sum(c.count for c in refused if c.error_code == "server.unauthorized") >= FLOOD
    assert {c.endpoint for c in refused} <= {
        "POST /v1/chat/completions", "POST /v1/models", "POST *", "GET *"
    }  # fmt: skip


def test_the_audit_db_is_capped(tmp_path: Path) -> None:
    from workbench.server.audit import AuditLog, AuditRecord

    path = tmp_path / "capped.sqlite3"
    cap, n = 256 << 10, 4000  # 4,000 rows take about 600 KB uncapped
    with AuditLog(path, max_bytes=cap) as log:
        for i in range(n):
            log.record(AuditRecord(f"req-{i:032d}", float(i), "POST /v1/completions", 0.1, 200))
        assert log.size_bytes() <= cap + 64 * 1024  # checked every 256 writes
        rows = log.query()
        assert rows[-1].request_id == f"req-{n - 1:032d}"  # the newest stay
        assert rows[0].request_id != f"req-{0:032d}"  # the oldest went


# -- 4 and 8: OpenAI compatibility -----------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tiny_model: Path) -> Iterator[LiveServer]:
    with LiveServer(lambda: Engine(tiny_model, backend="numpy"), ServerSettings()) as server:
        yield server


@pytest.fixture(scope="module")
def client(open_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{open_server.url}/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 + 5])
def test_seed_out_of_range_is_400(client: openai.OpenAI, seed: int) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, seed=seed)
    assert e.value.param == "seed" and "seed" in e.value.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("n", 2),
        ("logit_bias", {"5": 10}),
        ("presence_penalty", 0.5),
    ],
)
def test_unsupported_fields_are_refused_by_name(
    client: openai.OpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={field: value}
        )
    assert field in e.value.message, e.value.message
    assert e.value.status_code == 400


def test_harmless_defaults_of_unsupported_fields_pass(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, n=1, logprobs=False,
        response_format={"type": "text"}, presence_penalty=0, user="someone",
    )  # fmt: skip
    assert r.choices[0].message is not None


@pytest.mark.parametrize(
    "patch",
    [{"max_tokens": "5"}, {"max_tokens": 5.0}, {"stream": 1}, {"stream": "true"}, {"seed": "7"}],
)
def test_no_coercion(open_server: LiveServer, patch: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": MESSAGES, **patch}
    r = httpx.post(f"{open_server.url}/v1/chat/completions", json=body)
    problem = assert_problem(r, 400, "user.invalid_request")
    error = problem["error"]
    assert error["param"] == next(iter(patch)) and error["type"] == "invalid_request_error"
    assert error["message"] and error["code"] == "user.invalid_request"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_bearer_is_case_insensitive(keyed_audit: Any, scheme: str) -> None:
    server, _ = keyed_audit
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert_problem(r, 401, "server.unauthorized")


# -- 6: read timeouts and the connection cap ----------------------------------------------------


@pytest.fixture(scope="module")
def strict(tiny_model: Path) -> Iterator[LiveServer]:
    settings = ServerSettings(
        header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.5, max_connections=6
    )
    with LiveServer(lambda: Engine(tiny_model, backend="numpy"), settings) as server:
        yield server


def _connections(server: LiveServer) -> int:
    return len(server.server.server_state.connections)


def test_a_dripping_or_silent_head_gets_408_and_is_closed(strict: LiveServer) -> None:
    _raw_problem(_raw(strict.port, b""), 408, "server.header_timeout")  # says nothing
    with socket.create_connection(("127.0.0.1", strict.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.settimeout(30)
        data = b""
        for i in range(300):  # a header byte every 20 ms; the server must cut it off
            try:
                s.sendall(b"X-Drip-%d: 1\r\n" % i)
            except OSError:
                break
            time.sleep(0.02)
        while chunk := s.recv(65536):
            data += chunk
    _raw_problem(data, 408, "server.header_timeout")
    _poll(lambda: _connections(strict) == 0, "the connections to close")


def test_a_slow_body_gets_408_and_its_buffer_is_freed(strict: LiveServer) -> None:
    import tracemalloc

    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        socks = []
        for _ in range(5):  # a half-sent body on each
            s = socket.create_connection(("127.0.0.1", strict.port))
            s.sendall(head + b"[" + b" " * 500_000)
            socks.append(s)
        answers = []
        for s in socks:
            s.settimeout(30)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(data)
            s.close()
        for data in answers:
            _raw_problem(data, 408, "server.body_timeout")
        _poll(lambda: _connections(strict) == 0, "the connections to close")
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, f"{held} bytes still held after 2.5 MB of dropped bodies"


def test_the_connection_cap_answers_503_problem(strict: LiveServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(6)]
    try:
        _poll(lambda: _connections(strict) >= 6, "the idle connections")
        raw = _raw(strict.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        problem = _raw_problem(raw, 503, "server.overloaded")
        assert "connections" in problem["detail"]
    finally:
        for s in idle:
            s.close()
    _poll(lambda: _connections(strict) == 0, "the connections to close")
    assert httpx.get(f"{strict.url}/v1/models").status_code == 200


def test_an_idle_kept_alive_connection_is_closed(strict: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", strict.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(30)
        data = b""
        while chunk := s.recv(65536):  # the answer, then the close after the idle time
            data += chunk
    assert _parse(data)[0] == 200


def test_unparsable_http_is_a_problem(strict: LiveServer) -> None:
    raw = _raw(strict.port, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    _raw_problem(raw, 400, "server.bad_http")
    raw = _raw(strict.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
    _raw_problem(raw, 400, "server.bad_http")


# -- 7: the request id of a 500 is in the logs ---------------------------------------------------


class BrokenEngine(Engine):
    def generate(self, prompt: Any, config: Any = None, *, request_id: str | None = None) -> Any:
        gen = super().generate(prompt, config, request_id=request_id)
        inner = gen._events

        def events() -> Any:
            yield next(inner)
            inner.close()  # on this thread, where its context was entered
            raise RuntimeError("a bug in the engine")

        gen._events = events()
        return gen


def test_a_500_is_found_in_the_logs_by_its_request_id(
    tiny_model: Path, log_lines: io.StringIO
) -> None:
    settings = ServerSettings(warmup=False)
    with LiveServer(lambda: BrokenEngine(tiny_model, backend="numpy"), settings) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=5)
    rid = e.value.response.headers["x-request-id"]
    assert rid in e.value.message  # the message asks the user to quote it
    mine = [r for r in _records(log_lines) if r["request_id"] == rid]
    assert any("a bug in the engine" in r.get("exc", "") for r in mine), mine
    assert any(r["message"] == "POST /v1/completions 500" for r in mine), mine


# -- 9: the smaller findings ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("slow9") / "audit.sqlite3"
    settings = ServerSettings(max_queue=1, audit_db=db, request_timeout_s=60)
    with LiveServer(lambda: slow_engine(tiny_model, 0.05), settings) as server:
        yield server


def _stream_first_token(url: str, max_tokens: int, rid: str) -> tuple[Any, Any]:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": True,
            "temperature": 0}  # fmt: skip
    cm = httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"X-Request-ID": rid}, timeout=60
    )
    r = cm.__enter__()
    lines = r.iter_lines()
    next(line for line in lines if line.startswith("data: "))
    return cm, lines


def _wait_idle(server: LiveServer) -> None:
    _poll(server.worker.idle, "the worker to go idle")


def test_a_client_gone_while_queued_is_audited_499(slow: LiveServer) -> None:
    cm, _ = _stream_first_token(slow.url, 40, "runner-499")
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{slow.url}/v1/completions",
                json=body,
                headers={"X-Request-ID": "queued-499"},
                timeout=0.3,
            )
    finally:
        cm.__exit__(None, None, None)
    audit = slow.app.state.server.audit
    _poll(lambda: any(r.request_id == "queued-499" for r in audit.query()), "the audit row")
    row = next(r for r in audit.query() if r.request_id == "queued-499")
    assert row.status == 499
    _wait_idle(slow)


def test_rejections_are_counted_and_retry_after_follows_the_queue(slow: LiveServer) -> None:
    url = slow.url
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "temperature": 0}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200  # ~1 s
    before = metric(url, "workbench_requests_rejected_total", code="server.queue_full")
    cm, _ = _stream_first_token(url, 40, "runner-ra")
    queued = threading.Thread(
        target=lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    )
    queued.start()
    try:
        _poll(lambda: slow.worker.queued == 1, "the second request to queue")
        rejected = [httpx.post(f"{url}/v1/completions", json=body, timeout=60) for _ in range(3)]
    finally:
        cm.__exit__(None, None, None)
        queued.join(60)
    for r in rejected:
        assert_problem(r, 503, "server.queue_full")
        assert int(r.headers["retry-after"]) >= 2  # two requests of about a second each ahead
    after = metric(url, "workbench_requests_rejected_total", code="server.queue_full")
    assert after == before + 3
    _wait_idle(slow)


def test_time_to_first_token_includes_the_queue_wait(slow: LiveServer) -> None:
    url = slow.url
    name = "workbench_time_to_first_token_seconds"
    fast_before = metric(url, f"{name}_bucket", le="0.5")
    all_before = metric(url, f"{name}_count")
    cm, lines = _stream_first_token(url, 30, "runner-ttft")  # 1.5 s of tokens
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        t = threading.Thread(
            target=lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        )
        t.start()
        _poll(lambda: slow.worker.queued == 1, "the second request to queue")
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the runner ran to its end; then the other
    finally:
        cm.__exit__(None, None, None)
    t.join(60)
    _wait_idle(slow)
    assert metric(url, f"{name}_count") == all_before + 2
    # The runner's first token came fast; the queued one waited for it first.
    assert metric(url, f"{name}_bucket", le="0.5") == fast_before + 1


def test_deep_nesting_and_non_utf8_are_malformed_json(open_server: LiveServer) -> None:
    url = f"{open_server.url}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    for body in (b"[" * 100_000, b'{"model": "\xff\xfe", "messages": []}'):
        r = httpx.post(url, content=body, headers=headers)
        problem = assert_problem(r, 400, "user.malformed_json")
        assert problem["error"]["type"] == "invalid_request_error"


def test_foreign_logs_share_the_json_format(log_lines: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").warning(
        "from uvicorn", extra={"color_message": "from \x1b[1muvicorn\x1b[0m"}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    records = _records(log_lines)  # every line parses as JSON
    assert {r["message"] for r in records} >= {"from uvicorn", "Exception in ASGI application"}
    assert any("boom" in r.get("exc", "") for r in records)
    assert any("a library warning" in r["message"] for r in records)
    assert "\\u001b" not in log_lines.getvalue()  # uvicorn's coloured copy is dropped


def test_without_a_key_only_loopback_host_names_are_answered(
    open_server: LiveServer, tiny_model: Path
) -> None:
    url = f"{open_server.url}/v1/models"
    for host in ("localhost", f"localhost:{open_server.port}", "127.0.0.1", "[::1]:80"):
        assert httpx.get(url, headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"attacker.test:{open_server.port}", "127.0.0.1.evil.test"):
        assert_problem(httpx.get(url, headers={"Host": host}), 421, "server.untrusted_host")
    assert httpx.get(f"{open_server.url}/health", headers={"Host": "evil.example"}).is_success
    settings = ServerSettings(allowed_hosts=("llm.internal",))
    with LiveServer(lambda: Engine(tiny_model, backend="numpy"), settings) as server:
        models = f"{server.url}/v1/models"
        assert httpx.get(models, headers={"Host": "llm.internal:8000"}).status_code == 200
        assert_problem(httpx.get(models, headers={"Host": "localhost"}), 421)


def test_with_a_key_any_host_is_answered(keyed_audit: Any) -> None:
    server, _ = keyed_audit
    headers = {"Host": "api.example.com", "Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
