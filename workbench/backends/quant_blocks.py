"""GGUF block layouts and the per-row kernels that decode or dot one row of blocks.

Each type has ``_deq_<type>_row(row, dst, nb)`` (row bytes -> float32 values) and
``_dot_<type>_row(row, x, xs, nb)`` (sum of the row's values times x). `quant_cpu` drives them over
matrices; `fused_decode` calls the dot kernels inside its one-call decode. Written with the
intrinsics of `quant_simd` (8 lanes; 16 for Q4_0, Q4_1 and Q8_0's dots).

Numerical contracts:

- Dequantization does exactly the float32 operations gguf-py does, in the same order (for
  example ``(d * q) + m`` for Q4_1: a multiply rounded to float32, then an add). The vector
  intrinsics emit plain IEEE ``fmul``/``fadd`` without fast-math flags, so LLVM may not fuse them
  into an FMA, and the dequantization kernels are compiled without ``fastmath``. fp16 scales are
  widened with an exact integer routine that also keeps NaN payloads as NumPy does.
- Dot products accumulate in float32 with FMAs. Q4_0, Q4_1 and Q8_0 (the common decode types)
  decode each block's weights into two 16-lane vectors and FMA them with ``x`` in two chains
  (`_dot_blocks16`), so a batch of input rows shares the decoding and pays only its FMAs. The
  other types, on eight lanes, dot the integer codes with ``x`` first and scale once per block
  (``d * sum(q * x)``); their additive block offsets use the per-block sums of ``x`` that all
  rows share (``m * sum(x)``), computed once per call.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import QK_K
from numba import njit

from workbench.backends.quant_simd import (
    _LANES,
    _ld_bf16,
    _ld_f16,
    _ld_f16_fast,
    _ld_f16x2_fast,
    _ld_f32,
    _ld_u32,
    _vadd,
    _vand,
    _vbits,
    _vbits_to_f32,
    _vf16_exact,
    _vfma,
    _vhsum,
    _vi2f,
    _vld_f16_fast,
    _vld_f32,
    _vld_i8,
    _vld_u8,
    _vld_u16,
    _vmul,
    _vor,
    _vshl,
    _vshr,
    _vsplat,
    _vst,
    _vsub,
    _vsub_i,
    _vzero,
    _wld_f32,
    _wld_i8,
    _wld_u8,
    _wq4_0_weights,
    _wq4_1_weights,
    _wsplat,
    _wzero,
)
from workbench.gguf.quants import block_layout

Q = GGMLQuantizationType

# ------------------------------------------------------------------------------------------------
# Block layouts. Sizes come from gguf's table (`block_layout`); field offsets are derived from the
# field sizes and checked against that table, so a layout change upstream fails at import.
# ------------------------------------------------------------------------------------------------

_F16 = 2  # bytes of one fp16 field (d, m, dmin)
_QH32 = 4  # bytes of the 32 packed high bits of Q5_0 / Q5_1


def _layout(qtype: GGMLQuantizationType, *fields: int) -> tuple[int, int]:
    """(values, bytes) per block of ``qtype``, asserting that ``fields`` add up to the block."""
    values, nbytes = block_layout(qtype)
    assert sum(fields) == nbytes, f"{qtype.name}: fields {fields} do not make a {nbytes}-byte block"
    return values, nbytes


_QK4_0, _Q4_0_B = _layout(Q.Q4_0, _F16, block_layout(Q.Q4_0)[0] // 2)  # d, qs
_Q4_0_QS = _F16

_QK4_1, _Q4_1_B = _layout(Q.Q4_1, _F16, _F16, block_layout(Q.Q4_1)[0] // 2)  # d, m, qs
_Q4_1_M = _F16
_Q4_1_QS = 2 * _F16

_QK5_0, _Q5_0_B = _layout(Q.Q5_0, _F16, _QH32, block_layout(Q.Q5_0)[0] // 2)  # d, qh, qs
_Q5_0_QH = _F16
_Q5_0_QS = _F16 + _QH32

_QK5_1, _Q5_1_B = _layout(Q.Q5_1, _F16, _F16, _QH32, block_layout(Q.Q5_1)[0] // 2)  # d,m,qh,qs
_Q5_1_M = _F16
_Q5_1_QH = 2 * _F16
_Q5_1_QS = 2 * _F16 + _QH32

_QK8_0, _Q8_0_B = _layout(Q.Q8_0, _F16, block_layout(Q.Q8_0)[0])  # d, qs (int8)
_Q8_0_QS = _F16

# The 12-byte packed scales: 8 sub-blocks x (6-bit scale + 6-bit min) for Q4_K/Q5_K, and
# 16 groups x 6-bit scale for Q3_K; both come to 12 bytes.
_K_SCALES = (QK_K // 32) * (6 + 6) // 8
assert _K_SCALES == (QK_K // 16) * 6 // 8

# Q2_K: scales[16] (4-bit scale | 4-bit min per 16 values), qs[64] (2-bit), d, dmin
_Q2_K_QS = QK_K // 16
_Q2_K_D = _Q2_K_QS + QK_K // 4
_Q2_K_DMIN = _Q2_K_D + _F16
_, _Q2_K_B = _layout(Q.Q2_K, QK_K // 16, QK_K // 4, _F16, _F16)

# Q3_K: hmask[32] (bit 3 of each value), qs[64] (low 2 bits), scales[12] (6-bit), d
_Q3_K_QS = QK_K // 8
_Q3_K_SC = _Q3_K_QS + QK_K // 4
_Q3_K_D = _Q3_K_SC + _K_SCALES
_, _Q3_K_B = _layout(Q.Q3_K, QK_K // 8, QK_K // 4, _K_SCALES, _F16)

# Q4_K: d, dmin, scales[12], qs[128]
_Q4_K_DMIN = _F16
_Q4_K_SC = 2 * _F16
_Q4_K_QS = _Q4_K_SC + _K_SCALES
_, _Q4_K_B = _layout(Q.Q4_K, _F16, _F16, _K_SCALES, QK_K // 2)

# Q5_K: d, dmin, scales[12], qh[32] (bit 4 of each value), qs[128]
_Q5_K_DMIN = _F16
_Q5_K_SC = 2 * _F16
_Q5_K_QH = _Q5_K_SC + _K_SCALES
_Q5_K_QS = _Q5_K_QH + QK_K // 8
_, _Q5_K_B = _layout(Q.Q5_K, _F16, _F16, _K_SCALES, QK_K // 8, QK_K // 2)

# Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8 per 16 values), d
_Q6_K_QH = QK_K // 2
_Q6_K_SC = _Q6_K_QH + QK_K // 4
_Q6_K_D = _Q6_K_SC + QK_K // 16
_, _Q6_K_B = _layout(Q.Q6_K, QK_K // 2, QK_K // 4, QK_K // 16, _F16)

# Float "blocks" are single values.
_F32_B = block_layout(Q.F32)[1]
_F16_B = block_layout(Q.F16)[1]
_BF16_B = block_layout(Q.BF16)[1]

# ------------------------------------------------------------------------------------------------
# Shared scalar helpers
# ------------------------------------------------------------------------------------------------


@njit(cache=True)
def _k_scale_min(row, off, j):
    """6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes at row[off] (Q4_K/Q5_K).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low 4 bits of scale (low nibble) and min (high nibble) 4-7.
    """
    if j < 4:
        return row[off + j] & 63, row[off + j + 4] & 63
    sc = (row[off + j + 4] & 15) | ((row[off + j - 4] >> 6) << 4)
    mn = (row[off + j + 4] >> 4) | ((row[off + j] >> 6) << 4)
    return sc, mn


@njit(cache=True)
def _q3_k_scale(row, off, i):
    """Signed 6-bit scale of 16-value group i (0..15) from the 12 packed bytes at row[off] (Q3_K).

    Low 4 bits: bytes 0-7 (groups 0-7 in the low nibbles, 8-15 in the high nibbles); high 2 bits:
    bytes 8-11, four 2-bit fields per byte (group i at byte 8 + i % 4, bits 2 * (i // 4)).
    """
    lo = (row[off + (i & 7)] >> (4 * (i >> 3))) & 15
    hi = (row[off + 8 + (i & 3)] >> (2 * (i >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=True)
def _row_index(ids, i):
    """Source row of output row i: ids[i] for a lookup, i itself for a full dequantization."""
    # int64 on both branches: a prange index may be unsigned, and int64 | uint64 unify to float.
    return ids[i] if ids.shape[0] > 0 else np.int64(i)


@njit(cache=True, fastmath=True)
def _group_sums(x, g):
    """Sums of consecutive groups of g values of x: (cols,) -> (cols // g,) float32.

    Shared by all rows: the block offsets (Q4_1's m, K-quants' mins) multiply sum(x) over the
    block, so it is computed once per call instead of once per row.
    """
    n = x.shape[0] // g
    out = np.empty(n, np.float32)  # (cols // g,)
    for i in range(n):
        s = np.float32(0.0)
        for j in range(g):
            s += x[i * g + j]
        out[i] = s
    return out


# ------------------------------------------------------------------------------------------------
# The dot products of the common decode types (Q4_0, Q4_1, Q8_0) on 16 lanes: each block's 32
# weights become two 16-lane vectors (values 0-15 and 16-31, one AVX-512 register each), then two
# FMA chains per input row, one horizontal sum per row at the end. The weights are decoded once
# however many input rows use them (`quant_batch` shares them out), so the batch kernels' only
# per-row work is the two FMAs, and every row gets the same operations as alone.
# Type codes are the gguf enum values.
# ------------------------------------------------------------------------------------------------

_T_Q4_0, _T_Q4_1, _T_Q8_0 = int(Q.Q4_0), int(Q.Q4_1), int(Q.Q8_0)


@njit(cache=True, fastmath=True, inline="always")
def _block_weights(code, row, b, dm=None):
    """Block b of a Q4_0, Q4_1 or Q8_0 row (``code`` a constant at the call site) as two 16-lane
    float32 vectors, its values 0-15 and 16-31: gguf-py's dequantized values, bit for bit (Q4_1's
    ``d q + m`` is one FMA, but ``d q``, an fp16 scale times a 4-bit code, is exact in float32,
    so there is one rounding either way). A Q4_1 row's d and m come from dm (2 nb,) float32 when
    given (`q4_1_scales`: widened ahead of time, the same values), else from its blocks."""
    if code == _T_Q8_0:
        o = b * _Q8_0_B
        dv = _wsplat(_ld_f16_fast(row, o))
        lo = _vi2f(_wld_i8(row, o + _Q8_0_QS))
        return _vmul(lo, dv), _vmul(_vi2f(_wld_i8(row, o + _Q8_0_QS + 16)), dv)
    if code == _T_Q4_1:
        o = b * _Q4_1_B
        if dm is None:
            d, m = _ld_f16x2_fast(row, o)
        else:
            d, m = dm[2 * b], dm[2 * b + 1]
        return _wq4_1_weights(_wld_u8(row, o + _Q4_1_QS), d, m)
    o = b * _Q4_0_B
    return _wq4_0_weights(_wld_u8(row, o + _Q4_0_QS), _ld_f16_fast(row, o))


@njit(cache=True, fastmath=True, inline="always")
def _dot_blocks16(code, row, x, nb, dm=None):
    """sum(W[row] * x) for a Q4_0, Q4_1 or Q8_0 row of nb blocks: x (nb * 32,); dm as
    `_block_weights`."""
    lo, hi = _wzero(), _wzero()
    for b in range(nb):
        w0, w1 = _block_weights(code, row, b, dm)
        lo = _vfma(w0, _wld_f32(x, 32 * b), lo)
        hi = _vfma(w1, _wld_f32(x, 32 * b + 16), hi)
    return _vhsum(_vadd(lo, hi))


@njit(cache=True, fastmath=True, inline="always")
def _dot_q4_1_split(row, dm, x, nb):
    """`_dot_blocks16` of a Q4_1 row whose block scales were widened ahead of time, dm (2 nb,)
    float32: the same weights and FMAs, so the same bits; a block costs about 1.7 instead of
    2.3-2.5 ns with the weights in cache, as d and m are broadcast straight from memory instead
    of widened and shuffled per block."""
    return _dot_blocks16(_T_Q4_1, row, x, nb, dm)


def q4_1_scales(blocks: np.ndarray) -> np.ndarray:
    """The d and m of Q4_1 blocks (n, 20) uint8 widened to float32: (2 n,), d then m per block,
    as `_dot_q4_1_split` reads them."""
    return blocks[:, : 2 * _F16].copy().view(np.float16).astype(np.float32).reshape(-1)


# ------------------------------------------------------------------------------------------------
# Row kernels. ``_deq_*_row(row, dst, nb)`` decodes one row of nb blocks: row (row_bytes,) uint8
# -> dst (cols,) float32. ``_dot_*_row(row, x, xs, nb)`` returns sum(W[row] * x): x (cols,),
# xs the group sums of x the type needs (else unused). Value v of a block lives in lane v % 8 of
# vector v // 8; every format below keeps 8 consecutive values in 8 consecutive bytes.
# ------------------------------------------------------------------------------------------------


# Q4_0: value j < 16 is the low nibble of qs[j], value j + 16 its high nibble; w = d * (q - 8).
@njit(cache=True)
def _deq_q4_0_row(row, dst, nb):
    for b in range(nb):
        o, e = b * _Q4_0_B, b * _QK4_0
        d = _vsplat(_ld_f16(row, o))
        for h in range(2):
            z = _vld_u8(row, o + _Q4_0_QS + 8 * h)
            _vst(dst, e + 8 * h, _vmul(d, _vi2f(_vsub_i(_vand(z, 15), 8))))
            _vst(dst, e + 16 + 8 * h, _vmul(d, _vi2f(_vsub_i(_vshr(z, 4), 8))))


@njit(cache=True, fastmath=True)
def _dot_q4_0_row(row, x, xs, nb):
    return _dot_blocks16(_T_Q4_0, row, x, nb)


# Q4_1: nibbles as Q4_0, unsigned; w = d * q + m.
@njit(cache=True)
def _deq_q4_1_row(row, dst, nb):
    for b in range(nb):
        o, e = b * _Q4_1_B, b * _QK4_1
        d = _vsplat(_ld_f16(row, o))
        m = _vsplat(_ld_f16(row, o + _Q4_1_M))
        for h in range(2):
            z = _vld_u8(row, o + _Q4_1_QS + 8 * h)
            _vst(dst, e + 8 * h, _vadd(_vmul(d, _vi2f(_vand(z, 15))), m))
            _vst(dst, e + 16 + 8 * h, _vadd(_vmul(d, _vi2f(_vshr(z, 4))), m))


@njit(cache=True, fastmath=True)
def _dot_q4_1_row(row, x, xs, nb):
    return _dot_blocks16(_T_Q4_1, row, x, nb)


# Q5_0: Q4_0's nibbles plus bit j of the 32-bit qh as bit 4 of value j; w = d * (q - 16).
@njit(cache=True)
def _deq_q5_0_row(row, dst, nb):
    for b in range(nb):
        o, e = b * _Q5_0_B, b * _QK5_0
        d = _vsplat(_ld_f16(row, o))
        qh = _ld_u32(row, o + _Q5_0_QH)
        for h in range(2):
            z = _vld_u8(row, o + _Q5_0_QS + 8 * h)
            lo = _vor(_vand(z, 15), _vshl(_vbits(qh, 8 * h), 4))
            hi = _vor(_vshr(z, 4), _vshl(_vbits(qh, 16 + 8 * h), 4))
            _vst(dst, e + 8 * h, _vmul(d, _vi2f(_vsub_i(lo, 16))))
            _vst(dst, e + 16 + 8 * h, _vmul(d, _vi2f(_vsub_i(hi, 16))))


@njit(cache=True, fastmath=True)
def _dot_q5_0_row(row, x, xs, nb):
    # As Q4_0: the -16 offset becomes -16 d * xs[b].
    acc = _vzero()
    dsum = np.float32(0.0)
    for b in range(nb):
        o, e = b * _Q5_0_B, b * _QK5_0
        qh = _ld_u32(row, o + _Q5_0_QH)
        s = _vzero()
        for h in range(2):
            z = _vld_u8(row, o + _Q5_0_QS + 8 * h)
            lo = _vor(_vand(z, 15), _vshl(_vbits(qh, 8 * h), 4))
            hi = _vor(_vshr(z, 4), _vshl(_vbits(qh, 16 + 8 * h), 4))
            s = _vfma(_vi2f(lo), _vld_f32(x, e + 8 * h), s)
            s = _vfma(_vi2f(hi), _vld_f32(x, e + 16 + 8 * h), s)
        d = _ld_f16_fast(row, o)
        acc = _vfma(_vsplat(d), s, acc)
        dsum += d * xs[b]
    return _vhsum(acc) - np.float32(16.0) * dsum


# Q5_1: Q5_0's codes, unsigned; w = d * q + m.
@njit(cache=True)
def _deq_q5_1_row(row, dst, nb):
    for b in range(nb):
        o, e = b * _Q5_1_B, b * _QK5_1
        d = _vsplat(_ld_f16(row, o))
        m = _vsplat(_ld_f16(row, o + _Q5_1_M))
        qh = _ld_u32(row, o + _Q5_1_QH)
        for h in range(2):
            z = _vld_u8(row, o + _Q5_1_QS + 8 * h)
            lo = _vor(_vand(z, 15), _vshl(_vbits(qh, 8 * h), 4))
            hi = _vor(_vshr(z, 4), _vshl(_vbits(qh, 16 + 8 * h), 4))
            _vst(dst, e + 8 * h, _vadd(_vmul(d, _vi2f(lo)), m))
            _vst(dst, e + 16 + 8 * h, _vadd(_vmul(d, _vi2f(hi)), m))


@njit(cache=True, fastmath=True)
def _dot_q5_1_row(row, x, xs, nb):
    acc = _vzero()
    macc = np.float32(0.0)
    for b in range(nb):
        o, e = b * _Q5_1_B, b * _QK5_1
        qh = _ld_u32(row, o + _Q5_1_QH)
        s = _vzero()
        for h in range(2):
            z = _vld_u8(row, o + _Q5_1_QS + 8 * h)
            lo = _vor(_vand(z, 15), _vshl(_vbits(qh, 8 * h), 4))
            hi = _vor(_vshr(z, 4), _vshl(_vbits(qh, 16 + 8 * h), 4))
            s = _vfma(_vi2f(lo), _vld_f32(x, e + 8 * h), s)
            s = _vfma(_vi2f(hi), _vld_f32(x, e + 16 + 8 * h), s)
        d, m = _ld_f16x2_fast(row, o)
        acc = _vfma(_vsplat(d), s, acc)
        macc += m * xs[b]
    return _vhsum(acc) + macc


# Q8_0: 32 int8 codes; w = q * d.
@njit(cache=True)
def _deq_q8_0_row(row, dst, nb):
    for b in range(nb):
        o, e = b * _Q8_0_B, b * _QK8_0
        d = _vsplat(_ld_f16(row, o))
        for h in range(4):
            _vst(dst, e + 8 * h, _vmul(_vi2f(_vld_i8(row, o + _Q8_0_QS + 8 * h)), d))


@njit(cache=True, fastmath=True)
def _dot_q8_0_row(row, x, xs, nb):
    return _dot_blocks16(_T_Q8_0, row, x, nb)


# Q2_K: 256 values in two halves of 128; within a half, 2-bit field k (bits 2k..2k+1) of
# qs[l] is value 32 k + l. Group i of 16 values has scale scales[i] & 15 and min scales[i] >> 4;
# w = (d * sc) * q - (dmin * mn).
@njit(cache=True)
def _deq_q2_k_row(row, dst, nb):
    for b in range(nb):
        o, eb = b * _Q2_K_B, b * QK_K
        d = _ld_f16(row, o + _Q2_K_D)
        dmin = _ld_f16(row, o + _Q2_K_DMIN)
        for half in range(2):
            for k in range(4):
                for g in range(2):
                    sc = row[o + half * 8 + k * 2 + g]
                    dl = _vsplat(d * np.float32(sc & 15))
                    ml = _vsplat(dmin * np.float32(sc >> 4))
                    for v in range(2):
                        lane = g * 16 + v * 8
                        z = _vld_u8(row, o + _Q2_K_QS + half * 32 + lane)
                        q = _vi2f(_vand(_vshr(z, 2 * k), 3))
                        _vst(dst, eb + half * 128 + k * 32 + lane, _vsub(_vmul(dl, q), ml))


@njit(cache=True, fastmath=True)
def _dot_q2_k_row(row, x, xs, nb):
    acc = _vzero()
    macc = np.float32(0.0)
    for b in range(nb):
        o, eb = b * _Q2_K_B, b * QK_K
        d, dmin = _ld_f16x2_fast(row, o + _Q2_K_D)
        for half in range(2):
            for k in range(4):
                for g in range(2):
                    i = half * 8 + k * 2 + g
                    sc = row[o + i]
                    s = _vzero()
                    for v in range(2):
                        lane = g * 16 + v * 8
                        z = _vld_u8(row, o + _Q2_K_QS + half * 32 + lane)
                        q = _vi2f(_vand(_vshr(z, 2 * k), 3))
                        s = _vfma(q, _vld_f32(x, eb + half * 128 + k * 32 + lane), s)
                    acc = _vfma(_vsplat(d * np.float32(sc & 15)), s, acc)
                    macc += dmin * np.float32(sc >> 4) * xs[b * 16 + i]
    return _vhsum(acc) - macc


# Q3_K: Q2_K's 2-bit layout plus bit (4 half + k) of hmask[l]; the code is q - 4 when that bit
# is clear. Group i of 16 values has a signed 6-bit scale; w = (d * scale) * code.
@njit(cache=True)
def _deq_q3_k_row(row, dst, nb):
    for b in range(nb):
        o, eb = b * _Q3_K_B, b * QK_K
        d = _ld_f16(row, o + _Q3_K_D)
        for half in range(2):
            for k in range(4):
                for g in range(2):
                    dl = _vsplat(
                        d * np.float32(_q3_k_scale(row, o + _Q3_K_SC, half * 8 + k * 2 + g))
                    )
                    for v in range(2):
                        lane = g * 16 + v * 8
                        z = _vld_u8(row, o + _Q3_K_QS + half * 32 + lane)
                        hm = _vld_u8(row, o + lane)
                        q = _vor(
                            _vand(_vshr(z, 2 * k), 3), _vshl(_vand(_vshr(hm, half * 4 + k), 1), 2)
                        )
                        _vst(dst, eb + half * 128 + k * 32 + lane, _vmul(dl, _vi2f(_vsub_i(q, 4))))


@njit(cache=True, fastmath=True)
def _dot_q3_k_row(row, x, xs, nb):
    acc = _vzero()
    for b in range(nb):
        o, eb = b * _Q3_K_B, b * QK_K
        d = _ld_f16_fast(row, o + _Q3_K_D)
        for half in range(2):
            for k in range(4):
                for g in range(2):
                    s = _vzero()
                    for v in range(2):
                        lane = g * 16 + v * 8
                        z = _vld_u8(row, o + _Q3_K_QS + half * 32 + lane)
                        hm = _vld_u8(row, o + lane)
                        q = _vor(
                            _vand(_vshr(z, 2 * k), 3), _vshl(_vand(_vshr(hm, half * 4 + k), 1), 2)
                        )
                        s = _vfma(
                            _vi2f(_vsub_i(q, 4)), _vld_f32(x, eb + half * 128 + k * 32 + lane), s
                        )
                    sc = _q3_k_scale(row, o + _Q3_K_SC, half * 8 + k * 2 + g)
                    acc = _vfma(_vsplat(d * np.float32(sc)), s, acc)
    return _vhsum(acc)


# Q4_K: 4 chunks of 64 values; in chunk c the low nibbles of qs[32c : 32c + 32] are sub-block
# 2c and the high nibbles sub-block 2c + 1. w = (d * sc) * q - (dmin * mn).
@njit(cache=True)
def _deq_q4_k_row(row, dst, nb):
    for b in range(nb):
        o, eb = b * _Q4_K_B, b * QK_K
        d = _ld_f16(row, o)
        dmin = _ld_f16(row, o + _Q4_K_DMIN)
        for c in range(4):
            for nib in range(2):
                sc, mn = _k_scale_min(row, o + _Q4_K_SC, 2 * c + nib)
                dl = _vsplat(d * np.float32(sc))
                ml = _vsplat(dmin * np.float32(mn))
                for v in range(4):
                    z = _vld_u8(row, o + _Q4_K_QS + c * 32 + v * 8)
                    q = _vi2f(_vand(_vshr(z, 4 * nib), 15))
                    _vst(dst, eb + c * 64 + nib * 32 + v * 8, _vsub(_vmul(dl, q), ml))


@njit(cache=True, fastmath=True)
def _dot_q4_k_row(row, x, xs, nb):
    acc = _vzero()
    macc = np.float32(0.0)
    for b in range(nb):
        o, eb = b * _Q4_K_B, b * QK_K
        d, dmin = _ld_f16x2_fast(row, o)
        for c in range(4):
            for nib in range(2):
                sc, mn = _k_scale_min(row, o + _Q4_K_SC, 2 * c + nib)
                s = _vzero()
                for v in range(4):
                    z = _vld_u8(row, o + _Q4_K_QS + c * 32 + v * 8)
                    q = _vi2f(_vand(_vshr(z, 4 * nib), 15))
                    s = _vfma(q, _vld_f32(x, eb + c * 64 + nib * 32 + v * 8), s)
                acc = _vfma(_vsplat(d * np.float32(sc)), s, acc)
                macc += dmin * np.float32(mn) * xs[b * 8 + 2 * c + nib]
    return _vhsum(acc) - macc


# Q5_K: Q4_K plus bit j of qh[l] as bit 4 of value 32 j + l.
@njit(cache=True)
def _deq_q5_k_row(row, dst, nb):
    for b in range(nb):
        o, eb = b * _Q5_K_B, b * QK_K
        d = _ld_f16(row, o)
        dmin = _ld_f16(row, o + _Q5_K_DMIN)
        for c in range(4):
            for nib in range(2):
                j = 2 * c + nib
                sc, mn = _k_scale_min(row, o + _Q5_K_SC, j)
                dl = _vsplat(d * np.float32(sc))
                ml = _vsplat(dmin * np.float32(mn))
                for v in range(4):
                    z = _vld_u8(row, o + _Q5_K_QS + c * 32 + v * 8)
                    hb = _vand(_vshr(_vld_u8(row, o + _Q5_K_QH + v * 8), j), 1)
                    q = _vi2f(_vor(_vand(_vshr(z, 4 * nib), 15), _vshl(hb, 4)))
                    _vst(dst, eb + j * 32 + v * 8, _vsub(_vmul(dl, q), ml))


@njit(cache=True, fastmath=True)
def _dot_q5_k_row(row, x, xs, nb):
    acc = _vzero()
    macc = np.float32(0.0)
    for b in range(nb):
        o, eb = b * _Q5_K_B, b * QK_K
        d, dmin = _ld_f16x2_fast(row, o)
        for c in range(4):
            for nib in range(2):
                j = 2 * c + nib
                sc, mn = _k_scale_min(row, o + _Q5_K_SC, j)
                s = _vzero()
                for v in range(4):
                    z = _vld_u8(row, o + _Q5_K_QS + c * 32 + v * 8)
                    hb = _vand(_vshr(_vld_u8(row, o + _Q5_K_QH + v * 8), j), 1)
                    q = _vi2f(_vor(_vand(_vshr(z, 4 * nib), 15), _vshl(hb, 4)))
                    s = _vfma(q, _vld_f32(x, eb + j * 32 + v * 8), s)
                acc = _vfma(_vsplat(d * np.float32(sc)), s, acc)
                macc += dmin * np.float32(mn) * xs[b * 8 + j]
    return _vhsum(acc) - macc


# Q6_K: two halves of 128 values; in half h, value 32 k + l (k < 4, l < 32) has its low 4 bits
# in nibble k // 2 of ql[64 h + 32 (k % 2) + l] and its high 2 bits in bits 2k of qh[32 h + l].
# Group i of 16 values has an int8 scale; w = (d * scale) * (q - 32).
@njit(cache=True)
def _deq_q6_k_row(row, dst, nb):
    for b in range(nb):
        o, eb = b * _Q6_K_B, b * QK_K
        d = _ld_f16(row, o + _Q6_K_D)
        for half in range(2):
            for k in range(4):
                for g in range(2):
                    sc = row[o + _Q6_K_SC + half * 8 + k * 2 + g]
                    dl = _vsplat(d * np.float32(sc - 256 if sc >= 128 else sc))
                    for v in range(2):
                        lane = g * 16 + v * 8
                        zl = _vld_u8(row, o + half * 64 + (k & 1) * 32 + lane)
                        zh = _vld_u8(row, o + _Q6_K_QH + half * 32 + lane)
                        q = _vor(
                            _vand(_vshr(zl, 4 * (k >> 1)), 15), _vshl(_vand(_vshr(zh, 2 * k), 3), 4)
                        )
                        _vst(dst, eb + half * 128 + k * 32 + lane, _vmul(dl, _vi2f(_vsub_i(q, 32))))


@njit(cache=True, fastmath=True)
def _dot_q6_k_row(row, x, xs, nb):
    acc = _vzero()
    for b in range(nb):
        o, eb = b * _Q6_K_B, b * QK_K
        d = _ld_f16_fast(row, o + _Q6_K_D)
        for half in range(2):
            for k in range(4):
                for g in range(2):
                    s = _vzero()
                    for v in range(2):
                        lane = g * 16 + v * 8
                        zl = _vld_u8(row, o + half * 64 + (k & 1) * 32 + lane)
                        zh = _vld_u8(row, o + _Q6_K_QH + half * 32 + lane)
                        q = _vor(
                            _vand(_vshr(zl, 4 * (k >> 1)), 15), _vshl(_vand(_vshr(zh, 2 * k), 3), 4)
                        )
                        s = _vfma(
                            _vi2f(_vsub_i(q, 32)), _vld_f32(x, eb + half * 128 + k * 32 + lane), s
                        )
                    sc = row[o + _Q6_K_SC + half * 8 + k * 2 + g]
                    acc = _vfma(_vsplat(d * np.float32(sc - 256 if sc >= 128 else sc)), s, acc)
    return _vhsum(acc)


# Float types: "nb" is the number of values; the last cols % 8 are done one at a time.
@njit(cache=True)
def _deq_f32_row(row, dst, n):
    n8 = n - n % _LANES
    for e in range(0, n8, _LANES):
        _vst(dst, e, _vld_f32(row, e * _F32_B))
    for e in range(n8, n):
        dst[e] = _ld_f32(row, e * _F32_B)


@njit(cache=True, fastmath=True)
def _dot_f32_row(row, x, xs, n):
    # Four accumulators: one FMA chain would wait on its own latency at every step.
    n32, n8 = n - n % (4 * _LANES), n - n % _LANES
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    for e in range(0, n32, 4 * _LANES):
        a0 = _vfma(_vld_f32(row, e * _F32_B), _vld_f32(x, e), a0)
        a1 = _vfma(_vld_f32(row, (e + 8) * _F32_B), _vld_f32(x, e + 8), a1)
        a2 = _vfma(_vld_f32(row, (e + 16) * _F32_B), _vld_f32(x, e + 16), a2)
        a3 = _vfma(_vld_f32(row, (e + 24) * _F32_B), _vld_f32(x, e + 24), a3)
    acc = _vadd(_vadd(a0, a1), _vadd(a2, a3))
    for e in range(n32, n8, _LANES):
        acc = _vfma(_vld_f32(row, e * _F32_B), _vld_f32(x, e), acc)
    s = _vhsum(acc)
    for e in range(n8, n):
        s += _ld_f32(row, e * _F32_B) * x[e]
    return s


@njit(cache=True)
def _deq_f16_row(row, dst, n):
    n8 = n - n % _LANES
    for e in range(0, n8, _LANES):
        _vst(dst, e, _vf16_exact(_vld_u16(row, e * _F16_B)))
    for e in range(n8, n):
        dst[e] = _ld_f16(row, e * _F16_B)


@njit(cache=True, fastmath=True)
def _dot_f16_row(row, x, xs, n):
    n32, n8 = n - n % (4 * _LANES), n - n % _LANES
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    for e in range(0, n32, 4 * _LANES):
        a0 = _vfma(_vld_f16_fast(row, e * _F16_B), _vld_f32(x, e), a0)
        a1 = _vfma(_vld_f16_fast(row, (e + 8) * _F16_B), _vld_f32(x, e + 8), a1)
        a2 = _vfma(_vld_f16_fast(row, (e + 16) * _F16_B), _vld_f32(x, e + 16), a2)
        a3 = _vfma(_vld_f16_fast(row, (e + 24) * _F16_B), _vld_f32(x, e + 24), a3)
    acc = _vadd(_vadd(a0, a1), _vadd(a2, a3))
    for e in range(n32, n8, _LANES):
        acc = _vfma(_vld_f16_fast(row, e * _F16_B), _vld_f32(x, e), acc)
    s = _vhsum(acc)
    for e in range(n8, n):
        s += _ld_f16_fast(row, e * _F16_B) * x[e]
    return s


@njit(cache=True)
def _bf16_at(row, e):
    """Value e of a BF16 row: its 16 bits become the top half of a float32."""
    return _vbits_to_f32(_vshl(_vld_u16(row, e * _BF16_B), 16))


@njit(cache=True)
def _deq_bf16_row(row, dst, n):
    n8 = n - n % _LANES
    for e in range(0, n8, _LANES):
        _vst(dst, e, _bf16_at(row, e))
    for e in range(n8, n):
        dst[e] = _ld_bf16(row, e * _BF16_B)


@njit(cache=True, fastmath=True)
def _dot_bf16_row(row, x, xs, n):
    n32, n8 = n - n % (4 * _LANES), n - n % _LANES
    a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
    for e in range(0, n32, 4 * _LANES):
        a0 = _vfma(_bf16_at(row, e), _vld_f32(x, e), a0)
        a1 = _vfma(_bf16_at(row, e + 8), _vld_f32(x, e + 8), a1)
        a2 = _vfma(_bf16_at(row, e + 16), _vld_f32(x, e + 16), a2)
        a3 = _vfma(_bf16_at(row, e + 24), _vld_f32(x, e + 24), a3)
    acc = _vadd(_vadd(a0, a1), _vadd(a2, a3))
    for e in range(n32, n8, _LANES):
        acc = _vfma(_bf16_at(row, e), _vld_f32(x, e), acc)
    s = _vhsum(acc)
    for e in range(n8, n):
        s += _ld_bf16(row, e * _BF16_B) * x[e]
    return s
