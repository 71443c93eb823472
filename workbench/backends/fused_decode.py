"""Fused decode: one compiled call runs every layer of a token on the quantized blocks.

The per-operation path (`NumpyBackend` through the launcher) makes about 16 Python-level calls
per layer; at a few microseconds of dispatch each that is a sizeable share of a token. Here a
whole token -- RMSNorm, the Q/K/V products, RoPE, the KV append, attention, the output
projection, the residuals, the FFN norm, gate/up and SwiGLU, down, and finally the output norm and
logits -- is one numba call over preallocated buffers. Matrix-vector products of one input are
merged into one loop over their stacked rows (Q, K and V; gate and up).

Threads. With N threads a fixed team (the caller and N - 1 helper threads, `_Team`) runs the
token's call together. Each thread works through its own part of every product's rows (in chunks)
and of the attention heads, then helps with the others' (`_claim`): an even static split left
one thread waiting 30-40 us per layer for the other, which the VM or the memory had slowed. The
threads meet at a spin-then-sleep barrier (`cpu_sync`) six times per layer. A token costs one
wake-up of the helpers instead of four numba parallel regions per layer (about 120 per token,
each a wake-up of passive OpenMP workers: 25-45 us on this project's VM).

Numerics are the reference's: the same row kernels (`quant_blocks._dot_*_row`, whose accumulation
order is fixed per row), the same block sums of the input, the same RMSNorm, RoPE tables and
attention loops and SwiGLU (`cpu_ops`). LLVM may vectorise the block sums differently where they
are inlined, so logits agree with the per-operation path to float32 rounding (relative 1e-6), not
bit for bit.

Weights are not copied: all of them live in the model file's one memory map, and the kernel reads
them through a table of (offset, rows, row_bytes, type) entries into that map. The one exception
is the fp16 scales of Q4_1 blocks, which `FusedDecoder` widens to float32 once, into an array of
their own (`split_scales`): a Q4_1 block then costs about 1.7 instead of 2.3 ns in cache.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import QK_K
from numba import njit
from numba.core.errors import NumbaPerformanceWarning

from workbench.backends import cpu_ops, cpu_sync, quant_cpu
from workbench.backends.quant_blocks import (
    _dot_bf16_row,
    _dot_f16_row,
    _dot_f32_row,
    _dot_q2_k_row,
    _dot_q3_k_row,
    _dot_q4_0_row,
    _dot_q4_1_row,
    _dot_q4_1_split,
    _dot_q4_k_row,
    _dot_q5_0_row,
    _dot_q5_1_row,
    _dot_q5_k_row,
    _dot_q6_k_row,
    _dot_q8_0_row,
    _group_sums,
    q4_1_scales,
)
from workbench.backends.quant_simd import _prefetch_range
from workbench.gguf.quants import SUPPORTED_TYPES, block_layout

Q = GGMLQuantizationType

# Type codes in the weight table are the gguf enum values (frozen as constants when compiled).
_T_F32, _T_F16, _T_BF16 = int(Q.F32), int(Q.F16), int(Q.BF16)
_T_Q4_0, _T_Q4_1, _T_Q5_0, _T_Q5_1, _T_Q8_0 = (
    int(Q.Q4_0), int(Q.Q4_1), int(Q.Q5_0), int(Q.Q5_1), int(Q.Q8_0)
)  # fmt: skip
_T_Q2_K, _T_Q3_K, _T_Q4_K, _T_Q5_K, _T_Q6_K = (
    int(Q.Q2_K), int(Q.Q3_K), int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)
)  # fmt: skip

# The per-layer matrices, in the order of a layer's rows of the weight table.
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_PER_LAYER = len(MATRICES)
_Q, _K, _V, _O, _GATE, _UP, _DOWN = range(_PER_LAYER)
# Work counters per layer (`cpu_sync.claim`): Q/K/V rows, attention heads, output rows, gate/up
# rows, down rows; then one for the logits' rows.
_SLOTS = 5
# Weight table columns. _SCALES: where a Q4_1 matrix's widened block scales start in the
# decoder's scales array (`FusedDecoder`), or -1.
_OFF, _ROWS, _ROW_BYTES, _CODE, _BLOCK_BYTES, _VALUES, _SCALES = range(7)


@njit(cache=True, nogil=True, inline="always")
def _dot_row(code, row, x, xs32, xs16, nb):
    """sum(W[row] * x) for a row of ``code``'s blocks; nb blocks (values for float types).

    The same row kernels, with the same block sums, as `quant_cpu.matvec`."""
    if code == _T_Q4_1:
        return _dot_q4_1_row(row, x, xs32, nb)
    if code == _T_Q8_0:
        return _dot_q8_0_row(row, x, xs32, nb)
    if code == _T_Q6_K:
        return _dot_q6_k_row(row, x, x, nb)
    if code == _T_Q4_K:
        return _dot_q4_k_row(row, x, xs32, nb)
    if code == _T_Q5_K:
        return _dot_q5_k_row(row, x, xs32, nb)
    if code == _T_Q4_0:
        return _dot_q4_0_row(row, x, xs32, nb)
    if code == _T_Q5_0:
        return _dot_q5_0_row(row, x, xs32, nb)
    if code == _T_Q5_1:
        return _dot_q5_1_row(row, x, xs32, nb)
    if code == _T_Q3_K:
        return _dot_q3_k_row(row, x, x, nb)
    if code == _T_Q2_K:
        return _dot_q2_k_row(row, x, xs16, nb)
    if code == _T_F16:
        return _dot_f16_row(row, x, x, nb)
    if code == _T_BF16:
        return _dot_bf16_row(row, x, x, nb)
    return _dot_f32_row(row, x, x, nb)


# Rows are handed out in chunks of about this many weight bytes: 1-2 us of work, against an
# atomic increment of a counter the other thread last touched (well under 0.1 us).
_CHUNK_BYTES = 16384
# Each row's dot product first asks for the cache lines this many bytes further on.
_AHEAD = quant_cpu.AHEAD
_Q4_1_BYTES = block_layout(Q.Q4_1)[1]


@njit(cache=True, nogil=True)
def _chunks(table, m):
    """How many chunks matrix m's rows are split into (`_matvec_rows`)."""
    rows = table[m, _ROWS]
    return max(1, min(rows, rows * table[m, _ROW_BYTES] // _CHUNK_BYTES))


@njit(cache=True, nogil=True)
def _part(lo, hi, tid, nt):
    """Thread tid's share lo..(returned hi)-1 of the range lo..hi-1 split evenly among nt."""
    n = hi - lo
    return lo + n * tid // nt, lo + n * (tid + 1) // nt


# parallel=True although nothing here runs in parallel: numba's parallel pipeline compiles this
# function faster than its default one (1.6x while the row loop looked the type up per row, about
# 3% with the per-type loops; the results are bit for bit the same), and warns that it found
# nothing to parallelise: silenced for this function only.
warnings.filterwarnings(
    "ignore", message=r"(?s).*def _matvec_rows\(", category=NumbaPerformanceWarning
)


# The next unit of a shared loop from a thread's part, then the others' (`cpu_sync.claim_in_part`)
_claim = cpu_sync.claim_in_part


@njit(cache=True, nogil=True, inline="always")
def _chunk_rows(table, m0, m1, c):
    """Chunk c of the stacked rows of matrices m0..m1-1: (m, first, lo, hi), rows lo..hi-1 of
    matrix m, whose row 0 is row ``first`` of the stack."""
    first, skip = 0, 0  # stacked index of matrix m's first row; chunks before matrix m
    for m in range(m0, m1):
        rows, n = table[m, _ROWS], _chunks(table, m)
        if c < skip + n:
            per = -(-rows // n)  # rows per chunk
            lo = (c - skip) * per
            return m, first, lo, min(lo + per, rows)
        first += rows
        skip += n
    return m1 - 1, first, 0, 0  # past the end: no rows


@njit(cache=True, nogil=True, inline="always")
def _total_chunks(table, m0, m1):
    """How many chunks the stacked rows of matrices m0..m1-1 are split into."""
    chunks = 0
    for m in range(m0, m1):
        chunks += _chunks(table, m)
    return chunks


@njit(cache=True, nogil=True, inline="always")
def _next_chunk(table, m0, m1, chunks, work, slot, part, nt):
    """The next chunk of ``part``'s share of the stacked rows of matrices m0..m1-1 (`_claim`):
    (m, first, lo, hi, row bytes, blocks per row, type code, offset of row 0 in the blob), or
    m = -1 when that share is done. The callers pick a row loop compiled for the type once per
    chunk (`_typed_span`): a type looked up per row cost about a third of the decode."""
    c = _claim(work, slot, part, nt, chunks)
    if c < 0:
        return -1, 0, 0, 0, 0, 0, 0, 0
    m, first, lo, hi = _chunk_rows(table, m0, m1, c)
    rb = table[m, _ROW_BYTES]
    return m, first, lo, hi, rb, rb // table[m, _BLOCK_BYTES], table[m, _CODE], table[m, _OFF]


@njit(cache=True, nogil=True, inline="always")
def _needs_sums(table, m0, m1, g):
    """Whether a matrix among m0..m1-1 takes the sums of x over groups of g values: g = 32 for
    the offsets of Q5_0, Q5_1, Q4_K and Q5_K, g = 16 for Q2_K's (the other kernels ignore them)."""
    for m in range(m0, m1):
        c = table[m, _CODE]
        if g == 32 and c in (_T_Q5_0, _T_Q5_1, _T_Q4_K, _T_Q5_K):
            return True
        if g == 16 and c == _T_Q2_K:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _prefetch_ahead(blob, o, rb):
    """Ask for the `_AHEAD` bytes after the row at blob[o : o + rb]."""
    _prefetch_range(blob, o + _AHEAD, o + _AHEAD + rb)


@njit(parallel=True, cache=True, nogil=True)
def _matvec_rows(blob, table, scales, m0, m1, x, out, tid, nt, work, slot):
    """Thread tid's chunks of out = concat(W_m @ x for m in m0..m1-1), the matrices sharing x.

    Every thread of the team calls this; the rows go out in chunks of about `_CHUNK_BYTES`
    (`_claim`). blob (file bytes,) uint8; table (matrices, 7) int64; scales (n,) float32, the
    widened Q4_1 block scales the table's _SCALES column points into; x (cols,) float32;
    out (sum rows,)."""
    # (cols // 32,) Q5_*, Q4_K, Q5_K block offsets; (cols // 16,) Q2_K's; empty when no matrix
    # here needs them (SmolLM2's Q4_1 layers: a few microseconds a layer saved)
    xs32 = _group_sums(x, 32) if _needs_sums(table, m0, m1, 32) else np.empty(0, np.float32)
    xs16 = _group_sums(x, QK_K // 16) if _needs_sums(table, m0, m1, 16) else np.empty(0, np.float32)
    chunks = _total_chunks(table, m0, m1)
    for i in range(nt):
        part = (tid + i) % nt
        while True:
            m, first, lo, hi, rb, nb, code, base = _next_chunk(
                table, m0, m1, chunks, work, slot, part, nt
            )
            if m < 0:
                break
            start = table[m, _SCALES]
            _typed_span(code, blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first, scales, start)


@njit(cache=True, nogil=True, inline="always")
def _dot_span(code, blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first):
    """out[first + r] = W[r] . x for the weight rows lo..hi-1 at blob[base + r rb]."""
    for r in range(lo, hi):
        o = base + r * rb
        _prefetch_ahead(blob, o, rb)
        out[first + r] = _dot_row(code, blob[o : o + rb], x, xs32, xs16, nb)


@njit(cache=True, nogil=True, inline="always")
def _kernel_span(kernel, blob, base, rb, lo, hi, x, xs, nb, out, first):
    """`_dot_span` through one row kernel, ``kernel(row, x, xs, nb)``."""
    for r in range(lo, hi):
        o = base + r * rb
        _prefetch_ahead(blob, o, rb)
        out[first + r] = kernel(blob[o : o + rb], x, xs, nb)


# One compiled row loop per common type, the type a constant in each (`_typed_span`). With the
# type looked up inside the loop, LLVM kept every kernel's registers and branches in it, and a
# Q4_1 block took 5.9 ns instead of 3.1. Not inlined: each loop compiles (and caches) once.
@njit(cache=True, nogil=True)
def _span_q4_1_split(blob, base, rb, lo, hi, x, scales, start, nb, out, first):
    """`_kernel_span` for a Q4_1 matrix, its block scales read from scales[start + 2 nb r ...]
    (`q4_1_scales`), a second stream prefetched as far ahead in blocks as the codes."""
    ahead = 2 * (_AHEAD // _Q4_1_BYTES)  # floats of scales as far ahead as _AHEAD block bytes
    for r in range(lo, hi):
        o = base + r * rb
        _prefetch_ahead(blob, o, rb)
        s = start + 2 * nb * r
        _prefetch_range(scales, s + ahead, s + ahead + 2 * nb)
        out[first + r] = _dot_q4_1_split(blob[o : o + rb], scales[s : s + 2 * nb], x, nb)


@njit(cache=True, nogil=True)
def _span_q8_0(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first):
    _kernel_span(_dot_q8_0_row, blob, base, rb, lo, hi, x, xs32, nb, out, first)


@njit(cache=True, nogil=True)
def _span_q4_0(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first):
    _kernel_span(_dot_q4_0_row, blob, base, rb, lo, hi, x, xs32, nb, out, first)


@njit(cache=True, nogil=True)
def _span_q4_k(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first):
    _kernel_span(_dot_q4_k_row, blob, base, rb, lo, hi, x, xs32, nb, out, first)


@njit(cache=True, nogil=True)
def _span_q6_k(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first):
    _kernel_span(_dot_q6_k_row, blob, base, rb, lo, hi, x, x, nb, out, first)


@njit(cache=True, nogil=True, inline="always")
def _typed_span(code, blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first, scales, start):
    """`_dot_span` through the loop compiled for ``code`` (the common types; the others share
    one loop that looks the type up per row). A Q4_1 matrix reads its widened scales from
    ``scales`` (start >= 0: `FusedDecoder` widens every one); one without them takes the
    shared loop."""
    if code == _T_Q4_1 and start >= 0:
        _span_q4_1_split(blob, base, rb, lo, hi, x, scales, start, nb, out, first)
    elif code == _T_Q8_0:
        _span_q8_0(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first)
    elif code == _T_Q4_0:
        _span_q4_0(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first)
    elif code == _T_Q4_K:
        _span_q4_k(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first)
    elif code == _T_Q6_K:
        _span_q6_k(blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first)
    else:
        _dot_span(code, blob, base, rb, lo, hi, x, xs32, xs16, nb, out, first)


@njit(cache=True, nogil=True)
def _team_step(
    tid, nt, sync, spins, blob, table, scales, norms, out_norm, eps, dims, xs, pos, cos, sin, neox,
    k_cache, v_cache, qkv, att, tmp, hs, gu, ffs, logits, stamps, work,
):  # fmt: skip
    """Thread tid of nt: every layer of one token at position ``pos``, then the output norm and
    logits. Every thread of the team calls this with the same arguments. Thread 0 writes the
    monotonic clock to stamps (layers + 2,) float64 at the start and after each layer and the
    head: the per-layer times the profiler reports, taken without splitting the call.

    Each thread keeps its own copy of the residual stream (xs[tid]), its norm (hs[tid]) and
    SwiGLU output (ffs[tid]), computed identically on every thread, so that only the products'
    rows and the attention heads are shared out (`_claim`, through the counters in ``work``:
    (layers * 5 + 1) * nt of `cpu_sync.new_counters`, zero at the call). Every row and head is
    computed the same way whichever thread takes it. The threads meet at ``sync`` (a
    `cpu_sync.new_barrier`, polled ``spins`` times before a thread sleeps) six times per layer:
    after each group of matrix rows, after RoPE and the KV append, and after attention.

    blob (file bytes,) uint8 and table (layers*7 + 1, 6) int64: the weights; norms (layers, 2,
    dim) float32: attn_norm, ffn_norm; out_norm (dim,); dims = (heads, kv_heads, hd, ffn);
    xs, hs (nt, 1, dim); cos, sin (1, rope_dim/2); k_cache, v_cache (layers, kv_heads, ctx, hd).
    Shared scratch: qkv (q_dim + 2 kv_dim,), att (q_dim,), tmp (dim,), gu (2 ffn,);
    ffs (nt, ffn); logits (vocab,).
    """
    nh, nkv, hd, nff = dims
    qd, kd = nh * hd, nkv * hd
    x, h, ff = xs[tid], hs[tid], ffs[tid]
    h0, h1 = _part(0, nh, tid, nt)  # this thread's query heads to rotate
    g0, g1 = _part(0, nkv, tid, nt)  # and KV heads
    if tid == 0:
        stamps[0] = cpu_sync.monotonic()
    for layer in range(norms.shape[0]):
        t = layer * _PER_LAYER
        w = layer * _SLOTS  # this layer's work counters
        cpu_ops.rmsnorm(x, norms[layer, 0], eps, h)
        _matvec_rows(blob, table, scales, t + _Q, t + _O, h[0], qkv, tid, nt, work, w)
        cpu_sync.barrier_wait(sync, nt, spins)
        q = qkv[:qd].reshape((1, nh, hd))
        k = qkv[qd : qd + kd].reshape((1, nkv, hd))
        cpu_ops.rope(q[:, h0:h1], cos, sin, neox)
        cpu_ops.rope(k[:, g0:g1], cos, sin, neox)
        for g in range(g0, g1):
            for d in range(hd):
                k_cache[layer, g, pos, d] = qkv[qd + g * hd + d]
                v_cache[layer, g, pos, d] = qkv[qd + kd + g * hd + d]
        cpu_sync.barrier_wait(sync, nt, spins)
        for i in range(nt):
            part = (tid + i) % nt
            head = _claim(work, w + 1, part, nt, nh)
            while head >= 0:
                cpu_ops.attention_decode_heads(
                    q[0], k_cache[layer], v_cache[layer], pos + 1, att, head, head + 1
                )
                head = _claim(work, w + 1, part, nt, nh)
        cpu_sync.barrier_wait(sync, nt, spins)
        _matvec_rows(blob, table, scales, t + _O, t + _GATE, att, tmp, tid, nt, work, w + 2)
        cpu_sync.barrier_wait(sync, nt, spins)
        for j in range(x.shape[1]):
            x[0, j] = x[0, j] + tmp[j]
        cpu_ops.rmsnorm(x, norms[layer, 1], eps, h)
        _matvec_rows(blob, table, scales, t + _GATE, t + _DOWN, h[0], gu, tid, nt, work, w + 3)
        cpu_sync.barrier_wait(sync, nt, spins)
        cpu_ops.swiglu(gu[:nff].reshape((1, nff)), gu[nff:].reshape((1, nff)), ff.reshape((1, nff)))
        _matvec_rows(blob, table, scales, t + _DOWN, t + _PER_LAYER, ff, tmp, tid, nt, work, w + 4)
        cpu_sync.barrier_wait(sync, nt, spins)
        for j in range(x.shape[1]):
            x[0, j] = x[0, j] + tmp[j]
        if tid == 0:
            stamps[layer + 1] = cpu_sync.monotonic()
    cpu_ops.rmsnorm(x, out_norm, eps, h)
    m = table.shape[0] - 1
    _matvec_rows(
        blob, table, scales, m, m + 1, h[0], logits, tid, nt, work, norms.shape[0] * _SLOTS
    )
    if tid == 0:
        stamps[-1] = cpu_sync.monotonic()


class _Team:
    """``n - 1`` helper threads that run ``fn(tid, *args)`` together with the caller (tid 0).

    The helpers sleep on an event between calls (one wake-up per call, not per layer), and
    run numba code that releases the GIL."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._job: tuple[Callable[..., None], tuple] | None = None
        self._error: BaseException | None = None
        self._start()

    def _start(self) -> None:
        self._go = [threading.Event() for _ in range(self.n - 1)]
        self._done = [threading.Event() for _ in range(self.n - 1)]
        self._threads = [
            threading.Thread(target=self._loop, args=(tid,), daemon=True, name=f"decode-{tid}")
            for tid in range(1, self.n)
        ]
        for th in self._threads:
            th.start()

    def run(self, fn: Callable[..., None], args: tuple) -> None:
        if not all(th.is_alive() for th in self._threads):
            self._start()  # a forked child inherits no threads: start the helpers again
        self._job = (fn, args)
        for go in self._go:
            go.set()
        try:
            fn(0, *args)
        finally:
            for done in self._done:
                done.wait()
                done.clear()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self, tid: int) -> None:
        go, done = self._go[tid - 1], self._done[tid - 1]
        while True:
            go.wait()
            go.clear()
            job = self._job
            if job is None:
                return
            try:
                job[0](tid, *job[1])
            except BaseException as e:  # handed to the caller of run()
                self._error = e
            finally:
                done.set()

    def close(self) -> None:
        """Stop the helper threads (they finish at once: none is inside a call)."""
        self._job = None
        for go in self._go:
            go.set()


def _root(a: np.ndarray) -> np.ndarray:
    """The array that owns a view's memory (the model file's memory map for every tensor)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


LayerHook = Callable[[int, float], None]


def weight_table(transformer: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(blob, table) of the transformer's matrices for the fused kernels, or None when they are
    not all C-contiguous views of one file map in supported types.

    blob (file bytes,) uint8, read-only; table (layers*7 + 1, 7) int64: each matrix's offset in
    blob, rows, row bytes, type code, block bytes, values per block and -1 (no widened scales:
    `split_scales`), layer by layer in the order of `MATRICES`, then the output projection."""
    mats = [getattr(lw, name) for lw in transformer.layers for name in MATRICES]
    mats.append(transformer.output)
    blob = _root(mats[0].data)
    if blob.ndim != 1 or blob.dtype != np.uint8:
        return None
    base = blob.ctypes.data
    rows = []
    for w in mats:
        data = w.data
        if (
            _root(data) is not blob
            or data.ndim != 2
            or not data.flags.c_contiguous
            or w.qtype not in SUPPORTED_TYPES
        ):
            return None
        values, block_bytes = block_layout(w.qtype)
        rows.append((data.ctypes.data - base, *data.shape, int(w.qtype), block_bytes, values, -1))
    table = np.array(rows, dtype=np.int64)  # (layers*7 + 1, 7)
    view = blob.view(np.ndarray)
    view.flags.writeable = False  # one compiled specialisation: the file map is read-only
    return view, table


def split_scales(blob: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales, table): every Q4_1 matrix's block scales widened to float32 (`q4_1_scales`),
    one after another in scales (n,), and a copy of the table whose _SCALES column says where
    each matrix's start. The decode's Q4_1 loop then reads them there (`_span_q4_1_split`):
    SmolLM2's Q4_1 products on 2 threads 4.2 -> 3.5 ms, a token 7.7 -> 6.8 ms (medians, same
    process), for 8 more bytes per 32 weights (27 MB)."""
    table = table.copy()
    parts, start = [], 0
    for m in range(table.shape[0]):
        if table[m, _CODE] != _T_Q4_1:
            continue
        off, rows, rb, _, bb = table[m, :_VALUES]
        parts.append(q4_1_scales(blob[off : off + rows * rb].reshape(-1, bb)))
        table[m, _SCALES] = start
        start += parts[-1].size
    scales = np.concatenate(parts) if parts else np.empty(0, np.float32)  # (2 Q4_1 blocks,)
    return scales, table


class TeamDecoder:
    """What both fused decodes (`FusedDecoder`, `fused_rows.FusedRowsDecoder`) hold: the weight
    table, the norms, the team of threads with its barrier and counters, the per-layer clock
    and the profiler's cost model. Build with ``build``, which returns None when the weights
    do not allow it (then the per-operation path runs)."""

    def __init__(self, transformer: Any, blob: np.ndarray, table: np.ndarray, threads: int) -> None:
        spec = transformer.spec
        self.spec = spec
        self.transformer = transformer
        self.blob = blob  # (file bytes,) uint8, read-only
        # (layers*7 + 1, 7) int64: offset, rows, row_bytes, code, block bytes, values, scales
        self.table = table
        sizes = table[:, _ROWS] * table[:, _ROW_BYTES]
        # Weight bytes and flops (2 per weight) of each matrix: the profiler's cost model.
        values = table[:, _ROW_BYTES] // table[:, _BLOCK_BYTES] * table[:, _VALUES]
        flops = 2 * table[:, _ROWS] * values
        self._costs = [(int(sizes[m].sum()), int(flops[m].sum()))
                       for m in (slice(i * _PER_LAYER, (i + 1) * _PER_LAYER)
                                 for i in range(spec.n_layers))]  # fmt: skip
        self._head_cost = (int(sizes[-1]), int(flops[-1]))
        self.norms = np.stack(
            [np.stack([lw.attn_norm.data, lw.ffn_norm.data]) for lw in transformer.layers]
        ).astype(np.float32)  # (layers, 2, dim)
        self.out_norm = np.ascontiguousarray(transformer.output_norm.data, np.float32)  # (dim,)
        self.ffn = int(table[_GATE, _ROWS])
        self.dims = (spec.n_heads, spec.n_kv_heads, spec.head_dim, self.ffn)
        self.vocab = int(table[-1, _ROWS])
        self.threads = max(1, int(threads))
        self.sync = cpu_sync.new_barrier()
        self.spins = cpu_sync.SPINS  # polls of a barrier before a thread sleeps
        self.stamps = np.zeros(spec.n_layers + 2, np.float64)  # clock after each layer, seconds
        # The team's work counters (`_claim`), zeroed before every call.
        self.work = cpu_sync.new_counters((spec.n_layers * _SLOTS + 1) * self.threads)
        self._lock = threading.Lock()  # one call at a time: scratch, barrier and counters
        self._team = _Team(self.threads) if self.threads > 1 else None
        if self._team is not None:
            weakref.finalize(self, self._team.close)

    @classmethod
    def build(cls, transformer: Any, threads: int) -> Any:
        """A decoder over the transformer's weights, or None if they are not one file's map."""
        weights = weight_table(transformer)
        return None if weights is None else cls(transformer, *weights, threads)

    def layer_costs(self) -> list[tuple[int, int]]:
        """(weight bytes, flops) of each layer's matrix-vector products, for one row."""
        return list(self._costs)

    def head_cost(self) -> tuple[int, int]:
        """(weight bytes, flops) of the output projection, for one row."""
        return self._head_cost

    def _run(self, fn: Callable[..., None], args: tuple, on_layer: LayerHook | None) -> None:
        """fn(tid, nt, *args) on every thread of the team (under the lock), then the per-layer
        times to ``on_layer(layer, seconds)``: each layer, then -1 for the norm and logits."""
        self.work[:] = 0
        if self._team is None:
            fn(0, 1, *args)
        else:
            self._team.run(fn, (self.threads, *args))
        if on_layer is not None:
            times = np.diff(self.stamps)  # (layers + 1,) seconds
            for layer in range(self.spec.n_layers):
                on_layer(layer, float(times[layer]))
            on_layer(-1, float(times[-1]))


class FusedDecoder(TeamDecoder):
    """Decodes one token per `step` for a transformer whose weights all lie in one file map."""

    def __init__(self, transformer: Any, blob: np.ndarray, table: np.ndarray, threads: int) -> None:
        scales, table = split_scales(blob, table)
        super().__init__(transformer, blob, table, threads)
        self.scales = scales  # (2 * Q4_1 blocks,) float32: `split_scales`
        nt, dim, hd, spec = self.threads, self.spec.dim, self.spec.head_dim, self.spec
        self.xs = np.empty((nt, 1, dim), np.float32)  # each thread's copy of the residual stream
        self.hs = np.empty((nt, 1, dim), np.float32)  # normed input of a projection, per thread
        self.ffs = np.empty((nt, self.ffn), np.float32)  # silu(gate) * up, per thread
        self.qkv = np.empty(spec.n_heads * hd + 2 * spec.n_kv_heads * hd, np.float32)
        self.att = np.empty(spec.n_heads * hd, np.float32)
        self.tmp = np.empty(dim, np.float32)  # output of attn_output / ffn_down
        self.gu = np.empty(2 * self.ffn, np.float32)  # gate then up

    def __call__(self, token: int, cache: Any) -> np.ndarray:
        return self.step(token, cache)

    def step(self, token: int, cache: Any, on_layer: LayerHook | None = None) -> np.ndarray:
        """Logits (vocab,) of ``token`` at position cache.length; writes that position's K/V.

        ``on_layer(layer, seconds)``, when given, is called after the token for each layer and
        once with layer -1 for the output norm and logits, with the times the call measured.
        """
        with self._lock:
            return self._step(token, cache, on_layer)

    def _step(self, token: int, cache: Any, on_layer: LayerHook | None) -> np.ndarray:
        tf, spec = self.transformer, self.spec
        pos = cache.length
        self.xs[:] = quant_cpu.get_rows(tf.tok_embd.qtype, tf.tok_embd.data, np.array([token]))
        cos, sin = cpu_ops.rope_tables(pos, 1, spec, tf.rope_factors)  # (1, rope_dim/2) each
        neox = spec.rope_mode == "neox"
        logits = np.empty(self.vocab, np.float32)
        args = (self.sync, self.spins, self.blob, self.table, self.scales, self.norms,
                self.out_norm, float(spec.norm_eps), self.dims, self.xs, pos, cos, sin, neox,
                cache.k, cache.v, self.qkv, self.att, self.tmp, self.hs, self.gu, self.ffs, logits,
                self.stamps, self.work)  # fmt: skip
        self._run(_team_step, args, on_layer)
        return logits


def zero_weights(
    dim: int, heads: int, kv_heads: int, hd: int, ffn: int, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """(table (8, 7) int64, blob (bytes,) uint8): a one-layer model's Q8_0 matrices of zeros,
    for compiling the fused kernels with a real model's argument types."""
    values, block_bytes = block_layout(Q.Q8_0)
    shapes = [(heads * hd, dim), (kv_heads * hd, dim), (kv_heads * hd, dim), (dim, heads * hd),
              (ffn, dim), (ffn, dim), (dim, ffn), (vocab, dim)]  # fmt: skip
    rows, off = [], 0
    for r, c in shapes:
        rb = c // values * block_bytes
        rows.append((off, r, rb, _T_Q8_0, block_bytes, values, -1))
        off += r * rb
    blob = np.zeros(off, np.uint8)  # (bytes,)
    blob.flags.writeable = False
    return np.array(rows, dtype=np.int64), blob


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernel `FusedDecoder.step` calls.

    Runs it once on a one-layer model of zeros; the argument types are those of a real model
    (they do not depend on its shapes, weight types or thread count), so nothing compiles at the
    first token.
    """
    dim, heads, kv_heads, hd, ffn, vocab, ctx = 32, 2, 1, 16, 32, 4, 2
    table, blob = zero_weights(dim, heads, kv_heads, hd, ffn, vocab)
    norms = np.ones((1, 2, dim), np.float32)
    out_norm = np.ones(dim, np.float32)
    xs, hs = np.zeros((1, 1, dim), np.float32), np.zeros((1, 1, dim), np.float32)
    cos, sin = np.ones((1, hd // 2), np.float32), np.zeros((1, hd // 2), np.float32)
    k_cache = np.zeros((1, kv_heads, ctx, hd), np.float32)
    v_cache = np.zeros((1, kv_heads, ctx, hd), np.float32)
    qkv = np.zeros(heads * hd + 2 * kv_heads * hd, np.float32)
    att, tmp = np.zeros(heads * hd, np.float32), np.zeros(dim, np.float32)
    gu, ffs = np.zeros(2 * ffn, np.float32), np.zeros((1, ffn), np.float32)
    logits = np.zeros(vocab, np.float32)
    dims = (heads, kv_heads, hd, ffn)
    stamps = np.zeros(3, np.float64)
    scales = np.empty(0, np.float32)  # (0,): no Q4_1 matrix here, the same type as a real one
    _team_step(0, 1, cpu_sync.new_barrier(), cpu_sync.SPINS, blob, table, scales, norms, out_norm,
               1e-5, dims, xs, 0, cos, sin, False, k_cache, v_cache, qkv, att, tmp, hs, gu, ffs,
               logits, stamps, cpu_sync.new_counters(_SLOTS + 1))  # fmt: skip
