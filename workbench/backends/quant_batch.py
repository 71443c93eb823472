"""Batched matrix-vector products on GGUF blocks: several input rows, the weights read once.

`matvec_rows(qtype, raw, x)` computes ``x @ W.T`` for a small batch of rows (the decode step of
2-32 sequences): each weight row is read from memory once and dotted with every input row while
it is in the first-level cache. The common decode types (Q4_0, Q4_1, Q8_0) go further and decode
each block's codes into registers once per group of eight input rows (two rows to a 16-lane
register) or four.

Numerical contract: row i of the result does not depend on the other rows. Every input row goes
through the same float32 operations in the same order whatever the batch holds (the block sums
of its own x, the one-row kernels' partial products and FMAs per block, the same horizontal
sum), only interleaved with the other rows', so row i is bit for bit the result of x[i] alone
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
    _Q4_0_B,
    _Q4_0_QS,
    _Q4_1_B,
    _Q4_1_QS,
    _Q8_0_B,
    _Q8_0_QS,
    _QK4_0,
    _QK4_1,
    _QK8_0,
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
from workbench.backends.quant_simd import (
    _ld_f16_fast,
    _ld_f16x2_fast,
    _vadd,
    _vand,
    _vfma,
    _vhsum,
    _vi2f,
    _vlane,
    _vld_as,
    _vld_f32,
    _vld_i8,
    _vld_u8,
    _vmul,
    _vshr,
    _vsplat,
    _vzero,
    _whsum,
    _wld_i8_twice,
    _wld_u8_twice,
    _wsplat,
    _wzero,
)
from workbench.errors import UserError

Q = GGMLQuantizationType

__all__ = ["MAX_ROWS", "matvec_rows"]

MAX_ROWS = 32  # the batch sizes this is for; more rows are a matrix product (`quant_cpu.matmul`)

# Type codes for the generic driver's dispatch (the gguf enum values).
_T_F32, _T_F16, _T_BF16 = int(Q.F32), int(Q.F16), int(Q.BF16)
_T_Q4_0, _T_Q4_1, _T_Q5_0, _T_Q5_1, _T_Q8_0 = (
    int(Q.Q4_0), int(Q.Q4_1), int(Q.Q5_0), int(Q.Q5_1), int(Q.Q8_0)
)  # fmt: skip
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
# Decode-once kernels. Per block, the codes become float vectors once; then each input row of a
# group of four (or one, for the rest of the batch) takes exactly the one-row kernel's operations
# on them. ``_part_*`` is one input row's (or pair's) share of a block, written once for every
# width.
# ------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _part_nibbles(q0l, q1l, q0h, q1h, x, e, step):
    """One block's sum of codes times x for Q4_0/Q4_1: two chains (lo, hi), as the row kernels.

    8 lanes (one row: x from e, step 8) or 16 (a pair of rows, `batch_layout`'s xp: the paired
    rows from 2 e, step 16): the same operations on every lane whatever the width."""
    lo = _vfma(q1l, _vld_as(q1l, x, e + step), _vmul(q0l, _vld_as(q0l, x, e)))
    hi = _vfma(q1h, _vld_as(q1h, x, e + 3 * step), _vmul(q0h, _vld_as(q0h, x, e + 2 * step)))
    return _vadd(lo, hi)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _q4_1_rows(row, x, xs, i0, w, nb, out, r):
    """out[i0 .. i0+w-1, r] for a Q4_1 row; w is 4 or 1."""
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    m0, m1, m2, m3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for b in range(nb):
        o, e = b * _Q4_1_B, b * _QK4_1
        z0 = _vld_u8(row, o + _Q4_1_QS)
        z1 = _vld_u8(row, o + _Q4_1_QS + 8)
        q0l, q1l = _vi2f(_vand(z0, 15)), _vi2f(_vand(z1, 15))
        q0h, q1h = _vi2f(_vshr(z0, 4)), _vi2f(_vshr(z1, 4))
        d, m = _ld_f16x2_fast(row, o)
        dv = _vsplat(d)
        a0 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0], e, 8), a0)
        m0 += m * xs[i0, b]
        if w == 4:
            a1 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0 + 1], e, 8), a1)
            m1 += m * xs[i0 + 1, b]
            a2 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0 + 2], e, 8), a2)
            m2 += m * xs[i0 + 2, b]
            a3 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0 + 3], e, 8), a3)
            m3 += m * xs[i0 + 3, b]
    out[i0, r] = _vhsum(a0) + m0
    if w == 4:
        out[i0 + 1, r] = _vhsum(a1) + m1
        out[i0 + 2, r] = _vhsum(a2) + m2
        out[i0 + 3, r] = _vhsum(a3) + m3


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _q4_0_rows(row, x, xs, i0, w, nb, out, r):
    """out[i0 .. i0+w-1, r] for a Q4_0 row; w is 4 or 1. The -8 offset: -8 d * xs[b]."""
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for b in range(nb):
        o, e = b * _Q4_0_B, b * _QK4_0
        z0 = _vld_u8(row, o + _Q4_0_QS)
        z1 = _vld_u8(row, o + _Q4_0_QS + 8)
        q0l, q1l = _vi2f(_vand(z0, 15)), _vi2f(_vand(z1, 15))
        q0h, q1h = _vi2f(_vshr(z0, 4)), _vi2f(_vshr(z1, 4))
        d = _ld_f16_fast(row, o)
        dv = _vsplat(d)
        a0 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0], e, 8), a0)
        s0 += d * xs[i0, b]
        if w == 4:
            a1 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0 + 1], e, 8), a1)
            s1 += d * xs[i0 + 1, b]
            a2 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0 + 2], e, 8), a2)
            s2 += d * xs[i0 + 2, b]
            a3 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x[i0 + 3], e, 8), a3)
            s3 += d * xs[i0 + 3, b]
    eight = np.float32(8.0)
    out[i0, r] = _vhsum(a0) - eight * s0
    if w == 4:
        out[i0 + 1, r] = _vhsum(a1) - eight * s1
        out[i0 + 2, r] = _vhsum(a2) - eight * s2
        out[i0 + 3, r] = _vhsum(a3) - eight * s3


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _part_q8(c0, c1, c2, c3, x, e, step):
    """One Q8_0 block's sum of codes times x: two chains, as `_dot_q8_0_row`; one row or a pair
    as `_part_nibbles`."""
    s0 = _vmul(c0, _vld_as(c0, x, e))
    s1 = _vmul(c1, _vld_as(c1, x, e + step))
    s0 = _vfma(c2, _vld_as(c2, x, e + 2 * step), s0)
    s1 = _vfma(c3, _vld_as(c3, x, e + 3 * step), s1)
    return _vadd(s0, s1)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _q8_0_rows(row, x, i0, w, nb, out, r):
    """out[i0 .. i0+w-1, r] for a Q8_0 row; w is 4 or 1."""
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    for b in range(nb):
        o, e = b * _Q8_0_B, b * _QK8_0
        q = o + _Q8_0_QS
        c0, c1 = _vi2f(_vld_i8(row, q)), _vi2f(_vld_i8(row, q + 8))
        c2, c3 = _vi2f(_vld_i8(row, q + 16)), _vi2f(_vld_i8(row, q + 24))
        dv = _vsplat(_ld_f16_fast(row, o))
        a0 = _vfma(dv, _part_q8(c0, c1, c2, c3, x[i0], e, 8), a0)
        if w == 4:
            a1 = _vfma(dv, _part_q8(c0, c1, c2, c3, x[i0 + 1], e, 8), a1)
            a2 = _vfma(dv, _part_q8(c0, c1, c2, c3, x[i0 + 2], e, 8), a2)
            a3 = _vfma(dv, _part_q8(c0, c1, c2, c3, x[i0 + 3], e, 8), a3)
    out[i0, r] = _vhsum(a0)
    if w == 4:
        out[i0 + 1, r] = _vhsum(a1)
        out[i0 + 2, r] = _vhsum(a2)
        out[i0 + 3, r] = _vhsum(a3)


# ------------------------------------------------------------------------------------------------
# Eight input rows at once, two per 16-lane register (`quant_simd`, "Two rows in one register"):
# rows 2p and 2p+1 of x are interleaved in 8-lane pieces (`batch_layout`), and each weight block's
# codes are decoded once into both halves. Every lane takes the operations of the 8-lane kernels
# above, in the same order; the per-row block-offset sums (Q4_1's m, Q4_0's -8 d) run as one
# 8-lane FMA per block, a lane per row, each lane the scalar FMA of the kernels above.
# ------------------------------------------------------------------------------------------------


# A batch's last rows (fewer than eight) run as a group of eight padded with rows of zeros when 3,
# 5, 6 or 7 are left, as one pair (one register per block) when 2 are; four take the four-row
# kernel, one the one-row kernel. One 1536x576 Q4_1 matrix on one core: 3 rows 222 -> 190 us,
# 5 rows 252 -> 198 us, 7 rows 528 -> 206 us; 4 rows 176 us (215 padded); 8 rows 227 us.
_PAIRED = (0, 0, 2, 8, 0, 8, 8, 8)  # by n % 8: how many of the last rows the paired kernels take


@njit(cache=True, nogil=True)
def batch_layout(x):
    """What the grouped kernels read besides x (n, cols): (xs, xst, xp).

    xs (n, cols // 32) the block sums of each row (Q4_0/Q4_1's offsets; Q8_0 does not use
    them). For the paired kernels, which take the first m rows (n rounded down to eight, plus
    `_PAIRED`'s share of the rest; rows past n are zeros): xst (cols // 32, m rounded up to
    eight) the block sums by block, and xp (m // 2, 2 cols) the rows two by two, xp[p] holding
    x[2p, e:e+8] then x[2p+1, e:e+8] for e = 0, 8, 16, ..."""
    n, cols = x.shape
    m = n - n % 8 + _PAIRED[n % 8]
    xs = _row_sums(x, 32)  # (n, cols // 32)
    xst = np.zeros((xs.shape[1], -(-m // 8) * 8), np.float32)  # (cols // 32, m up to eight)
    xp = np.zeros((m // 2, 2 * cols), np.float32)  # (m // 2, 2 cols)
    for i in range(min(n, m)):
        p, half = i // 2, 8 * (i % 2)
        for b in range(xs.shape[1]):
            xst[b, i] = xs[i, b]
        for c in range(0, cols, 8):
            for j in range(8):
                xp[p, 2 * c + half + j] = x[i, c + j]
    return xs, xst, xp


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _wnibbles(row, o):
    """A Q4_0/Q4_1 block's 32 codes at row[o:o+16] as floats, in both halves of four vectors."""
    z0, z1 = _wld_u8_twice(row, o), _wld_u8_twice(row, o + 8)
    return _vi2f(_vand(z0, 15)), _vi2f(_vand(z1, 15)), _vi2f(_vshr(z0, 4)), _vi2f(_vshr(z1, 4))


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _q4_pairs(q4_1, row, xp, xst, i0, pairs, w, nb, out, r):
    """out[i0 .. i0+w-1, r] (w <= 2 pairs) for a Q4_1 (``q4_1`` True) or Q4_0 row, from rows
    i0 .. i0+2 pairs-1 of `batch_layout`'s xp and xst (i0 even); ``pairs`` 4 or 1 (the test
    inside the block loop costs about 1%; two copies of each kernel, one per count, doubled the
    fused step's compile time). The block offsets, one lane per row: Q4_1's m * xs, added;
    Q4_0's d * xs, times -8 (the one-row kernels' arithmetic)."""
    bb, qs = (_Q4_1_B, _Q4_1_QS) if q4_1 else (_Q4_0_B, _Q4_0_QS)
    p, n = i0 // 2, xst.shape[1]
    x0 = x1 = x2 = x3 = xp[p]
    if pairs == 4:
        x1, x2, x3 = xp[p + 1], xp[p + 2], xp[p + 3]
    a0, a1, a2, a3 = _wzero(), _wzero(), _wzero(), _wzero()
    ov = _vzero()  # lane i: row i0+i's sum of offset * xs
    for b in range(nb):
        o, f = b * bb, 2 * b * _QK4_1
        q0l, q1l, q0h, q1h = _wnibbles(row, o + qs)
        if q4_1:
            d, off = _ld_f16x2_fast(row, o)
        else:
            d = _ld_f16_fast(row, o)
            off = d
        dv = _wsplat(d)
        a0 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x0, f, 16), a0)
        if pairs == 4:
            a1 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x1, f, 16), a1)
            a2 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x2, f, 16), a2)
            a3 = _vfma(dv, _part_nibbles(q0l, q1l, q0h, q1h, x3, f, 16), a3)
        ov = _vfma(_vsplat(off), _vld_f32(xst, b * n + i0), ov)
    eight = np.float32(8.0)
    for k, a in enumerate((a0, a1, a2, a3)):
        for h in range(2):
            i = 2 * k + h
            if i < w:
                s = _whsum(a, 0) if h == 0 else _whsum(a, 1)
                out[i0 + i, r] = s + _vlane(ov, i) if q4_1 else s - eight * _vlane(ov, i)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _q8_0_pairs(row, xp, i0, pairs, w, nb, out, r):
    """out[i0 .. i0+w-1, r] for a Q8_0 row, as `_q4_pairs`."""
    p = i0 // 2
    x0 = x1 = x2 = x3 = xp[p]
    if pairs == 4:
        x1, x2, x3 = xp[p + 1], xp[p + 2], xp[p + 3]
    a0, a1, a2, a3 = _wzero(), _wzero(), _wzero(), _wzero()
    for b in range(nb):
        o, f = b * _Q8_0_B, 2 * b * _QK8_0
        q = o + _Q8_0_QS
        c0, c1 = _vi2f(_wld_i8_twice(row, q)), _vi2f(_wld_i8_twice(row, q + 8))
        c2, c3 = _vi2f(_wld_i8_twice(row, q + 16)), _vi2f(_wld_i8_twice(row, q + 24))
        dv = _wsplat(_ld_f16_fast(row, o))
        a0 = _vfma(dv, _part_q8(c0, c1, c2, c3, x0, f, 16), a0)
        if pairs == 4:
            a1 = _vfma(dv, _part_q8(c0, c1, c2, c3, x1, f, 16), a1)
            a2 = _vfma(dv, _part_q8(c0, c1, c2, c3, x2, f, 16), a2)
            a3 = _vfma(dv, _part_q8(c0, c1, c2, c3, x3, f, 16), a3)
    for k, a in enumerate((a0, a1, a2, a3)):
        if 2 * k < w:
            out[i0 + 2 * k, r] = _whsum(a, 0)
        if 2 * k + 1 < w:
            out[i0 + 2 * k + 1, r] = _whsum(a, 1)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _grouped_row(code, row, x, xp, xst, xs, nb, out, r):
    """Every input row against weight row r: groups of eight (two rows per register, the last
    one perhaps padded), a last pair, then fours, then the rest one by one. xs, xst, xp:
    `batch_layout(x)`."""
    n, m = x.shape[0], 2 * xp.shape[0]
    i0 = 0
    while i0 < m:
        pairs = 4 if m - i0 >= 8 else 1
        w = min(2 * pairs, n - i0)
        if code == _T_Q8_0:
            _q8_0_pairs(row, xp, i0, pairs, w, nb, out, r)
        else:
            _q4_pairs(code == _T_Q4_1, row, xp, xst, i0, pairs, w, nb, out, r)
        i0 += 2 * pairs
    while i0 < n:
        w = 4 if n - i0 >= 4 else 1
        if code == _T_Q4_1:
            _q4_1_rows(row, x, xs, i0, w, nb, out, r)
        elif code == _T_Q8_0:
            _q8_0_rows(row, x, i0, w, nb, out, r)
        else:
            _q4_0_rows(row, x, xs, i0, w, nb, out, r)
        i0 += w


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _mvr_grouped(code, raw, x, nb, out, par):
    """out (n, rows) = x (n, cols) @ W.T for Q4_0, Q4_1, Q8_0, decoding each block once per
    group of eight, two or four input rows."""
    xs, xst, xp = batch_layout(x)
    if par:
        for r in prange(raw.shape[0]):
            _grouped_row(code, raw[r], x, xp, xst, xs, nb, out, r)
    else:
        for r in range(raw.shape[0]):
            _grouped_row(code, raw[r], x, xp, xst, xs, nb, out, r)


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
