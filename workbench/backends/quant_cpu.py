"""CPU compute core of the NumPy backend: numba kernels over GGUF quantized blocks.

Four operations, every type in `SUPPORTED_TYPES`:

- `dequantize`: block bytes -> float32, bit-identical to ``gguf.quants.dequantize``.
- `matvec`: ``W @ x`` computed on the blocks (each block is decoded in registers and dotted with
  ``x`` at once; the float32 matrix never exists). This is the decode hot path.
- `matmul`: ``x @ W.T`` for several rows of ``x`` (prefill): dequantizes a bounded chunk of ``W``
  at a time into a scratch buffer and hands each chunk to BLAS.
- `get_rows`: embedding lookup, dequantizing only the requested rows.

Why explicit SIMD. LLVM's auto-vectoriser does badly on block formats: the 16-byte nibble loops
are fully unrolled before the loop vectoriser sees them, after which it either vectorises the
*block* loop (a gather per byte) or gives up because it cannot prove the output does not alias
the input; such loops run at under 1 GB/s. So the kernels here are written with a handful of
8-lane vector operations (`_vld_u8`, `_vfma`, ...): numba intrinsics that emit LLVM vector IR
directly. The kernel code stays plain numba; only the lane-wise arithmetic is spelled out. Eight
float32 lanes are one AVX2 register; without AVX2, LLVM splits each operation into SSE halves.

Numerical contracts:

- Dequantization does exactly the float32 operations gguf-py does, in the same order (for
  example ``(d * q) + m`` for Q4_1: a multiply rounded to float32, then an add). The vector
  intrinsics emit plain IEEE ``fmul``/``fadd`` without fast-math flags, so LLVM may not fuse them
  into an FMA, and the drivers are compiled without ``fastmath``. fp16 scales are widened with an
  exact integer routine that also keeps NaN payloads as NumPy does.
- Dot products accumulate in float32 with FMAs in eight lanes. Per block the integer codes are
  dotted with ``x`` first and scaled once (``d * sum(q * x)``); additive block offsets use the
  per-block sums of ``x`` that all rows share (``m * sum(x)``), computed once per call.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import QK_K
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, models, register_model

from workbench.errors import ModelError, UserError
from workbench.gguf.quants import SUPPORTED_TYPES, block_layout

Q = GGMLQuantizationType

__all__ = [
    "default_threads", "dequantize", "get_rows", "get_threads", "matmul", "matvec",
    "physical_cores", "set_threads",
]  # fmt: skip

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
# 8-lane SIMD intrinsics. Offsets are in elements of the array they index (bytes for the uint8
# block rows). Loads are unaligned; nothing is bounds-checked, callers stay inside their rows.
# ------------------------------------------------------------------------------------------------

_LANES = 8
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_VI32 = ir.VectorType(_I32, _LANES)
_VF32 = ir.VectorType(_F32, _LANES)


class _Vec(types.Type):
    """An LLVM <8 x i32> or <8 x float> value held in a numba local (a register after mem2reg)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(name=f"{kind}x{_LANES}")


_f32x8 = _Vec("f32")
_i32x8 = _Vec("i32")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF32 if fe_type.kind == "f32" else _VI32)


def _ptr(context, builder, aryty, ary, off, llty):
    """Pointer to element ``off`` of array ``ary``, cast to ``llty*``."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [off]), llty.as_pointer())


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _int_operand(context, builder, ty, val):
    """An i32x8 operand from either an i32x8 or a scalar integer (broadcast)."""
    if isinstance(ty, _Vec):
        return val
    return _splat(builder, context.cast(builder, val, ty, types.int32), _VI32)


def _f16_bits_to_f32(builder, h):
    """Exact fp16 -> fp32 on i32 (or <8 x i32>) holding the 16-bit patterns.

    Same results as NumPy's conversion for all 65536 codes, NaN payloads included (hardware
    F16C conversion would quiet signalling NaNs, NumPy does not).
    """
    ity = h.type
    fty = _VF32 if isinstance(ity, ir.VectorType) else _F32

    def c(v: int):
        return ir.Constant(ity, [v] * ity.count) if fty is _VF32 else ir.Constant(ity, v)

    sign = builder.shl(builder.and_(h, c(0x8000)), c(16))
    em = builder.and_(h, c(0x7FFF))
    # Normal numbers: move exponent+mantissa up 13 bits and rebias the exponent (15 -> 127).
    normal = builder.add(builder.shl(em, c(13)), c((127 - 15) << 23))
    # Inf/NaN (exponent 31): rebias once more, to exponent 255; the payload bits stay put.
    special = builder.add(normal, c((127 - 15) << 23))
    # Subnormals: em * 2**-24, exact in float32 (at most 10 significant bits, result normal).
    scale = ir.Constant(fty, [2.0**-24] * _LANES) if fty is _VF32 else ir.Constant(fty, 2.0**-24)
    sub = builder.bitcast(builder.fmul(builder.sitofp(em, fty), scale), ity)
    bits = builder.select(
        builder.icmp_unsigned(">=", em, c(0x7C00)),
        special,
        builder.select(builder.icmp_unsigned("<", em, c(0x0400)), sub, normal),
    )
    return builder.bitcast(builder.or_(bits, sign), fty)


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF32, [0.0] * _LANES)

    return _f32x8(), codegen


@intrinsic
def _vsplat(typingctx, s):
    """Broadcast a float32 scalar to all lanes."""

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], _VF32)

    return _f32x8(types.float32), codegen


@intrinsic
def _vld_u8(typingctx, arr, off):
    """8 bytes at arr[off:off+8], zero-extended to i32 lanes."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, _LANES))
        return builder.zext(builder.load(p, align=1), _VI32)

    return _i32x8(arr, off), codegen


@intrinsic
def _vld_i8(typingctx, arr, off):
    """8 bytes at arr[off:off+8] read as int8, sign-extended to i32 lanes."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, _LANES))
        return builder.sext(builder.load(p, align=1), _VI32)

    return _i32x8(arr, off), codegen


@intrinsic
def _vld_u16(typingctx, arr, off):
    """8 little-endian uint16 starting at byte arr[off], zero-extended to i32 lanes."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I16, _LANES))
        return builder.zext(builder.load(p, align=1), _VI32)

    return _i32x8(arr, off), codegen


@intrinsic
def _vld_f32(typingctx, arr, off):
    """8 float32 starting at element ``off`` of ``arr`` (a float32 array, or bytes of a row)."""

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _VF32), align=1)

    return _f32x8(arr, off), codegen


@intrinsic
def _vld_f16_fast(typingctx, arr, off):
    """8 fp16 starting at byte arr[off], widened by the hardware (F16C); for dot products only."""

    def codegen(context, builder, sig, args):
        p = _ptr(
            context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.HalfType(), _LANES)
        )
        return builder.fpext(builder.load(p, align=1), _VF32)

    return _f32x8(arr, off), codegen


@intrinsic
def _vst(typingctx, arr, off, v):
    """Store 8 float32 lanes at arr[off:off+8]."""

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], _VF32), 4)
        return context.get_dummy_value()

    return types.none(arr, off, v), codegen


def _int_binary(op: str):
    """i32x8 (op) i32x8-or-scalar-int, lane-wise."""

    @intrinsic
    def impl(typingctx, a, b):
        if a != _i32x8 or not (b == _i32x8 or isinstance(b, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            rhs = _int_operand(context, builder, sig.args[1], args[1])
            return getattr(builder, op)(args[0], rhs)

        return _i32x8(a, b), codegen

    return impl


_vand = _int_binary("and_")
_vor = _int_binary("or_")
_vshl = _int_binary("shl")
_vshr = _int_binary("lshr")
_vsub_i = _int_binary("sub")


def _float_binary(op: str):
    """f32x8 (op) f32x8, lane-wise IEEE (no fast-math flags, so never fused with a neighbour)."""

    @intrinsic
    def impl(typingctx, a, b):
        if a != _f32x8 or b != _f32x8:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return _f32x8(a, b), codegen

    return impl


_vadd = _float_binary("fadd")
_vsub = _float_binary("fsub")
_vmul = _float_binary("fmul")


@intrinsic
def _vfma(typingctx, a, b, c):
    """a * b + c with one rounding (dot products only)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_VF32, [_VF32] * 3)
        fn = builder.module.globals.get("llvm.fma.v8f32") or ir.Function(
            builder.module, fnty, "llvm.fma.v8f32"
        )
        return builder.call(fn, args)

    return _f32x8(a, b, c), codegen


@intrinsic
def _vi2f(typingctx, v):
    """i32 lanes -> float32 lanes (exact for the small integer codes used here)."""

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _VF32)

    return _f32x8(v), codegen


@intrinsic
def _vbits(typingctx, word, start):
    """Lane i = bit (start + i) of the scalar ``word`` (0 or 1)."""

    def codegen(context, builder, sig, args):
        w = context.cast(builder, args[0], sig.args[0], types.uint32)
        s = context.cast(builder, args[1], sig.args[1], types.uint32)
        shifted = _splat(builder, builder.lshr(w, s), _VI32)
        lanes = builder.lshr(shifted, ir.Constant(_VI32, list(range(_LANES))))
        return builder.and_(lanes, ir.Constant(_VI32, [1] * _LANES))

    return _i32x8(word, start), codegen


@intrinsic
def _vf16_exact(typingctx, v):
    """i32 lanes holding fp16 bit patterns -> float32 lanes, exactly as NumPy converts."""

    def codegen(context, builder, sig, args):
        return _f16_bits_to_f32(builder, args[0])

    return _f32x8(v), codegen


@intrinsic
def _vbits_to_f32(typingctx, v):
    """Reinterpret i32 lanes as float32 lanes."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _VF32)

    return _f32x8(v), codegen


@intrinsic
def _vhsum(typingctx, v):
    """Sum of the 8 lanes (pairwise: 8 -> 4 -> 2 -> 1)."""

    def codegen(context, builder, sig, args):
        x, n = args[0], _LANES
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
            hi = builder.shuffle_vector(
                x, x, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n)))
            )
            x = builder.fadd(lo, hi)
        return builder.extract_element(x, ir.Constant(_I32, 0))

    return types.float32(v), codegen


@intrinsic
def _ld_f16(typingctx, arr, off):
    """The fp16 at bytes arr[off:off+2] as float32, exactly as NumPy converts it."""

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I16), align=1)
        return _f16_bits_to_f32(builder, builder.zext(h, _I32))

    return types.float32(arr, off), codegen


@intrinsic
def _ld_f16_fast(typingctx, arr, off):
    """The fp16 at bytes arr[off:off+2] widened by the hardware (F16C); for dot products only.

    The 16 bits are zero-extended into a fresh vector before the conversion: inserting them into
    a register (``vpinsrw``) would make the conversion wait for whatever that register last held,
    often the previous block's accumulator, and serialise the blocks.
    """

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I16), align=1)
        v4 = ir.VectorType(_I32, 4)
        v = builder.insert_element(
            ir.Constant(v4, [0] * 4), builder.zext(h, _I32), ir.Constant(_I32, 0)
        )
        halves = builder.bitcast(v, ir.VectorType(ir.HalfType(), 8))
        low4 = builder.shuffle_vector(halves, halves, ir.Constant(v4, [0, 1, 2, 3]))
        f = builder.fpext(low4, ir.VectorType(_F32, 4))
        return builder.extract_element(f, ir.Constant(_I32, 0))

    return types.float32(arr, off), codegen


@intrinsic
def _ld_f16x2_fast(typingctx, arr, off):
    """The two adjacent fp16 at bytes arr[off:off+4] (a block's d and m / dmin), widened together.

    One 32-bit load and one conversion instead of two of each: the scale fields cost a noticeable
    share of a Q4_1 block's instructions.
    """
    pair = types.UniTuple(types.float32, 2)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.HalfType(), 2))
        v = builder.fpext(builder.load(p, align=1), ir.VectorType(_F32, 2))
        lanes = [builder.extract_element(v, ir.Constant(_I32, i)) for i in range(2)]
        return context.make_tuple(builder, pair, lanes)

    return pair(arr, off), codegen


@intrinsic
def _ld_bf16(typingctx, arr, off):
    """The bf16 at bytes arr[off:off+2] as float32 (its bits become the top half)."""

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I16), align=1)
        return builder.bitcast(builder.shl(builder.zext(h, _I32), ir.Constant(_I32, 16)), _F32)

    return types.float32(arr, off), codegen


@intrinsic
def _ld_u32(typingctx, arr, off):
    """The little-endian uint32 at bytes arr[off:off+4] (as int64, for plain numba arithmetic)."""

    def codegen(context, builder, sig, args):
        w = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        return builder.zext(w, ir.IntType(64))

    return types.int64(arr, off), codegen


@intrinsic
def _ld_f32(typingctx, arr, off):
    """The float32 at element ``off`` of ``arr`` (bytes of a row, or a float32 array)."""

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _F32), align=1)

    return types.float32(arr, off), codegen


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
    # sum_j d (q_j - 8) x_j = d * sum_j q_j x_j - 8 d * xs[b]: the offset moves out of the lanes.
    acc = _vzero()
    dsum = np.float32(0.0)
    for b in range(nb):
        o, e = b * _Q4_0_B, b * _QK4_0
        z0 = _vld_u8(row, o + _Q4_0_QS)
        z1 = _vld_u8(row, o + _Q4_0_QS + 8)
        lo = _vfma(
            _vi2f(_vand(z1, 15)), _vld_f32(x, e + 8), _vmul(_vi2f(_vand(z0, 15)), _vld_f32(x, e))
        )
        hi = _vfma(
            _vi2f(_vshr(z1, 4)),
            _vld_f32(x, e + 24),
            _vmul(_vi2f(_vshr(z0, 4)), _vld_f32(x, e + 16)),
        )
        d = _ld_f16_fast(row, o)
        acc = _vfma(_vsplat(d), _vadd(lo, hi), acc)
        dsum += d * xs[b]
    return _vhsum(acc) - np.float32(8.0) * dsum


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
    # sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * sum_j x_j; the second sum is xs[b].
    # The four partial products form two independent chains, then one FMA applies d.
    acc = _vzero()
    macc = np.float32(0.0)
    for b in range(nb):
        o, e = b * _Q4_1_B, b * _QK4_1
        z0 = _vld_u8(row, o + _Q4_1_QS)
        z1 = _vld_u8(row, o + _Q4_1_QS + 8)
        lo = _vfma(
            _vi2f(_vand(z1, 15)), _vld_f32(x, e + 8), _vmul(_vi2f(_vand(z0, 15)), _vld_f32(x, e))
        )
        hi = _vfma(
            _vi2f(_vshr(z1, 4)),
            _vld_f32(x, e + 24),
            _vmul(_vi2f(_vshr(z0, 4)), _vld_f32(x, e + 16)),
        )
        d, m = _ld_f16x2_fast(row, o)
        acc = _vfma(_vsplat(d), _vadd(lo, hi), acc)
        macc += m * xs[b]
    return _vhsum(acc) + macc


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
    acc = _vzero()
    for b in range(nb):
        o, e = b * _Q8_0_B, b * _QK8_0
        q = _Q8_0_QS
        s0 = _vmul(_vi2f(_vld_i8(row, o + q)), _vld_f32(x, e))
        s1 = _vmul(_vi2f(_vld_i8(row, o + q + 8)), _vld_f32(x, e + 8))
        s0 = _vfma(_vi2f(_vld_i8(row, o + q + 16)), _vld_f32(x, e + 16), s0)
        s1 = _vfma(_vi2f(_vld_i8(row, o + q + 24)), _vld_f32(x, e + 24), s1)
        acc = _vfma(_vsplat(_ld_f16_fast(row, o)), _vadd(s0, s1), acc)
    return _vhsum(acc)


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


# ------------------------------------------------------------------------------------------------
# Drivers, one pair per type: ``_deq_*(raw, ids, out, par)`` and ``_mv_*(raw, x, out, par)``.
# raw (rows, row_bytes) uint8; ids (n,) int64 rows to decode, or (0,) for all rows;
# out (n, cols) / (rows,) float32; x (cols,) float32. ``par`` picks the threaded loop; small
# matrices take the plain loop, because waking the worker threads costs more than they save.
# Dequantization drivers are compiled without fastmath (bit-identity); matvec drivers with it.
# Dequantization releases the GIL, so that `matmul` can split a chunk across its own threads.
# ------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _deq_f32(raw, ids, out, par):
    n = raw.shape[1] // _F32_B
    if par:
        for i in prange(out.shape[0]):
            _deq_f32_row(raw[_row_index(ids, i)], out[i], n)
    else:
        for i in range(out.shape[0]):
            _deq_f32_row(raw[_row_index(ids, i)], out[i], n)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f32(raw, x, out, par):
    n = raw.shape[1] // _F32_B
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_f32_row(raw[r], x, x, n)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_f32_row(raw[r], x, x, n)


@njit(parallel=True, cache=True, nogil=True)
def _deq_f16(raw, ids, out, par):
    n = raw.shape[1] // _F16_B
    if par:
        for i in prange(out.shape[0]):
            _deq_f16_row(raw[_row_index(ids, i)], out[i], n)
    else:
        for i in range(out.shape[0]):
            _deq_f16_row(raw[_row_index(ids, i)], out[i], n)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f16(raw, x, out, par):
    n = raw.shape[1] // _F16_B
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_f16_row(raw[r], x, x, n)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_f16_row(raw[r], x, x, n)


@njit(parallel=True, cache=True, nogil=True)
def _deq_bf16(raw, ids, out, par):
    n = raw.shape[1] // _BF16_B
    if par:
        for i in prange(out.shape[0]):
            _deq_bf16_row(raw[_row_index(ids, i)], out[i], n)
    else:
        for i in range(out.shape[0]):
            _deq_bf16_row(raw[_row_index(ids, i)], out[i], n)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_bf16(raw, x, out, par):
    n = raw.shape[1] // _BF16_B
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_bf16_row(raw[r], x, x, n)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_bf16_row(raw[r], x, x, n)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_0(raw, ids, out, par):
    nb = raw.shape[1] // _Q4_0_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q4_0_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q4_0_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_0(raw, x, out, par):
    nb = raw.shape[1] // _Q4_0_B
    xs = _group_sums(x, _QK4_0)  # (nb,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q4_0_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q4_0_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_1(raw, ids, out, par):
    nb = raw.shape[1] // _Q4_1_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q4_1_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q4_1_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_1(raw, x, out, par):
    nb = raw.shape[1] // _Q4_1_B
    xs = _group_sums(x, _QK4_1)  # (nb,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q4_1_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q4_1_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q5_0(raw, ids, out, par):
    nb = raw.shape[1] // _Q5_0_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q5_0_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q5_0_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q5_0(raw, x, out, par):
    nb = raw.shape[1] // _Q5_0_B
    xs = _group_sums(x, _QK5_0)  # (nb,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q5_0_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q5_0_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q5_1(raw, ids, out, par):
    nb = raw.shape[1] // _Q5_1_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q5_1_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q5_1_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q5_1(raw, x, out, par):
    nb = raw.shape[1] // _Q5_1_B
    xs = _group_sums(x, _QK5_1)  # (nb,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q5_1_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q5_1_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q8_0(raw, ids, out, par):
    nb = raw.shape[1] // _Q8_0_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q8_0_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q8_0_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q8_0(raw, x, out, par):
    nb = raw.shape[1] // _Q8_0_B
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q8_0_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q8_0_row(raw[r], x, x, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q2_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q2_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q2_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q2_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q2_k(raw, x, out, par):
    nb = raw.shape[1] // _Q2_K_B
    xs = _group_sums(x, QK_K // 16)  # (nb * 16,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q2_k_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q2_k_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q3_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q3_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q3_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q3_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q3_k(raw, x, out, par):
    nb = raw.shape[1] // _Q3_K_B
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q3_k_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q3_k_row(raw[r], x, x, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q4_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q4_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q4_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_k(raw, x, out, par):
    nb = raw.shape[1] // _Q4_K_B
    xs = _group_sums(x, QK_K // 8)  # (nb * 8,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q4_k_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q4_k_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q5_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q5_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q5_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q5_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q5_k(raw, x, out, par):
    nb = raw.shape[1] // _Q5_K_B
    xs = _group_sums(x, QK_K // 8)  # (nb * 8,)
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q5_k_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q5_k_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q6_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q6_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q6_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q6_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q6_k(raw, x, out, par):
    nb = raw.shape[1] // _Q6_K_B
    if par:
        for r in prange(raw.shape[0]):
            out[r] = _dot_q6_k_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q6_k_row(raw[r], x, x, nb)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


class _Kernels(NamedTuple):
    qtype: GGMLQuantizationType
    values: int  # values per block
    nbytes: int  # bytes per block
    deq: numba.core.registry.CPUDispatcher  # (raw, ids, out, par) -> None
    mv: numba.core.registry.CPUDispatcher  # (raw, x, out, par) -> None


def _entry(qtype: GGMLQuantizationType, deq, mv) -> _Kernels:
    return _Kernels(qtype, *block_layout(qtype), deq, mv)


_KERNELS: dict[GGMLQuantizationType, _Kernels] = {
    Q.F32: _entry(Q.F32, _deq_f32, _mv_f32),
    Q.F16: _entry(Q.F16, _deq_f16, _mv_f16),
    Q.BF16: _entry(Q.BF16, _deq_bf16, _mv_bf16),
    Q.Q4_0: _entry(Q.Q4_0, _deq_q4_0, _mv_q4_0),
    Q.Q4_1: _entry(Q.Q4_1, _deq_q4_1, _mv_q4_1),
    Q.Q5_0: _entry(Q.Q5_0, _deq_q5_0, _mv_q5_0),
    Q.Q5_1: _entry(Q.Q5_1, _deq_q5_1, _mv_q5_1),
    Q.Q8_0: _entry(Q.Q8_0, _deq_q8_0, _mv_q8_0),
    Q.Q2_K: _entry(Q.Q2_K, _deq_q2_k, _mv_q2_k),
    Q.Q3_K: _entry(Q.Q3_K, _deq_q3_k, _mv_q3_k),
    Q.Q4_K: _entry(Q.Q4_K, _deq_q4_k, _mv_q4_k),
    Q.Q5_K: _entry(Q.Q5_K, _deq_q5_k, _mv_q5_k),
    Q.Q6_K: _entry(Q.Q6_K, _deq_q6_k, _mv_q6_k),
}
assert set(_KERNELS) == set(SUPPORTED_TYPES)

_U8 = np.dtype(np.uint8)
_F32_DTYPE = np.dtype(np.float32)

# Passed as ``ids`` to decode every row. Kept writable like the ids `get_rows` builds, so both
# calls share one compiled specialisation.
_ALL_ROWS = np.empty(0, np.int64)  # (0,)

# Below this many weight bytes a call stays on the calling thread: handing work to the other
# threads and waiting for them costs microseconds, more than such a matrix takes alone.
_PAR_MIN_BYTES = 64 << 10

# Largest float32 chunk of W that `matmul` dequantizes at a time (when no scratch is given, or
# the scratch is bigger): large enough for BLAS to run at full speed, small enough to stay cheap.
_CHUNK_BYTES = 16 << 20


def _kernels(qtype: GGMLQuantizationType) -> _Kernels:
    k = _KERNELS.get(qtype)
    if k is None:
        name = getattr(qtype, "name", repr(qtype))
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ModelError(
            "model.unsupported_type",
            f"tensor type {name} is not supported by the CPU kernels (supported: {supported})",
            qtype=name,
        )
    return k


def _check_bytes(op: str, k: _Kernels, raw: np.ndarray, ndim: int | None) -> None:
    """Raise the `UserError` that says what is wrong with ``raw`` (dtype, rank, row length)."""
    if raw.dtype != np.uint8:
        raise UserError(
            "user.bad_dtype", f"{op}: raw must be uint8 block bytes, got dtype {raw.dtype}", op=op
        )
    if (ndim is not None and raw.ndim != ndim) or raw.ndim == 0:
        raise UserError(
            "user.bad_shape",
            f"{op}: raw must be 2-D (rows, row_bytes), got shape {raw.shape}",
            op=op,
            got=raw.shape,
        )
    if raw.shape[-1] % k.nbytes:
        raise UserError(
            "user.bad_shape",
            f"{op}: a {k.qtype.name} row is a whole number of {k.nbytes}-byte blocks ({k.values}"
            f" values each), got row_bytes={raw.shape[-1]} (raw shape {raw.shape})",
            op=op,
            got=raw.shape,
        )


def _blocks(raw: np.ndarray) -> np.ndarray:
    """raw as a read-only C-contiguous array: one compiled specialisation for every input,
    writable or memory-mapped (read-only), and no copy for the usual memory-mapped tensor."""
    flags = raw.flags
    if not flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
        flags = raw.flags
    if flags.writeable:
        raw = raw.view()
        raw.flags.writeable = False
    return raw


def _matrix(op: str, k: _Kernels, raw: np.ndarray) -> tuple[np.ndarray, int]:
    """(raw as read-only C-contiguous (rows, row_bytes) uint8, cols)."""
    raw = np.asarray(raw)
    shape = raw.shape
    if raw.dtype != _U8 or len(shape) != 2 or shape[1] % k.nbytes:
        _check_bytes(op, k, raw, 2)
    return _blocks(raw), shape[1] // k.nbytes * k.values


def _f32(x: np.ndarray) -> np.ndarray:
    """x as a writable C-contiguous float32 array (a copy only when it is not one already)."""
    flags = x.flags
    if x.dtype != _F32_DTYPE or not flags.c_contiguous or not flags.writeable:
        x = np.array(x, dtype=np.float32, order="C")
    return x


def _output(op: str, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise UserError(
            "user.bad_out",
            f"{op}: out must be a writable C-contiguous float32 array of shape {shape}, got {got}",
            op=op,
            expected=shape,
        )
    return out


def dequantize(
    qtype: GGMLQuantizationType, raw: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Block bytes -> float32, bit-identical to ``gguf.quants.dequantize(raw, qtype)``.

    raw: (..., row_bytes) uint8, typically (rows, row_bytes) or (row_bytes,).
    Returns (..., cols) float32 (``out`` if given).
    """
    k = _kernels(qtype)
    raw = np.asarray(raw)
    _check_bytes("dequantize", k, raw, None)
    row_bytes = raw.shape[-1]
    cols = row_bytes // k.nbytes * k.values
    out = _output("dequantize", out, (*raw.shape[:-1], cols))
    if out.size == 0:
        return out
    rows = _blocks(raw.reshape(-1, row_bytes))  # (rows, row_bytes)
    k.deq(rows, _ALL_ROWS, out.reshape(-1, cols), rows.nbytes >= _PAR_MIN_BYTES)
    return out


def matvec(
    qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``W @ x`` on the blocks: raw (rows, row_bytes) uint8, x (cols,) -> (rows,) float32.

    Float32 accumulation with FMAs; against a float64 product of the dequantized matrix the
    error is ~1e-7 of sum(|W| |x|) per output.
    """
    k = _KERNELS.get(qtype) or _kernels(qtype)
    raw, cols = _matrix("matvec", k, raw)
    x = np.asarray(x)
    if x.shape != (cols,):
        raise UserError(
            "user.bad_shape",
            f"matvec: x has shape {x.shape}, expected ({cols},) for a {k.qtype.name} matrix of"
            f" {raw.shape[0]} x {cols} (raw {raw.shape})",
            op="matvec",
            expected=(cols,),
            got=x.shape,
        )
    out = _output("matvec", out, (raw.shape[0],))
    k.mv(raw, _f32(x), out, raw.nbytes >= _PAR_MIN_BYTES)
    return out


def matmul(
    qtype: GGMLQuantizationType,
    raw: np.ndarray,
    x: np.ndarray,
    out: np.ndarray | None = None,
    *,
    scratch: np.ndarray | None = None,
    workers: int = 1,
) -> np.ndarray:
    """``x @ W.T``: raw (rows, row_bytes) uint8, x (n, cols) -> (n, rows) float32.

    W is dequantized a chunk of rows at a time (at most 16 MB of float32, inside ``scratch`` when
    given: any writable C-contiguous float32 array of at least ``cols`` values) and each chunk
    goes to BLAS. A single row of x takes the fused `matvec` path instead.

    ``workers`` > 1 splits each chunk's dequantization across that many threads of a plain
    thread pool (the calling thread is one): they block between chunks instead of spin-waiting as
    numba's OpenMP workers do, so BLAS keeps every core while it multiplies.
    """
    k = _kernels(qtype)
    raw, cols = _matrix("matmul", k, raw)
    rows = raw.shape[0]
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cols:
        raise UserError(
            "user.bad_shape",
            f"matmul: x has shape {x.shape}, expected (n, {cols}) for a {k.qtype.name} matrix of"
            f" {rows} x {cols} (raw {raw.shape})",
            op="matmul",
            expected=(None, cols),
            got=x.shape,
        )
    x = _f32(x)
    n = x.shape[0]
    out = _output("matmul", out, (n, rows))
    chunk = max(1, min(rows, _CHUNK_BYTES // (4 * max(cols, 1))))  # rows of W per BLAS call
    if scratch is not None:
        if (
            not isinstance(scratch, np.ndarray)
            or scratch.dtype != np.float32
            or not scratch.flags.c_contiguous
            or not scratch.flags.writeable
            or scratch.size < cols
        ):
            got = (
                f"{scratch.dtype} {scratch.shape}"
                if isinstance(scratch, np.ndarray)
                else type(scratch).__name__
            )
            raise UserError(
                "user.bad_scratch",
                f"matmul: scratch must be a writable C-contiguous float32 array of at least"
                f" {cols} values, got {got}",
                op="matmul",
            )
        chunk = min(chunk, scratch.size // max(cols, 1))
    if out.size == 0:
        return out
    if n == 1:
        k.mv(raw, x[0], out[0], raw.nbytes >= _PAR_MIN_BYTES)
        return out
    if k.qtype == Q.F32:
        # Already float32: BLAS reads the block bytes as they are.
        np.matmul(x, raw.view(np.float32).T, out=out)
        return out
    buf = scratch.reshape(-1) if scratch is not None else np.empty(chunk * cols, np.float32)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        w = buf[: (r1 - r0) * cols].reshape(r1 - r0, cols)  # (r1 - r0, cols) float32
        if workers > 1 and w.nbytes >= _PAR_MIN_BYTES:
            _deq_split(k, raw[r0:r1], w, workers)
        else:
            k.deq(raw[r0:r1], _ALL_ROWS, w, w.nbytes >= _PAR_MIN_BYTES)
        np.matmul(x, w.T, out=out[:, r0:r1])
    return out


_POOL: ThreadPoolExecutor | None = None  # `matmul`'s dequantization helpers, made on first use


def _deq_split(k: _Kernels, raw: np.ndarray, w: np.ndarray, workers: int) -> None:
    """Dequantize raw (rows, row_bytes) into w (rows, cols) in ``workers`` row slices at once."""
    global _POOL
    if _POOL is None:  # threads start as work arrives, up to numba's thread limit
        limit = max(numba.config.NUMBA_NUM_THREADS - 1, 1)
        _POOL = ThreadPoolExecutor(limit, thread_name_prefix="workbench-deq")
    bounds = np.linspace(0, raw.shape[0], workers + 1).astype(int)  # (workers + 1,)
    futures = [
        _POOL.submit(k.deq, raw[a:b], _ALL_ROWS, w[a:b], False)
        for a, b in itertools.pairwise(bounds[1:])
    ]
    k.deq(raw[: bounds[1]], _ALL_ROWS, w[: bounds[1]], False)
    for f in futures:
        f.result()


def get_rows(qtype: GGMLQuantizationType, raw: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: raw (rows, row_bytes) uint8, ids (n,) int -> (n, cols) float32.

    Decodes only the requested rows; bit-identical to ``dequantize(qtype, raw)[ids]``. ``ids`` of
    any shape gives ``ids.shape + (cols,)``.
    """
    k = _kernels(qtype)
    raw, cols = _matrix("get_rows", k, raw)
    rows = raw.shape[0]
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise UserError(
            "user.bad_ids", f"get_rows: ids must be integers, got dtype {ids.dtype}", op="get_rows"
        )
    flat = ids.astype(np.int64).reshape(-1)  # (n,), a private writable copy
    if flat.size and (flat.min() < 0 or flat.max() >= rows):
        raise UserError(
            "user.bad_ids",
            f"get_rows: ids must lie in [0, {rows}), got min {flat.min()} and max {flat.max()}",
            op="get_rows",
            rows=rows,
        )
    out = np.empty((*ids.shape, cols), np.float32)
    if out.size == 0:
        return out
    k.deq(raw, flat, out.reshape(-1, cols), flat.size * raw.shape[1] >= _PAR_MIN_BYTES)
    return out


def set_threads(n: int) -> None:
    """Threads the kernels use (numba's count for the calling thread)."""
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise UserError(
            "user.bad_threads",
            f"threads must be an integer from 1 to {limit} (this machine's numba limit), got {n!r}",
            threads=repr(n),
            limit=limit,
        )
    numba.set_num_threads(int(n))


def physical_cores() -> int:
    """Physical cores of this machine (hyper-threads of one core count once), from sysfs.

    Falls back to the logical CPU count where the topology is not exposed."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def default_threads() -> int:
    """The kernels' default thread count: the physical cores, within numba's limit."""
    return max(1, min(physical_cores(), numba.config.NUMBA_NUM_THREADS))


def get_threads() -> int:
    """Threads the kernels use."""
    return int(numba.get_num_threads())
