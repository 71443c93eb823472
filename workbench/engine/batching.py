"""Many generations on one engine: continuous batching over the paged KV cache.

`Batcher.submit` queues a sequence and returns its `Generation`; `Batcher.step` runs one forward
pass over everything the scheduler picked (see `workbench.engine.scheduler`) and streams a token
to every sequence whose prompt is done. Iterating a submitted `Generation` steps the batch
whenever that sequence has no event ready, so one thread can drive many generations, or many
threads can each iterate their own: steps are serialised by a lock, and each step advances all.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from workbench.engine import runner
from workbench.engine.pages import PagePool, default_kv_cache_mb
from workbench.engine.results import Generation, GenerationConfig, TokenEvent
from workbench.engine.scheduler import Scheduler
from workbench.engine.sequence import Sequence
from workbench.errors import WorkbenchError
from workbench.observe.profiler import Profiler

log = logging.getLogger(__name__)


class Batcher:
    """The scheduler, page pool and runner of one engine (see the module docstring)."""

    def __init__(self, engine: Any, *, max_batch: int, kv_cache_mb: float | None) -> None:
        self.engine = engine
        spec = engine.spec
        self.kv_cache_mb = (
            kv_cache_mb if kv_cache_mb is not None else default_kv_cache_mb(spec, max_batch)
        )
        be = engine.transformer.backend  # its pages live where its arrays do, in its KV type
        self.pool = PagePool(
            spec, self.kv_cache_mb, xp=be.xp, dtype=getattr(be, "kv_dtype", np.float32)
        )
        self.scheduler = Scheduler(
            self.pool, max_batch=max_batch, prefill_chunk=engine.prefill_chunk
        )
        self.lock = threading.RLock()
        self.computed_positions = 0  # positions run through the model, over all steps
        self.steps = 0
        self._seen = (0, 0)  # prefix hits and preemptions already counted in the metrics
        self._seqs: dict[int, Sequence] = {}  # id(generation) -> its sequence, until drained

    @property
    def backend_name(self) -> str:
        return str(self.engine.transformer.backend.name)

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    def submit(self, gen: Generation, config: GenerationConfig) -> Generation:
        """Queue a validated generation (see `Engine.submit`)."""
        e = self.engine
        ids = gen.prompt_token_ids
        max_new = min(config.max_tokens, e.spec.context_length - len(ids))
        seq = Sequence(gen, config, e.tokenizer, max_new)
        with self.lock:
            self.scheduler.add(seq)
        gen.trace.begin("batch_queue")  # until the scheduler first runs it
        e.metrics.request_started(e.model.name, self.backend_name)
        e.metrics.tokens(e.model.name, self.backend_name, prompt=len(ids))
        with self.lock:
            self._seqs[id(gen)] = seq
        gen._events = self._stream(seq)
        return gen

    def _stream(self, seq: Sequence) -> Iterator[TokenEvent]:
        try:
            while True:
                with self.lock:
                    while not seq.events and not seq.finished:
                        self.step()
                    ev = seq.events.popleft() if seq.events else None
                    error = seq.error
                if ev is None:
                    with self.lock:
                        self._seqs.pop(id(seq.gen), None)
                    if error is not None:
                        raise error
                    return
                yield ev
        except GeneratorExit:  # the consumer stopped listening: free the pages at once
            with self.lock:
                if not seq.finished:
                    self._end(seq, "cancelled")
            raise

    def state(self) -> dict[str, int]:
        """Running and waiting sequences, pages used and total, prefix hits, preemptions.

        Read without the lock (a step can hold it for a while, and the server's event loop
        asks): each figure is current, together they may straddle a step."""
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "pages_used": self.pool.used,
            "pages_total": self.pool.n_pages,
            "prefix_hit_tokens": self.pool.hit_tokens,
            "preemptions": s.preemptions,
        }

    def step(self) -> int:
        """One forward pass over the scheduled work; returns how many sequences ran."""
        with self.lock:
            s = self.scheduler
            for seq in [*s.running, *s.waiting]:
                if seq.gen.stopping():
                    self._end(seq, "cancelled")
            work = s.schedule()
            if not work:
                return 0
            for seq, _ in work:
                trace = seq.gen.trace
                if trace.is_open("batch_queue"):
                    trace.end("batch_queue")
                    trace.begin("prefill", {"gen_ai.usage.input_tokens": seq.prompt_len})
                elif seq.out_ids and seq.pending == 1:
                    trace.begin("decode_step", {"workbench.token_index": len(seq.out_ids)})
            # Launch events go to a request's span when the step serves that request alone.
            current = work[0][0].gen.trace.current() if len(work) == 1 else contextlib.nullcontext()
            slices = [
                (seq.table, seq.computed, seq.tokens[seq.computed : seq.computed + n])
                for seq, n in work
            ]
            tf = self.engine.transformer
            try:
                # A step with a prompt chunk counts as prefill in the profile.
                phase = "prefill" if any(n > 1 for _, n in work) else "decode"
                with Profiler.phase(phase), current:
                    logits = runner.forward(tf, self.pool, slices)
            except WorkbenchError as err:
                log.warning("a batched step of %d sequences failed: %s", len(work), err)
                for seq, _ in work:
                    seq.error = err
                    self._end(seq, "error")
                return len(work)
            self.steps += 1
            eog = self.engine.tokenizer.eog_ids
            for (seq, n), lg in zip(work, logits, strict=True):
                self.computed_positions += n
                seq.computed_up_to(seq.computed + n, self.pool.register)
                if seq.pending == 0:
                    seq.accept(tf.backend.to_host(lg), eog)
                    if seq.finished:
                        self._end(seq, seq.gen.result.finish_reason)  # type: ignore[union-attr]
            self._publish(len(work))  # after the step: sequences that ended hold no pages
            return len(work)

    def _publish(self, size: int) -> None:
        s, pool = self.scheduler, self.pool
        self.engine.metrics.batch_step(
            self.engine.model.name,
            size=size,
            running=len(s.running),
            waiting=len(s.waiting),
            pages_used=pool.used,
            pages_total=pool.n_pages,
            new_hit_tokens=pool.hit_tokens - self._seen[0],
            new_preemptions=s.preemptions - self._seen[1],
        )
        self._seen = (pool.hit_tokens, s.preemptions)

    def take(self, gen: Generation) -> list[TokenEvent]:
        """The events a submitted generation has ready, without stepping. Once it has ended
        and every event is taken: [] (its result is set), or the error that ended it."""
        with self.lock:
            seq = self._seqs.get(id(gen))
            if seq is None:
                return []
            events = list(seq.events)
            seq.events.clear()
            if seq.finished and not events:
                del self._seqs[id(gen)]
                if seq.error is not None:
                    raise seq.error
            return events

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish(reason)
        self.scheduler.remove(seq)
        seq.gen.trace.finish(seq.gen.result, error=seq.error)
        m, name = self.engine.metrics, self.engine.model.name
        m.tokens(name, self.backend_name, generated=len(seq.out_ids))
        if reason == "cancelled":
            m.request_cancelled(name, self.backend_name)
        elif reason == "error":
            category = seq.error.category if seq.error is not None else "internal"
            m.request_failed(name, self.backend_name, category)
        else:
            m.request_completed(name, self.backend_name, duration_s=seq.timings.total_s)
