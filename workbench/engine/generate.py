"""The generation loop: prefill the prompt in one pass, then decode token by token.

`Engine.generate` returns a `Generation`: iterate it for `TokenEvent`s as tokens arrive, then read
`.result` for the whole text, the finish reason and the timings. Nothing here prints.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.engine.batching import Batcher
from workbench.engine.defaults import MAX_BATCH
from workbench.engine.launcher import Launcher
from workbench.engine.loader import Model, load
from workbench.engine.model import KVCache, Transformer
from workbench.engine.results import (  # re-exported: the API's home stays here
    FLUSH_ID,
    Generation,
    GenerationConfig,
    GenerationResult,
    StopMatcher,
    Timings,
    TokenEvent,
    TopLogprob,
)
from workbench.engine.sampler import Sampler
from workbench.engine.sequence import token_logprobs
from workbench.errors import BackendError, RecoverableError, UserError, WorkbenchError
from workbench.observe import tracing
from workbench.observe.metrics import Metrics
from workbench.observe.profiler import Profiler
from workbench.runtime.breaker import CircuitBreaker, Transition
from workbench.runtime.classify import CONTEXT_LOST
from workbench.runtime.errorlog import ErrorLog
from workbench.runtime.faults import FaultInjector
from workbench.runtime.retry import RetryPolicy, RetryStats

log = logging.getLogger(__name__)

# Launch retries: a transient device fault is retried quickly; five attempts make an exhausted
# launch (and so a fallback) vanishingly rare at a few percent of injected faults.
DEFAULT_LAUNCH_RETRY = RetryPolicy(max_attempts=5, initial_delay_s=0.001, max_delay_s=0.05)

BACKENDS = ("auto", "numpy", "emulator", "cupy")

# The sampling kernel keeps its candidates in shared memory: top_k above this samples on the host.
DEVICE_SAMPLE_MAX_K = 128

# Prompt tokens per prefill pass: between passes a cancelled or expired generation stops, so a
# long prompt holds the engine at most one chunk after its client has gone. Chunks keep the
# batched matmuls at full speed (a 1,024-token prompt prefilled no slower in chunks of 128 than
# in one pass), and 64 tokens at the ~340 tok/s prefill docs/performance.md reports for
# SmolLM2-135M on the CPU are about 0.2 s, leaving room for the attention over every earlier
# position at the end of a 5,000-token prompt.
PREFILL_CHUNK = 64


class Engine:
    """A model on a backend, generating text; the hub of profiling, metrics and resilience.

    Not thread-safe: one generation runs at a time (the server queues requests onto one worker).
    """

    def __init__(
        self,
        model: Model | str | Path | None = None,
        backend: str = "auto",
        *,
        threads: int | None = None,
        profiler: Profiler | None = None,
        metrics: Metrics | None = None,
        error_log: ErrorLog | None = None,
        retry: RetryPolicy | None = None,
        faults: FaultInjector | None = None,
        breaker: CircuitBreaker | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        max_batch: int = MAX_BATCH,
        kv_cache_mb: float | None = None,
        compile_progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        """``compile_progress(done, total, source)``: called as a device backend builds its
        kernel modules (all of them, here: see `DeviceBackend`).

        ``max_batch`` and ``kv_cache_mb`` size the batch of `submit`ted generations: how many
        run together, and the budget of the paged KV cache they share (None: a default from
        the model, `workbench.engine.pages.default_kv_cache_mb`)."""
        if backend not in BACKENDS:
            raise UserError(
                "user.unknown_backend",
                f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})",
            )
        if prefill_chunk < 1:
            raise UserError(
                "user.bad_prefill_chunk", f"prefill_chunk must be >= 1, got {prefill_chunk}"
            )
        self.prefill_chunk = prefill_chunk
        if max_batch < 1:
            raise UserError("user.bad_max_batch", f"max_batch must be >= 1, got {max_batch}")
        if kv_cache_mb is not None and not kv_cache_mb > 0:
            raise UserError("user.bad_kv_cache_mb", f"kv_cache_mb must be > 0, got {kv_cache_mb}")
        self.max_batch = max_batch
        self.kv_cache_mb = kv_cache_mb
        self._batcher: Batcher | None = None
        self.model = model if isinstance(model, Model) else load(model)
        self.requested_backend = backend
        self.threads = threads
        # whether a kernel was compiled (not loaded from numba's cache) in `warm_up`: a process
        # that compiled holds the compiler's memory in its peak resident set
        self.compiled_kernels = False
        self.profiler = profiler if profiler is not None else Profiler()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.connect(self.profiler)
        tracing.connect(self.profiler)  # launches become span events while tracing
        self.error_log = error_log if error_log is not None else ErrorLog()
        self.retry = retry if retry is not None else DEFAULT_LAUNCH_RETRY
        self.retry_stats = RetryStats()
        self.retry_stats.add_listener(self._on_retry)
        self.faults = faults
        self.transformer = self._transformer(
            make_backend(backend, threads=threads, compile_progress=compile_progress)
        )
        self.breaker: CircuitBreaker | None = None
        if self.transformer.backend.name != "numpy":
            self.breaker = breaker or CircuitBreaker(
                self.transformer.backend.name, failure_threshold=3, cooldown_s=30.0
            )
            self.breaker.add_listener(self._on_breaker)
            self.metrics.breaker_state(self.breaker.name, self.breaker.state)
        self._fallback: Transformer | None = None
        self._device_lost = False  # a kernel killed the device's context: CPU from now on
        self._active: Transformer = self.transformer  # the transformer of the last forward
        self._kv: KVCache | None = None  # the running generation's cache
        # Loading pulled in numba, LLVM and the tokenizer: a large heap of objects that live as
        # long as the process. Every full collection triggered by the per-launch records would
        # walk all of them (measured: prefill 300 -> 185 tok/s with profiling on). Freezing moves
        # them out of the collector's way; it frees nothing and changes no behaviour.
        gc.freeze()

    def _transformer(self, backend: Any) -> Transformer:
        launcher = Launcher(
            backend,
            profiler=self.profiler,
            retry=self.retry,
            retry_stats=self.retry_stats,
            error_log=self.error_log,
            faults=self.faults,
        )
        return Transformer(self.model.gguf, launcher)

    def set_faults(self, faults: FaultInjector | None) -> None:
        """Inject faults at this engine's launch sites (None: the process-wide injector)."""
        self.faults = faults
        for tf in (self.transformer, self._fallback):
            if tf is not None:
                tf.backend.faults = faults

    @property
    def backend(self) -> Any:
        """The backend of the engine's own (first-choice) transformer."""
        return self.transformer.backend.backend

    @property
    def fallback_active(self) -> bool:
        return self._active is not self.transformer

    def state(self) -> dict[str, Any]:
        """A snapshot for health checks and dashboards."""
        spec = self.spec
        kv = self._kv
        per_token = 2 * spec.n_layers * spec.kv_dim * 4
        used = kv.length if kv is not None else 0
        memory = getattr(self.backend, "memory", lambda: None)()
        return {
            "model": self.model.name,
            "backend": self._active.backend.name,
            "requested_backend": self.requested_backend,
            "fallback_active": self.fallback_active,
            "breaker": self.breaker.snapshot() if self.breaker is not None else None,
            "kv_cache": {
                "used_tokens": used,
                "capacity_tokens": kv.capacity if kv is not None else 0,
                "bytes": used * per_token,
            },
            "device_memory": memory,
            "batch": self._batcher.state() if self._batcher is not None else None,
        }

    def warm_up(self, on_compile: Callable[[], None] | None = None) -> float:
        """Compile or load every kernel and start the thread pools now, so that the first
        generation is timed at the steady-state speed (see `workbench.engine.warmup`). Returns
        the seconds taken; ``on_compile`` is called once if a kernel has to be compiled (and
        ``compiled_kernels`` becomes True)."""
        from workbench.engine.warmup import warm_up

        def compiling() -> None:
            self.compiled_kernels = True
            if on_compile is not None:
                on_compile()

        profiling, self.profiler.enabled = self.profiler.enabled, False
        try:
            tf = self._pick()
            if tf is not self.transformer or self.breaker is None:
                return warm_up(tf, compiling)
            try:
                return warm_up(tf, compiling)
            except (RecoverableError, BackendError) as e:  # the device failed: as in _forward
                self._device_failed(e, request_id=None)
                return warm_up(self._fallback_transformer(), compiling)
        finally:
            self.profiler.enabled = profiling

    def _on_retry(self, operation: str, outcome: str, attempts: int, delays: list[float]) -> None:
        for _ in range(attempts - 1):
            self.metrics.retry(operation, "retry")
        if outcome in ("recovered", "exhausted"):
            self.metrics.retry(operation, outcome)

    def _on_breaker(self, t: Transition) -> None:
        self.metrics.breaker_state(t.breaker, t.new)
        tracing.event("workbench.breaker", asdict(t))
        log.warning("breaker of the %s backend: %s -> %s (%s)", t.breaker, t.old, t.new, t.reason)

    @property
    def spec(self) -> Any:
        return self.model.spec

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def format_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        text = self.model.chat_template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special=False, parse_special=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Raw prompt ids: BOS/EOS as the model's flags say, special tokens parsed."""
        return self.tokenizer.encode(prompt, add_special=True, parse_special=True)

    def generate(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        request_id: str | None = None,
    ) -> Generation:
        """Generate from a raw prompt (text, or token ids as they are)."""
        return self._start(self._prompt_ids(prompt), request_id, config, prompt)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise UserError("user.empty_prompt", "the prompt is empty")
            return self.encode_prompt(prompt)
        return [int(i) for i in prompt]

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        config: GenerationConfig | None = None,
        *,
        request_id: str | None = None,
    ) -> Generation:
        """Generate the assistant's reply to a conversation, formatted by the chat template."""
        if not messages or not any(m.get("content") for m in messages):
            raise UserError("user.empty_prompt", "the conversation has no content")
        return self._start(self.format_chat(messages), request_id, config, messages)

    @property
    def batcher(self) -> Batcher:
        """The continuous batch of `submit`ted generations (its page pool made on first use)."""
        if self._batcher is None:
            self._batcher = Batcher(self, max_batch=self.max_batch, kv_cache_mb=self.kv_cache_mb)
        return self._batcher

    def submit(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        *,
        request_id: str | None = None,
    ) -> Generation:
        """Queue a generation into the continuous batch (raw prompt: text or token ids).

        Iterating the returned `Generation` steps the whole batch whenever it has no event
        ready; `step` does the same explicitly. Thread-safe (steps are serialised). Runs on the
        engine's own backend, without the single-caller path's device fallback."""
        gen = self._new_generation(self._prompt_ids(prompt), request_id, config, prompt)
        return self.batcher.submit(gen, gen.config)

    def submit_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        config: GenerationConfig | None = None,
        *,
        request_id: str | None = None,
    ) -> Generation:
        """`submit` for a conversation, formatted by the chat template."""
        if not messages or not any(m.get("content") for m in messages):
            raise UserError("user.empty_prompt", "the conversation has no content")
        gen = self._new_generation(self.format_chat(messages), request_id, config, messages)
        return self.batcher.submit(gen, gen.config)

    def step(self) -> int:
        """Run one step of the continuous batch; returns how many sequences it advanced."""
        return self.batcher.step()

    def _start(
        self, ids: list[int], request_id: str | None, config: GenerationConfig | None, prompt: Any
    ) -> Generation:
        gen = self._new_generation(ids, request_id, config, prompt)
        gen._events = self._run(gen, ids, gen.config)
        return gen

    def _new_generation(
        self, ids: list[int], request_id: str | None, config: GenerationConfig | None, prompt: Any
    ) -> Generation:
        """A Generation with no events yet (its span started), after checking the prompt."""
        ctx = self.spec.context_length
        if not ids:
            raise UserError("user.empty_prompt", "the prompt has no tokens")
        if len(ids) >= ctx:
            raise UserError(
                "user.prompt_too_long",
                f"the prompt has {len(ids)} tokens; the model's context holds {ctx} "
                f"(leave room for at least one generated token)",
                prompt_tokens=len(ids),
                context=ctx,
            )
        vocab = self.spec.vocab_size
        if any(i < 0 or i >= vocab for i in ids):
            raise UserError("user.bad_token_id", f"prompt token ids must be in [0, {vocab})")
        gen = Generation(iter(()), ids)
        gen.request_id = request_id or uuid.uuid4().hex
        gen.config = config = config or GenerationConfig()
        gen.trace = tracing.generation(self.model.name, config, request_id=gen.request_id,
                                       prompt_tokens=len(ids), prompt=prompt)  # fmt: skip
        return gen

    def _run(
        self, gen: Generation, ids: list[int], config: GenerationConfig
    ) -> Iterator[TokenEvent]:
        with Profiler.request(gen.request_id):
            model, first_backend = self.model.name, self._pick().backend.name
            self.metrics.request_started(model, first_backend)
            self.metrics.tokens(model, first_backend, prompt=len(ids))
            try:
                yield from self._generate(gen, ids, config)
            except GeneratorExit:
                self.metrics.request_cancelled(model, self._active.backend.name)
                gen.trace.finish(reason="cancelled")
                raise
            except Exception as e:
                category = e.category if isinstance(e, WorkbenchError) else "internal"
                self.metrics.request_failed(model, self._active.backend.name, category)
                self.error_log.record(e, operation="generate", request_id=gen.request_id)
                gen.trace.finish(error=e)
                raise
            finally:
                self._kv = None
            r = gen.result
            assert r is not None
            gen.trace.finish(r)
            backend = self._active.backend.name
            self.metrics.tokens(model, backend, generated=len(r.token_ids))
            if r.finish_reason == "cancelled":
                self.metrics.request_cancelled(model, backend)
            else:
                self.metrics.request_completed(model, backend, duration_s=r.timings.total_s)

    def _pick(self) -> Transformer:
        """The transformer a new request starts on: the device unless its breaker is open."""
        if self._device_lost or (self.breaker is not None and not self.breaker.allow()):
            return self._fallback_transformer()
        return self.transformer

    def _fallback_transformer(self) -> Transformer:
        if self._fallback is None:
            from workbench.backends.numpy_backend import NumpyBackend

            self._fallback = self._transformer(NumpyBackend(threads=self.threads))
        return self._fallback

    def _forward(self, run: _Run, tokens: list[int]) -> Any:
        """Logits (vocab,), on the backend's device, after running ``tokens`` at the end of
        ``run``'s cache.

        A device failure that survived the launch retries counts against the breaker, and the
        request continues on the NumPy backend: its KV cache is rebuilt from the tokens so far.
        """
        tf = run.tf
        if tf is self.transformer and self.breaker is not None:
            try:
                logits = tf.forward(np.asarray(tokens), run.cache)
            except (RecoverableError, BackendError) as e:
                self._device_failed(e, request_id=run.request_id)
                self._switch_to_fallback(run)
                return self._forward(run, tokens)
            self.breaker.record_success()
        else:
            logits = tf.forward(np.asarray(tokens), run.cache)
        run.done.extend(tokens)
        return logits

    def _prefill(self, run: _Run, ids: list[int], gen: Generation) -> Any:
        """The last prompt position's logits, running ``ids`` in chunks of ``prefill_chunk``;
        None when the generation was cancelled or passed its deadline between two chunks.
        Each chunk attends to the cache the previous ones filled, so the logits are those of
        one pass (up to float rounding in the batched matmuls)."""
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            if gen.stopping():
                return None
            logits = self._forward(run, ids[start : start + self.prefill_chunk])
        return logits

    def _device_failed(self, e: WorkbenchError, *, request_id: str | None) -> None:
        """Count a device failure against the breaker. A lost context (a kernel trapped or
        faulted) cannot be retried or probed: the breaker opens and the device is not used
        again by this engine."""
        assert self.breaker is not None
        self.error_log.record(e, operation="forward", request_id=request_id)
        if e.code == CONTEXT_LOST:
            self._device_lost = True
            self.breaker.trip("context_lost")
        else:
            self.breaker.record_failure()

    def _sample(
        self,
        run: _Run,
        logits: Any,
        sampler: Sampler,
        history: list[int],
        config: GenerationConfig,
    ) -> tuple[int, np.ndarray | None]:
        """(next token id, host logits or None). On a device that can draw the token itself,
        only the id crosses to the host; log-probabilities and the repetition penalty need the
        logits on the host. The uniform draw comes from the sampler's own generator either way,
        so a seed gives the same text on every backend."""
        c = config.sampler
        be = run.tf.backend
        on_device = (
            hasattr(be, "sample_token")
            and config.logprobs == 0
            and (c.repeat_penalty == 1.0 or c.repeat_last_n == 0)
            and (c.greedy or 1 <= c.top_k <= DEVICE_SAMPLE_MAX_K)
        )
        if on_device:
            u = 0.0 if c.greedy else float(sampler.rng.random())
            token = be.sample_token(
                logits, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, min_p=c.min_p, u=u
            )
            return token, None
        host = be.to_host(logits)
        return sampler(host, history), host

    def _switch_to_fallback(self, run: _Run) -> None:
        src = run.tf.backend.name
        log.warning(
            "request %s continues on numpy: the %s backend failed (breaker %s)",
            run.request_id,
            src,
            self.breaker.state if self.breaker is not None else "none",
        )
        run.tf = self._active = self._fallback_transformer()
        run.cache = run.tf.new_cache(run.cache.capacity)
        self._kv = run.cache
        self.metrics.fallback(src, run.tf.backend.name)
        tracing.event("workbench.fallback", {"from": src, "to": run.tf.backend.name})
        if run.done:
            run.tf.forward(np.asarray(run.done), run.cache)  # rebuild the cache

    def _generate(
        self, gen: Generation, ids: list[int], config: GenerationConfig
    ) -> Iterator[TokenEvent]:
        tok = self.tokenizer
        model = self.model.name
        max_new = min(config.max_tokens, self.spec.context_length - len(ids))
        tf = self._active = self._pick()
        run = _Run(tf, tf.new_cache(len(ids) + max_new), gen.request_id)
        self._kv = run.cache
        sampler = Sampler(config.sampler)
        stops = StopMatcher(config.stop)
        stream = tok.stream()
        timings = Timings(prompt_tokens=len(ids))
        out_ids: list[int] = []
        logprobs: list[tuple[float, tuple[TopLogprob, ...]]] = []
        finish = "length"

        history = list(ids)  # prompt and generated ids, for the repetition penalty
        trace = gen.trace
        trace.begin("prefill", {"gen_ai.usage.input_tokens": len(ids)})
        t0 = t_step = t_first = time.perf_counter()
        with Profiler.phase("prefill"), trace.current():
            logits = self._prefill(run, ids, gen)
        timings.prefill_s = time.perf_counter() - t0
        if logits is None:  # cancelled or expired between prefill chunks
            finish, max_new = "cancelled", 0
        for index in range(max_new):
            if index:
                t_step = time.perf_counter()
                trace.begin("decode_step", {"workbench.token_index": index})
                with Profiler.phase("decode"), trace.current():
                    logits = self._forward(run, [out_ids[-1]])
                self.metrics.observe_tpot(
                    time.perf_counter() - t_step, model=model, backend=run.tf.backend.name
                )
            with Profiler.phase("decode" if index else "prefill"), trace.current():
                token, host_logits = self._sample(run, logits, sampler, history, config)
            trace.drawn(index)
            if token in tok.eog_ids:
                finish = "stop"
                break
            lp, top = (
                self._logprobs(host_logits, token, config.logprobs)
                if host_logits is not None
                else (float("nan"), ())
            )
            out_ids.append(token)
            history.append(token)
            logprobs.append((lp, top))
            released, stopped = stops.feed(stream.feed(token))
            now = time.perf_counter()
            if index == 0:
                timings.ttft_s, t_first = now - t0, now
                self.metrics.observe_ttft(
                    gen.queued_s + timings.ttft_s, model=model, backend=run.tf.backend.name
                )
            timings.generated_tokens = len(out_ids)
            self.metrics.kv_cache(
                model, used_tokens=run.cache.length, capacity_tokens=run.cache.capacity
            )
            yield TokenEvent(index, token, released, lp, top, now - t0, now - t_step)
            if stopped:
                finish = "stop"
                break
            if gen.cancelled:
                finish = "cancelled"
                break

        if not stops.matched:
            tail = stops.flush(stream.flush())
            if tail:  # held-back text that turned out not to start a stop string
                now = time.perf_counter()
                yield TokenEvent(len(out_ids), FLUSH_ID, tail, 0.0, (), now - t0, 0.0)
        end = time.perf_counter()
        timings.total_s = end - t0
        if out_ids:
            timings.decode_s = end - t_first
        gen.result = GenerationResult(
            text=stops.text,
            token_ids=out_ids,
            prompt_token_ids=ids,
            finish_reason=finish,
            timings=timings,
            logprobs=logprobs,
        )

    def _logprobs(
        self, logits: np.ndarray, token: int, n: int
    ) -> tuple[float, tuple[TopLogprob, ...]]:
        return token_logprobs(logits, token, n, self.tokenizer.piece)


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one GPU."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


def make_backend(
    name: str,
    *,
    threads: int | None = None,
    compile_progress: Callable[[int, int, str], None] | None = None,
) -> Any:
    """numpy (CPU), emulator (HIP kernels on the CPU emulator), cupy (GPU), or auto."""
    if name == "auto":
        name = "cupy" if gpu_available() else "numpy"
    if name == "numpy":
        from workbench.backends.numpy_backend import NumpyBackend

        return NumpyBackend(threads=threads)
    from workbench.backends.device import DeviceBackend

    return DeviceBackend(name, progress=compile_progress)


@dataclass
class _Run:
    """The state of one running generation: which transformer, its cache, tokens processed."""

    tf: Transformer
    cache: KVCache
    request_id: str
    done: list[int] = field(default_factory=list)  # token ids whose keys/values are in the cache
