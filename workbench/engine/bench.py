"""Generation benchmark: prefill tok/s on a fixed-length prompt, decode tok/s over fixed steps.

Runs the transformer directly (no sampling, no EOG stop) so every run does the same work: a
prefill of `prompt_tokens` then `gen_tokens` greedy decode steps. A warm-up run (JIT compilation,
page faults of the mapped weights) is excluded; the median of `runs` is reported.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from workbench.errors import UserError

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
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def bench_generate(
    engine, *, prompt_tokens: int = 128, gen_tokens: int = 128, runs: int = 3
) -> GenerateBench:
    if prompt_tokens < 1 or gen_tokens < 1 or runs < 1:
        raise UserError("user.bad_bench", "prompt_tokens, gen_tokens and runs must be >= 1")
    tf = engine.transformer
    if prompt_tokens + gen_tokens > engine.spec.context_length:
        raise UserError("user.context_overflow", "prompt + generated tokens exceed the context")
    prompt = bench_prompt(engine.tokenizer, prompt_tokens)

    def one_run() -> tuple[float, float]:
        cache = tf.new_cache(prompt_tokens + gen_tokens)
        t0 = time.perf_counter()
        host = engine.backend.to_host
        logits = host(tf.prefill(prompt, cache))
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = host(tf.decode_one_token(int(np.argmax(logits)), cache))
        return t1 - t0, time.perf_counter() - t1

    # The engine's compute is measured, not the profiler's bookkeeping (a few ms per token on
    # the NumPy backend): recording is off for the timed runs.
    profiling, engine.profiler.enabled = engine.profiler.enabled, False
    try:
        one_run()  # warm-up
        times = [one_run() for _ in range(runs)]
    finally:
        engine.profiler.enabled = profiling
    prefill = [p for p, _ in times]
    decode = [d for _, d in times]
    decode_tok_s = gen_tokens / statistics.median(decode)
    model_bytes = sum(t.nbytes for t in engine.model.gguf.tensors.values())
    return GenerateBench(
        model=engine.model.name,
        backend=engine.backend.name,
        threads=engine.backend.threads,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        runs=runs,
        prefill_tok_s=prompt_tokens / statistics.median(prefill),
        decode_tok_s=decode_tok_s,
        prefill_s=prefill,
        decode_s=decode,
        model_bytes=model_bytes,
        decode_gb_s=model_bytes * decode_tok_s / 1e9,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
