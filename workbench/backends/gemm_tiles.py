"""The register-blocked micro-kernels of the CPU engine's prompt products (`quant_gemm`) and of
the prompt's attention (`prefill_attention`): one tile of a float32 product ``C = W @ X``.

A tile is 8 rows of C by 32 (or 16) contiguous columns, held in 16 (or 8) accumulators of 16
lanes, one AVX-512 register each. Each step of the k loop loads the tile's columns of one row of
X (two 16-lane loads), broadcasts the 8 rows' values of W at that k, and does 16 FMAs. Every
operand is a flat float32 array with an offset and strides, so the same kernel multiplies W's
rows (stride ``ws`` between rows, 1 along k), the keys (rows of the cache) and the values read
transposed (stride 1 between rows, the head size along k). Results are summed along k in order,
one rounding per FMA.

    w[wo + i*ws + k*ks]   W, row i < 8 of the tile, k < k_len
    x[xo + k*xs + l]      X, lane l < 32 (16) of the tile
    c[co + i*cs + l]      C, written (not accumulated)

Inlined into their callers, where the strides are usually constants: LLVM folds them.
"""

from __future__ import annotations

from numba import njit

from workbench.backends.quant_simd import _has_avx512f, _vfma, _wld_f32, _wsplat, _wst, _wzero

ROWS = 8  # rows of W (and C) per tile
COLS = 32  # columns of X (and C) per full tile: two 16-lane vectors
COLS_TAIL = 16  # the narrow tile, for a last 16 columns

# Whether the engine multiplies with these tiles here rather than with BLAS: only on targets with
# AVX-512. A tile's 16 accumulators of 16 lanes and its operands need the 32 vector registers
# AVX-512 has; split into AVX2's 16 registers of 8 lanes they spill, and a tile ran at 38 GFLOP/s
# against OpenBLAS's 145. The kernels themselves run anywhere.
FAST_HERE = _has_avx512f()


@njit(nogil=True, inline="always")
def tile32(w, wo, ws, ks, k_len, x, xo, xs, c, co, cs):
    """c[co + i*cs + l] = sum over k < k_len of w[wo + i*ws + k*ks] * x[xo + k*xs + l], for
    i < 8 and l < 32; every array flat float32."""
    c00, c01, c10, c11 = _wzero(), _wzero(), _wzero(), _wzero()
    c20, c21, c30, c31 = _wzero(), _wzero(), _wzero(), _wzero()
    c40, c41, c50, c51 = _wzero(), _wzero(), _wzero(), _wzero()
    c60, c61, c70, c71 = _wzero(), _wzero(), _wzero(), _wzero()
    for k in range(k_len):
        b0, b1 = _wld_f32(x, xo + k * xs), _wld_f32(x, xo + k * xs + 16)
        a0 = wo + k * ks
        a = _wsplat(w[a0])
        c00, c01 = _vfma(a, b0, c00), _vfma(a, b1, c01)
        a = _wsplat(w[a0 + ws])
        c10, c11 = _vfma(a, b0, c10), _vfma(a, b1, c11)
        a = _wsplat(w[a0 + 2 * ws])
        c20, c21 = _vfma(a, b0, c20), _vfma(a, b1, c21)
        a = _wsplat(w[a0 + 3 * ws])
        c30, c31 = _vfma(a, b0, c30), _vfma(a, b1, c31)
        a = _wsplat(w[a0 + 4 * ws])
        c40, c41 = _vfma(a, b0, c40), _vfma(a, b1, c41)
        a = _wsplat(w[a0 + 5 * ws])
        c50, c51 = _vfma(a, b0, c50), _vfma(a, b1, c51)
        a = _wsplat(w[a0 + 6 * ws])
        c60, c61 = _vfma(a, b0, c60), _vfma(a, b1, c61)
        a = _wsplat(w[a0 + 7 * ws])
        c70, c71 = _vfma(a, b0, c70), _vfma(a, b1, c71)
    # Sixteen named accumulators, stored one by one: in an array they would leave the registers.
    _wst(c, co, c00)
    _wst(c, co + 16, c01)
    _wst(c, co + cs, c10)
    _wst(c, co + cs + 16, c11)
    _wst(c, co + 2 * cs, c20)
    _wst(c, co + 2 * cs + 16, c21)
    _wst(c, co + 3 * cs, c30)
    _wst(c, co + 3 * cs + 16, c31)
    _wst(c, co + 4 * cs, c40)
    _wst(c, co + 4 * cs + 16, c41)
    _wst(c, co + 5 * cs, c50)
    _wst(c, co + 5 * cs + 16, c51)
    _wst(c, co + 6 * cs, c60)
    _wst(c, co + 6 * cs + 16, c61)
    _wst(c, co + 7 * cs, c70)
    _wst(c, co + 7 * cs + 16, c71)


@njit(nogil=True, inline="always")
def tile16(w, wo, ws, ks, k_len, x, xo, xs, c, co, cs):
    """`tile32` for 16 columns: l < 16."""
    c0, c1, c2, c3 = _wzero(), _wzero(), _wzero(), _wzero()
    c4, c5, c6, c7 = _wzero(), _wzero(), _wzero(), _wzero()
    for k in range(k_len):
        b = _wld_f32(x, xo + k * xs)
        a0 = wo + k * ks
        c0 = _vfma(_wsplat(w[a0]), b, c0)
        c1 = _vfma(_wsplat(w[a0 + ws]), b, c1)
        c2 = _vfma(_wsplat(w[a0 + 2 * ws]), b, c2)
        c3 = _vfma(_wsplat(w[a0 + 3 * ws]), b, c3)
        c4 = _vfma(_wsplat(w[a0 + 4 * ws]), b, c4)
        c5 = _vfma(_wsplat(w[a0 + 5 * ws]), b, c5)
        c6 = _vfma(_wsplat(w[a0 + 6 * ws]), b, c6)
        c7 = _vfma(_wsplat(w[a0 + 7 * ws]), b, c7)
    _wst(c, co, c0)
    _wst(c, co + cs, c1)
    _wst(c, co + 2 * cs, c2)
    _wst(c, co + 3 * cs, c3)
    _wst(c, co + 4 * cs, c4)
    _wst(c, co + 5 * cs, c5)
    _wst(c, co + 6 * cs, c6)
    _wst(c, co + 7 * cs, c7)
