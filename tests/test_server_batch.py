"""`workbench serve --max-batch`: concurrent requests run together and answer as alone."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from tests.test_server import LiveServer, metric
from workbench.engine.generate import Engine, GenerationConfig
from workbench.server import ServerSettings


def test_concurrent_requests_share_steps_and_match_the_engine(tiny_model: Path, rng, seed):
    engine = Engine(tiny_model, backend="numpy", max_batch=4)
    vocab = engine.spec.vocab_size
    prompts = [
        "".join(chr(int(c)) for c in rng.integers(97, 123, size=int(rng.integers(4, 30))))
        for _ in range(6)
    ]
    # Each prompt alone through the scheduler (a batch of one): the server batches through it
    # too, while a single caller's generate() takes the fused decode (equal to ~1e-6, not bits).
    expected = []
    for p in prompts:
        alone = engine.submit(p, GenerationConfig(temperature=0.0, max_tokens=12))
        for _ in alone:
            pass
        expected.append(alone.result.text)
    settings = ServerSettings(max_batch=4, max_queue=8, audit_db=None)
    texts: list[str | None] = [None] * len(prompts)

    with LiveServer(engine, settings) as live:
        assert live.worker.batching()

        def ask(i: int) -> None:
            r = httpx.post(
                f"{live.url}/v1/completions",
                json={
                    "model": engine.model.name,
                    "prompt": prompts[i],
                    "max_tokens": 12,
                    "temperature": 0.0,
                },
                timeout=60,
            )
            assert r.status_code == 200, r.text
            texts[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert texts == expected, f"seed {seed}, vocab {vocab}"
        steps = metric(live.url, "workbench_batch_size_sequences_count")
        sizes = metric(live.url, "workbench_batch_size_sequences_sum")
        assert steps > 0 and sizes > steps, "no step advanced more than one sequence"
        assert metric(live.url, "workbench_kv_pages_capacity") == engine.batcher.pool.n_pages
        health = httpx.get(f"{live.url}/health").json()
        assert health["requests"]["max_batch"] == 4
        assert health["engine"]["batch"]["pages_used"] == 0


def test_bench_serve_reports_every_level(tiny_model: Path):
    from workbench.server.bench import bench_serve

    engine = Engine(tiny_model, backend="numpy")
    r = bench_serve(engine, [1, 2], prompt_tokens=8, gen_tokens=6, requests=2)
    assert [lv.clients for lv in r.levels] == [1, 2] and r.url == "in-process"
    for lv in r.levels:
        assert lv.requests == 2 * lv.clients
        assert 0 < lv.tokens <= 6 * lv.requests
        assert lv.tok_s > 0 and lv.ttft_p50_s <= lv.ttft_p99_s
    assert engine.batcher.max_batch >= 2
    d = r.to_dict()
    assert set(d["levels"][0]) >= {"tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"}


def test_bench_shared_prefix_second_request_computes_only_its_tail(tmp_path: Path):
    """`bench serve --shared-prefix`: the second request finds the prefix's full pages cached
    and its prefill runs only the positions after them (counted, not timed)."""
    from tests.synth import TinyConfig, write_tiny_llama
    from workbench.engine.pages import PAGE_SIZE
    from workbench.server.bench import bench_serve

    model = write_tiny_llama(tmp_path / "tiny-320.gguf", TinyConfig(context_length=320), seed=5)
    engine = Engine(model, backend="numpy")
    r = bench_serve(engine, [1], prompt_tokens=8, gen_tokens=2, requests=1, shared_prefix=150)
    sp = r.shared_prefix
    assert sp is not None and sp.prefix_tokens >= 150
    # The first request's prefix is new: every prompt position is computed.
    assert sp.first_computed_positions == sp.first_prompt_tokens
    # The second: the full pages of the shared prefix come from the cache (all but the page
    # where the prompts part, at most), and only the rest is computed.
    assert sp.second_cached_tokens % PAGE_SIZE == 0
    assert sp.second_cached_tokens >= (sp.prefix_tokens // PAGE_SIZE - 1) * PAGE_SIZE
    assert sp.second_cached_tokens < sp.second_prompt_tokens
    assert sp.second_computed_positions == sp.second_prompt_tokens - sp.second_cached_tokens
    assert sp.first_ttft_s > 0 and sp.second_ttft_s > 0
    assert sp.ttft_ratio == sp.second_ttft_s / sp.first_ttft_s
    assert r.to_dict()["shared_prefix"]["ttft_ratio"] == sp.ttft_ratio


def test_bench_streaming_requests_read_chunks_and_refuse_errors():
    """Both bench requests read the stream through one reader: `data:` chunks only, up to
    `[DONE]`; an error answer is a `UserError` naming the status."""
    import pytest

    from workbench.errors import UserError
    from workbench.server.bench import _first_token, _one_request

    sse = (
        ": keep-alive\n\n"
        'data: {"choices": [{"text": "a"}]}\n\n'
        'data: {"choices": [{"text": ""}]}\n\n'
        'data: {"choices": [{"text": "b"}]}\n\n'
        'data: {"choices": [], "usage": {"prompt_tokens": 7}}\n\n'
        "data: [DONE]\n\n"
    )

    def answer(request: httpx.Request) -> httpx.Response:
        if b"fail" in request.content:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        ttft, arrivals = _one_request(client, "http://bench", "m", "hello", 4)
        assert len(arrivals) == 2 and ttft > 0 and arrivals[0] <= arrivals[1]
        first, prompt_tokens = _first_token(client, "http://bench", "m", "hello")
        assert first > 0 and prompt_tokens == 7
        for call in (
            lambda: _one_request(client, "http://bench", "m", "fail", 4),
            lambda: _first_token(client, "http://bench", "m", "fail"),
        ):
            with pytest.raises(UserError, match="503: busy") as e:
                call()
            assert e.value.code == "user.bench_request_failed"
