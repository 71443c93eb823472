"""Fused batched decode: one compiled call runs a decode step of several sequences at once.

The batched runner (`workbench.engine.runner`) takes a step that holds decode rows only (every
running sequence one position further, no prompt chunk) through here instead of about 13
Python-level operation calls per layer, each of them a wake-up of numba's thread pool: about
6 ms of SmolLM2's 16 ms one-sequence step went there.

The team of threads, its barrier, the shared row counters and the weight table are the
one-sequence fused decode's (`fused_decode`). The arithmetic of each row is the per-operation
runner's: `quant_batch`'s kernels, which compute every input row bit for bit as they do alone;
`cpu_ops`'s RMSNorm, RoPE and SwiGLU; `paged_ops.attention_head_paged` over the page pool. So a
row does not depend on the other rows of the step, and it agrees with the per-operation path to
float32 rounding (bit for bit in tests for Q4_0, Q4_1, Q8_0 and float weights).
"""

from __future__ import annotations

import warnings

import numpy as np
from gguf.constants import QK_K
from numba import njit
from numba.core.errors import NumbaPerformanceWarning

from workbench.backends import cpu_ops, cpu_sync, fused_decode, paged_ops, quant_cpu
from workbench.backends.fused_decode import (
    _DOWN,
    _GATE,
    _O,
    _PER_LAYER,
    _Q,
    _SLOTS,
    LayerHook,
    TeamDecoder,
    _claim,
    _needs_sums,
    _next_chunk,
    _part,
    _prefetch_ahead,
    _total_chunks,
)
from workbench.backends.paged_ops import attention_head_paged
from workbench.backends.quant_batch import (
    _T_Q4_0,
    _T_Q4_1,
    _T_Q8_0,
    _dot_row,
    _grouped_row,
    _row_sums,
)

# fastmath as `quant_batch._mvr_grouped`: the row kernels are inlined into this loop and take its
# flags (with them, LLVM fuses the scalar block-offset sums into FMAs there too). parallel=True
# although nothing here runs in parallel, as `fused_decode._matvec_rows`: numba's parallel
# pipeline compiles this loop 1.9-3.7x faster than its default one (the gate and up products of
# one layer, one thread: 1 row 262 -> 141 us, 2 rows 952 -> 258 us, 8 rows 1071 -> 398 us; in the
# default pipeline the array views taken per row and per group cost most of that: addressing by
# offset instead ran 3x faster there); its warning that there was nothing to parallelise is
# silenced for this function only.
warnings.filterwarnings(
    "ignore", message=r"(?s).*def _product_rows\(", category=NumbaPerformanceWarning
)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _product_rows(blob, table, m0, m1, x, out, tid, nt, work, slot):
    """Thread tid's chunks of out = x @ concat(W_m for m in m0..m1-1).T, as `quant_batch`.

    blob (file bytes,) uint8; table (matrices, 7) int64 (`fused_decode.weight_table`); x (n,
    cols) float32; out (n, sum rows).
    Rows go out in chunks (`fused_decode._claim`); each weight row is read once for all n."""
    # (n, cols // 32) Q5_*, Q4_K, Q5_K block offsets; (n, cols // 16) Q2_K's; empty rows when no
    # matrix here needs them (`fused_decode._needs_sums`)
    none = np.empty((x.shape[0], 0), np.float32)
    xs32 = _row_sums(x, 32) if _needs_sums(table, m0, m1, 32) else none
    xs16 = _row_sums(x, QK_K // 16) if _needs_sums(table, m0, m1, 16) else none
    chunks = _total_chunks(table, m0, m1)
    for p in range(nt):
        part = (tid + p) % nt
        while True:
            m, first, lo, hi, rb, nb, code, base = _next_chunk(
                table, m0, m1, chunks, work, slot, part, nt
            )
            if m < 0:
                break
            # One call per type, each with its type a constant: LLVM then compiles one kernel
            # into each row loop (with the type looked up per row, the Q4_1 loop ran 35% slower).
            if code == _T_Q4_1:
                _grouped_span(_T_Q4_1, blob, base, rb, lo, hi, x, nb, out, first)
            elif code == _T_Q8_0:
                _grouped_span(_T_Q8_0, blob, base, rb, lo, hi, x, nb, out, first)
            elif code == _T_Q4_0:
                _grouped_span(_T_Q4_0, blob, base, rb, lo, hi, x, nb, out, first)
            else:
                for r in range(lo, hi):
                    o = base + r * rb
                    _prefetch_ahead(blob, o, rb)
                    row = blob[o : o + rb]
                    for i in range(x.shape[0]):
                        out[i, first + r] = _dot_row(code, row, x[i], xs32[i], xs16[i], nb)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _grouped_span(code, blob, base, rb, lo, hi, x, nb, out, first):
    """Weight rows lo..hi-1 at blob[base + r rb] of a Q4_0, Q4_1 or Q8_0 matrix against every
    input row, each block decoded once per eight or four input rows (`quant_batch`)."""
    for r in range(lo, hi):
        o = base + r * rb
        _prefetch_ahead(blob, o, rb)
        _grouped_row(code, blob[o : o + rb], x, nb, out, first + r)


@njit(cache=True, nogil=True)
def _rows_step(
    tid, nt, sync, spins, blob, table, norms, out_norm, eps, dims, xs, hs, ffs, qkv, att, tmp,
    gu, cos, sin, neox, k_pool, v_pool, wpage, wrow, tables, lengths, logits, stamps, work,
):  # fmt: skip
    """Thread tid of nt: every layer of one decode position of each of n sequences, then the
    output norm and logits. Every thread of the team calls this with the same arguments.

    As `fused_decode._team_step` with rows: each thread keeps its own copy of the residual
    streams xs[tid] (n, dim), their norms hs[tid] and SwiGLU outputs ffs[tid] (n, ffn); the
    products' weight rows and the (row, head) attention units are shared out. Row i's keys and
    values go to row wrow[i] of page wpage[i] of the pool k_pool, v_pool (layers, pages,
    page_size, kv_heads, hd); its attention reads positions 0..lengths[i]-1 through tables[i].
    dims = (heads, kv_heads, hd, ffn); cos, sin (n, rope_dim/2). Shared scratch: qkv (n,
    q_dim + 2 kv_dim), att (n, q_dim), tmp (n, dim), gu (n, 2 ffn); logits (n, vocab). Thread 0
    writes the clock to stamps (layers + 2,) as `_team_step` does."""
    nh, nkv, hd, nff = dims
    qd, kd = nh * hd, nkv * hd
    n = xs.shape[1]
    x, h, ff = xs[tid], hs[tid], ffs[tid]
    u0, u1 = _part(0, n * nh, tid, nt)  # this thread's (row, query head) pairs to rotate
    v0, v1 = _part(0, n * nkv, tid, nt)  # and (row, KV head) pairs to rotate and store
    scores = np.empty(tables.shape[1] * k_pool.shape[2], np.float32)  # (max positions,)
    if tid == 0:
        stamps[0] = cpu_sync.monotonic()
    for layer in range(norms.shape[0]):
        t = layer * _PER_LAYER
        w = layer * _SLOTS
        cpu_ops.rmsnorm(x, norms[layer, 0], eps, h)
        _product_rows(blob, table, t + _Q, t + _O, h, qkv, tid, nt, work, w)
        cpu_sync.barrier_wait(sync, nt, spins)
        for u in range(u0, u1):
            i, hh = u // nh, u % nh
            q = qkv[i, :qd].reshape((1, nh, hd))
            cpu_ops.rope(q[:, hh : hh + 1], cos[i : i + 1], sin[i : i + 1], neox)
        for u in range(v0, v1):
            i, g = u // nkv, u % nkv
            k = qkv[i, qd : qd + kd].reshape((1, nkv, hd))
            cpu_ops.rope(k[:, g : g + 1], cos[i : i + 1], sin[i : i + 1], neox)
            for d in range(hd):
                k_pool[layer, wpage[i], wrow[i], g, d] = k[0, g, d]
                v_pool[layer, wpage[i], wrow[i], g, d] = qkv[i, qd + kd + g * hd + d]
        cpu_sync.barrier_wait(sync, nt, spins)
        for p in range(nt):
            part = (tid + p) % nt
            u = _claim(work, w + 1, part, nt, n * nh)
            while u >= 0:
                i, hh = u // nh, u % nh
                q = qkv[i, :qd].reshape((nh, hd))
                attention_head_paged(
                    q, k_pool[layer], v_pool[layer], tables[i], lengths[i], hh, scores, att[i]
                )
                u = _claim(work, w + 1, part, nt, n * nh)
        cpu_sync.barrier_wait(sync, nt, spins)
        _product_rows(blob, table, t + _O, t + _GATE, att, tmp, tid, nt, work, w + 2)
        cpu_sync.barrier_wait(sync, nt, spins)
        for i in range(n):
            for j in range(x.shape[1]):
                x[i, j] = x[i, j] + tmp[i, j]
        cpu_ops.rmsnorm(x, norms[layer, 1], eps, h)
        _product_rows(blob, table, t + _GATE, t + _DOWN, h, gu, tid, nt, work, w + 3)
        cpu_sync.barrier_wait(sync, nt, spins)
        cpu_ops.swiglu(gu[:, :nff], gu[:, nff:], ff)
        _product_rows(blob, table, t + _DOWN, t + _PER_LAYER, ff, tmp, tid, nt, work, w + 4)
        cpu_sync.barrier_wait(sync, nt, spins)
        for i in range(n):
            for j in range(x.shape[1]):
                x[i, j] = x[i, j] + tmp[i, j]
        if tid == 0:
            stamps[layer + 1] = cpu_sync.monotonic()
    cpu_ops.rmsnorm(x, out_norm, eps, h)
    m = table.shape[0] - 1
    _product_rows(blob, table, m, m + 1, h, logits, tid, nt, work, norms.shape[0] * _SLOTS)
    if tid == 0:
        stamps[-1] = cpu_sync.monotonic()


class FusedRowsDecoder(TeamDecoder):
    """Runs a decode step of several sequences whose keys and values live in a page pool."""

    def step(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        tables: np.ndarray,
        k_pool: np.ndarray,
        v_pool: np.ndarray,
        on_layer: LayerHook | None = None,
    ) -> np.ndarray:
        """Logits (n, vocab) of tokens ids (n,) at positions (n,), one per sequence.

        tables (n, max_pages) int64: each sequence's page table, its pages up to and including
        the one that holds its position; k_pool, v_pool (layers, pages, page_size, kv_heads, hd)
        float32, into which each row's keys and values are written. ``on_layer`` as
        `fused_decode.FusedDecoder.step`'s."""
        tf, spec = self.transformer, self.spec
        n, nt, dim = len(ids), self.threads, spec.dim
        page_size = k_pool.shape[2]
        paged_ops.check_page_size(page_size)
        positions = np.asarray(positions, dtype=np.int64)  # (n,)
        tables = np.ascontiguousarray(tables, dtype=np.int64)  # (n, max_pages)
        x = quant_cpu.get_rows(tf.tok_embd.qtype, tf.tok_embd.data, np.asarray(ids, np.int64))
        xs = np.empty((nt, n, dim), np.float32)  # each thread's copy of the residual streams
        xs[:] = x
        hs = np.empty((nt, n, dim), np.float32)  # their norms
        ffs = np.empty((nt, n, self.ffn), np.float32)  # their SwiGLU outputs
        qkv = np.empty((n, (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim), np.float32)
        att = np.empty((n, spec.n_heads * spec.head_dim), np.float32)
        tmp = np.empty((n, dim), np.float32)  # output of attn_output / ffn_down
        gu = np.empty((n, 2 * self.ffn), np.float32)  # gate then up
        logits = np.empty((n, self.vocab), np.float32)
        cos, sin = cpu_ops.rope_tables_at(positions, spec, tf.rope_factors)  # (n, rope_dim/2)
        wpage = tables[np.arange(n), positions // page_size]  # (n,) page of each position
        wrow = positions % page_size  # (n,) its row in that page
        args = (self.sync, self.spins, self.blob, self.table, self.norms, self.out_norm,
                float(spec.norm_eps), self.dims, xs, hs, ffs, qkv, att, tmp, gu, cos, sin,
                spec.rope_mode == "neox", k_pool, v_pool, wpage, wrow, tables, positions + 1,
                logits, self.stamps, self.work)  # fmt: skip
        with self._lock:
            self._run(_rows_step, args, on_layer)
        return logits


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernel `FusedRowsDecoder.step` calls, on a
    one-layer model of zeros with the argument types of a real one (as `fused_decode.warm_up`)."""
    dim, heads, kv_heads, hd, ffn, vocab, pages, size = 32, 2, 1, 16, 32, 4, 1, 4
    table, blob = fused_decode.zero_weights(dim, heads, kv_heads, hd, ffn, vocab)
    norms, out_norm = np.ones((1, 2, dim), np.float32), np.ones(dim, np.float32)
    xs, hs = np.zeros((1, 1, dim), np.float32), np.zeros((1, 1, dim), np.float32)
    ffs = np.zeros((1, 1, ffn), np.float32)
    qkv = np.zeros((1, (heads + 2 * kv_heads) * hd), np.float32)
    att, tmp = np.zeros((1, heads * hd), np.float32), np.zeros((1, dim), np.float32)
    gu, logits = np.zeros((1, 2 * ffn), np.float32), np.zeros((1, vocab), np.float32)
    cos, sin = np.ones((1, hd // 2), np.float32), np.zeros((1, hd // 2), np.float32)
    k_pool = np.zeros((1, pages, size, kv_heads, hd), np.float32)
    v_pool = np.zeros((1, pages, size, kv_heads, hd), np.float32)
    one = np.zeros(1, np.int64)
    _rows_step(0, 1, cpu_sync.new_barrier(), cpu_sync.SPINS, blob, table, norms, out_norm, 1e-5,
               (heads, kv_heads, hd, ffn), xs, hs, ffs, qkv, att, tmp, gu, cos, sin, False,
               k_pool, v_pool, one, one, np.zeros((1, 1), np.int64), one + 1, logits,
               np.zeros(3, np.float64), cpu_sync.new_counters(_SLOTS + 1))  # fmt: skip
