"""Generation benchmark: prefill tok/s on a fixed-length prompt, decode tok/s over fixed steps.

Runs the transformer directly (no sampling, no EOG stop) so every run does the same work: a
prefill of `prompt_tokens` then `gen_tokens` greedy decode steps. A warm-up run (JIT compilation,
page faults of the mapped weights) is excluded; the median of `runs` is reported.

Each run is traced as the engine traces a generation (a generation span, its prefill and decode
children, each pass made current): with tracing off those calls do nothing, as in the engine.
``trace=True`` also times runs with tracing on (spans kept in memory, nothing exported),
interleaved with untraced ones so that both see the same machine, and reports the decode
throughput lost to tracing.

In the same run the machine's limits are measured (`limits.measure`: streaming read bandwidth,
float32 GEMM rate at the model's shapes) and each phase is reported as a fraction of its limit.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np

from workbench.engine import limits
from workbench.engine.results import GenerationConfig
from workbench.errors import UserError
from workbench.observe import tracing

LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# Deterministic filler text; its tokens are cut to the requested prompt length.
_FILLER = (
    "The GPU executes thousands of threads in groups called wavefronts. Each compute unit has "
    "local data share memory, vector registers and scalar registers. Kernels that read memory "
    "once and compute little are limited by bandwidth; the roofline model tells which limit "
    "applies. Quantized weights reduce the bytes read per token, which raises decode speed. "
)


def bench_prompt(tokenizer, n: int) -> np.ndarray:
    """(n,) token ids of deterministic English text, the same for every engine compared."""
    ids = tokenizer.encode(_FILLER * (1 + n // 40))
    return np.asarray((ids * (1 + n // max(len(ids), 1)))[:n], dtype=np.int64)


@dataclass(frozen=True)
class GenerateBench:
    model: str
    backend: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    runs: int
    prefill_tok_s: float  # median over runs
    decode_tok_s: float  # median over runs
    prefill_s: list[float]
    decode_s: list[float]
    model_bytes: int  # weight bytes read per decoded token
    decode_gb_s: float  # model_bytes x decode tok/s: the achieved weight bandwidth
    peak_rss_mb: float  # before the limits are measured (their read buffer is large)
    prefill_flops: int  # matrix products and causal attention of one prefill
    prefill_gflops: float  # prefill_flops / median prefill seconds
    read_gb_s: float | None = None  # the machine's streaming read bandwidth (limits.py)
    gemm_gflops: float | None = None  # the machine's float32 GEMM rate at the model's shapes
    decode_bandwidth_fraction: float | None = None  # decode_gb_s / read_gb_s
    prefill_gemm_fraction: float | None = None  # prefill_gflops / gemm_gflops
    trace_steps: bool | None = None  # traced runs had one span per decode step
    trace_prefill_tok_s: float | None = None  # median over the traced runs
    trace_decode_tok_s: float | None = None
    trace_decode_overhead: float | None = None  # 1 - traced / untraced decode tok/s
    trace_spans: int | None = None  # spans the traced runs recorded

    def to_dict(self) -> dict:
        return asdict(self)


def layer_shapes(engine) -> dict[tuple[int, int], int]:
    """(rows, cols): how many of a layer's matrices have that shape (layer 0 speaks for all)."""
    shapes: dict[tuple[int, int], int] = {}
    tensors = engine.model.gguf.tensors
    for name in LAYER_MATRICES:
        rows, cols = tensors[f"blk.0.{name}.weight"].shape
        shapes[(rows, cols)] = shapes.get((rows, cols), 0) + 1
    return shapes


def prefill_flops(engine, n: int) -> int:
    """Flops of a prefill of n tokens: every layer's products, causal attention (the scores and
    the weighted values of the positions each row sees) and the last position's logits."""
    spec = engine.spec
    mats = sum(2 * n * rows * cols * c for (rows, cols), c in layer_shapes(engine).items())
    attention = 2 * 2 * spec.n_heads * spec.head_dim * (n * (n + 1) // 2)
    return spec.n_layers * (mats + attention) + 2 * spec.vocab_size * spec.dim


def bench_generate(
    engine,
    *,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    runs: int = 3,
    measure_limits: bool = True,
    trace: bool = False,
    trace_steps: bool = False,
) -> GenerateBench:
    if prompt_tokens < 1 or gen_tokens < 1 or runs < 1:
        raise UserError("user.bad_bench", "prompt_tokens, gen_tokens and runs must be >= 1")
    tf = engine.transformer
    if prompt_tokens + gen_tokens > engine.spec.context_length:
        raise UserError("user.context_overflow", "prompt + generated tokens exceed the context")
    prompt = bench_prompt(engine.tokenizer, prompt_tokens)
    config = GenerationConfig(max_tokens=gen_tokens, temperature=0)
    done = SimpleNamespace(token_ids=range(gen_tokens), finish_reason="length", text="")
    recorder = None
    if trace:
        tracing.configure(steps=trace_steps)  # in memory only: the export is not what is timed
        recorder = tracing.recorder(capacity=1_000_000)

    def one_run(traced: bool = False) -> tuple[float, float]:
        gt = tracing.NO_TRACE
        if traced:
            gt = tracing.generation(
                engine.model.name, config, request_id="bench", prompt_tokens=prompt_tokens
            )
        cache = tf.new_cache(prompt_tokens + gen_tokens)
        t0 = time.perf_counter()
        host = engine.backend.to_host
        gt.begin("prefill")
        with gt.current():
            logits = host(tf.prefill(prompt, cache))
        gt.drawn(0)
        t1 = time.perf_counter()
        for i in range(gen_tokens):
            gt.begin("decode_step")
            with gt.current():
                logits = host(tf.decode_one_token(int(np.argmax(logits)), cache))
            gt.drawn(i + 1)
        gt.finish(done)
        return t1 - t0, time.perf_counter() - t1

    # The engine's compute is measured, not the profiler's bookkeeping (a few ms per token on
    # the NumPy backend): recording is off for the timed runs.
    profiling, engine.profiler.enabled = engine.profiler.enabled, False
    traced: list[tuple[float, float]] = []
    try:
        one_run(trace)  # warm-up
        times = []
        for _ in range(runs):
            times.append(one_run())
            if trace:
                traced.append(one_run(traced=True))
    finally:
        engine.profiler.enabled = profiling
        if trace:
            tracing.shutdown()
    prefill = [p for p, _ in times]
    decode = [d for _, d in times]
    decode_tok_s = gen_tokens / statistics.median(decode)
    model_bytes = sum(t.nbytes for t in engine.model.gguf.tensors.values())
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    prefill_tok_s = prompt_tokens / statistics.median(prefill)
    flops = prefill_flops(engine, prompt_tokens)
    prefill_gflops = flops * prefill_tok_s / prompt_tokens / 1e9
    decode_gb_s = model_bytes * decode_tok_s / 1e9
    extra = {}
    if measure_limits:
        lim = limits.measure(layer_shapes(engine), prompt_tokens, engine.backend.threads)
        extra = dict(
            read_gb_s=lim.read_gb_s,
            gemm_gflops=lim.gemm_gflops,
            decode_bandwidth_fraction=decode_gb_s / lim.read_gb_s,
            prefill_gemm_fraction=prefill_gflops / lim.gemm_gflops,
        )
    if trace:
        assert recorder is not None
        trace_decode = gen_tokens / statistics.median(d for _, d in traced)
        extra.update(
            trace_steps=trace_steps,
            trace_prefill_tok_s=prompt_tokens / statistics.median(p for p, _ in traced),
            trace_decode_tok_s=trace_decode,
            trace_decode_overhead=1 - trace_decode / decode_tok_s,
            trace_spans=len(recorder.spans()),
        )
    return GenerateBench(
        model=engine.model.name,
        backend=engine.backend.name,
        threads=engine.backend.threads,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        runs=runs,
        prefill_tok_s=prefill_tok_s,
        decode_tok_s=decode_tok_s,
        prefill_s=prefill,
        decode_s=decode,
        model_bytes=model_bytes,
        decode_gb_s=decode_gb_s,
        peak_rss_mb=peak_rss_mb,
        prefill_flops=flops,
        prefill_gflops=prefill_gflops,
        **extra,
    )
