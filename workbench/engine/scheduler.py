"""Which sequences run in the next step, and where their pages come from.

Each step runs every running sequence that is decoding (one position each) plus one chunk of at
most ``prefill_chunk`` positions of the oldest running sequence that still has a prompt to
compute, so a long prompt holds the others back by one chunk at most. Waiting sequences are
admitted, oldest first, while fewer than ``max_batch`` run and the pool has the pages for their
whole prompt (less the pages found in the prefix cache). When a running sequence needs a page and
none is left, the newest running sequence is preempted: its pages go back to the pool and it
waits at the head of the queue, to be recomputed from its tokens when readmitted.
"""

from __future__ import annotations

from collections import deque

from workbench.engine.pages import PAGE_SIZE, PagePool
from workbench.engine.sequence import Sequence
from workbench.errors import UserError

Work = list[tuple[Sequence, int]]  # (sequence, positions to compute this step)


class Scheduler:
    def __init__(self, pool: PagePool, *, max_batch: int, prefill_chunk: int) -> None:
        if max_batch < 1:
            raise UserError("user.bad_max_batch", f"max_batch must be >= 1, got {max_batch}")
        self.pool = pool
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admitted first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = -(-(seq.prompt_len + 1) // PAGE_SIZE)
        if need > self.pool.n_pages:
            raise UserError(
                "user.kv_cache_too_small",
                f"the prompt needs {need} KV pages; the cache holds {self.pool.n_pages} "
                "(raise kv_cache_mb)",
                pages=need,
                capacity=self.pool.n_pages,
            )
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and give its pages back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.table)
        seq.table, seq.keys = [], []

    def schedule(self) -> Work:
        """The work of the next step; pages are allocated for all of it."""
        work: Work = []
        prefilling = False
        for seq in list(self.running):
            if seq not in self.running:  # preempted to make room for an older one
                continue
            n = seq.pending
            if n > 1:
                if prefilling:
                    continue
                n = min(n, self.prefill_chunk)
            if not self._grow(seq, seq.computed + n):
                continue  # seq itself was preempted
            prefilling = prefilling or seq.pending > 1
            work.append((seq, n))
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            if not prefilling or seq.pending == 1:
                n = min(seq.pending, self.prefill_chunk)
                prefilling = prefilling or seq.pending > 1
                work.append((seq, n))
        return work

    def _admit(self, seq: Sequence) -> bool:
        """Hold the cached prefix and allocate pages for the rest of the tokens, or nothing."""
        pool = self.pool
        pages, keys = pool.match_prefix(seq.tokens)
        cached = len(pages) * PAGE_SIZE
        rest = max(0, -(-len(seq.tokens) // PAGE_SIZE) - len(pages))
        if pool.cost(pages) + rest > pool.available:
            return False
        pool.hold(pages)
        seq.table, seq.keys, seq.computed = list(pages), list(keys), cached
        for _ in range(rest):
            seq.table.append(pool.allocate())
        return True

    def _grow(self, seq: Sequence, length: int) -> bool:
        """Pages for ``length`` positions of a running sequence, preempting the newest running
        sequences while none is free. False when ``seq`` itself had to go."""
        for _ in range(seq.pages_for(length)):
            while not self.pool.available:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    return False
            seq.table.append(self.pool.allocate())
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        freed = len(seq.table)
        self.pool.release(seq.table)
        seq.reset()
        self.waiting.appendleft(seq)
        self.preemptions += 1
        seq.gen.trace.event("workbench.preempted", {"workbench.pages_freed": freed})
