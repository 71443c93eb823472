"""Fused decode: one compiled call runs every layer of a token on the quantized blocks.

The per-operation path (`NumpyBackend` through the launcher) makes about 16 Python-level calls
per layer; at a few microseconds of dispatch each that is a sizeable share of a token. Here a
whole token -- RMSNorm, the Q/K/V products, RoPE, the KV append, attention, the output
projection, the residuals, the FFN norm, gate/up and SwiGLU, down, and finally the output norm and
logits -- is one numba call over preallocated buffers. Matrix-vector products of one input are
merged into one threaded loop (Q, K and V; gate and up), so a layer is four parallel regions.

Numerics are the reference's: the same row kernels (`quant_blocks._dot_*_row`, whose accumulation
order is fixed per row), the same block sums of the input, the same RMSNorm, RoPE tables and
attention loops (`cpu_ops`). SwiGLU's float32 ``exp`` comes from a different library than
NumPy's, and LLVM may vectorise the block sums differently where they are inlined, so logits agree
with the per-operation path to float32 rounding (relative 1e-6), not bit for bit.

Weights are not copied: all of them live in the model file's one memory map, and the kernel reads
them through a table of (offset, rows, row_bytes, type) entries into that map.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import QK_K
from numba import njit, prange

from workbench.backends import cpu_ops, quant_cpu
from workbench.backends.quant_blocks import (
    _dot_bf16_row,
    _dot_f16_row,
    _dot_f32_row,
    _dot_q2_k_row,
    _dot_q3_k_row,
    _dot_q4_0_row,
    _dot_q4_1_row,
    _dot_q4_k_row,
    _dot_q5_0_row,
    _dot_q5_1_row,
    _dot_q5_k_row,
    _dot_q6_k_row,
    _dot_q8_0_row,
    _group_sums,
)
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
# Weight table columns.
_OFF, _ROWS, _ROW_BYTES, _CODE, _BLOCK_BYTES, _VALUES = range(6)

# Matrices smaller than this stay on the calling thread (as `quant_cpu`'s drivers decide).
_PAR_MIN_BYTES = quant_cpu._PAR_MIN_BYTES


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


@njit(cache=True, nogil=True)
def _locate(table, m0, r):
    """(matrix, row in it) of row r of the matrices m0, m0+1, ... stacked."""
    m = m0
    while r >= table[m, _ROWS]:
        r -= table[m, _ROWS]
        m += 1
    return m, r


@njit(parallel=True, cache=True, nogil=True)
def _matvec_group(blob, table, m0, m1, x, out, par):
    """out = concat(W_m @ x for m in m0..m1-1): matrices of the table sharing the input x.

    blob (file bytes,) uint8; table (matrices, 6) int64; x (cols,) float32; out (sum rows,)."""
    xs32 = _group_sums(x, 32)  # (cols // 32,) Q4_*, Q5_*, Q4_K, Q5_K block offsets
    xs16 = _group_sums(x, QK_K // 16)  # (cols // 16,) Q2_K
    total = 0
    for m in range(m0, m1):
        total += table[m, _ROWS]
    if par:
        for r in prange(total):
            m, rr = _locate(table, m0, r)
            rb = table[m, _ROW_BYTES]
            o = table[m, _OFF] + rr * rb
            out[r] = _dot_row(table[m, _CODE], blob[o : o + rb], x, xs32, xs16,
                              rb // table[m, _BLOCK_BYTES])  # fmt: skip
    else:
        r = 0
        for m in range(m0, m1):
            rb = table[m, _ROW_BYTES]
            nb = rb // table[m, _BLOCK_BYTES]
            code = table[m, _CODE]
            for rr in range(table[m, _ROWS]):
                o = table[m, _OFF] + rr * rb
                out[r] = _dot_row(code, blob[o : o + rb], x, xs32, xs16, nb)
                r += 1


@njit(cache=True, nogil=True)
def _decode_layers(
    blob, table, par, norms, eps, dims, x, pos, cos, sin, neox, k_cache, v_cache,
    qkv, att, tmp, h, gu, ff, l0, l1,
):  # fmt: skip
    """Run layers l0..l1-1 of one token at position ``pos`` on the residual stream x, in place.

    blob (file bytes,) uint8 and table (layers*7 + 1, 6) int64: the weights; par (layers*7 + 1,)
    bool: which matrices run threaded; norms (layers, 2, dim) float32: attn_norm, ffn_norm;
    dims = (heads, kv_heads, hd, ffn); x (1, dim); cos, sin (1, rope_dim/2); k_cache, v_cache
    (layers, kv_heads, ctx, hd). Scratch: qkv (q_dim + 2 kv_dim,), att (q_dim,), tmp (dim,),
    h (1, dim), gu (2 ffn,), ff (ffn,).
    """
    nh, nkv, hd, nff = dims
    qd, kd = nh * hd, nkv * hd
    for layer in range(l0, l1):
        t = layer * _PER_LAYER
        cpu_ops.rmsnorm(x, norms[layer, 0], eps, h)
        _matvec_group(blob, table, t + _Q, t + _O, h[0], qkv, par[t + _Q])
        q = qkv[:qd].reshape((1, nh, hd))
        k = qkv[qd : qd + kd].reshape((1, nkv, hd))
        cpu_ops.rope(q, cos, sin, neox)
        cpu_ops.rope(k, cos, sin, neox)
        for g in range(nkv):
            for d in range(hd):
                k_cache[layer, g, pos, d] = qkv[qd + g * hd + d]
                v_cache[layer, g, pos, d] = qkv[qd + kd + g * hd + d]
        cpu_ops.attention_decode(q[0], k_cache[layer], v_cache[layer], pos + 1, att)
        _matvec_group(blob, table, t + _O, t + _GATE, att, tmp, par[t + _O])
        for j in range(x.shape[1]):
            x[0, j] = x[0, j] + tmp[j]
        cpu_ops.rmsnorm(x, norms[layer, 1], eps, h)
        _matvec_group(blob, table, t + _GATE, t + _DOWN, h[0], gu, par[t + _GATE])
        for j in range(nff):
            # silu(g) * u as the reference writes it; exp overflow gives g / inf = -0.0.
            g = gu[j]
            ff[j] = g / (np.float32(1.0) + np.exp(-g)) * gu[nff + j]
        _matvec_group(blob, table, t + _DOWN, t + _PER_LAYER, ff, tmp, par[t + _DOWN])
        for j in range(x.shape[1]):
            x[0, j] = x[0, j] + tmp[j]


@njit(cache=True, nogil=True)
def _decode_head(blob, table, par, out_norm, eps, x, h, logits):
    """logits (vocab,) = output @ rmsnorm(x (1, dim)); the output matrix is the table's last row."""
    cpu_ops.rmsnorm(x, out_norm, eps, h)
    m = table.shape[0] - 1
    _matvec_group(blob, table, m, m + 1, h[0], logits, par[m])


@njit(cache=True, nogil=True)
def _decode_token(
    blob, table, par, norms, out_norm, eps, dims, x, pos, cos, sin, neox, k_cache, v_cache,
    qkv, att, tmp, h, gu, ff, logits,
):  # fmt: skip
    """Every layer and the logits of one token: `_decode_layers` then `_decode_head`."""
    n_layers = norms.shape[0]
    _decode_layers(blob, table, par, norms, eps, dims, x, pos, cos, sin, neox, k_cache, v_cache,
                   qkv, att, tmp, h, gu, ff, 0, n_layers)  # fmt: skip
    _decode_head(blob, table, par, out_norm, eps, x, h, logits)


def _root(a: np.ndarray) -> np.ndarray:
    """The array that owns a view's memory (the model file's memory map for every tensor)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


LayerHook = Callable[[int, float], None]


class FusedDecoder:
    """Decodes one token per `step` for a transformer whose weights all lie in one file map.

    Build with `FusedDecoder.build`, which returns None when the weights do not allow it (then
    the per-operation path runs)."""

    def __init__(self, transformer: Any, blob: np.ndarray, table: np.ndarray, threads: int) -> None:
        spec = transformer.spec
        self.spec = spec
        self.transformer = transformer
        self.blob = blob  # (file bytes,) uint8, read-only
        self.table = (
            table  # (layers*7 + 1, 6) int64: offset, rows, row_bytes, code, block bytes, values
        )
        sizes = table[:, _ROWS] * table[:, _ROW_BYTES]
        self.par = (sizes >= _PAR_MIN_BYTES) & (threads > 1)  # (layers*7 + 1,) bool
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
        dim, hd = spec.dim, spec.head_dim
        ffn = int(table[_GATE, _ROWS])
        self.dims = (spec.n_heads, spec.n_kv_heads, hd, ffn)
        self.x = np.empty((1, dim), np.float32)  # the residual stream
        self.h = np.empty((1, dim), np.float32)  # normed input of a projection
        self.qkv = np.empty(spec.n_heads * hd + 2 * spec.n_kv_heads * hd, np.float32)
        self.att = np.empty(spec.n_heads * hd, np.float32)
        self.tmp = np.empty(dim, np.float32)  # output of attn_output / ffn_down
        self.gu = np.empty(2 * ffn, np.float32)  # gate then up
        self.ff = np.empty(ffn, np.float32)  # silu(gate) * up
        self.vocab = int(table[-1, _ROWS])

    @classmethod
    def build(cls, transformer: Any, threads: int) -> FusedDecoder | None:
        """A decoder over the transformer's weights, or None if they are not one file's map."""
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
            rows.append((data.ctypes.data - base, *data.shape, int(w.qtype), block_bytes, values))
        table = np.array(rows, dtype=np.int64)  # (layers*7 + 1, 6)
        view = blob.view(np.ndarray)
        view.flags.writeable = False  # one compiled specialisation: the file map is read-only
        return cls(transformer, view, table, threads)

    def __call__(self, token: int, cache: Any) -> np.ndarray:
        return self.step(token, cache)

    def layer_costs(self) -> list[tuple[int, int]]:
        """(weight bytes, flops) of each layer's matrix-vector products."""
        return list(self._costs)

    def head_cost(self) -> tuple[int, int]:
        """(weight bytes, flops) of the output projection."""
        return self._head_cost

    def step(self, token: int, cache: Any, on_layer: LayerHook | None = None) -> np.ndarray:
        """Logits (vocab,) of ``token`` at position cache.length; writes that position's K/V.

        ``on_layer(layer, seconds)`` (layer -1 for the output norm and logits), when given, makes
        each layer a separate call so that it can be timed.
        """
        tf, spec = self.transformer, self.spec
        pos = cache.length
        self.x[:] = quant_cpu.get_rows(tf.tok_embd.qtype, tf.tok_embd.data, np.array([token]))
        cos, sin = cpu_ops.rope_tables(pos, 1, spec, tf.rope_factors)  # (1, rope_dim/2) each
        neox = spec.rope_mode == "neox"
        logits = np.empty(self.vocab, np.float32)
        args = (self.blob, self.table, self.par)
        scratch = (self.qkv, self.att, self.tmp, self.h, self.gu, self.ff)
        eps = float(spec.norm_eps)
        if on_layer is None:
            _decode_token(*args, self.norms, self.out_norm, eps, self.dims, self.x, pos, cos, sin,
                          neox, cache.k, cache.v, *scratch, logits)  # fmt: skip
            return logits
        for layer in range(spec.n_layers):
            t0 = time.perf_counter()
            _decode_layers(*args, self.norms, eps, self.dims, self.x, pos, cos, sin, neox,
                           cache.k, cache.v, *scratch, layer, layer + 1)  # fmt: skip
            on_layer(layer, time.perf_counter() - t0)
        t0 = time.perf_counter()
        _decode_head(*args, self.out_norm, eps, self.x, self.h, logits)
        on_layer(-1, time.perf_counter() - t0)
        return logits


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernels `FusedDecoder.step` calls.

    Runs them once on a one-layer model of zeros; the argument types are those of a real model
    (they do not depend on its shapes or weight types), so nothing compiles at the first token.
    """
    dim, heads, kv_heads, hd, ffn, vocab, ctx = 32, 2, 1, 16, 32, 4, 2
    values, block_bytes = block_layout(Q.Q8_0)
    shapes = [(heads * hd, dim), (kv_heads * hd, dim), (kv_heads * hd, dim), (dim, heads * hd),
              (ffn, dim), (ffn, dim), (dim, ffn), (vocab, dim)]  # fmt: skip
    rows, off = [], 0
    for r, c in shapes:
        rb = c // values * block_bytes
        rows.append((off, r, rb, _T_Q8_0, block_bytes, values))
        off += r * rb
    table = np.array(rows, dtype=np.int64)  # (8, 6)
    blob = np.zeros(off, np.uint8)  # (bytes,)
    blob.flags.writeable = False
    par = np.ones(len(rows), dtype=np.bool_)  # (8,)
    norms = np.ones((1, 2, dim), np.float32)
    out_norm = np.ones(dim, np.float32)
    x, h = np.zeros((1, dim), np.float32), np.zeros((1, dim), np.float32)
    cos, sin = np.ones((1, hd // 2), np.float32), np.zeros((1, hd // 2), np.float32)
    k_cache = np.zeros((1, kv_heads, ctx, hd), np.float32)
    v_cache = np.zeros((1, kv_heads, ctx, hd), np.float32)
    qkv = np.zeros(heads * hd + 2 * kv_heads * hd, np.float32)
    att, tmp = np.zeros(heads * hd, np.float32), np.zeros(dim, np.float32)
    gu, ff = np.zeros(2 * ffn, np.float32), np.zeros(ffn, np.float32)
    scratch = (qkv, att, tmp, h, gu, ff)
    logits = np.zeros(vocab, np.float32)
    dims = (heads, kv_heads, hd, ffn)
    _decode_token(blob, table, par, norms, out_norm, 1e-5, dims, x, 0, cos, sin, False, k_cache,
                  v_cache, *scratch, logits)  # fmt: skip
    _decode_layers(blob, table, par, norms, 1e-5, dims, x, 1, cos, sin, False, k_cache, v_cache,
                   *scratch, 0, 1)  # fmt: skip
    _decode_head(blob, table, par, out_norm, 1e-5, x, h, logits)
