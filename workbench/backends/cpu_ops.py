"""Small numba kernels for the NumPy backend's per-token operations.

At decode time each of these runs on one row, hundreds of times per token; written as NumPy
expressions they cost tens of microseconds each in temporaries and dispatch, more than the
arithmetic. These loops do the same arithmetic in the same order as the NumPy formulas they
replace (see the NumPy backend), with the accumulations the comments name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from workbench.backends.quant_simd import (
    _f32x16,
    _fma1,
    _fma_call,
    _pow2i,
    _vfma,
    _vhsum,
    _vld_f32,
    _vsplat,
    _vst,
    _vzero,
    _wld_f32,
    _wst,
)


@njit(cache=True, nogil=True)
def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """x (n, dim) float32, w (dim,) -> out (n, dim); the mean of squares accumulated in float64."""
    n, dim = x.shape
    for i in range(n):
        acc = 0.0  # float64
        for j in range(dim):
            v = np.float64(x[i, j])
            acc += v * v
        scale = np.float32(1.0 / math.sqrt(acc / dim + eps))
        for j in range(dim):
            out[i, j] = x[i, j] * scale * w[j]


@njit(cache=True, nogil=True)
def rmsnorm_cols(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """`rmsnorm` feature-major: x (dim, n) float32, a position per column -> out (dim, n).

    Each column's squares are summed in float64 in the same order as `rmsnorm`'s row, so a
    column comes out with the same bits as that position's row; the loops run along the
    positions, which LLVM vectorises."""
    dim, n = x.shape
    acc = np.zeros(n)  # (n,) float64
    for i in range(dim):
        for j in range(n):
            v = np.float64(x[i, j])
            acc[j] += v * v
    scale = np.empty(n, dtype=np.float32)  # (n,)
    for j in range(n):
        scale[j] = np.float32(1.0 / math.sqrt(acc[j] / dim + eps))
    for i in range(dim):
        for j in range(n):
            out[i, j] = x[i, j] * scale[j] * w[i]


# exp(x) for float32 as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so
# n ln2 is exact to float32), exp(r) by a degree-7 polynomial, times 2**n. Written as plain
# float32 arithmetic, a loop of it is vectorised by LLVM (8 lanes here; `wexp32` does 16), where
# ``np.exp`` in a compiled loop is a call per value (4.1 ns each here): decode attention spent
# a quarter of its time there. Below -87.34 it returns 0 (expf's subnormals there are lost),
# above 88.38 inf (exp(x) there is within 1.3x of float32's largest value): SiLU's limit for very
# negative inputs stays exactly -0 * up. Measured against float64 over -87.3..88.3:
# at most 1.01 ulp (NumPy's float32 exp: 2.47), 0.66 ns a value in a loop
# (`tests/test_quant_batch.py::test_exp32_is_within_an_ulp_and_vectorises_to_the_same_bits`).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_LO, _EXP_HI = np.float32(-87.3365478515625), np.float32(88.3762626647949)
_P = tuple(
    np.float32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
              5.0000001201e-1)
)  # fmt: skip
_ONE, _HALF = np.float32(1.0), np.float32(0.5)
_ZERO, _INF = np.float32(0.0), np.float32(np.inf)
_LOWEST = np.float32(np.finfo(np.float32).min)  # a finite start for a maximum (flags: ninf)


@njit(nogil=True, inline="always")
def exp32(x: Any) -> Any:
    """exp of a float32 within about 1 ulp (see above); the same bits vectorised or not."""
    a = np.float32(x)
    x = a if a > _EXP_LO else _EXP_LO  # selects, which LLVM vectorises without fast-math flags
    x = x if x < _EXP_HI else _EXP_HI
    n = np.float32(math.floor(_fma1(x, _LOG2E, _HALF)))  # the nearest integer to x / ln2
    r = _fma1(n, -_LN2_HI, x)
    r = _fma1(n, -_LN2_LO, r)
    p = _fma1(_P[0], r, _P[1])
    p = _fma1(p, r, _P[2])
    p = _fma1(p, r, _P[3])
    p = _fma1(p, r, _P[4])
    p = _fma1(p, r, _P[5])
    p = _fma1(p, r * r, r) + _ONE
    e = p * _pow2i(np.int32(n))
    e = e if a >= _EXP_LO else _ZERO  # past the range: 0 and inf, as expf's limits
    e = e if a <= _EXP_HI else _INF
    return e if a == a else a  # NaN stays NaN


def _vconst(value: float, ty: ir.VectorType) -> ir.Constant:
    return ir.Constant(ty, [float(value)] * ty.count)


@intrinsic
def wexp32(typingctx, v):
    """`exp32` of 16 float32 lanes, written out in vector IR: the same operations lane by lane,
    so the same bits as `exp32` of each value. LLVM vectorises a loop of `exp32` at 8 lanes on
    this project's AVX-512 machine (it prefers 256-bit vectors); this runs at 16: 0.74 against
    1.23 ns a value."""
    if v != _f32x16:
        return None

    def codegen(context, builder, sig, args):
        a = args[0]
        ty = a.type

        def k(value: float) -> ir.Constant:
            return _vconst(value, ty)

        def fma(x, y, z):
            return _fma_call(builder, x, y, z)

        name = f"llvm.floor.v{ty.count}f32"
        floor = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ty, [ty]), name
        )
        x = builder.select(builder.fcmp_ordered(">", a, k(_EXP_LO)), a, k(_EXP_LO))
        x = builder.select(builder.fcmp_ordered("<", x, k(_EXP_HI)), x, k(_EXP_HI))
        n = builder.call(floor, [fma(x, k(_LOG2E), k(_HALF))])
        r = fma(n, k(-_LN2_HI), x)
        r = fma(n, k(-_LN2_LO), r)
        p = fma(k(_P[0]), r, k(_P[1]))
        for c in _P[2:]:
            p = fma(p, r, k(c))
        p = builder.fadd(fma(p, builder.fmul(r, r), r), k(_ONE))
        vi = ir.VectorType(ir.IntType(32), ty.count)
        e = builder.add(builder.fptosi(n, vi), ir.Constant(vi, [127] * ty.count))
        e = builder.fmul(p, builder.bitcast(builder.shl(e, ir.Constant(vi, [23] * ty.count)), ty))
        e = builder.select(builder.fcmp_ordered(">=", a, k(_EXP_LO)), e, k(_ZERO))
        e = builder.select(builder.fcmp_ordered("<=", a, k(_EXP_HI)), e, k(_INF))
        return builder.select(builder.fcmp_ordered("==", a, a), e, a)

    return _f32x16(v), codegen


@njit(nogil=True, inline="always")
def exp_in_place(x: np.ndarray) -> None:
    """x (n,) float32 -> exp32(x), 16 lanes at a time (`wexp32`) where x is contiguous."""
    n = x.shape[0]
    n16 = n - n % 16 if x.strides[0] == 4 else 0
    for j in range(0, n16, 16):
        _wst(x, j, wexp32(_wld_f32(x, j)))
    for j in range(n16, n):
        x[j] = exp32(x[j])


# NumPy's error model: a float division by zero gives inf or NaN instead of raising, so the
# loop carries no zero test per value and LLVM vectorises the division (SwiGLU of 1536 values:
# 3.1 -> 1.8 us). The quotients are the same bits.
@njit(cache=True, nogil=True, error_model="numpy")
def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    """out = silu(gate) * up for (n, ffn) float32 rows, as g / (1 + exp(-g)) * u; out must not
    share memory with gate or up.

    For very negative g, exp(-g) overflows to inf and the result is -0.0 (times up), the limit.
    One compiled loop for the per-operation path and both fused decodes, so all three compute it
    alike. The exps first, in a loop of their own: with the division in the same loop LLVM did
    not vectorise it (1536 values: 11 us, against 3 us in two loops and 6 us with ``np.exp``);
    and on 16 lanes (`exp_in_place`), 1.7x the rate of LLVM's 8."""
    n, f = gate.shape
    one = np.float32(1.0)
    for i in range(n):
        row = out[i]
        for j in range(f):
            row[j] = -gate[i, j]
        exp_in_place(row)
        for j in range(f):
            row[j] = gate[i, j] / (one + row[j]) * up[i, j]


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def swiglu_parallel(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    """`swiglu` with the rows split over numba's threads: each row the same bits."""
    for i in prange(gate.shape[0]):
        swiglu(gate[i : i + 1], up[i : i + 1], out[i : i + 1])


@njit(cache=True, nogil=True)
def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotate x (n, heads, hd) in place; cos, sin (n, rope_dim/2) float32.

    neox=False pairs (2i, 2i+1) as llama.cpp's "norm" mode; neox=True pairs (i, i + rope_dim/2).
    """
    n, heads, _ = x.shape
    half = cos.shape[1]
    for t in range(n):
        for h in range(heads):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0, x1 = x[t, h, a], x[t, h, b]
                c, s = cos[t, i], sin[t, i]
                x[t, h, a] = x0 * c - x1 * s
                x[t, h, b] = x0 * s + x1 * c


@njit(cache=True, nogil=True)
def rope_cols(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int, neox: bool) -> None:
    """`rope` feature-major: rotate x (heads*hd, n) in place, column t the position of
    cos[:, t], sin[:, t] (rope_dim/2, n) float32. The same products and sums as `rope`."""
    hd, n = x.shape[0] // heads, x.shape[1]
    half = cos.shape[0]
    for h in range(heads):
        for i in range(half):
            a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
            ra, rb = x[h * hd + a], x[h * hd + b]  # (n,) each
            c, s = cos[i], sin[i]  # (n,) each
            for t in range(n):
                x0, x1 = ra[t], rb[t]
                ra[t] = x0 * c[t] - x1 * s[t]
                rb[t] = x0 * s[t] + x1 * c[t]


# The decode attention's floating-point flags: fast-math without reassociation. Its vector code is
# spelled out (`quant_simd`); reassociation would let LLVM vectorise the remaining scalar sums
# (an odd head size's last lanes, the softmax total) differently in each caller, which inlines
# the loop with its own row lookup, and the paged and contiguous caches would part by an ulp.
ATTENTION_MATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@njit(cache=True, nogil=True, fastmath=ATTENTION_MATH)
def attention_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, t: int, out: np.ndarray) -> None:
    """One query position: q (heads, hd), k, v (kv_heads, ctx, hd) filled up to t -> out (heads*hd).

    Query head h reads KV head h // (heads / kv_heads). Softmax in float32 after subtracting the
    row maximum, as the NumPy path.
    """
    attention_decode_heads(q, k, v, t, out, 0, q.shape[0])


@njit(nogil=True, inline="always")
def contiguous_row(cache: np.ndarray, g: int, j: int) -> np.ndarray:
    """The (hd,) row of position j, KV head g, in a contiguous cache (kv_heads, ctx, hd)."""
    return cache[g, j]


def decode_head_kernel(kv_row: Any) -> Any:
    """The decode-attention loop of one query head, compiled with ``kv_row(cache, where, j)``,
    the (hd,) key or value row of position j, as its only row lookup: `contiguous_row` here,
    a page-table lookup in `paged_ops`. Both caches run this one loop, so their arithmetic and
    its order are the same by construction.

    The kernel is inlined into its callers (``inline="always"``): no compile of its own, and
    each caller's lookup is known when it compiles. numba keys a cached function on its own
    file only: after changing this loop, clear the numba cache (``__pycache__/*.nbi``) so that
    `paged_ops` and `fused_decode` compile it again.
    """

    @njit(nogil=True, fastmath=ATTENTION_MATH, inline="always")
    def attention_head(
        q: np.ndarray, k: np.ndarray, v: np.ndarray, where: Any, t: int, h: int, scale: Any,
        scores: np.ndarray, out: np.ndarray,
    ) -> None:  # fmt: skip
        """Query head h of q (heads, hd) over positions 0..t-1, whose rows of k and v
        ``kv_row`` finds through ``where`` -> out[h*hd : (h+1)*hd]; scores (>= t,) scratch.

        Eight-lane dot products for the scores; the weighted sum of value rows keeps 32 output
        lanes in registers over all positions (accumulating into ``out`` itself made every
        position a load and a store of each element: 5x slower at t = 200)."""
        hd = q.shape[1]
        qh = q[h]  # (hd,)
        n8 = hd - hd % 8
        m = _LOWEST  # float32 throughout: the exp loop below then runs on 16 lanes
        for j in range(t):
            row = kv_row(k, where, j)  # (hd,)
            acc = _vzero()
            for d in range(0, n8, 8):
                acc = _vfma(_vld_f32(qh, d), _vld_f32(row, d), acc)
            a = _vhsum(acc)
            for d in range(n8, hd):
                a += qh[d] * row[d]
            s = a * scale
            scores[j] = s
            m = max(m, s)
        for j in range(t):  # vectorised: `exp32`
            scores[j] = exp32(scores[j] - m)
        total = np.float32(0.0)
        for j in range(t):
            total += scores[j]
        for j in range(t):
            scores[j] = scores[j] / total  # the softmax weights
        o = out[h * hd : (h + 1) * hd]  # (hd,)
        d = 0
        while d + 64 <= hd:  # 64 lanes: one row lookup per position for the common hd 64
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            a4, a5, a6, a7 = _vzero(), _vzero(), _vzero(), _vzero()
            for j in range(t):
                row = kv_row(v, where, j)  # (hd,)
                p = _vsplat(scores[j])
                a0 = _vfma(p, _vld_f32(row, d), a0)
                a1 = _vfma(p, _vld_f32(row, d + 8), a1)
                a2 = _vfma(p, _vld_f32(row, d + 16), a2)
                a3 = _vfma(p, _vld_f32(row, d + 24), a3)
                a4 = _vfma(p, _vld_f32(row, d + 32), a4)
                a5 = _vfma(p, _vld_f32(row, d + 40), a5)
                a6 = _vfma(p, _vld_f32(row, d + 48), a6)
                a7 = _vfma(p, _vld_f32(row, d + 56), a7)
            _vst(o, d, a0)
            _vst(o, d + 8, a1)
            _vst(o, d + 16, a2)
            _vst(o, d + 24, a3)
            _vst(o, d + 32, a4)
            _vst(o, d + 40, a5)
            _vst(o, d + 48, a6)
            _vst(o, d + 56, a7)
            d += 64
        while d + 32 <= hd:
            a0, a1, a2, a3 = _vzero(), _vzero(), _vzero(), _vzero()
            for j in range(t):
                row = kv_row(v, where, j)  # (hd,)
                p = _vsplat(scores[j])
                a0 = _vfma(p, _vld_f32(row, d), a0)
                a1 = _vfma(p, _vld_f32(row, d + 8), a1)
                a2 = _vfma(p, _vld_f32(row, d + 16), a2)
                a3 = _vfma(p, _vld_f32(row, d + 24), a3)
            _vst(o, d, a0)
            _vst(o, d + 8, a1)
            _vst(o, d + 16, a2)
            _vst(o, d + 24, a3)
            d += 32
        while d + 8 <= hd:
            a0 = _vzero()
            for j in range(t):
                a0 = _vfma(_vsplat(scores[j]), _vld_f32(kv_row(v, where, j), d), a0)
            _vst(o, d, a0)
            d += 8
        for e in range(d, hd):
            a = np.float32(0.0)
            for j in range(t):
                a += scores[j] * kv_row(v, where, j)[e]
            o[e] = a

    return attention_head


_attention_head = decode_head_kernel(contiguous_row)


@njit(cache=True, nogil=True, fastmath=ATTENTION_MATH)
def attention_decode_heads(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, t: int, out: np.ndarray, h0: int, h1: int
) -> None:
    """`attention_decode` for query heads h0..h1-1 only (out's other heads are not touched)."""
    heads, hd = q.shape
    group = heads // k.shape[0]
    scale = np.float32(1.0 / math.sqrt(hd))
    scores = np.empty(t, dtype=np.float32)  # (t,)
    for h in range(h0, h1):
        _attention_head(q, k, v, h // group, t, h, scale, scores, out)


# Any order of the comparisons and additions is a valid reduction here; with it LLVM vectorises.
_REDUCE_MATH = {"nnan", "ninf", "nsz", "reassoc"}


@njit(cache=True, nogil=True, fastmath=_REDUCE_MATH)
def _max_of(row: np.ndarray, n: int) -> Any:
    """max(row[:n]), n >= 1."""
    m = row[0]
    for j in range(1, n):
        m = max(m, row[j])
    return m


@njit(cache=True, nogil=True, fastmath=_REDUCE_MATH)
def sum_of(row: np.ndarray) -> Any:
    """Sum of row (n,) float32 in one loop LLVM vectorises (several vector accumulators, in any
    order): the prefill softmax's row sums and the bandwidth probe's pieces
    (`workbench.engine.limits`)."""
    total = np.float32(0.0)
    for j in range(row.shape[0]):
        total += row[j]
    return total


@njit(cache=True, nogil=True)
def causal_shift(scores: np.ndarray, start: int) -> None:
    """The prefill's causal softmax before its exp: scores (rows, n, t), row i of each (n, t)
    block the query at position start + i, which sees positions 0..start+i. Subtracts from
    each row the maximum of what it sees and sets what it does not see to -inf (exp: 0)."""
    n, t = scores.shape[1], scores.shape[2]
    for r in range(scores.shape[0]):
        for i in range(n):
            row = scores[r, i]  # (t,)
            seen = min(t, start + i + 1)
            m = _max_of(row, seen)
            for j in range(seen):
                row[j] -= m
            for j in range(seen, t):
                row[j] = -np.inf


@njit(cache=True, nogil=True)
def normalize_rows(p: np.ndarray) -> None:
    """p (rows, t) /= each row's sum, in place: the softmax after its exp."""
    for r in range(p.shape[0]):
        row = p[r]  # (t,)
        total = sum_of(row)
        for j in range(row.shape[0]):
            row[j] = row[j] / total


def rope_tables(
    start: int, n: int, spec: Any, factors: Any | None
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, rope_dim/2) float32 for positions start..start+n-1 of ``spec``'s RoPE.

    ``factors``: a weight whose ``data`` (rope_dim/2,) divides the frequencies, or None.
    """
    return rope_tables_at(np.arange(start, start + n), spec, factors)


def rope_tables_at(positions: Any, spec: Any, factors: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """`rope_tables` for any positions (n,): cos, sin (n, rope_dim/2) float32 (a batch's
    decode rows, one position per sequence)."""
    # Angles in float64 so that positions in the thousands keep their low-order bits.
    half = spec.rope_dim // 2
    inv_freq = spec.rope_base ** (-np.arange(half, dtype=np.float64) * 2 / spec.rope_dim)
    if factors is not None:
        inv_freq = inv_freq / factors.data.astype(np.float64)
    scaled = np.asarray(positions, dtype=np.float64) / spec.rope_scale  # (n,)
    angles = np.outer(scaled, inv_freq)  # (n, half)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
