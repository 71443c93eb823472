"""A prompt's causal attention, feature-major, on the GEMM micro-kernels (`gemm_tiles`).

The work is cut into items of one query head by 32 positions (the last 16 where the prompt's
length asks), which numba's threads take one at a time, the longest first (the items late in
the prompt see the most keys). An item does, for query positions i0..i0+32 at cache positions
start+i0..:

1. scores, transposed: s (keys, 32) = K[:keys] @ Q^T, keys = start + i0 + 32 (all the item's
   positions can see), K's rows read in place from the cache, 8 at a time, as the tile's rows;
2. softmax down each column: the row maxima, exp (`cpu_ops.exp_in_place`, 16 lanes at a time)
   and the sums, lane-wise over the 32 positions (the only masked rows are the last 32, the
   diagonal);
3. out^T (hd, 32) = V^T @ s, V read transposed from the cache (stride 1 between the tile's
   rows, hd along k), then each column times the reciprocal of its sum.

So the causal half of the scores is never computed, nothing is transposed or copied, and the
products run at the micro-kernel's rate instead of the rate of BLAS on 64 x 128 matrices. The
sums are float32, in key order; the result agrees with a float64 reference to ~1e-6, as the
BLAS path's does, but not bit for bit with it.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from workbench.backends.cpu_ops import _EXP_LO, _LOWEST, exp_in_place
from workbench.backends.cpu_sync import claim, new_counters
from workbench.backends.gemm_tiles import COLS, COLS_TAIL, FAST_HERE, ROWS, tile16, tile32

BLOCK = COLS  # query positions per work item
N_ALIGN = COLS_TAIL  # the kernel needs n a multiple of this; `attention_cols` pads to it
USED = FAST_HERE  # whether the NumPy backend's prefill runs this kernel (else BLAS)


@njit(fastmath=True, nogil=True, inline="always")
def _scores(kf, ko, hd, keys, qf, qo, n, s, width, panel):
    """s[j, l] = K[j] . q[:, l] for j < keys rounded up to 8 and l < width (32 or 16). K's rows
    at kf[ko + j*hd], q's at qf[qo + d*n]; s (keys8, 32) flat. A last panel past ``keys`` is
    copied into ``panel`` (8*hd,) with zeros after the valid rows, so no row past the cache's
    filled part is read."""
    full = keys - keys % ROWS
    for r in range(0, keys + (-keys) % ROWS, ROWS):
        if r < full:
            src, so = kf, ko + r * hd
        else:
            panel[:] = 0.0
            panel[: (keys - r) * hd] = kf[ko + r * hd : ko + keys * hd]
            src, so = panel, 0
        if width == COLS:
            tile32(src, so, hd, 1, hd, qf, qo, n, s, r * COLS, COLS)
        else:
            tile16(src, so, hd, 1, hd, qf, qo, n, s, r * COLS, COLS)


@njit(fastmath=True, nogil=True, inline="always")
def _softmax_columns(s, keys, diag, scale, total):
    """s (keys8, 32) flat scores -> exp(scale * (s - max)) in place, each column l seeing rows
    j <= diag + l (0 past them); ``total`` (32,) their sums."""
    m = np.full(COLS, _LOWEST, np.float32)  # (32,) each column's maximum
    for j in range(keys):
        first = j - diag  # columns l < first cannot see row j
        for l in range(COLS):
            v = s[j * COLS + l] if l >= first else _LOWEST
            m[l] = v if v > m[l] else m[l]
    below = _EXP_LO - np.float32(1.0)  # exp32 of it is exactly 0
    for j in range(keys):
        first = j - diag
        for l in range(COLS):
            s[j * COLS + l] = scale * (s[j * COLS + l] - m[l]) if l >= first else below
    exp_in_place(s[: keys * COLS])  # 16 lanes at a time
    total[:] = 0.0
    for j in range(keys):
        for l in range(COLS):
            total[l] += s[j * COLS + l]


# NumPy's error model: no zero test per division (a column's sum is at least 1).
@njit(parallel=True, cache=True, fastmath=True, nogil=True, error_model="numpy")
def _attention(qt, k, v, start, n, out, group, nt, counters):
    """out = causal attention of qt over the cache: qt (heads*hd, n_pad) float32 for positions
    start.. (columns past n are zeros), k, v (kv_heads, ctx, hd) filled up to start+n,
    out (heads*hd, n_pad); query head h reads KV head h // group. nt threads (an argument:
    reading the count inside would keep numba from caching) take the items one at a time from
    ``counters`` (`cpu_sync.new_counters(1)`), the most keys first: whichever thread is free
    takes the next, so a thread the VM deschedules holds no share of the work."""
    n_pad = qt.shape[1]
    ctx, hd = k.shape[1], k.shape[2]
    heads = qt.shape[0] // hd
    blocks = -(-n_pad // BLOCK)
    items = heads * blocks
    qf, kf, vf, of = qt.reshape(-1), k.reshape(-1), v.reshape(-1), out.reshape(-1)
    scale = np.float32(1.0 / np.sqrt(hd))
    keys_max = start + n
    for _ in prange(nt):
        # (keys rounded up to 8, 32), zeroed: a 16-wide item leaves the last 16 lanes as they
        # were, and they go through the softmax (unused) with the others
        s = np.zeros((keys_max + ROWS) * COLS, np.float32)
        panel = np.empty(ROWS * hd, np.float32)  # (8, hd): the last rows of K, zero-padded
        total = np.empty(COLS, np.float32)  # (32,) each column's sum of exps
        item = claim(counters, 0)
        while item < items:
            b, h = blocks - 1 - item // heads, item % heads  # the longest rows of keys first
            i0 = b * BLOCK
            width = min(BLOCK, n_pad - i0)
            keys = min(start + i0 + width, keys_max)  # the keys these positions see
            ko = (h // group) * ctx * hd
            qo = h * hd * n_pad + i0
            _scores(kf, ko, hd, keys, qf, qo, n_pad, s, width, panel)
            _softmax_columns(s, keys, start + i0, scale, total)
            oo = h * hd * n_pad + i0
            for d in range(0, hd, ROWS):
                if width == COLS:
                    tile32(vf, ko + d, 1, hd, keys, s, 0, COLS, of, oo + d * n_pad, n_pad)
                else:
                    tile16(vf, ko + d, 1, hd, keys, s, 0, COLS, of, oo + d * n_pad, n_pad)
            for l in range(COLS):
                total[l] = 1.0 / total[l]
            for d in range(hd):
                row = of[oo + d * n_pad : oo + d * n_pad + width]
                for l in range(width):
                    row[l] *= total[l]
            item = claim(counters, 0)


def attention_cols(
    qt: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int
) -> np.ndarray:
    """Causal grouped-query attention of a prompt: qt (heads*hd, n) float32, column i the query
    at position start + i; k_cache, v_cache (kv_heads, ctx, hd) one layer's cache, filled up to
    start + n. -> (heads*hd, n). Query head h reads KV head h // (heads / kv_heads), as in
    llama.cpp and HF. On numba's current thread count."""
    n_kv, ctx, hd = k_cache.shape
    rows, n = qt.shape
    if rows % (hd * n_kv) or v_cache.shape != k_cache.shape or start + n > ctx:
        raise ValueError(
            f"attention of q {qt.shape} at {start} over caches {k_cache.shape}, {v_cache.shape}"
        )
    if hd % ROWS:
        raise ValueError(f"head size {hd} is not a multiple of {ROWS}")
    n_pad = -(-n // N_ALIGN) * N_ALIGN
    q = np.ascontiguousarray(qt, dtype=np.float32)  # (heads*hd, n_pad)
    if n_pad != n:
        q = np.concatenate([q, np.zeros((rows, n_pad - n), np.float32)], axis=1)
    out = np.empty((rows, n_pad), np.float32)  # (heads*hd, n_pad)
    k, v = np.ascontiguousarray(k_cache), np.ascontiguousarray(v_cache)
    nt = numba.get_num_threads()
    _attention(q, k, v, start, n, out, rows // hd // n_kv, nt, new_counters(1))
    return out if n_pad == n else np.ascontiguousarray(out[:, :n])
