"""Warm-up: pay a new process's one-time costs before anything is timed.

The first forward pass of a process is slow for reasons that have nothing to do with the model:
the NumPy backend's numba kernels compile (first run after an install, about a minute on two
cores) or load from numba's on-disk cache (later runs), numba's and BLAS's thread pools start,
the mapped weights fault in; device backends build their kernel modules. `warm_up` runs one short
prefill and one decode step on a scratch cache, so that every kernel a generation uses is ready
and the first generation's timings show the steady-state speed.

Nothing is printed here: ``on_compile`` is called once, just before the first kernel compiles
(never when everything loads from a cache), so a front end can say why the wait is long.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

# Tokens of the warm-up prefill: more than one, so the prefill path (matmul, causal attention)
# compiles, not only the decode path. Kernels specialise on types, not lengths.
WARMUP_PROMPT_TOKENS = 4


def warm_up(transformer: Any, on_compile: Callable[[], None] | None = None) -> float:
    """Run a short prefill and one decode step of ``transformer`` on a scratch cache; return
    the seconds it took. ``on_compile`` is called at most once, before the first compile."""
    spec = transformer.spec
    ids = np.arange(WARMUP_PROMPT_TOKENS, dtype=np.int64) % spec.vocab_size
    t0 = time.perf_counter()
    with compile_listener(on_compile) if on_compile is not None else nullcontext():
        # The NumPy backend loads its kernels without reading the weights first, then gives
        # back the compiler's pages (see NumpyBackend.warm_up).
        prepare = getattr(transformer.backend, "warm_up", None)
        if prepare is not None:
            prepare(transformer)
        cache = transformer.new_cache(WARMUP_PROMPT_TOKENS + 1)
        logits = transformer.forward(ids, cache)
        transformer.backend.to_host(logits)
        logits = transformer.forward(ids[:1], cache)
        transformer.backend.to_host(logits)
    return time.perf_counter() - t0


@contextmanager
def compile_listener(on_compile: Callable[[], None]) -> Iterator[None]:
    """Call ``on_compile`` when numba starts its first compile in this block. numba fires the
    ``numba:compile`` event only on a real compile, not when it loads a kernel from its cache."""
    try:
        from numba.core import event
    except ImportError:  # no numba: nothing compiles on the CPU
        yield
        return

    class _First(event.Listener):
        fired = False

        def on_start(self, ev: Any) -> None:
            if not self.fired:
                self.fired = True
                on_compile()

        def on_end(self, ev: Any) -> None:
            pass

    with event.install_listener("numba:compile", _First()):
        yield
