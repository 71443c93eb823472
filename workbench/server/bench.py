"""`workbench bench serve`: concurrent streaming clients against a server, per concurrency level.

Each level runs ``clients`` threads at once; each sends ``requests`` streaming completions one
after the other (a distinct prompt each, so the prefix cache does not turn the benchmark into a
cache test) and records when every token chunk arrives. Reported per level: aggregate generated
tokens/s (all tokens over the level's wall time), time to first token and inter-token latency at
p50 and p99. The server is the caller's (``url``) or one started in this process on a loopback
port with room for the largest level.

With ``shared_prefix=N``, before the levels, two requests run one after the other whose prompts
share their first ~N tokens (a prefix no earlier request used): the second's time to first token
over the first's is what the prefix cache saves (`SharedPrefix`).
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

from workbench.errors import UserError


@dataclass(frozen=True)
class ServeLevel:
    clients: int
    requests: int  # completed requests
    tokens: int  # generated tokens received
    wall_s: float
    tok_s: float  # aggregate: tokens / wall_s
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float


@dataclass(frozen=True)
class SharedPrefix:
    """Two requests in turn whose prompts share a prefix: the second should find it cached."""

    prefix_tokens: int  # tokens of the shared prefix (as the server's tokenizer counts)
    first_prompt_tokens: int
    second_prompt_tokens: int
    first_ttft_s: float
    second_ttft_s: float
    ttft_ratio: float  # second / first
    # In-process only (None against --url): positions each request's prefill ran through the
    # model, and the second's prompt positions served from the prefix cache.
    first_computed_positions: int | None
    second_computed_positions: int | None
    second_cached_tokens: int | None


@dataclass(frozen=True)
class ServeBench:
    model: str
    url: str  # "in-process" when the benchmark started the server itself
    prompt_tokens: int
    gen_tokens: int
    levels: tuple[ServeLevel, ...]
    shared_prefix: SharedPrefix | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _stream_chunks(
    client: httpx.Client, url: str, body: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """The JSON chunks of one streaming completion, each yielded as it arrives (the caller takes
    the arrival time); an answer other than 200 is a `UserError`."""
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise UserError(
                "user.bench_request_failed",
                f"the server answered {r.status_code}: {r.text[:200]}",
            )
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            yield json.loads(line[6:])


def _one_request(
    client: httpx.Client, url: str, model: str, prompt: str, gen_tokens: int
) -> tuple[float, list[float]]:
    """(time to first token, arrival times of every token chunk) of one streaming request."""
    body = {"model": model, "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0.0,
            "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    arrivals: list[float] = []
    for chunk in _stream_chunks(client, url, body):
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter())
    if not arrivals:
        return float("nan"), []
    return arrivals[0] - t0, arrivals


def _first_token(client: httpx.Client, url: str, model: str, prompt: str) -> tuple[float, int]:
    """(time to the first chunk, prompt tokens) of a one-token streaming completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = float("nan")
    prompt_tokens = 0
    for chunk in _stream_chunks(client, url, body):
        if chunk.get("choices") and first != first:  # the token (or the end, if held back)
            first = time.perf_counter() - t0
        if chunk.get("usage"):
            prompt_tokens = int(chunk["usage"]["prompt_tokens"])
    return first, prompt_tokens


def shared_prefix_probe(
    url: str, model: str, prefix: str, prefix_tokens: int, *,
    headers: dict[str, str] | None = None, counters: Callable[[], tuple[int, int]] | None = None,
) -> SharedPrefix:  # fmt: skip
    """Two one-token requests in turn, ``prefix`` then different tails; ``counters`` gives the
    engine's (computed positions, prefix-cache hit tokens) so far, when it is in this process."""
    seen = []
    results = []
    with httpx.Client(timeout=600, headers=headers) as client:
        for tail in (" Which of these words comes first?", " Which of these words is longest?"):
            before = counters() if counters else None
            results.append(_first_token(client, url, model, prefix + tail))
            after = counters() if counters else None
            if before is not None and after is not None:
                seen.append((after[0] - before[0], after[1] - before[1]))
    (t1, n1), (t2, n2) = results
    return SharedPrefix(
        prefix_tokens=prefix_tokens,
        first_prompt_tokens=n1,
        second_prompt_tokens=n2,
        first_ttft_s=t1,
        second_ttft_s=t2,
        ttft_ratio=t2 / t1 if t1 > 0 else float("nan"),
        first_computed_positions=seen[0][0] if seen else None,
        second_computed_positions=seen[1][0] if seen else None,
        second_cached_tokens=seen[1][1] if seen else None,
    )


def run_level(
    url: str, model: str, prompts: Callable[[int, int], str], *, clients: int, requests: int,
    gen_tokens: int, headers: dict[str, str] | None = None,
) -> ServeLevel:  # fmt: skip
    """``clients`` threads, each sending ``requests`` streaming completions in turn."""
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    done = 0
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_main(c: int) -> None:
        nonlocal tokens, done
        try:
            with httpx.Client(timeout=600, headers=headers) as client:
                for j in range(requests):
                    ttft, arrivals = _one_request(client, url, model, prompts(c, j), gen_tokens)
                    with lock:
                        done += 1
                        tokens += len(arrivals)
                        if arrivals:
                            ttfts.append(ttft)
                            itls.extend(np.diff(arrivals).tolist())
        except BaseException as e:  # reported to the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=client_main, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return ServeLevel(
        clients=clients,
        requests=done,
        tokens=tokens,
        wall_s=wall,
        tok_s=tokens / wall if wall else 0.0,
        ttft_p50_s=_percentile(ttfts, 50),
        ttft_p99_s=_percentile(ttfts, 99),
        itl_p50_s=_percentile(itls, 50),
        itl_p99_s=_percentile(itls, 99),
    )


@contextmanager
def in_process_server(engine: Any, max_batch: int) -> Iterator[str]:
    """The engine behind `create_app` on a loopback port, for the duration; yields its URL."""
    from workbench.server import ServerSettings, create_app
    from workbench.server.serving import DrainingServer, uvicorn_config

    settings = ServerSettings(max_batch=max_batch, max_queue=max_batch, audit_db=None, warmup=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(engine, settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.server, 0.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (server.started and app.state.server.worker.ready):
            if app.state.server.worker.load_error is not None:
                raise app.state.server.worker.load_error
            if time.monotonic() > deadline:
                raise UserError("user.bench_server", "the in-process server did not start")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def bench_serve(
    engine: Any | None,
    clients: Sequence[int],
    *,
    url: str | None = None,
    model: str | None = None,
    prompt_tokens: int = 64,
    gen_tokens: int = 64,
    requests: int = 2,
    api_key: str | None = None,
    shared_prefix: int = 0,
    progress: Callable[[ServeLevel], None] | None = None,
) -> ServeBench:
    """Run every concurrency level in ``clients``; against ``url`` when given, else against
    ``engine`` served in this process (its batch sized for the largest level). With
    ``shared_prefix`` tokens, first measure the prefix cache (`shared_prefix_probe`)."""
    if any(c < 1 for c in clients) or (not clients and not shared_prefix):
        raise UserError("user.bad_clients", "client counts must be >= 1")
    if prompt_tokens < 1 or gen_tokens < 1 or requests < 1 or shared_prefix < 0:
        raise UserError(
            "user.bad_bench",
            "prompt and generated tokens, requests must be >= 1, the shared prefix >= 0",
        )
    if url is None and engine is None:
        raise UserError("user.bad_bench", "give an engine or the URL of a running server")
    filler = " ".join(f"w{i % 97}" for i in range(prompt_tokens))

    def prompts(c: int, j: int) -> str:
        # The tag first: two prompts differ from their first page, so none shares a prefix.
        words = f"client {c} request {j}: {filler}".split()
        return " ".join(words[: max(1, prompt_tokens // 2)])

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    levels: list[ServeLevel] = []
    probe: list[SharedPrefix] = []

    def run_all(target: str, name: str) -> None:
        run_level(target, name, prompts, clients=1, requests=1, gen_tokens=2, headers=headers)
        if shared_prefix:
            text, n = _prefix_text(engine, shared_prefix)
            counters = None
            if url is None:
                b = engine.batcher
                counters = lambda: (b.computed_positions, b.pool.hit_tokens)  # noqa: E731
            probe.append(
                shared_prefix_probe(target, name, text, n, headers=headers, counters=counters)
            )
        for c in clients:
            level = run_level(
                target, name, prompts, clients=c, requests=requests, gen_tokens=gen_tokens,
                headers=headers,
            )  # fmt: skip
            levels.append(level)
            if progress is not None:
                progress(level)

    if url is not None:
        name = model or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        run_all(url.rstrip("/"), name)
        where = url
    else:
        # The largest level runs as one batch; the prefix cache lives in the batch, so a probe
        # of it needs one even with a single client.
        size = max([*clients, 2 if shared_prefix else 1])
        if engine._batcher is None:  # the batch is sized on first use
            engine.max_batch = max(engine.max_batch, size)
        name = engine.model.name
        with in_process_server(engine, size) as local:
            run_all(local, name)
        where = "in-process"
    return ServeBench(
        name, where, prompt_tokens, gen_tokens, tuple(levels), probe[0] if probe else None
    )


def _prefix_text(engine: Any | None, tokens: int) -> tuple[str, int]:
    """A prompt prefix of about ``tokens`` tokens that no earlier request used (it starts with a
    random tag), and its token count (exact with an in-process engine, else estimated)."""
    words = [f"bench {secrets.token_hex(4)}:"]
    if engine is None:
        words += [f"w{i % 97}" for i in range(tokens // 2)]
        return " ".join(words), tokens
    i = 0
    while len(engine.tokenizer.encode(" ".join(words))) < tokens:
        step = max(1, (tokens - len(engine.tokenizer.encode(" ".join(words)))) // 3)
        words += [f"w{(i + j) % 97}" for j in range(step)]
        i += step
    text = " ".join(words)
    return text, len(engine.tokenizer.encode(text))
