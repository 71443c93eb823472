"""A prompt's matrix products with the dequantization inside the GEMM: ``W @ xt`` on the blocks.

`quant_cpu.matmul_cols` used to dequantize each matrix into a float32 buffer (a pass over 425 MB
a SmolLM2 prefill) and hand it to BLAS. Here each thread dequantizes 8 rows of W at a time into
a buffer that stays in L1/L2 (8 x cols float32: 18 KB for 576 columns) and multiplies them with
xt straight away, in a register-blocked micro-kernel (`gemm_tiles`): 8 rows x 32 positions of
the output in 16 accumulators of 16 lanes (one AVX-512 register each), each step of the k loop
two loads of xt, eight broadcasts of W and sixteen FMAs. The dequantization's stores never leave
the core, and no BLAS thread pool runs beside numba's. At SmolLM2's shapes, one thread ran this
kernel at 131-139 GFLOP/s against OpenBLAS's 144-146 with the same float32 W
(docs/performance.md).

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

from workbench.backends.cpu_ops import rmsnorm_cols, swiglu
from workbench.backends.cpu_sync import claim_in_part, new_counters
from workbench.backends.gemm_tiles import COLS, COLS_TAIL, FAST_HERE, ROWS, tile16, tile32
from workbench.backends.quant_blocks import (
    _QK4_0,
    _QK4_1,
    _QK8_0,
    _deq_f32_row,
    _deq_q4_0_row,
    _deq_q4_1_row,
    _deq_q8_0_row,
)
from workbench.backends.quant_simd import _prefetch_range
from workbench.gguf.quants import block_layout, row_bytes

Q = GGMLQuantizationType

MR = ROWS  # rows of W per panel (and per micro-kernel tile)
NR = COLS  # positions per tile: two 16-lane vectors
N_ALIGN = COLS_TAIL  # the kernels need n a multiple of this; `gemm_cols` pads xt to it


@njit(nogil=True)
def _panel(w, xt, c, r):
    """c[r:r+8] = w @ xt for one panel: w (8 * cols,) float32, xt (cols, n), c (rows8, n),
    n a multiple of `N_ALIGN`."""
    k_len, n = xt.shape
    xf, cf = xt.reshape(-1), c.reshape(-1)
    n32 = n - n % NR
    for j in range(0, n32, NR):
        tile32(w, 0, k_len, 1, k_len, xf, j, n, cf, r * n + j, n)
    if n32 < n:
        tile16(w, 0, k_len, 1, k_len, xf, n32, n, cf, r * n + n32, n)


@njit(nogil=True)
def _zero_rows(w, first, cols):
    """Zero the panel's rows first.. (a last panel past W's rows)."""
    w[first * cols :] = 0.0


# The types with a fused kernel, as the small integer the driver branches on per row; the prefill
# uses it where the tiles are fast (`gemm_tiles.FAST_HERE`: AVX-512).
_KIND = {Q.F32: 0, Q.Q4_0: 1, Q.Q4_1: 2, Q.Q8_0: 3}
FUSED_TYPES = frozenset(_KIND) if FAST_HERE else frozenset()


@njit(nogil=True, inline="always")
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


@njit(nogil=True, inline="always")
def _prefetch_panel(raw, p):
    """Ask for the bytes of W's rows p*MR.. (panel p, where it exists). Issued a panel ahead,
    they arrive while the current panel is multiplied: a prefill reads each layer's weights
    once, from memory."""
    rows, rb = raw.shape
    _prefetch_range(raw.reshape(-1), min(p * MR, rows) * rb, min((p + 1) * MR, rows) * rb)


@njit(nogil=True, inline="always")
def _deq_panel(kind, raw, p, w, cols):
    """w (MR * cols,) = W's rows p*MR.. dequantized, zeros past W's last row."""
    m = min(MR, raw.shape[0] - p * MR)
    for i in range(m):
        _deq_row(kind, raw[p * MR + i], w[i * cols : (i + 1) * cols], cols)
    if m < MR:
        _zero_rows(w, m, cols)


# What a panel's product does with C (`_gemm`'s epilogue)
STORE = 0  # c = W @ xt
ADD = 1  # c += W @ xt: a residual stream, updated in place
SWIGLU = 2  # c = silu(W @ xt) * (W2 @ xt): a gate and an up matrix
ROPE_KV = 3  # Q, K, V: RoPE on Q's and K's panels, K's and V's written into the cache

# `_gemm`'s RoPE and cache operands when the epilogue has none: (cos, sin, k_cache, v_cache,
# start, n), one numba type for every call
_NO_ROPE = (
    np.zeros((0, 0), np.float32),
    np.zeros((0, 0), np.float32),
    np.zeros((0, 0, 0), np.float32),
    np.zeros((0, 0, 0), np.float32),
    0,
    0,
)
_NO_NORM = np.zeros(0, np.float32)  # `_gemm`'s norm weight when xt is multiplied as it is


# No fast-math here. numba compiles a function that is first called from a compiled caller with
# the caller's flags, and every later call, from anywhere, reuses that code: `cpu_ops.swiglu`
# called from a fast-math driver divided with a reciprocal, an ulp off in 4 of 10 values, in
# the decode too. The tiles are vector intrinsics, which carry no flags, so they lose nothing.
@njit(parallel=True, cache=True, nogil=True)
def _gemm(kind, raws, xt, cs, count, nt, epilogue, counters, rope, nw, eps):
    """Products of matrices W_i (raws[i] (rows_i, row_bytes) uint8 blocks of `_KIND` ``kind``)
    with xt (cols, n) float32, n % N_ALIGN == 0, into cs[i] (rows8_i, n) float32, rows8_i
    rows_i rounded up to MR, as ``epilogue`` says:

    - `STORE`: cs[i] = W_i @ xt for i < ``count`` (1 to 3: a layer's Q, K and V in one
      parallel region); the rows past W come out 0;
    - `ADD`: cs[0] += W_0 @ xt (its rows past W untouched);
    - `SWIGLU`: cs[0] = silu(W_0 @ xt) * (W_1 @ xt), W_1 of W_0's type and shape;
    - `ROPE_KV` (count 3: Q, K, V): cs[0] = W_0 @ xt rotated (`_rope_rows`), and with ``rope``
      = (cos, sin (rope_dim/2, n) float32, k_cache, v_cache (kv_heads, ctx, hd) float32, start,
      n), W_1 @ xt rotated and W_2 @ xt written into the caches at positions start..start+n
      (the first n columns of xt); every matrix's rows a multiple of hd, hd of MR. Otherwise
      ``rope`` is `_NO_ROPE`.

    With a norm weight nw (cols,) float32 (else `_NO_NORM`), the products are of
    rmsnorm_cols(xt, nw, eps) (`cpu_ops.rmsnorm_cols`, so its bits), which each thread computes
    into a copy of its own as it starts: the normalized xt is then in the cache of the core
    that reads it, where a pass of its own left it in the caller's (30 layers' norm and Q, K, V
    products: 19.2-20.6 ms with the pass, 16.9-18.0 with the copies).

    The unused slots of raws and cs repeat a used one (a tuple of one type). The panels of the
    ``count`` outputs, in order, are cut into nt parts, one per numba thread, which works
    through its own part and then claims what is left of the others' (`cpu_sync.claim_in_part`,
    ``counters`` from `cpu_sync.new_counters(nt)`): a thread that the VM deschedules is helped
    instead of holding the product up. A panel is computed by one thread whichever it is, so
    the results do not depend on who. Each thread has its own buffers; nt is an argument
    (reading the count inside would keep numba from caching).
    The epilogues run on a panel's 8 x n outputs while they are in L1, with the same operations
    as their own passes (`cpu_ops.swiglu`; a float32 add): the same bits as the product followed
    by them."""
    cols, n = xt.shape
    p0, p1 = -(-raws[0].shape[0] // MR), -(-raws[1].shape[0] // MR)
    panels = p0 + (p1 if count > 1 else 0) + (-(-raws[2].shape[0] // MR) if count > 2 else 0)
    for t in prange(nt):
        w = np.empty(MR * cols, np.float32)  # (MR * cols,): the panel's rows, dequantized
        a = np.empty((MR, n), np.float32)  # (MR, n): the panel's product, before the epilogue
        b = np.empty((MR, n), np.float32)  # (MR, n): W_1's (SWIGLU)
        if nw.shape[0] > 0:
            x = np.empty((cols, n), np.float32)  # (cols, n): xt normalized, this thread's copy
            rmsnorm_cols(xt, nw, eps, x)
        else:
            x = xt
        for k in range(nt):  # this thread's part first, then the others' leftovers
            part = (t + k) % nt
            q = claim_in_part(counters, 0, part, nt, panels)
            while q >= 0:
                i, p = (0, q) if q < p0 else ((1, q - p0) if q < p0 + p1 else (2, q - p0 - p1))
                _one_panel(kind, raws, x, cs[i], i, p, w, a, b, epilogue, rope)
                q = claim_in_part(counters, 0, part, nt, panels)


@njit(nogil=True, inline="always")
def _one_panel(kind, raws, xt, c, i, p, w, a, b, epilogue, rope):
    """`_gemm`'s work on panel p of matrix i: its rows of c, through the epilogue. w, a and b
    are the thread's buffers."""
    raw, r, cols = raws[i], p * MR, xt.shape[0]
    _prefetch_panel(raw, p + 1)
    if epilogue == SWIGLU:
        _prefetch_panel(raws[1], p + 1)
    _deq_panel(kind, raw, p, w, cols)
    if epilogue == STORE:
        _panel(w, xt, c, r)
    elif epilogue == ADD:
        _panel(w, xt, a, 0)
        _add_rows(c, r, a, min(MR, raw.shape[0] - r))
    elif epilogue == ROPE_KV:
        cos, sin, k_cache, v_cache, start, n = rope
        hd = k_cache.shape[2]
        if i == 0:  # Q: rotated in its output
            _panel(w, xt, c, r)
            _rope_rows(c[r : r + MR], r % hd, cos, sin)
        else:  # K rotated, V as it is: into the cache, position by position
            _panel(w, xt, a, 0)
            if i == 1:
                _rope_rows(a, r % hd, cos, sin)
            cache = k_cache if i == 1 else v_cache
            g, d = r // hd, r % hd
            for t in range(n):
                cache[g, start + t, d : d + MR] = a[:, t]
    else:
        _panel(w, xt, a, 0)
        _deq_panel(kind, raws[1], p, w, cols)
        _panel(w, xt, b, 0)
        swiglu(a, b, c[r : r + MR])


@njit(nogil=True, inline="always")
def _add_rows(c, r, a, m):
    """c[r : r + m] += a[:m], a float32 add per value, as loops: written as a slice expression
    inside `_gemm`'s parallel region, it is one that numba's array-expression rewrite turns into
    a parallel loop of its own, and the ADD products ran at 209-261 GFLOP/s against 233-279
    with these loops (alternated in one process)."""
    for i in range(m):
        ci, ai = c[r + i], a[i]
        for t in range(ci.shape[0]):
            ci[t] += ai[t]


@njit(nogil=True, inline="always")
def _rope_rows(a, d0, cos, sin):
    """RoPE, "norm" pairs, on a panel a (MR, >= n) of one head's rows d0..d0+MR (d0 even), in
    place: rows (2i, 2i+1) of the head for i < rope_dim/2, column t by cos[i, t], sin[i, t]
    (rope_dim/2, n). The products and sums of `cpu_ops.rope_cols`, so the same bits."""
    half, n = cos.shape
    for i0 in range(0, MR, 2):
        pair = (d0 + i0) // 2
        if pair < half:
            ra, rb, c, s = a[i0], a[i0 + 1], cos[pair], sin[pair]
            for t in range(n):
                x0, x1 = ra[t], rb[t]
                ra[t] = x0 * c[t] - x1 * s[t]
                rb[t] = x0 * s[t] + x1 * c[t]


def _check(qtype: GGMLQuantizationType, raw: np.ndarray, xt: np.ndarray) -> None:
    """The epilogues' callers skip `quant_cpu.matmul_cols`'s checks: W's row bytes must hold
    xt's rows (W's columns)."""
    if xt.ndim != 2 or raw.ndim != 2 or raw.shape[1] != row_bytes(qtype, xt.shape[0]):
        values, nbytes = block_layout(qtype)
        w_shape = (raw.shape[0], raw.shape[-1] // nbytes * values)
        raise ValueError(f"{qtype.name} W {w_shape} cannot multiply xt {xt.shape}")


def _read_only(raw: np.ndarray) -> np.ndarray:
    """raw as a C-contiguous read-only view (a copy if it is not contiguous): `_gemm`'s tuple of
    matrices must be of one numba type, and one type for the model's memory-mapped weights and
    anyone else's keeps to one compiled driver."""
    view = np.ascontiguousarray(raw).view()
    view.flags.writeable = False
    return view


def _padded(xt: np.ndarray) -> np.ndarray:
    """xt (cols, n) as contiguous float32 with zero positions up to a multiple of `N_ALIGN`."""
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    n = xt.shape[1]
    n_pad = -(-n // N_ALIGN) * N_ALIGN
    if n_pad == n:
        return xt
    return np.concatenate([xt, np.zeros((xt.shape[0], n_pad - n), np.float32)], axis=1)


def _products(
    qtype: GGMLQuantizationType,
    raws: list[np.ndarray],
    xt: np.ndarray,
    epilogue: int,
    rope: tuple = _NO_ROPE,
    norm: tuple[np.ndarray, float] | None = None,
) -> list[np.ndarray]:
    """`_gemm` into fresh outputs: [(rows_i, n) float32], one per matrix with `STORE`, the
    first's only with `SWIGLU` (of the pair) and `ROPE_KV` (Q's; K and V go to the cache);
    with ``norm`` = (w (cols,), eps), of xt normalized first (`_gemm`)."""
    nw, eps = _NO_NORM, 0.0
    if norm is not None:
        nw, eps = np.ascontiguousarray(norm[0], dtype=np.float32), float(norm[1])
        if nw.shape != (xt.shape[0],):
            raise ValueError(f"norm weight {nw.shape} for xt {xt.shape}")
    raws = [_read_only(raw) for raw in raws]
    xp = _padded(xt)
    n, n_pad = xt.shape[1], xp.shape[1]
    count = 1 if epilogue == SWIGLU else len(raws)  # matrices whose panels are shared out
    outputs = len(raws) if epilogue == STORE else 1
    cs = [np.empty((-(-raw.shape[0] // MR) * MR, n_pad), np.float32) for raw in raws[:outputs]]
    raw_slots, c_slots = tuple((raws + raws[:1] * 2)[:3]), tuple((cs + cs[:1] * 2)[:3])
    nt = numba.get_num_threads()
    counters = new_counters(nt)
    _gemm(_KIND[qtype], raw_slots, xp, c_slots, count, nt, epilogue, counters, rope, nw, eps)
    rows = [raw.shape[0] for raw in raws[:outputs]]
    if n_pad == n:
        return [c[:r] for c, r in zip(cs, rows)]
    return [np.ascontiguousarray(c[:r, :n]) for c, r in zip(cs, rows)]


def gemm_cols(qtype: GGMLQuantizationType, raw: np.ndarray, xt: np.ndarray) -> np.ndarray:
    """``W @ xt`` for W of type F32, Q4_0, Q4_1 or Q8_0: raw (rows, row_bytes) uint8 blocks, xt
    (cols, n) float32 -> (rows, n) float32, on numba's current thread count. It runs on any
    CPU; `FUSED_TYPES` says where the prefill uses it (AVX-512).

    The caller checks the shapes (`quant_cpu.matmul_cols` does). xt is padded with zero
    positions to a multiple of `N_ALIGN` and W's rows to a multiple of `MR` where needed; the
    padding never reaches the result."""
    return _products(qtype, [raw], xt, STORE)[0]


def gemm_qkv_cols(
    qtype: GGMLQuantizationType, q: np.ndarray, k: np.ndarray, v: np.ndarray, xt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Q @ xt, K @ xt, V @ xt)``, three matrices of ``qtype`` with xt's rows as columns,
    raw (rows_i, row_bytes) each, in one parallel region (one wake-up of numba's threads
    instead of three): the bits of three `gemm_cols`."""
    for raw in (q, k, v):
        _check(qtype, raw, xt)
    out_q, out_k, out_v = _products(qtype, [q, k, v], xt, STORE)
    return out_q, out_k, out_v


def gemm_qkv_rope_kv_cols(
    qtype: GGMLQuantizationType,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    xt: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    norm: tuple[np.ndarray, float] | None = None,
) -> np.ndarray:
    """A layer's attention inputs in one parallel region, each panel finished while in L1: Q @ xt
    with RoPE ("norm" pairs: rows 2i, 2i+1 of each head for i < rope_dim/2) returned (rows_q,
    n); K @ xt with RoPE and V @ xt written into k_cache, v_cache (kv_heads, ctx, hd) float32,
    C-contiguous, at positions start..start+n. cos, sin (rope_dim/2, n) float32, column t for
    position start+t (`cpu_ops.rope_tables_at`, transposed). The bits of three `gemm_cols`,
    `cpu_ops.rope_cols` on Q and K and the cache writes of ``kv_append_cols``. With ``norm`` =
    (w (cols,) float32, eps), xt is the residual stream, normalized first inside the region:
    the bits of `cpu_ops.rmsnorm_cols` before all that."""
    n_kv, ctx, hd = k_cache.shape
    n = xt.shape[1]
    for raw in (q, k, v):
        _check(qtype, raw, xt)
    caches_ok = all(
        c.dtype == np.float32 and c.flags.c_contiguous and c.flags.writeable
        for c in (k_cache, v_cache)
    )
    if not caches_ok or v_cache.shape != k_cache.shape or start < 0 or start + n > ctx:
        raise ValueError(f"caches {k_cache.shape}, {v_cache.shape} cannot take {n} at {start}")
    if hd % MR or q.shape[0] % hd or k.shape[0] != n_kv * hd or v.shape[0] != n_kv * hd:
        raise ValueError(
            f"Q, K, V of {q.shape[0]}, {k.shape[0]}, {v.shape[0]} rows are not heads of {hd}"
            f" (a multiple of {MR}) over {n_kv} KV heads"
        )
    half = cos.shape[0]
    if cos.shape != (half, n) or sin.shape != (half, n) or 2 * half > hd:
        raise ValueError(f"RoPE tables {cos.shape}, {sin.shape} for {n} positions of head {hd}")
    tables = [np.ascontiguousarray(a, dtype=np.float32) for a in (cos, sin)]
    rope = (*tables, k_cache, v_cache, start, n)
    return _products(qtype, [q, k, v], xt, ROPE_KV, rope, norm)[0]


def gemm_swiglu_cols(
    qtype: GGMLQuantizationType,
    gate: np.ndarray,
    up: np.ndarray,
    xt: np.ndarray,
    norm: tuple[np.ndarray, float] | None = None,
) -> np.ndarray:
    """``silu(G @ xt) * (U @ xt)`` elementwise, G and U both of ``qtype`` (`gemm_cols`'s types)
    and of one shape, raw (rows, row_bytes) each: a feed-forward's gate, up and SwiGLU in one
    pass, each panel's SwiGLU while its two products are in L1. -> (rows, n) float32, the bits
    of `cpu_ops.swiglu` on `gemm_cols`'s two products; with ``norm`` = (w (cols,) float32,
    eps), of xt normalized first, inside the region (`cpu_ops.rmsnorm_cols`'s bits)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    _check(qtype, gate, xt)
    return _products(qtype, [gate, up], xt, SWIGLU, norm=norm)[0]


def gemm_add_cols(
    qtype: GGMLQuantizationType, raw: np.ndarray, xt: np.ndarray, residual: np.ndarray
) -> np.ndarray:
    """``residual += W @ xt`` in place, and returned: residual (rows, n) C-contiguous float32
    (the residual stream a layer adds its output projection to). The bits of ``residual +
    gemm_cols(qtype, raw, xt)``."""
    rows, n = raw.shape[0], xt.shape[1]
    if (
        residual.shape != (rows, n)
        or residual.dtype != np.float32
        or not residual.flags.c_contiguous
    ):
        raise ValueError(
            f"residual {residual.shape} {residual.dtype} is not C-contiguous float32 ({rows}, {n})"
        )
    xp = _padded(xt)
    c = residual if xp.shape[1] == n else _padded(residual)
    raw = _read_only(raw)
    nt = numba.get_num_threads()
    counters = new_counters(nt)
    slots = (raw, raw, raw), xp, (c, c, c)  # the ADD's one matrix, its input and output
    _gemm(_KIND[qtype], *slots, 1, nt, ADD, counters, _NO_ROPE, _NO_NORM, 0.0)
    if c is not residual:
        residual[...] = c[:, :n]
    return residual
