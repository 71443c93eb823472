"""One request among many: its tokens, its page table, and what it has streamed so far.

A `Sequence` is what the scheduler moves between waiting and running and what the batched runner
computes. Its KV lives in pages of the shared pool (`workbench.engine.pages`): ``table[i]`` holds
positions ``i*PAGE_SIZE ..``; ``computed`` positions of ``tokens`` have their keys and values
there. Everything else is per request, as in a single-caller generation: sampler and seed, stop
strings, logprobs, timings.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

from workbench.engine.pages import PAGE_SIZE, chain_hash
from workbench.engine.results import (
    FLUSH_ID,
    Generation,
    GenerationConfig,
    GenerationResult,
    StopMatcher,
    Timings,
    TokenEvent,
    TopLogprob,
)
from workbench.engine.sampler import Sampler, log_softmax
from workbench.errors import WorkbenchError


def token_logprobs(
    logits: np.ndarray, token: int, n: int, piece: Callable[[int], str]
) -> tuple[float, tuple[TopLogprob, ...]]:
    """The chosen token's log-probability and the top ``n`` alternatives, most likely first."""
    lps = log_softmax(logits)
    top: tuple[TopLogprob, ...] = ()
    if n:
        best = np.argpartition(-lps, n - 1)[:n]
        best = best[np.argsort(-lps[best], kind="stable")]
        top = tuple(TopLogprob(int(i), piece(int(i)), float(lps[i])) for i in best)
    return float(lps[token]), top


class Sequence:
    """A request's state in the batch: tokens, page table, sampler, streamed events."""

    def __init__(
        self, gen: Generation, config: GenerationConfig, tokenizer: object, max_new: int
    ) -> None:
        self.gen = gen
        self.config = config
        self.tokenizer = tokenizer
        self.prompt_len = len(gen.prompt_token_ids)
        self.tokens: list[int] = list(gen.prompt_token_ids)  # prompt, then generated ids
        self.max_new = max_new
        self.table: list[int] = []  # page ids, position p in table[p // PAGE_SIZE]
        self.keys: list[int] = []  # hash-chain keys of the full pages at the head of table
        self.computed = 0  # positions of tokens whose keys and values are in the pages
        self.sampler = Sampler(config.sampler)
        self.stops = StopMatcher(config.stop)
        self.stream = tokenizer.stream()  # type: ignore[attr-defined]
        self.timings = Timings(prompt_tokens=self.prompt_len)
        self.out_ids: list[int] = []
        self.logprobs: list[tuple[float, tuple[TopLogprob, ...]]] = []
        self.events: deque[TokenEvent] = deque()  # produced, not yet taken by the consumer
        self.finished = False
        self.preemptions = 0
        self.error: WorkbenchError | None = None  # the failure of a step it was part of
        self.t0 = time.perf_counter()
        self.t_step = self.t0
        self.t_first = self.t0

    @property
    def pending(self) -> int:
        """Positions still to compute before the next token can be drawn."""
        return len(self.tokens) - self.computed

    def pages_for(self, length: int) -> int:
        """Pages the table needs to hold ``length`` positions, beyond those it has."""
        return max(0, -(-length // PAGE_SIZE) - len(self.table))

    def computed_up_to(self, end: int, register: Callable[[int, int], None]) -> None:
        """Positions up to ``end`` now have keys and values: key every page that became full."""
        self.computed = end
        while len(self.keys) < end // PAGE_SIZE:
            p = len(self.keys)
            prev = self.keys[-1] if self.keys else 0
            key = chain_hash(prev, self.tokens[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])
            self.keys.append(key)
            register(self.table[p], key)

    def reset(self) -> None:
        """Preempted: the pages are gone; every token so far is recomputed when readmitted."""
        self.table, self.keys, self.computed = [], [], 0
        self.preemptions += 1

    def accept(self, logits: np.ndarray, eog_ids: object) -> None:
        """Draw the next token from the last position's logits (vocab,) and stream it."""
        now = time.perf_counter()
        if not self.out_ids:
            self.timings.prefill_s = now - self.t0
        c = self.config
        token = self.sampler(logits, self.tokens)
        if token in eog_ids:  # type: ignore[operator]
            self.finish("stop")
            return
        lp, top = token_logprobs(logits, token, c.logprobs, self.tokenizer.piece)  # type: ignore[attr-defined]
        index = len(self.out_ids)
        self.out_ids.append(token)
        self.tokens.append(token)
        self.logprobs.append((lp, top))
        released, stopped = self.stops.feed(self.stream.feed(token))
        now = time.perf_counter()
        if index == 0:
            self.timings.ttft_s, self.t_first = now - self.t0, now
        self.timings.generated_tokens = len(self.out_ids)
        self.events.append(
            TokenEvent(index, token, released, lp, top, now - self.t0, now - self.t_step)
        )
        self.t_step = now
        self.gen.trace.drawn(index)
        if stopped:
            self.finish("stop")
        elif len(self.out_ids) >= self.max_new:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the generation: flush held-back text and set the result."""
        if self.finished:
            return
        self.finished = True
        t0 = self.t0
        if not self.stops.matched:
            tail = self.stops.flush(self.stream.flush())
            if tail:
                now = time.perf_counter()
                self.events.append(
                    TokenEvent(len(self.out_ids), FLUSH_ID, tail, 0.0, (), now - t0, 0.0)
                )
        end = time.perf_counter()
        self.timings.total_s = end - t0
        if self.out_ids:
            self.timings.decode_s = end - self.t_first
        self.gen.result = GenerationResult(
            text=self.stops.text,
            token_ids=self.out_ids,
            prompt_token_ids=self.gen.prompt_token_ids,
            finish_reason=reason,
            timings=self.timings,
            logprobs=self.logprobs,
        )
