"""What this machine can do: streaming read bandwidth and float32 GEMM rate, measured now.

`workbench bench generate` divides its decode and prefill figures by these, so that a user sees
how close each phase is to the machine's limit: decode reads every weight once per token (a
bandwidth-bound matrix-vector product), prefill multiplies the prompt by every weight (a
compute-bound matrix-matrix product).

- Read bandwidth: a threaded sum over a float32 buffer several times larger than the last-level
  cache (so that every pass comes from memory), best of a few passes, bytes / seconds.
- GEMM rate: NumPy's BLAS at the model's own shapes (x: (prompt tokens, cols), W one of each
  distinct layer matrix shape, weighted by how often a layer uses it), on the same thread count
  as the engine, run as BLAS's own threaded product both ``x @ W.T`` and feature-major
  ``W @ xt`` (the prefill's orientation), and as one single-threaded product per thread over row
  slices; and as this project's own float32 GEMM (`quant_gemm`, the prefill's kernel without a
  dequantization) on the engine's numba threads; flops / seconds of the best repetition.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

import workbench.backends  # noqa: F401  (numba's OpenMP wait policy, before its threads start)
from workbench.backends import quant_gemm
from workbench.backends.cpu_ops import sum_of

# At least this much is read per pass even on machines with small caches.
_MIN_READ_BYTES = 256 << 20
_CACHE_MULTIPLE = 2  # read buffer / last-level cache


@dataclass(frozen=True)
class MachineLimits:
    threads: int
    read_bytes: int  # size of the buffer read per pass
    read_gb_s: float  # streaming read bandwidth, GB/s (1e9 bytes)
    gemm_gflops: float  # float32 GEMM rate at the model's shapes, GFLOP/s
    gemm_shapes: list[tuple[int, int, int]]  # (n, rows, cols) products timed

    def to_dict(self) -> dict:
        return asdict(self)


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size from sysfs, or 0 where it is not exposed."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_sum(buf, chunks):
    """Sum of buf (n,) float32, read once, in ``chunks`` threaded pieces.

    Each piece is summed by its own call of `cpu_ops.sum_of`: the same loop written inline in the
    ``prange`` body was not vectorised and summed about 13 GB/s on one core even with the data in
    L2, so it measured the loop, not the memory (the buffer larger than the caches read at 7.9
    GB/s on one thread and 15.7 on two, against 16.6 and 32 with this loop)."""
    n = buf.shape[0]
    step = (n + chunks - 1) // chunks
    parts = np.zeros(chunks, np.float32)  # (chunks,)
    for c in prange(chunks):
        parts[c] = sum_of(buf[c * step : min(n, (c + 1) * step)])
    return parts.sum()


def read_bandwidth(threads: int, nbytes: int | None = None, passes: int = 4) -> tuple[int, float]:
    """(bytes per pass, best GB/s) of a streaming read on ``threads`` threads."""
    if nbytes is None:
        nbytes = max(_MIN_READ_BYTES, _CACHE_MULTIPLE * last_level_cache_bytes())
    buf = np.ones(nbytes // 4, np.float32)  # (n,): written once so that every page is resident
    saved = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _stream_sum(buf[:1024], 4 * threads)  # compile / load before timing
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            _stream_sum(buf, 4 * threads)
            best = min(best, time.perf_counter() - t0)
    finally:
        numba.set_num_threads(saved)
    return buf.nbytes, buf.nbytes / best / 1e9


def _work_cols(
    shapes: dict[tuple[int, int], int], n: int, repeat: int
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray, int]], int]:
    """The products of ``shapes`` ((rows, cols): count) feature-major, on random float32
    operands: ([(xt (cols, n), w (rows, cols), out (rows, n), count x repeat)], their flops)."""
    rng = np.random.default_rng(0)
    work = []
    for (rows, cols), count in sorted(shapes.items()):
        w = rng.standard_normal((rows, cols), dtype=np.float32)  # (rows, cols)
        xt = rng.standard_normal((cols, n), dtype=np.float32)  # (cols, n)
        work.append((xt, w, np.empty((rows, n), np.float32), count * repeat))
    flops = sum(2 * n * w.shape[0] * w.shape[1] * c for _, w, _, c in work)
    return work, flops


def _products(work: list, reps: int, cols: bool = False) -> float:
    """Seconds of the fastest of ``reps`` passes over work [(x, w, out, count)]: ``x @ w.T``
    into out, or with ``cols`` ``w @ x``, x feature-major ((cols, n), out (rows, n))."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for x, w, out, count in work:
            for _ in range(count):
                if cols:
                    np.matmul(w, x, out=out)
                else:
                    np.matmul(x, w.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(
    shapes: dict[tuple[int, int], int], n: int, threads: int, reps: int = 3
) -> tuple[float, list[tuple[int, int, int]]]:
    """Best GFLOP/s of float32 products with W over the (rows, cols): count mix of a layer.

    Each repetition runs every shape ``count`` times (as one layer of a prefill does); the rate
    is total flops over the fastest repetition. Four ways, the best one counts: NumPy's BLAS
    on ``threads`` threads, as ``x @ W.T`` (x (n, cols)) and feature-major as ``W @ xt`` (xt
    (cols, n), the orientation the NumPy backend's prefill uses, which OpenBLAS runs faster at
    these shapes); ``threads`` threads each running single-threaded BLAS ``x @ W.T`` on its
    own slice of every W's rows at once (no thread waits for another: on a machine shared with
    other processes BLAS's own threads, which wait for each other inside every product, can
    fall far below that); and the prefill's own GEMM kernel on float32 W (`quant_gemm`, on
    ``threads`` numba threads), so that a prefill is never measured against a rate below its
    own kernel's.
    """
    work_cols, flops = _work_cols(shapes, n, 1)
    work = []  # the same products row-major: [(x (n, cols), w, out (n, rows), count)]
    for xt, w, _, count in work_cols:
        work.append((np.ascontiguousarray(xt.T), w, np.empty((n, w.shape[0]), np.float32), count))
    best = float("inf")
    with threadpool_limits(threads):
        for each, cols in ((work, False), (work_cols, True)):
            _products(each, 1, cols)  # BLAS's threads start, its buffers are allocated
            best = min(best, _products(each, reps, cols))
    if threads > 1:
        # Thread t's work: rows t/threads.. of every W, its own output.
        parts = []
        for t in range(threads):
            part = []
            for x, w, _, count in work:
                a, b = w.shape[0] * t // threads, w.shape[0] * (t + 1) // threads
                part.append((x, w[a:b], np.empty((n, b - a), np.float32), count))
            parts.append(part)
        with threadpool_limits(1), ThreadPoolExecutor(threads) as pool:
            for _ in range(reps + 1):  # the first pass warms up
                t0 = time.perf_counter()
                list(pool.map(lambda part: _products(part, 1), parts))
                sliced = time.perf_counter() - t0
            best = min(best, sliced)
    if quant_gemm.Q.F32 in quant_gemm.FUSED_TYPES:  # the prefill's kernel on this CPU
        best = min(best, _own_products(work_cols, reps, threads))
    timed = [(n, w.shape[0], w.shape[1]) for _, w, _, _ in work]
    return flops / best / 1e9, timed


def _own_products(work: list, reps: int, threads: int) -> float:
    """Seconds of the fastest of ``reps`` passes over ``work`` [(xt, w, out, count)] through
    `quant_gemm.gemm_cols` on ``threads`` numba threads (after one pass that compiles or loads
    the kernel)."""
    saved = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        best = float("inf")
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            for xt, w, _, count in work:
                for _ in range(count):
                    quant_gemm.gemm_cols(quant_gemm.Q.F32, w.view(np.uint8), xt)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        numba.set_num_threads(saved)


def products_pass(
    shapes: dict[tuple[int, int], int], n: int, threads: int, layers: int
) -> tuple[int, Callable[[], float]]:
    """(flops, time_pass): ``time_pass()`` runs every product of a ``layers``-layer prefill of n
    tokens once (each (rows, cols) shape count x layers times) on random float32 W and xt, in
    the prefill's own orientation and kernel (`quant_gemm` on ``threads`` numba threads where it
    runs, else BLAS's ``W @ xt``), and returns its seconds. For pairing with whole prefills
    back to back (`bench.paired_gemm_fraction`): on a machine shared with other jobs, two
    measurements a few milliseconds apart see the same load, where a probe run once before or
    after a benchmark does not."""
    work, flops = _work_cols(shapes, n, layers)
    own = quant_gemm.Q.F32 in quant_gemm.FUSED_TYPES

    def time_pass() -> float:
        if own:
            return _own_products(work, 0, threads)
        with threadpool_limits(threads):
            return _products(work, 1, cols=True)

    return flops, time_pass


def measure(shapes: dict[tuple[int, int], int], n: int, threads: int) -> MachineLimits:
    """Both limits, for a model whose layers multiply by ``shapes`` ((rows, cols): count)."""
    nbytes, gb_s = read_bandwidth(threads)
    gflops, timed = gemm_rate(shapes, n, threads)
    return MachineLimits(threads, nbytes, gb_s, gflops, timed)
