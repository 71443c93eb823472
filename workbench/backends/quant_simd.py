"""8-lane SIMD intrinsics for the quantized-block kernels (`quant_blocks`).

Why explicit SIMD. LLVM's auto-vectoriser does badly on block formats: the 16-byte nibble loops
are fully unrolled before the loop vectoriser sees them, after which it either vectorises the
*block* loop (a gather per byte) or gives up because it cannot prove the output does not alias
the input; such loops run at under 1 GB/s. So the kernels are written with a handful of
8-lane vector operations (`_vld_u8`, `_vfma`, ...): numba intrinsics that emit LLVM vector IR
directly. The kernel code stays plain numba; only the lane-wise arithmetic is spelled out. Eight
float32 lanes are one AVX2 register; without AVX2, LLVM splits each operation into SSE halves.
The Q4_0, Q4_1 and Q8_0 dot products use 16 lanes, a block in two AVX-512 registers (see "16
lanes" below); without AVX-512, LLVM splits those into 8-lane halves.

The intrinsics emit plain IEEE ``fmul``/``fadd`` without fast-math flags (so LLVM may not fuse
them into an FMA where a dequantization must match gguf-py bit for bit); `_vfma` is an explicit
fused multiply-add for dot products. Inside a function compiled with ``fastmath=True`` LLVM may
still contract and reorder the plain ones (the function's attributes allow it); the batch kernels
rely only on every input row getting the same operations whatever the batch, which
`tests/test_quant_batch.py` checks bit for bit.
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic, models, register_model

# ------------------------------------------------------------------------------------------------
# 8-lane SIMD intrinsics. Offsets are in elements of the array they index (bytes for the uint8
# block rows). Loads are unaligned; nothing is bounds-checked, callers stay inside their rows.
# ------------------------------------------------------------------------------------------------

_LANES = 8
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_VI32 = ir.VectorType(_I32, _LANES)
_VF32 = ir.VectorType(_F32, _LANES)


class _Vec(types.Type):
    """An LLVM <lanes x i32> or <lanes x float> value held in a numba local (a register after
    mem2reg): 8 lanes, or 16 (see "16 lanes")."""

    def __init__(self, kind: str, lanes: int = _LANES) -> None:
        self.kind, self.lanes = kind, lanes
        super().__init__(name=f"{kind}x{lanes}")


_f32x8 = _Vec("f32")
_i32x8 = _Vec("i32")
_f32x16 = _Vec("f32", 2 * _LANES)
_i32x16 = _Vec("i32", 2 * _LANES)


def _llty(ty: _Vec) -> ir.VectorType:
    return ir.VectorType(_F32 if ty.kind == "f32" else _I32, ty.lanes)


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _llty(fe_type))


def _ptr(context, builder, aryty, ary, off, llty):
    """Pointer to element ``off`` of array ``ary``, cast to ``llty*``."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [off]), llty.as_pointer())


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _int_operand(context, builder, ty, val, lanes):
    """An i32 vector operand from either an i32 vector or a scalar integer (broadcast)."""
    if isinstance(ty, _Vec):
        return val
    return _splat(builder, context.cast(builder, val, ty, types.int32), ir.VectorType(_I32, lanes))


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
    """i32 vector (op) the same vector type or a scalar int, lane-wise."""

    @intrinsic
    def impl(typingctx, a, b):
        if not (isinstance(a, _Vec) and a.kind == "i32") or not (
            b == a or isinstance(b, types.Integer)
        ):
            return None

        def codegen(context, builder, sig, args):
            rhs = _int_operand(context, builder, sig.args[1], args[1], a.lanes)
            return getattr(builder, op)(args[0], rhs)

        return a(a, b), codegen

    return impl


_vand = _int_binary("and_")
_vor = _int_binary("or_")
_vshl = _int_binary("shl")
_vshr = _int_binary("lshr")
_vsub_i = _int_binary("sub")


def _float_binary(op: str):
    """f32 vector (op) the same vector type, lane-wise IEEE (no fast-math flags, so never fused
    with a neighbour)."""

    @intrinsic
    def impl(typingctx, a, b):
        if not (isinstance(a, _Vec) and a.kind == "f32") or b != a:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return a(a, b), codegen

    return impl


_vadd = _float_binary("fadd")
_vsub = _float_binary("fsub")
_vmul = _float_binary("fmul")


def _fma_call(builder, a, b, c):
    """llvm.fma on float32 scalars or vectors of any width: a * b + c, one rounding."""
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(a.type, [a.type] * 3), name
    )
    return builder.call(fn, [a, b, c])


@intrinsic
def _vfma(typingctx, a, b, c):
    """a * b + c with one rounding, lane-wise on 8 or 16 lanes (dot products only)."""
    if not (isinstance(a, _Vec) and a.kind == "f32") or not a == b == c:
        return None

    def codegen(context, builder, sig, args):
        return _fma_call(builder, *args)

    return a(a, b, c), codegen


@intrinsic
def _vi2f(typingctx, v):
    """i32 lanes -> float32 lanes (exact for the small integer codes used here)."""
    if not (isinstance(v, _Vec) and v.kind == "i32"):
        return None
    out = _Vec("f32", v.lanes)

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _llty(out))

    return out(v), codegen


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


def _lanes(builder, x, first, n):
    """Lanes first .. first+n-1 of vector x, as an n-lane vector."""
    return builder.shuffle_vector(
        x, x, ir.Constant(ir.VectorType(_I32, n), list(range(first, first + n)))
    )


def _pairwise_sum(builder, x):
    """Sum of the lanes of x (8 or 16), pairwise: 16 -> 8 -> 4 -> 2 -> 1."""
    n = x.type.count
    while n > 1:
        n //= 2
        x = builder.fadd(_lanes(builder, x, 0, n), _lanes(builder, x, n, n))
    return builder.extract_element(x, ir.Constant(_I32, 0))


@intrinsic
def _vhsum(typingctx, v):
    """Sum of the lanes of an 8- or 16-lane float vector, pairwise (16 -> 8 -> 4 -> 2 -> 1)."""
    if not (isinstance(v, _Vec) and v.kind == "f32"):
        return None

    def codegen(context, builder, sig, args):
        return _pairwise_sum(builder, args[0])

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


@intrinsic
def _prefetch(typingctx, arr, off):
    """Ask the CPU to start loading the cache line holding arr[off] (a hint: never faults, even
    past the end of the array)."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], _I8)
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _I32, _I32, _I32])
        fn = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
            builder.module, fnty, "llvm.prefetch.p0"
        )
        one, three = ir.Constant(_I32, 1), ir.Constant(_I32, 3)
        builder.call(fn, [p, ir.Constant(_I32, 0), three, one])
        return context.get_dummy_value()

    return types.none(arr, off), codegen


@njit(nogil=True, inline="always")
def _prefetch_range(arr, lo, hi):
    """`_prefetch` every cache line of arr[lo:hi] (arr flat; a hint, like `_prefetch`)."""
    for f in range(lo, hi, max(1, 64 // arr.itemsize)):
        _prefetch(arr, f)


# ------------------------------------------------------------------------------------------------
# 16 lanes: a whole 32-value block in two registers. The Q4_0, Q4_1 and Q8_0 dot products
# (`quant_blocks._block_weights`) decode a block's weights into two 16-lane vectors (one AVX-512
# register each; two AVX2 halves without AVX-512) and FMA them into two accumulators per input
# row: `_vand`, `_vshr`, `_vsub_i`, `_vi2f`, `_vmul` and `_vfma` take both widths.
# ------------------------------------------------------------------------------------------------


@intrinsic
def _wzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_llty(_f32x16), [0.0] * 2 * _LANES)

    return _f32x16(), codegen


@intrinsic
def _wsplat(typingctx, s):
    """Broadcast a float32 scalar to 16 lanes."""

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], _llty(_f32x16))

    return _f32x16(types.float32), codegen


def _wide_bytes(signed: bool):
    """The 16 bytes at arr[off:off+16], extended to i32 lanes."""

    @intrinsic
    def impl(typingctx, arr, off):
        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, 16))
            v = builder.load(p, align=1)
            return (builder.sext if signed else builder.zext)(v, _llty(_i32x16))

        return _i32x16(arr, off), codegen

    return impl


_wld_u8 = _wide_bytes(signed=False)
_wld_i8 = _wide_bytes(signed=True)


@intrinsic
def _wld_f32(typingctx, arr, off):
    """16 float32 starting at element ``off`` of ``arr``."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], _llty(_f32x16))
        return builder.load(p, align=1)

    return _f32x16(arr, off), codegen


@intrinsic
def _wst(typingctx, arr, off, v):
    """Store 16 float32 lanes at arr[off:off+16]."""

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], _llty(_f32x16))
        builder.store(args[2], p, 4)
        return context.get_dummy_value()

    return types.none(arr, off, v), codegen


@intrinsic
def _fma1(typingctx, a, b, c):
    """a * b + c for float32 scalars with one rounding (``llvm.fma.f32``: LLVM vectorises it)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return _fma_call(builder, *args)

    return types.float32(a, b, c), codegen


@intrinsic
def _pow2i(typingctx, n):
    """2.0 ** n as float32 for an int32 n in -126..127: the bits (n + 127) << 23."""
    if n != types.int32:
        return None

    def codegen(context, builder, sig, args):
        e = builder.add(args[0], ir.Constant(_I32, 127))
        return builder.bitcast(builder.shl(e, ir.Constant(_I32, 23)), _F32)

    return types.float32(n), codegen


def _has_avx512f() -> bool:
    """Whether numba compiles for a CPU with AVX-512F (its target's features, as numba picks them:
    ``NUMBA_CPU_FEATURES`` when set, else the host's)."""
    features = config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


# Q4_0 and Q4_1 weights by table lookup: a block's 16 possible weights (q = 0..15) computed once
# in one vector, then each nibble picks its lane with a permute (``vpermps``, port 5) instead of
# an int-to-float conversion and an FMA per 16 values (ports 0 and 1, which the dot product's
# FMAs need): one Q4_1 block 2.58 -> 2.30 ns on one core with the weights in L2, all layers' Q4_1
# matrices on two threads 5.75 -> 5.21 ms. The table's lane q is the very operation the
# lane-wise route does for code q, so both routes give the same bits; the lane-wise one is
# compiled where the target has no AVX-512 (`tests/test_quant_batch.py` checks the two
# agree). Read when a kernel is compiled.
_PERMUTE_TABLES = _has_avx512f()


def _nibble_weights(builder, z, lane):
    """The weights of a block's 32 nibbles z (16 bytes in i32 lanes: low nibble value j, high
    nibble value j + 16) as two <16 x float>, ``lane(builder, q)`` giving the weight of codes q
    (a float vector)."""
    vi, vf = _llty(_i32x16), _llty(_f32x16)
    lo = builder.and_(z, ir.Constant(vi, [15] * 16))
    hi = builder.lshr(z, ir.Constant(vi, [4] * 16))
    if not _PERMUTE_TABLES:
        return lane(builder, builder.sitofp(lo, vf)), lane(builder, builder.sitofp(hi, vf))
    table = lane(builder, ir.Constant(vf, [float(q) for q in range(16)]))  # (16,) weight of q
    name = "llvm.x86.avx512.permvar.sf.512"
    perm = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(vf, [vf, vi]), name
    )
    return builder.call(perm, [table, lo]), builder.call(perm, [table, hi])


_W_PAIR = types.UniTuple(_f32x16, 2)


@intrinsic
def _wq4_1_weights(typingctx, z, d, m):
    """A Q4_1 block's 32 weights ``d q + m`` (one FMA each, lane-wise) from its codes z
    (`_wld_u8` of its 16 code bytes) and its float32 d and m: (values 0-15, values 16-31)."""

    def codegen(context, builder, sig, args):
        vf = _llty(_f32x16)
        dv, mv = _splat(builder, args[1], vf), _splat(builder, args[2], vf)
        w = _nibble_weights(builder, args[0], lambda b, q: _fma_call(b, dv, q, mv))
        return context.make_tuple(builder, _W_PAIR, w)

    return _W_PAIR(z, types.float32, types.float32), codegen


@intrinsic
def _wq4_0_weights(typingctx, z, d):
    """A Q4_0 block's 32 weights ``(q - 8) d`` as `_wq4_1_weights`."""

    def codegen(context, builder, sig, args):
        vf = _llty(_f32x16)
        dv, eight = _splat(builder, args[1], vf), ir.Constant(vf, [8.0] * 16)
        w = _nibble_weights(builder, args[0], lambda b, q: b.fmul(b.fsub(q, eight), dv))
        return context.make_tuple(builder, _W_PAIR, w)

    return _W_PAIR(z, types.float32), codegen
