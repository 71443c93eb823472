"""Batched matrix-vector products on GGUF blocks: several input rows, the weights read once.

`matvec_rows(qtype, raw, x)` computes ``x @ W.T`` for a small batch of rows (the decode step of
2-32 sequences): each weight row is read from memory once and dotted with every input row while
it is in the first-level cache. The common decode types (Q4_0, Q4_1, Q8_0) go further and decode
each block's weights into registers once per group of eight input rows (or four).

Numerical contract: row i of the result does not depend on the other rows. Every input row goes
through the same float32 operations in the same order whatever the batch holds (the one-row
kernels' FMAs per block, the same horizontal sum; for the other types also the block sums of
its own x), only interleaved with the other rows', so row i is bit for bit the result of x[i] alone
(``matvec_rows(qtype, raw, x[i:i+1])``) and a sequence's greedy tokens do not depend on who it is
batched with. Against `quant_cpu.matvec` of the same row the results agree to float32 rounding:
they are the same operations, but compiled in another context LLVM may reassociate the scalar
block-offset sums of fast-math code differently (bit-equal in tests for Q4_0, Q4_1, Q8_0 and the
float types, not for Q4_K). `tests/test_quant_batch.py` checks both, for every type.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import QK_K
from numba import njit, prange

from workbench.backends import quant_cpu
from workbench.backends.quant_blocks import (
    _T_Q4_0,
    _T_Q4_1,
    _T_Q8_0,
    _block_weights,
    _dot_bf16_row,
    _dot_blocks16,
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
from workbench.backends.quant_simd import _vadd, _vfma, _vhsum, _wld_f32, _wzero
from workbench.errors import UserError

Q = GGMLQuantizationType

__all__ = ["MAX_ROWS", "matvec_rows"]

MAX_ROWS = 32  # the batch sizes this is for; more rows are a matrix product (`quant_cpu.matmul`)

# Type codes for the generic driver's dispatch (the gguf enum values).
_T_F32, _T_F16, _T_BF16 = int(Q.F32), int(Q.F16), int(Q.BF16)
_T_Q5_0, _T_Q5_1 = int(Q.Q5_0), int(Q.Q5_1)  # Q4_0, Q4_1, Q8_0: `quant_blocks`
_T_Q2_K, _T_Q3_K, _T_Q4_K, _T_Q5_K, _T_Q6_K = (
    int(Q.Q2_K), int(Q.Q3_K), int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)
)  # fmt: skip


@njit(cache=True, nogil=True)
def _row_sums(x, g):
    """`_group_sums` of every row of x: (n, cols) -> (n, cols // g), each row as the one-row
    drivers compute it."""
    out = np.empty((x.shape[0], x.shape[1] // g), np.float32)  # (n, cols // g)
    for i in range(x.shape[0]):
        out[i] = _group_sums(x[i], g)
    return out


# ------------------------------------------------------------------------------------------------
# The generic driver: each weight row once from memory, then every input row through the type's
# one-row kernel (the row stays in L1 between them).
# ------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _dot_row(code, row, x, xs32, xs16, nb):
    """sum(W[row] * x) through ``code``'s one-row kernel, with the block sums `quant_cpu`'s
    drivers pass it (xs32 for Q4_*, Q5_*, Q4_K, Q5_K; xs16 for Q2_K; x where unused)."""
    if code == _T_Q4_1:
        return _dot_q4_1_row(row, x, xs32, nb)
    if code == _T_Q8_0:
        return _dot_q8_0_row(row, x, x, nb)
    if code == _T_Q4_0:
        return _dot_q4_0_row(row, x, xs32, nb)
    if code == _T_Q5_0:
        return _dot_q5_0_row(row, x, xs32, nb)
    if code == _T_Q5_1:
        return _dot_q5_1_row(row, x, xs32, nb)
    if code == _T_Q2_K:
        return _dot_q2_k_row(row, x, xs16, nb)
    if code == _T_Q3_K:
        return _dot_q3_k_row(row, x, x, nb)
    if code == _T_Q4_K:
        return _dot_q4_k_row(row, x, xs32, nb)
    if code == _T_Q5_K:
        return _dot_q5_k_row(row, x, xs32, nb)
    if code == _T_Q6_K:
        return _dot_q6_k_row(row, x, x, nb)
    if code == _T_F16:
        return _dot_f16_row(row, x, x, nb)
    if code == _T_BF16:
        return _dot_bf16_row(row, x, x, nb)
    return _dot_f32_row(row, x, x, nb)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _mvr_generic(code, raw, x, nb, out, par):
    """out (n, rows) = x (n, cols) @ W.T, every row of x through the one-row kernel."""
    xs32 = _row_sums(x, 32)  # (n, cols // 32)
    xs16 = _row_sums(x, QK_K // 16)  # (n, cols // 16)
    n = x.shape[0]
    if par:
        for r in prange(raw.shape[0]):
            for i in range(n):
                out[i, r] = _dot_row(code, raw[r], x[i], xs32[i], xs16[i], nb)
    else:
        for r in range(raw.shape[0]):
            for i in range(n):
                out[i, r] = _dot_row(code, raw[r], x[i], xs32[i], xs16[i], nb)


# ------------------------------------------------------------------------------------------------
# Decode-once kernels for Q4_0, Q4_1 and Q8_0: each block's weights become two 16-lane vectors
# once (`quant_blocks._block_weights`), then every input row of a group of eight (or four) takes
# its two FMAs, exactly the one-row kernel's (`quant_blocks._dot_blocks16`).
# ------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _fma2(w0, w1, x, e, lo, hi):
    """One input row's share of a block: its two FMA chains, as `_dot_blocks16`."""
    return _vfma(w0, _wld_f32(x, e), lo), _vfma(w1, _wld_f32(x, e + 16), hi)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _rows_group(code, row, x, i0, g, nb, out, r):
    """out[i0 .. i0+g-1, r] (rows up to n - 1) for weight row ``row`` of type ``code``; g is 8
    or 4. A group that runs past the last input row reads that row again for the missing ones
    and does not write them (the rest of a batch: 5-7 rows take a group of eight, 2-3 one of
    four)."""
    n = x.shape[0]
    last = n - 1
    x0, x1, x2, x3 = x[i0], x[min(i0 + 1, last)], x[min(i0 + 2, last)], x[min(i0 + 3, last)]
    x4 = x5 = x6 = x7 = x0
    if g == 8:
        x4, x5 = x[min(i0 + 4, last)], x[min(i0 + 5, last)]
        x6, x7 = x[min(i0 + 6, last)], x[min(i0 + 7, last)]
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = _wzero()  # (16,) chains of values 0-15, per row
    h0 = h1 = h2 = h3 = h4 = h5 = h6 = h7 = _wzero()  # (16,) and of values 16-31
    for b in range(nb):
        w0, w1 = _block_weights(code, row, b)
        e = 32 * b
        l0, h0 = _fma2(w0, w1, x0, e, l0, h0)
        l1, h1 = _fma2(w0, w1, x1, e, l1, h1)
        l2, h2 = _fma2(w0, w1, x2, e, l2, h2)
        l3, h3 = _fma2(w0, w1, x3, e, l3, h3)
        if g == 8:  # a test per block (about 1% in earlier kernels); a copy per g: compile time
            l4, h4 = _fma2(w0, w1, x4, e, l4, h4)
            l5, h5 = _fma2(w0, w1, x5, e, l5, h5)
            l6, h6 = _fma2(w0, w1, x6, e, l6, h6)
            l7, h7 = _fma2(w0, w1, x7, e, l7, h7)
    chains = ((l0, h0), (l1, h1), (l2, h2), (l3, h3), (l4, h4), (l5, h5), (l6, h6), (l7, h7))
    for k, (lo, hi) in enumerate(chains):
        if k < g and i0 + k < n:
            out[i0 + k, r] = _vhsum(_vadd(lo, hi))


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _grouped_row(code, row, x, nb, out, r):
    """Every input row of x (n, cols) against weight row r: groups of eight, the rest as one
    group (of eight or four) or, a single row left, the one-row kernel."""
    n = x.shape[0]
    i0 = 0
    while i0 < n:
        left = n - i0
        if left == 1:
            out[i0, r] = _dot_blocks16(code, row, x[i0], nb)
            i0 += 1
        else:
            g = 8 if left > 4 else 4
            _rows_group(code, row, x, i0, g, nb, out, r)
            i0 += g


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _mvr_grouped(code, raw, x, nb, out, par):
    """out (n, rows) = x (n, cols) @ W.T for Q4_0, Q4_1, Q8_0, decoding each block once per
    group of eight or four input rows."""
    if par:
        for r in prange(raw.shape[0]):
            _grouped_row(code, raw[r], x, nb, out, r)
    else:
        for r in range(raw.shape[0]):
            _grouped_row(code, raw[r], x, nb, out, r)


_GROUPED = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0})


def matvec_rows(
    qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``x @ W.T`` for a few rows: raw (rows, row_bytes) uint8, x (n, cols) -> (n, rows) float32.

    Row i of the result is bit for bit that of x[i] alone, whatever the other rows (see the
    module docstring); the weights are read once for all n rows. Meant for n up to `MAX_ROWS`
    (any n works)."""
    k = quant_cpu._kernels(qtype)
    raw, cols = quant_cpu._matrix("matvec_rows", k, raw)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cols:
        raise UserError(
            "user.bad_shape",
            f"matvec_rows: x must be (n, {cols}) for a {k.qtype.name} matrix of "
            f"{raw.shape[0]}x{cols}, got {x.shape}",
            op="matvec_rows",
            got=x.shape,
        )
    out = quant_cpu._output("matvec_rows", out, (x.shape[0], raw.shape[0]))
    if x.shape[0] == 0 or raw.shape[0] == 0:
        return out
    x = quant_cpu._f32(x)
    nb = raw.shape[1] // k.nbytes if k.values > 1 else cols
    par = raw.nbytes * x.shape[0] >= quant_cpu._PAR_MIN_BYTES
    if qtype in _GROUPED:
        _mvr_grouped(int(qtype), raw, x, nb, out, par)
    else:
        _mvr_generic(int(qtype), raw, x, nb, out, par)
    return out
