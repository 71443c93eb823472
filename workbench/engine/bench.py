"""Generation benchmark: prefill tok/s on a fixed-length prompt, decode tok/s over fixed steps.

Runs the transformer directly (no sampling, no EOG stop) so every run does the same work: a
prefill of `prompt_tokens` then `gen_tokens` greedy decode steps. A warm-up run (JIT compilation,
page faults of the mapped weights) is excluded, a full garbage collection precedes each run,
and the median of `runs` is reported.

Each run is traced as the engine traces a generation (a generation span, its prefill and decode
children, each pass made current): with tracing off those calls do nothing, as in the engine.
``trace=True`` measures what tracing costs, two ways. End to end: `runs` pairs of an untraced and
a traced generation (spans kept in memory, nothing exported) decoded together a token at a time
in ABBA order (untraced then traced, traced then untraced, ...; the next pair starts the other
way), so that both see the same moments of a busy machine and neither always goes second; a
full garbage collection before each pair, one pair of warm-up. The figure is the median over
pairs of each pair's decode throughput lost, with a distribution-free 95 % interval for that
median; beside it the same for each pair's median over tokens of the step time lost (robust to
the bursts of other work that hit a few steps and dominate the first figure on a busy machine,
blind to a cost that comes in rare long pauses, which the first one keeps). Alone: the tracing
calls around an empty step, disabled and enabled, less the same loop without them, in
microseconds per token (end to end cannot resolve a cost that small).

In the same run the machine's limits are measured (`limits.measure`: streaming read bandwidth,
float32 GEMM rate at the model's shapes) and each phase is reported as a fraction of its limit.

``profile=True`` (the CLI's ``--profile``) adds one more generation after the timed ones, with the
engine's profiler on, and breaks each phase down by kernel (`phase_profile`): its share of the
phase and, where the cost model knows its work, its GFLOP/s and GB/s as fractions of the GEMM
rate and the read bandwidth. This is where the time the fractions above leave goes. The
profiler's bookkeeping slows that run a little, so its shares are of its own wall time, not of
the timed runs'.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from workbench.engine import limits
from workbench.engine.results import GenerationConfig
from workbench.engine.warmup import compile_listener
from workbench.errors import UserError
from workbench.kernels import registry
from workbench.observe import tracing
from workbench.observe.profiler import Profiler

TRACE_PAIRS = 10  # pairs of runs with trace=True when the caller gives no count (the CLI's default)
CALL_REPS = 100  # generations of empty steps timed for the tracing calls alone
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GEMM_PAIRS = 10  # prefills each timed back to back with the GEMM pass (`paired_gemm_fraction`)
PROFILE_REQUEST = "bench-profile"  # the request ids of profiled runs' records start with this

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
    # a kernel was compiled in this process (not loaded from numba's cache): peak_rss_mb then
    # includes the compiler's memory (docs/performance.md, "Memory")
    kernels_compiled: bool
    prefill_flops: int  # matrix products and causal attention of one prefill
    prefill_gflops: float  # prefill_flops / median prefill seconds
    read_gb_s: float | None = None  # the machine's streaming read bandwidth (limits.py)
    gemm_gflops: float | None = None  # the machine's float32 GEMM rate at the model's shapes
    decode_bandwidth_fraction: float | None = None  # decode_gb_s / read_gb_s
    prefill_gemm_fraction: float | None = None  # prefill_gflops / gemm_gflops
    # the median over GEMM_PAIRS prefills of each one's rate over that of the same products
    # timed back to back with it (`paired_gemm_fraction`)
    prefill_gemm_fraction_paired: float | None = None
    trace_steps: bool | None = None  # traced runs had one span per decode step
    trace_prefill_tok_s: float | None = None  # median over the traced runs
    trace_decode_tok_s: float | None = None
    trace_decode_s: list[float] | None = None  # traced runs, pair by pair (decode_s's pairs)
    trace_pair_overheads: list[float] | None = None  # 1 - decode_s[i] / trace_decode_s[i]
    trace_decode_overhead: float | None = None  # median of trace_pair_overheads
    trace_overhead_interval: list[float] | None = None  # 95 % for that median; None: < 6 pairs
    # Per pair, the median over tokens of 1 - untraced / traced step time (the other jobs' bursts
    # hit few steps); the median over pairs and its 95 % interval
    trace_step_overhead: float | None = None
    trace_step_overhead_interval: list[float] | None = None
    trace_spans: int | None = None  # spans the traced runs (warm-up included) recorded
    trace_call_us_off: float | None = None  # per token: the tracing calls, disabled, alone
    trace_call_us_on: float | None = None  # per token: the same calls enabled, alone
    # With profile: {"prefill": phase_profile(...), "decode": ...} of one profiled generation,
    # and the records the profiler dropped meanwhile (its capacity; > 0: the earliest are missing)
    profile: dict[str, dict[str, Any]] | None = None
    profile_dropped: int | None = None

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
    prefill = registry.get("attention_prefill")  # the profiler's cost model for the same kernel
    attention = prefill.cost(n=n, heads=spec.n_heads, head_dim=spec.head_dim).flops
    return spec.n_layers * (mats + attention) + 2 * spec.vocab_size * spec.dim


def measure_paired_gemm_fraction(engine: Any, prompt: np.ndarray) -> float:
    """`paired_gemm_fraction` of ``engine``'s prefill of ``prompt`` (token ids (n,)), against
    the same products (`limits.products_pass`), the profiler off."""
    tf, host, n = engine.transformer, engine.backend.to_host, len(prompt)
    flops = prefill_flops(engine, n)

    def prefill() -> float:
        cache = tf.new_cache(n)
        t0 = time.perf_counter()
        host(tf.prefill(prompt, cache))
        return time.perf_counter() - t0

    shapes, layers = layer_shapes(engine), engine.spec.n_layers
    gemm_flops, time_gemm = limits.products_pass(shapes, n, engine.backend.threads, layers)
    profiling, engine.profiler.enabled = engine.profiler.enabled, False
    try:
        return paired_gemm_fraction(prefill, flops, gemm_flops, time_gemm)
    finally:
        engine.profiler.enabled = profiling


def paired_gemm_fraction(
    prefill: Callable[[], float],
    flops: int,
    gemm_flops: int,
    time_gemm: Callable[[], float],
    pairs: int = GEMM_PAIRS,
) -> float:
    """The median over ``pairs`` of a prefill's GFLOP/s (``flops`` over the seconds
    ``prefill()`` returns) over the GEMM rate of its products (``gemm_flops`` over the seconds
    ``time_gemm()`` returns, `limits.products_pass`), the two timed back to back, in alternating
    order, after one pair that warms both up. On a machine shared with other jobs the rate of
    either can move by a third from one minute to the next; two measurements milliseconds apart
    see the same load, and their ratio keeps what the prefill itself does."""
    ratios = []
    for i in range(pairs + 1):
        if i % 2:
            g = time_gemm()
            p = prefill()
        else:
            p = prefill()
            g = time_gemm()
        if i:
            ratios.append((flops / p) / (gemm_flops / g))
    return statistics.median(ratios)


def phase_profile(
    profiler: Profiler,
    phase: str,
    wall_s: float,
    request_id: str,
    gemm_gflops: float | None = None,
    read_gb_s: float | None = None,
) -> dict[str, Any]:
    """One phase of a profiled generation by kernel, from ``profiler``'s records of
    ``request_id``: {"wall_s", "kernels": [...] (most time first), "other_s"}.

    Each kernel: name, count, total_s, share (total_s / wall_s), gflop_s and gb_s (None where
    the cost model has no figure), gemm_fraction (gflop_s / ``gemm_gflops``) and read_fraction
    (gb_s / ``read_gb_s``; None where either is unknown): the products of a prompt are bound by
    the first, a decode's by the second. other_s is the wall time outside every recorded kernel
    (Python between operations, the profiler's own bookkeeping)."""

    def fraction(rate: float | None, limit: float | None) -> float | None:
        return rate / limit if rate is not None and limit else None

    kernels = [
        {
            "name": row["name"],
            "count": row["count"],
            "total_s": row["total_s"],
            "share": row["total_s"] / wall_s,
            "gflop_s": row["gflop_s"] or None,  # 0: a copy (kv_append), no arithmetic
            "gb_s": row["gb_s"],
            "gemm_fraction": fraction(row["gflop_s"] or None, gemm_gflops),
            "read_fraction": fraction(row["gb_s"], read_gb_s),
        }
        for row in profiler.summary(by=("name",), request_id=request_id, phase=phase)
    ]
    other = wall_s - math.fsum(k["total_s"] for k in kernels)
    return {"wall_s": wall_s, "kernels": kernels, "other_s": other}


def median_interval(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """[low, high]: a distribution-free confidence interval for the median of ``values`` (the
    k-th smallest and k-th largest, k as large as the binomial(n, 1/2) tails allow), or None
    when there are too few values for that confidence (fewer than 6 for 95 %)."""
    xs, n = sorted(values), len(values)
    tail, k = 0.0, 0  # tail: P(at most k - 1 of n values below the median)
    while k < n and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail, k = tail + math.comb(n, k) / 2**n, k + 1
    return None if k == 0 else [xs[k - 1], xs[n - k]]


class _Generation:
    """One generation advanced a piece at a time (the prefill, then one token per `token`),
    each piece timed with the tracing calls the engine makes around it."""

    def __init__(
        self,
        gt: tracing.GenerationTrace,
        prefill: Callable[[], Any],
        step: Callable[[Any], Any],
        n: int,
    ) -> None:
        self.gt, self._prefill, self._step, self.n = gt, prefill, step, n
        self.x: Any = None  # what the last piece returned (logits), the next step's input
        self.done = 0  # tokens decoded
        self.prefill_s = 0.0
        self.steps_s: list[float] = []  # (done,) seconds of each decode step

    @property
    def decode_s(self) -> float:
        return math.fsum(self.steps_s)

    def prefill(self) -> None:
        gt, t0 = self.gt, time.perf_counter()
        gt.begin("prefill")
        with gt.current():
            self.x = self._prefill()
        gt.drawn(0)
        self.prefill_s = time.perf_counter() - t0

    def token(self) -> None:
        """The next decode step (the last one also ends the generation's spans)."""
        gt, t0 = self.gt, time.perf_counter()
        gt.begin("decode_step")
        with gt.current():
            self.x = self._step(self.x)
        self.done += 1
        gt.drawn(self.done)
        if self.done == self.n:
            gt.finish(SimpleNamespace(token_ids=range(self.n), finish_reason="length", text=""))
        self.steps_s.append(time.perf_counter() - t0)


class _Bare(_Generation):
    """`_Generation` without its tracing calls: the baseline they are timed against."""

    def token(self) -> None:
        t0 = time.perf_counter()
        self.x = self._step(self.x)
        self.done += 1
        self.steps_s.append(time.perf_counter() - t0)


def _run_alone(gen: _Generation) -> _Generation:
    """Prefill, then every decode step."""
    gen.prefill()
    for _ in range(gen.n):
        gen.token()
    return gen


def _run_profiled(gen: _Generation, request_id: str) -> _Generation:
    """`_run_alone` with every record tagged ``request_id`` and its phase."""
    with Profiler.request(request_id):
        with Profiler.phase("prefill"):
            gen.prefill()
        with Profiler.phase("decode"):
            for _ in range(gen.n):
                gen.token()
    return gen


def _run_interleaved(a: _Generation, b: _Generation, flip: bool = False) -> None:
    """Prefill both, then decode both a token at a time in ABBA order (a b, b a, a b, ...;
    b first with ``flip``): whatever else the machine does, both see it alike."""
    for gen in (b, a) if flip else (a, b):
        gen.prefill()
    for i in range(a.n):
        for gen in (a, b) if i % 2 == flip else (b, a):
            gen.token()


def tracing_call_cost(
    new_trace: Callable[[], tracing.GenerationTrace], n: int, reps: int = CALL_REPS
) -> tuple[float, float]:
    """(disabled, enabled) microseconds per token that the tracing calls around a decode step
    add to an empty step: medians over ``reps`` rounds of a generation of n steps of each kind
    (without the calls, disabled, enabled), the first subtracted from the others. ``new_trace``
    starts an enabled generation's trace."""
    times: dict[str, list[float]] = {"bare": [], "off": [], "on": []}

    def same(x: Any) -> Any:
        return x

    for _ in range(reps):
        for kind, gen in (
            ("bare", _Bare(tracing.NO_TRACE, lambda: None, same, n)),
            ("off", _Generation(tracing.NO_TRACE, lambda: None, same, n)),
            ("on", _Generation(new_trace(), lambda: None, same, n)),
        ):
            times[kind].append(_run_alone(gen).decode_s)
    base = statistics.median(times["bare"])
    return (
        (statistics.median(times["off"]) - base) / n * 1e6,
        (statistics.median(times["on"]) - base) / n * 1e6,
    )


def bench_generate(
    engine,
    *,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    runs: int | None = None,
    measure_limits: bool = True,
    trace: bool = False,
    trace_steps: bool = False,
    profile: bool = False,
) -> GenerateBench:
    """Time ``runs`` runs (default 3), or with ``trace`` that many pairs of an untraced and a
    traced generation (default `TRACE_PAIRS`), after a warm-up; with ``profile``, then one
    generation with the engine's profiler on, broken down by kernel. See the module's
    docstring."""
    runs = runs if runs is not None else TRACE_PAIRS if trace else 3
    if prompt_tokens < 1 or gen_tokens < 1 or runs < 1:
        raise UserError("user.bad_bench", "prompt_tokens, gen_tokens and runs must be >= 1")
    tf = engine.transformer
    if prompt_tokens + gen_tokens > engine.spec.context_length:
        raise UserError("user.context_overflow", "prompt + generated tokens exceed the context")
    prompt = bench_prompt(engine.tokenizer, prompt_tokens)
    config = GenerationConfig(max_tokens=gen_tokens, temperature=0)
    recorder = None
    if trace:
        tracing.configure(steps=trace_steps)  # in memory only: the export is not what is timed
        recorder = tracing.recorder(capacity=1_000_000)

    def new_trace() -> tracing.GenerationTrace:
        return tracing.generation(
            engine.model.name, config, request_id="bench", prompt_tokens=prompt_tokens
        )

    def new_run(traced: bool) -> _Generation:
        cache = tf.new_cache(prompt_tokens + gen_tokens)
        host = engine.backend.to_host
        return _Generation(
            new_trace() if traced else tracing.NO_TRACE,
            lambda: host(tf.prefill(prompt, cache)),
            lambda logits: host(tf.decode_one_token(int(np.argmax(logits)), cache)),
            gen_tokens,
        )

    # The engine's compute is measured, not the profiler's bookkeeping (a few ms per token on
    # the NumPy backend): recording is off for the timed runs.
    profiling, engine.profiler.enabled = engine.profiler.enabled, False
    times: list[tuple[float, float]] = []
    traced: list[tuple[float, float]] = []
    step_losses: list[float] = []  # per pair: the median over its tokens
    calls, spans = (0.0, 0.0), 0
    # A kernel compiled in this process (in the engine's warm-up or in these runs) leaves the
    # compiler's memory in the peak resident set: the result says so.
    compiled = [engine.compiled_kernels]
    with compile_listener(lambda: compiled.append(True)):
        try:
            for i in range(runs + 1):  # the first: warm-up
                plain, marked = new_run(False), new_run(True) if trace else None
                gc.collect()  # no run collects an earlier one's garbage
                if marked is not None:
                    _run_interleaved(plain, marked, flip=i % 2 == 1)
                    traced.append((marked.prefill_s, marked.decode_s))
                    losses = (1 - u / t for u, t in zip(plain.steps_s, marked.steps_s))
                    step_losses.append(statistics.median(losses))
                else:
                    _run_alone(plain)
                times.append((plain.prefill_s, plain.decode_s))
            times, traced, step_losses = times[1:], traced[1:], step_losses[1:]
            if trace:
                assert recorder is not None
                spans = len(recorder.spans())
                calls = tracing_call_cost(new_trace, gen_tokens)
            if profile:
                gc.collect()
                engine.profiler.enabled = True
                request_id, dropped = (
                    f"{PROFILE_REQUEST}-{uuid.uuid4().hex[:12]}",
                    engine.profiler.dropped,
                )
                profiled = _run_profiled(new_run(False), request_id)
                dropped = engine.profiler.dropped - dropped
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
            prefill_gemm_fraction_paired=measure_paired_gemm_fraction(engine, prompt),
        )
    if profile:
        walls = {"prefill": profiled.prefill_s, "decode": profiled.decode_s}
        lims = {"gemm_gflops": extra.get("gemm_gflops"), "read_gb_s": extra.get("read_gb_s")}
        extra["profile"] = {
            ph: phase_profile(engine.profiler, ph, wall, request_id, **lims)
            for ph, wall in walls.items()
        }
        extra["profile_dropped"] = dropped
    if trace:
        trace_decode = [d for _, d in traced]
        pairs = [1 - u / t for u, t in zip(decode, trace_decode)]
        extra.update(
            trace_steps=trace_steps,
            trace_prefill_tok_s=prompt_tokens / statistics.median(p for p, _ in traced),
            trace_decode_tok_s=gen_tokens / statistics.median(trace_decode),
            trace_decode_s=trace_decode,
            trace_pair_overheads=pairs,
            trace_decode_overhead=statistics.median(pairs),
            trace_overhead_interval=median_interval(pairs),
            trace_step_overhead=statistics.median(step_losses),
            trace_step_overhead_interval=median_interval(step_losses),
            trace_spans=spans,
            trace_call_us_off=calls[0],
            trace_call_us_on=calls[1],
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
        kernels_compiled=any(compiled),
        prefill_flops=flops,
        prefill_gflops=prefill_gflops,
        **extra,
    )
