"""A prompt's matrix products with the dequantization inside the GEMM: ``W @ xt`` on the blocks.

`quant_cpu.matmul_cols` used to dequantize each matrix into a float32 buffer (a pass over 425 MB
a SmolLM2 prefill) and hand it to BLAS. Here each thread dequantizes 8 rows of W at a time into
a buffer that stays in L1/L2 (8 x cols float32: 18 KB for 576 columns) and multiplies them with
xt straight away, in a register-blocked micro-kernel: 8 rows x 32 positions of the output in 16
accumulators of 16 lanes (one AVX-512 register each), each step of the k loop two loads of xt,
eight broadcasts of W and sixteen FMAs. The dequantization's stores never leave the core, and no
BLAS thread pool runs beside numba's. At SmolLM2's shapes, one thread ran this kernel at 131-139
GFLOP/s against OpenBLAS's 144-146 with the same float32 W (docs/performance.md).

The same float32 weights as `quant_cpu.dequantize` (the types' row kernels) and float32 FMAs
summed along k in order, one accumulator per output: the products agree with a float64 reference
to ~1e-7 of sum(|W| |x|), as BLAS's do, but not bit for bit with them.

Types that take this path: `FUSED_TYPES` (F32, Q4_0, Q4_1, Q8_0, on CPUs with AVX-512);
`quant_cpu.matmul_cols` dequantizes the others for BLAS. `gemm_cols` itself runs anywhere.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from workbench.backends.quant_blocks import (
    _QK4_0,
    _QK4_1,
    _QK8_0,
    _deq_f32_row,
    _deq_q4_0_row,
    _deq_q4_1_row,
    _deq_q8_0_row,
)
from workbench.backends.quant_simd import _has_avx512f, _vfma, _wld_f32, _wsplat, _wst, _wzero

Q = GGMLQuantizationType

MR = 8  # rows of W per panel (and per micro-kernel tile)
NR = 32  # positions per tile: two 16-lane vectors
NR_TAIL = 16  # the last tile of a row of tiles when n % 32 == 16
N_ALIGN = NR_TAIL  # the kernels need n a multiple of this; `gemm_cols` pads xt to it


@njit(fastmath=True, nogil=True, inline="always")
def _tile32(w, k_len, xf, n, j, cf, r):
    """c[r:r+8, j:j+32] = w @ xt[:, j:j+32]: w (8 * k_len,) a panel's rows back to back, xf and
    cf xt (k_len, n) and c (rows, n) flattened."""
    c00, c01, c10, c11 = _wzero(), _wzero(), _wzero(), _wzero()
    c20, c21, c30, c31 = _wzero(), _wzero(), _wzero(), _wzero()
    c40, c41, c50, c51 = _wzero(), _wzero(), _wzero(), _wzero()
    c60, c61, c70, c71 = _wzero(), _wzero(), _wzero(), _wzero()
    for k in range(k_len):
        b0, b1 = _wld_f32(xf, k * n + j), _wld_f32(xf, k * n + j + 16)
        a = _wsplat(w[k])
        c00, c01 = _vfma(a, b0, c00), _vfma(a, b1, c01)
        a = _wsplat(w[k_len + k])
        c10, c11 = _vfma(a, b0, c10), _vfma(a, b1, c11)
        a = _wsplat(w[2 * k_len + k])
        c20, c21 = _vfma(a, b0, c20), _vfma(a, b1, c21)
        a = _wsplat(w[3 * k_len + k])
        c30, c31 = _vfma(a, b0, c30), _vfma(a, b1, c31)
        a = _wsplat(w[4 * k_len + k])
        c40, c41 = _vfma(a, b0, c40), _vfma(a, b1, c41)
        a = _wsplat(w[5 * k_len + k])
        c50, c51 = _vfma(a, b0, c50), _vfma(a, b1, c51)
        a = _wsplat(w[6 * k_len + k])
        c60, c61 = _vfma(a, b0, c60), _vfma(a, b1, c61)
        a = _wsplat(w[7 * k_len + k])
        c70, c71 = _vfma(a, b0, c70), _vfma(a, b1, c71)
    o = r * n + j
    _wst(cf, o, c00)
    _wst(cf, o + 16, c01)
    _wst(cf, o + n, c10)
    _wst(cf, o + n + 16, c11)
    _wst(cf, o + 2 * n, c20)
    _wst(cf, o + 2 * n + 16, c21)
    _wst(cf, o + 3 * n, c30)
    _wst(cf, o + 3 * n + 16, c31)
    _wst(cf, o + 4 * n, c40)
    _wst(cf, o + 4 * n + 16, c41)
    _wst(cf, o + 5 * n, c50)
    _wst(cf, o + 5 * n + 16, c51)
    _wst(cf, o + 6 * n, c60)
    _wst(cf, o + 6 * n + 16, c61)
    _wst(cf, o + 7 * n, c70)
    _wst(cf, o + 7 * n + 16, c71)


@njit(fastmath=True, nogil=True, inline="always")
def _tile16(w, k_len, xf, n, j, cf, r):
    """`_tile32` for 16 positions, c[r:r+8, j:j+16]."""
    c0, c1, c2, c3 = _wzero(), _wzero(), _wzero(), _wzero()
    c4, c5, c6, c7 = _wzero(), _wzero(), _wzero(), _wzero()
    for k in range(k_len):
        b = _wld_f32(xf, k * n + j)
        c0 = _vfma(_wsplat(w[k]), b, c0)
        c1 = _vfma(_wsplat(w[k_len + k]), b, c1)
        c2 = _vfma(_wsplat(w[2 * k_len + k]), b, c2)
        c3 = _vfma(_wsplat(w[3 * k_len + k]), b, c3)
        c4 = _vfma(_wsplat(w[4 * k_len + k]), b, c4)
        c5 = _vfma(_wsplat(w[5 * k_len + k]), b, c5)
        c6 = _vfma(_wsplat(w[6 * k_len + k]), b, c6)
        c7 = _vfma(_wsplat(w[7 * k_len + k]), b, c7)
    o = r * n + j
    _wst(cf, o, c0)
    _wst(cf, o + n, c1)
    _wst(cf, o + 2 * n, c2)
    _wst(cf, o + 3 * n, c3)
    _wst(cf, o + 4 * n, c4)
    _wst(cf, o + 5 * n, c5)
    _wst(cf, o + 6 * n, c6)
    _wst(cf, o + 7 * n, c7)


@njit(fastmath=True, nogil=True)
def _panel(w, xt, c, r):
    """c[r:r+8] = w @ xt for one panel: w (8 * cols,) float32, xt (cols, n), c (rows8, n),
    n a multiple of `N_ALIGN`."""
    k_len, n = xt.shape
    xf, cf = xt.reshape(-1), c.reshape(-1)
    n32 = n - n % NR
    for j in range(0, n32, NR):
        _tile32(w, k_len, xf, n, j, cf, r)
    if n32 < n:
        _tile16(w, k_len, xf, n, n32, cf, r)


@njit(fastmath=True, nogil=True)
def _zero_rows(w, first, cols):
    """Zero the panel's rows first.. (a last panel past W's rows)."""
    w[first * cols :] = 0.0


# The types with a fused kernel, as the small integer the driver branches on per row. Only on
# targets with AVX-512: the micro-kernel's 16 accumulators of 16 lanes and its operands need the
# 32 vector registers AVX-512 has; split into AVX2's 16 registers of 8 lanes they would spill.
_KIND = {Q.F32: 0, Q.Q4_0: 1, Q.Q4_1: 2, Q.Q8_0: 3}
FUSED_TYPES = frozenset(_KIND) if _has_avx512f() else frozenset()


@njit(fastmath=True, nogil=True, inline="always")
def _deq_row(kind, row, dst, cols):
    """One row of W (row bytes) -> dst (cols,) float32, with the type's own row kernel."""
    if kind == 0:
        _deq_f32_row(row, dst, cols)
    elif kind == 1:
        _deq_q4_0_row(row, dst, cols // _QK4_0)
    elif kind == 2:
        _deq_q4_1_row(row, dst, cols // _QK4_1)
    else:
        _deq_q8_0_row(row, dst, cols // _QK8_0)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _gemm(kind, raw, xt, c, nt):
    """c = W @ xt: raw (rows, row_bytes) uint8 blocks of `_KIND` ``kind``, xt (cols, n) float32
    with n % N_ALIGN == 0, c (rows8, n) float32 with rows8 = rows rounded up to MR (the rows
    past W come out 0). nt ranges of panels, each with its own panel buffer, over numba's
    threads (the count is an argument: reading it inside would keep numba from caching)."""
    rows, cols = raw.shape[0], xt.shape[0]
    panels = c.shape[0] // MR
    for t in prange(nt):
        w = np.empty(MR * cols, np.float32)  # (MR * cols,): the panel's rows, dequantized
        for p in range(t * panels // nt, (t + 1) * panels // nt):
            m = min(MR, rows - p * MR)
            for i in range(m):
                _deq_row(kind, raw[p * MR + i], w[i * cols : (i + 1) * cols], cols)
            if m < MR:
                _zero_rows(w, m, cols)
            _panel(w, xt, c, p * MR)


def gemm_cols(qtype: GGMLQuantizationType, raw: np.ndarray, xt: np.ndarray) -> np.ndarray:
    """``W @ xt`` for W of type F32, Q4_0, Q4_1 or Q8_0: raw (rows, row_bytes) uint8 blocks, xt
    (cols, n) float32 -> (rows, n) float32, on numba's current thread count. It runs on any
    CPU; `FUSED_TYPES` says where the prefill uses it (AVX-512).

    The caller checks the shapes (`quant_cpu.matmul_cols` does). xt is padded with zero
    positions to a multiple of `N_ALIGN` and W's rows to a multiple of `MR` where needed; the
    padding never reaches the result."""
    raw, xt = np.ascontiguousarray(raw), np.ascontiguousarray(xt, dtype=np.float32)
    rows, n = raw.shape[0], xt.shape[1]
    n_pad, rows_pad = -(-n // N_ALIGN) * N_ALIGN, -(-rows // MR) * MR
    if n_pad != n:
        xt = np.concatenate([xt, np.zeros((xt.shape[0], n_pad - n), np.float32)], axis=1)
    c = np.empty((rows_pad, n_pad), np.float32)  # (rows rounded up to MR, n rounded up)
    _gemm(_KIND[qtype], raw, xt, c, numba.get_num_threads())
    return c[:rows] if n_pad == n else np.ascontiguousarray(c[:rows, :n])
