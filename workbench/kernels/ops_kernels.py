"""The transformer operations other than the quantized products, as HIP kernels.

Sources (kernels/): rmsnorm.hip, rope.hip, attention.hip, elementwise.hip, sampling.hip. For each
launchable symbol this module registers a `KernelSpec` (launch geometry, NumPy reference, cost
model, representative SmolLM2 shapes) and offers a thin launch wrapper. A wrapper takes the
compiled module (an `EmulatorModule` with NumPy arrays, or a ``cupy.RawModule`` with CuPy arrays:
anything with ``get_function``), checks shapes and dtypes, allocates the output with the inputs'
array module and launches with NumPy scalars (np.int32 / np.float32, the kernels' C types).

The references have exactly the NumPy engine's semantics (workbench.backends.numpy_backend,
workbench.engine.model, workbench.engine.sampler); the tests check both that the kernels match
the references and that the references match the engine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.kernels.registry import Cost, KernelSpec, Launch, kernels_dir, register

Array = Any  # numpy.ndarray or cupy.ndarray

BLOCK = 256  # threads per block of the row-wise and elementwise kernels
SAMPLING_BLOCK = 1024  # one block per row of vocabulary: use all the threads a block may have
GRID_CAP = 4096  # grid-stride kernels never need more blocks than this to fill a GPU
ATTN_HD_MAX = 128  # attention.hip sizes its shared tiles for head_dim up to this
ROPE_KV_HD_MAX = 1024  # rope_kv: one block of head_dim threads (rope.hip's ROPE_KV_HD_MAX)
PREFILL_QUERIES = 16  # attention_prefill: query positions per block
ATTN_THREADS = 256  # both attention kernels are written for exactly 256 threads
DECODE_TILE = 32  # attention_decode: keys per tile (attention.hip's DC_TK)
DECODE_HEADS = 8  # attention_decode: query heads per block (attention.hip's DC_GMAX)
DECODE_BLOCKS = 1024  # attention_decode splits the keys until about this many blocks
# ... but never below this many tiles per chunk. A block's fixed traffic (its queries, its partials
# written and merged: about 5 KiB for SmolLM2) is a third of its K/V reads at 1 tile (kernels
# report: attention 1.62x its ideal, the token 1.29x), 1.17x / 1.14x at 4 tiles, 1.10x / 1.12x at
# 8. A block walks its tiles one after the other, though: on an H200 at t = 1024 (fp32 cache)
# attention_decode took 16, 19, 27 and 44 us at 1, 2, 4 and 8 tiles (docs/kernels.md). 4 keeps
# the token under the counters' 1.15x bar at the least latency.
DECODE_MIN_TILES = 4
SAMPLE_MAX_K = 128  # sampling.hip keeps at most this many top-k candidates
SAMPLE_PASSES = 5  # sample_top_k_top_p's passes over the vocabulary (radix select + gather)

SOURCES = ("rmsnorm.hip", "rope.hip", "attention.hip", "elementwise.hip", "sampling.hip")


# --- NumPy references ---------------------------------------------------------------------------


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (n, dim), w (dim,) -> (n, dim) float32; mean of squares accumulated in float64."""
    ms = np.einsum("ij,ij->i", x, x, dtype=np.float64) / x.shape[1]
    scale = (1.0 / np.sqrt(ms + eps)).astype(np.float32)
    return x * scale[:, None] * w


def rope_inv_freq(
    rope_dim: int, base: float, rope_scale: float = 1.0, freq_factors: np.ndarray | None = None
) -> np.ndarray:
    """(rope_dim/2,) float64 angle per position of each pair, as cpu_ops.rope_tables."""
    inv = base ** (-np.arange(rope_dim // 2, dtype=np.float64) * 2 / rope_dim)
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors).astype(np.float64)
    return inv / rope_scale


def rope_table(
    positions: int,
    rope_dim: int,
    base: float,
    rope_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
    pos0: int = 0,
) -> np.ndarray:
    """(positions, rope_dim/2, 2) float32: (cos, sin) of positions pos0.. for the rope kernels,
    computed in float64 and rounded once (the same bits as `rope_reference` uses)."""
    angles = np.outer(
        np.arange(pos0, pos0 + positions, dtype=np.float64),
        rope_inv_freq(rope_dim, base, rope_scale, freq_factors),
    )  # (positions, rope_dim/2)
    return np.ascontiguousarray(np.stack([np.cos(angles), np.sin(angles)], axis=-1), np.float32)


def rope_reference(
    x: np.ndarray,
    pos0: int,
    *,
    mode: str,
    rope_dim: int,
    base: float,
    rope_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
) -> np.ndarray:
    """x (n, heads, head_dim) rotated for positions pos0..pos0+n-1; returns a new array."""
    n = x.shape[0]
    angles = np.outer(
        np.arange(pos0, pos0 + n, dtype=np.float64),
        rope_inv_freq(rope_dim, base, rope_scale, freq_factors),
    )  # (n, rope_dim/2)
    c = np.cos(angles).astype(np.float32)[:, None, :]
    s = np.sin(angles).astype(np.float32)[:, None, :]
    y = np.array(x, dtype=np.float32, copy=True)
    half = rope_dim // 2
    if mode == "norm":
        i0, i1 = slice(0, rope_dim, 2), slice(1, rope_dim, 2)
    elif mode == "neox":
        i0, i1 = slice(0, half), slice(half, rope_dim)
    else:
        raise UserError("user.bad_argument", f"RoPE mode must be 'norm' or 'neox', not {mode!r}")
    x0, x1 = y[..., i0].copy(), y[..., i1].copy()
    y[..., i0] = x0 * c - x1 * s
    y[..., i1] = x0 * s + x1 * c
    return y


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal GQA: q (n, heads, hd), k, v (kv_heads, >= start+n, hd) -> (n, heads*hd)."""
    n, heads, hd = q.shape
    t = start + n
    k, v = k[:, :t], v[:, :t]
    group = heads // k.shape[0]
    kk = np.repeat(k, group, axis=0)  # (heads, t, hd): head h reads KV head h // group
    vv = np.repeat(v, group, axis=0)
    scores = np.einsum("nhd,htd->hnt", q, kk) * np.float32(1.0 / np.sqrt(hd))  # (heads, n, t)
    visible = np.arange(t)[None, :] <= (start + np.arange(n))[:, None]  # (n, t)
    scores = np.where(visible[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hnt,htd->nhd", p, vv)  # (n, heads, hd)
    return out.reshape(n, heads * hd).astype(np.float32)


def swiglu_reference(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g: g / inf = -0, right
        return gate / (1.0 + np.exp(-gate)) * up


def add_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def kv_append_reference(
    k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """k, v (n, kv_heads, hd) into copies of k_cache, v_cache (kv_heads, ctx, hd) at start.."""
    kc, vc = k_cache.copy(), v_cache.copy()
    n = k.shape[0]
    kc[:, start : start + n] = k.transpose(1, 0, 2)
    vc[:, start : start + n] = v.transpose(1, 0, 2)
    return kc, vc


def argmax_reference(x: np.ndarray) -> np.ndarray:
    """(rows, vocab) -> (rows,) int32, first index on ties (numpy.argmax)."""
    return np.argmax(np.atleast_2d(x), axis=-1).astype(np.int32)


def softmax_reference(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(rows, vocab) -> softmax(x / T) in float64, returned as float32."""
    z = np.atleast_2d(x).astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def sample_reference(
    logits: np.ndarray,
    *,
    top_k: int,
    top_p: float = 1.0,
    min_p: float = 0.0,
    temperature: float = 1.0,
    u: float,
) -> int:
    """The token sample_top_k_top_p picks for the uniform number u (see sampling.hip).

    Candidates sorted by logit descending (ties: lower index), the first top_k kept; the
    smallest prefix whose temperature-1 probability reaches top_p; those with p >= min_p * p_0;
    then q = softmax(z / T) over them and the first index whose cumulative q exceeds
    u * sum(q). With u = rng.random() this is the engine Sampler's draw (Generator.choice
    searches the normalized cdf for the u it draws, side='right'), min-p and all.
    """
    z = np.asarray(logits, dtype=np.float32)
    order = np.lexsort((np.arange(z.size), -z))  # value descending, then index ascending
    ids = order[: min(top_k, z.size)]
    zc = z[ids].astype(np.float64)
    p = np.exp(zc - zc[0])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        ids, p, zc = ids[:keep], p[:keep], zc[:keep]
    if min_p > 0.0:
        keep = max(1, int(np.count_nonzero(p >= min_p * p[0])))
        ids, zc = ids[:keep], zc[:keep]
    q = np.exp((zc - zc[0]) / temperature)
    cdf = np.cumsum(q)
    pick = min(int(np.searchsorted(cdf / cdf[-1], u, side="right")), len(ids) - 1)
    return int(ids[pick])


# --- launch geometry and cost models --------------------------------------------------------------


def _blocks(count: int, block: int = BLOCK) -> int:
    return max(1, min(GRID_CAP, -(-count // block)))


def _rows_launch(rows: int = 1, block: int = BLOCK, **_: int) -> Launch:
    return Launch((rows, 1, 1), (block, 1, 1))


def _rmsnorm_launch(n: int = 1, block: int = BLOCK, **_: int) -> Launch:
    """One block per row of x (n, dim)."""
    return _rows_launch(n, block)


def _rmsnorm_cost(n: int, dim: int, **_: int) -> Cost:
    # read x and w, write out; square-accumulate (2) and scale twice (2) per element
    return Cost(bytes=4 * (2 * n * dim + dim), flops=4 * n * dim)


def _rope_launch(n: int, heads: int, rope_dim: int, **_: int) -> Launch:
    return Launch((_blocks(n * heads * (rope_dim // 2)), 1, 1), (BLOCK, 1, 1))


def _rope_cost(n: int, heads: int, rope_dim: int, **_: int) -> Cost:
    # the rotated dims are read and written; 4 multiplies and 2 adds per pair (angles not counted)
    return Cost(bytes=8 * n * heads * rope_dim, flops=3 * n * heads * rope_dim)


def _rope_kv_launch(head_dim: int, **_: int) -> Launch:
    return Launch((1, 1, 1), (head_dim, 1, 1))  # thread d: element d of every row


def _rope_kv_cost(heads: int, kv_heads: int, head_dim: int, rope_dim: int, **_: int) -> Cost:
    # q read and written, k and v read, fp16 cache rows written, the table row read
    return Cost(
        bytes=8 * heads * head_dim + 12 * kv_heads * head_dim + 4 * rope_dim,
        flops=3 * (heads + kv_heads) * rope_dim,
    )


def rope_kv_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    pos: int,
    *,
    mode: str,
    rope_dim: int,
    base: float,
    rope_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rotated q, k_cache, v_cache) as new arrays: `rope_reference` of q and k (heads, hd) at
    pos, then `kv_append_reference` (the cache's dtype rounds, as the kernel)."""
    rot = {"mode": mode, "rope_dim": rope_dim, "base": base, "rope_scale": rope_scale,
           "freq_factors": freq_factors}  # fmt: skip
    qr = rope_reference(q[None], pos, **rot)[0]
    kr = rope_reference(k[None], pos, **rot)
    kc, vc = kv_append_reference(kr, v[None], k_cache, v_cache, pos)
    return qr, kc, vc


def _prefill_launch(n: int, heads: int, **_: int) -> Launch:
    return Launch((-(-n // PREFILL_QUERIES), heads, 1), (ATTN_THREADS, 1, 1))


def _prefill_cost(n: int, heads: int, head_dim: int, start: int = 0, **_: int) -> Cost:
    # Each block streams K and V up to the last key its last query sees.
    keys_read = sum(
        min(start + n, start + i0 + PREFILL_QUERIES) for i0 in range(0, n, PREFILL_QUERIES)
    )
    pairs = n * start + n * (n + 1) // 2  # visible (query, key) pairs per head
    return Cost(
        bytes=4 * head_dim * heads * (2 * n + 2 * keys_read),
        flops=4 * head_dim * heads * pairs,  # q.k and p*v: 2 flops per dim each
    )


def decode_chunk(t: int, heads: int, kv_heads: int) -> int:
    """Keys per chunk of flash-decoding: a multiple of DECODE_TILE, small enough that about
    DECODE_BLOCKS blocks share the work (a long context fills the GPU), never below
    DECODE_MIN_TILES tiles (short contexts: fewer, fuller blocks)."""
    groups = -(-(heads // kv_heads) // DECODE_HEADS)
    chunks = max(1, DECODE_BLOCKS // (kv_heads * groups))
    tiles = -(-t // DECODE_TILE)
    return DECODE_TILE * max(DECODE_MIN_TILES, -(-tiles // chunks))


def _decode_launch(heads: int, kv_heads: int = 1, t: int = 1, **_: int) -> Launch:
    groups = -(-(heads // kv_heads) // DECODE_HEADS)
    chunks = -(-t // decode_chunk(t, heads, kv_heads))
    return Launch((kv_heads, chunks, groups), (ATTN_THREADS, 1, 1))


def _decode_cost(heads: int, head_dim: int, t: int, kv_heads: int = 1, **_: int) -> Cost:
    # each KV head's t keys and values once per group slice, q, out, and the chunks' partials
    groups = -(-(heads // kv_heads) // DECODE_HEADS)
    chunks = -(-t // decode_chunk(t, heads, kv_heads))
    kv = 2 * t * head_dim * kv_heads * groups
    partials = 2 * heads * chunks * (head_dim + 2)  # written, then read by the reduction
    return Cost(bytes=4 * (kv + 2 * heads * head_dim + partials), flops=4 * head_dim * heads * t)


def _flat_launch(count: int, **_: int) -> Launch:
    return Launch((_blocks(count), 1, 1), (BLOCK, 1, 1))


def _kv_append_launch(n: int, kv_heads: int, head_dim: int, **_: int) -> Launch:
    return _flat_launch(n * kv_heads * head_dim)


def _sampling_launch(rows: int = 1, **_: int) -> Launch:
    return Launch((rows, 1, 1), (SAMPLING_BLOCK, 1, 1))


# SmolLM2-135M: dim 576, 9 heads, 3 KV heads, head_dim 64, ffn 1536, vocab 49152, context 2048.
_ROWS = ({"n": 1, "dim": 576}, {"n": 512, "dim": 576})
_ROPE = (
    {"n": 1, "heads": 9, "head_dim": 64, "rope_dim": 64},
    {"n": 512, "heads": 9, "head_dim": 64, "rope_dim": 64},
    {"n": 512, "heads": 3, "head_dim": 64, "rope_dim": 64},
)
_ATTN = {"heads": 9, "kv_heads": 3, "head_dim": 64, "ctx": 2048}

_SPECS = (
    KernelSpec(
        "rmsnorm", "rmsnorm.hip", "rmsnorm", _rmsnorm_launch,
        rmsnorm_reference, _rmsnorm_cost,
        "RMSNorm of each row, one block per row", shapes=_ROWS,
    ),
    KernelSpec(
        "rope_norm", "rope.hip", "rope_norm", _rope_launch,
        rope_reference, _rope_cost,
        "RoPE in place, adjacent pairs (2i, 2i+1)", shapes=_ROPE,
    ),
    KernelSpec(
        "rope_neox", "rope.hip", "rope_neox", _rope_launch,
        rope_reference, _rope_cost,
        "RoPE in place, pairs (i, i + rope_dim/2)", shapes=_ROPE,
    ),
    KernelSpec(
        "rope_kv", "rope.hip", "rope_kv", _rope_kv_launch,
        rope_kv_reference, _rope_kv_cost,
        "decode RoPE of q and k fused with the KV-cache write of k and v",
        shapes=({"heads": 9, "kv_heads": 3, "head_dim": 64, "rope_dim": 64},),
    ),
    KernelSpec(
        "attention_prefill", "attention.hip", "attention_prefill", _prefill_launch,
        attention_reference, _prefill_cost,
        "causal GQA flash attention, 16 queries x 16-key tiles per block",
        shapes=({**_ATTN, "n": 512, "start": 0}, {**_ATTN, "n": 64, "start": 1024}),
    ),
    KernelSpec(
        "attention_decode", "attention.hip", "attention_decode", _decode_launch,
        attention_reference, _decode_cost,
        "flash-decoding: key chunks x GQA groups (K/V read once per group), then a merge",
        shapes=({**_ATTN, "t": 128}, {**_ATTN, "t": 2048}),
    ),
    KernelSpec(
        "swiglu", "elementwise.hip", "swiglu", _flat_launch,
        swiglu_reference, lambda count, **_: Cost(12 * count, 5 * count),
        "silu(gate) * up", shapes=({"count": 1536}, {"count": 512 * 1536}),
    ),
    KernelSpec(
        "add", "elementwise.hip", "add", _flat_launch,
        add_reference, lambda count, **_: Cost(12 * count, count),
        "residual add", shapes=({"count": 576}, {"count": 512 * 576}),
    ),
    KernelSpec(
        "kv_append", "elementwise.hip", "kv_append", _kv_append_launch,
        kv_append_reference,
        lambda n, kv_heads, head_dim, **_: Cost(16 * n * kv_heads * head_dim, 0),
        "write k, v (n, kv_heads, hd) into one layer of the cache",
        shapes=(
            {"n": 1, "kv_heads": 3, "head_dim": 64, "ctx": 2048},
            {"n": 512, "kv_heads": 3, "head_dim": 64, "ctx": 2048},
        ),
    ),
    KernelSpec(
        "argmax", "sampling.hip", "argmax", _sampling_launch,
        argmax_reference, lambda vocab, rows=1, **_: Cost(4 * rows * (vocab + 1), rows * vocab),
        "greedy pick per row (first index on ties)", shapes=({"rows": 1, "vocab": 49152},),
    ),
    KernelSpec(
        "softmax", "sampling.hip", "softmax", _sampling_launch,
        softmax_reference,
        # x read three times, out written twice and read once; max, sub, div, exp, add, div
        lambda vocab, rows=1, **_: Cost(4 * 6 * rows * vocab, 6 * rows * vocab),
        "softmax(x / T) per row", shapes=({"rows": 1, "vocab": 49152},),
    ),
    KernelSpec(
        "sample_top_k_top_p", "sampling.hip", "sample_top_k_top_p", _sampling_launch,
        sample_reference,
        # 4 radix-select histogram passes and the gather pass read the logits: 5 passes, any k
        lambda vocab, top_k, **_: Cost(4 * vocab * SAMPLE_PASSES, vocab * SAMPLE_PASSES),
        f"top-k (k <= {SAMPLE_MAX_K}), top-p, min-p, temperature, draw from a given u",
        shapes=({"vocab": 49152, "top_k": 40},),
    ),
)  # fmt: skip
for _spec in _SPECS:
    register(_spec)


# --- modules -----------------------------------------------------------------------------------


def load_module(
    source: str, target: str = "emulator", *, warp_size: int = 32, **kwargs: Any
) -> Any:
    """Compile one of SOURCES: an `EmulatorModule` ("emulator", with ``warp_size`` and its other
    keyword arguments) or a `cupy_target.CupyModule` ("cupy", compiled now)."""
    if source not in SOURCES:
        raise UserError("user.bad_argument", f"{source!r} is not one of {', '.join(SOURCES)}")
    path: Path = kernels_dir() / source
    options = (f"-I{kernels_dir()}",)
    if target == "emulator":
        from workbench.kernels.emulator import EmulatorModule

        return EmulatorModule(path=path, options=options, warp_size=warp_size, **kwargs)
    if target == "cupy":
        from workbench.kernels.cupy_target import load_module as load_gpu_module

        return load_gpu_module(path, options=options, **kwargs)
    raise UserError("user.bad_argument", f"target must be 'emulator' or 'cupy', not {target!r}")


# --- launch wrappers ------------------------------------------------------------------------------


def _xp(a: Array) -> Any:
    """The array module of a: numpy, or cupy for CuPy arrays (without importing cupy otherwise)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _check(name: str, a: Array, shape: tuple[int, ...] | None = None, dtype: Any = np.float32):
    if a.dtype != np.dtype(dtype):
        raise UserError("user.bad_argument", f"{name} must be {np.dtype(dtype)}, not {a.dtype}")
    if shape is not None and tuple(a.shape) != shape:
        raise UserError("user.bad_argument", f"{name} has shape {tuple(a.shape)}, want {shape}")
    if not a.flags.c_contiguous:
        raise UserError("user.bad_argument", f"{name} must be C-contiguous")


def _i32(*values: int) -> tuple[np.int32, ...]:
    return tuple(np.int32(v) for v in values)


def _launch(module: Any, symbol: str, launch: Launch, args: tuple[Any, ...]) -> None:
    module.get_function(symbol)(launch.grid, launch.block, args, shared_mem=launch.shared_mem)


def rmsnorm(
    module: Any, x: Array, w: Array, eps: float, *, out: Array | None = None, block: int = BLOCK
) -> Array:
    """x (n, dim), w (dim,) -> out (n, dim). block: a multiple of the warp size, <= 1024."""
    n, dim = x.shape
    _check("x", x)
    _check("w", w, (dim,))
    out = _xp(x).empty_like(x) if out is None else out
    _check("out", out, (n, dim))
    _launch(module, "rmsnorm", _rows_launch(n, block), (x, w, out, *_i32(dim), np.float32(eps)))
    return out


def rope(
    module: Any,
    x: Array,
    pos0: int,
    *,
    mode: str,
    rope_dim: int,
    base: float,
    rope_scale: float = 1.0,
    freq_factors: Array | None = None,
    table: Array | None = None,
    table_pos0: int = 0,
) -> Array:
    """Rotate x (n, heads, head_dim) in place for positions pos0..; returns x.

    ``table`` (`rope_table` for positions table_pos0..) is what a backend keeps for a model's
    whole context; without it this call's rows are computed here (base, rope_scale and
    freq_factors are then the table's parameters)."""
    n, heads, head_dim = x.shape
    _check("x", x)
    if mode not in ("norm", "neox"):
        raise UserError("user.bad_argument", f"RoPE mode must be 'norm' or 'neox', not {mode!r}")
    if rope_dim % 2 or not 0 < rope_dim <= head_dim:
        raise UserError("user.bad_argument", f"rope_dim {rope_dim} must be even, <= {head_dim}")
    launch = _rope_launch(n, heads, rope_dim)
    if table is None:  # this call's positions only
        ff = None if freq_factors is None else _host(freq_factors)
        table = _xp(x).asarray(rope_table(n, rope_dim, base, rope_scale, ff, pos0))
        table_pos0 = pos0
    _check("table", table)
    if table.ndim != 3 or table.shape[1:] != (rope_dim // 2, 2):
        raise UserError("user.bad_argument", f"RoPE table has shape {table.shape}")
    if not table_pos0 <= pos0 or pos0 + n - table_pos0 > table.shape[0]:
        raise UserError(
            "user.bad_argument",
            f"RoPE table covers positions {table_pos0}..{table_pos0 + table.shape[0] - 1}, "
            f"not {pos0}..{pos0 + n - 1}",
        )
    args = (x, *_i32(n, heads, head_dim, rope_dim, pos0), table, np.int32(table_pos0))
    _launch(module, f"rope_{mode}", launch, args)
    return x


def rope_kv(
    module: Any,
    q: Array,
    k: Array,
    v: Array,
    k_cache: Array,
    v_cache: Array,
    pos: int,
    *,
    mode: str,
    rope_dim: int,
    table: Array,
    table_pos0: int = 0,
    q_out: Array | None = None,
) -> Array:
    """One decode position: q (heads, hd) rotated into q_out (default: q itself, in place),
    k (kv_heads, hd) rotated into row pos of k_cache and v copied into row pos of v_cache
    ((kv_heads, ctx, hd) float32 or fp16); ``table`` as `rope`'s. The same values as `rope` of
    q and k, then `kv_append`. Returns q_out."""
    heads, hd = q.shape
    kv_heads = k.shape[0]
    ctx = k_cache.shape[1]
    _check("q", q)
    q_out = q if q_out is None else q_out
    _check("q_out", q_out, (heads, hd))
    _check("k", k, (kv_heads, hd))
    _check("v", v, (kv_heads, hd))
    kv_half = _kv_half(k_cache)
    _check("k_cache", k_cache, (kv_heads, ctx, hd), k_cache.dtype)
    _check("v_cache", v_cache, (kv_heads, ctx, hd), k_cache.dtype)
    _check("table", table)
    if mode not in ("norm", "neox"):
        raise UserError("user.bad_argument", f"RoPE mode must be 'norm' or 'neox', not {mode!r}")
    if rope_dim % 2 or not 0 < rope_dim <= hd:
        raise UserError("user.bad_argument", f"rope_dim {rope_dim} must be even, <= {hd}")
    if hd > ROPE_KV_HD_MAX:
        raise UserError("user.bad_argument", f"rope_kv supports head_dim <= {ROPE_KV_HD_MAX}")
    if table.ndim != 3 or table.shape[1:] != (rope_dim // 2, 2):
        raise UserError("user.bad_argument", f"RoPE table has shape {table.shape}")
    if not table_pos0 <= pos < table_pos0 + table.shape[0]:
        raise UserError("user.bad_argument", f"RoPE table does not cover position {pos}")
    if not 0 <= pos < ctx:
        raise UserError("user.context_overflow", f"position {pos} does not fit {ctx}")
    args = (q, q_out, k, v, k_cache, v_cache)
    args += (*_i32(heads, kv_heads, hd, rope_dim, mode == "neox", pos), table)
    args += (*_i32(table_pos0, ctx), kv_half)
    _launch(module, "rope_kv", _rope_kv_launch(hd), args)
    return q_out


def _host(a: Array) -> np.ndarray:
    return a.get() if _xp(a) is not np else np.asarray(a)


KV_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))  # the KV cache's element types


def _kv_half(k_cache: Array) -> np.int32:
    """The kernels' kv_half flag: 1 for an fp16 cache, 0 for float32; anything else refused."""
    if k_cache.dtype not in KV_DTYPES:
        raise UserError(
            "user.bad_argument", f"the KV cache must be float32 or float16, not {k_cache.dtype}"
        )
    return np.int32(k_cache.dtype == np.float16)


def _check_attention(q: Array, k_cache: Array, v_cache: Array, start: int) -> tuple[int, ...]:
    n, heads, hd = q.shape
    kv_heads, ctx, _ = k_cache.shape
    _check("q", q)
    _kv_half(k_cache)
    _check("k_cache", k_cache, (kv_heads, ctx, hd), k_cache.dtype)
    _check("v_cache", v_cache, (kv_heads, ctx, hd), k_cache.dtype)
    if hd > ATTN_HD_MAX:
        raise UserError(
            "user.bad_argument", f"attention kernels support head_dim <= {ATTN_HD_MAX}, not {hd}"
        )
    if heads % kv_heads:
        raise UserError("user.bad_argument", f"{heads} heads do not group over {kv_heads}")
    if start < 0 or start + n > ctx:
        raise UserError("user.bad_argument", f"positions {start}..{start + n - 1} exceed {ctx}")
    return n, heads, hd, kv_heads, ctx


def attention(
    module: Any,
    q: Array,
    k_cache: Array,
    v_cache: Array,
    start: int,
    *,
    out: Array | None = None,
    xq: Array | None = None,
) -> Array:
    """q (n, heads, hd) at positions start..; k_cache, v_cache (kv_heads, ctx, hd), one layer
    holding rows 0..start+n-1 -> out (n, heads*hd). n == 1 uses the decode kernel; then ``xq``
    ((heads*hd) * 9/8,) uint8, 16-aligned, heads*hd % 32 == 0) also receives out as Q8_1, by
    the merge kernel (attention_decode_reduce_q8_1: the next matvec needs no quantize launch)."""
    n, heads, hd, kv_heads, ctx = _check_attention(q, k_cache, v_cache, start)
    if xq is not None and (n != 1 or heads * hd % 32):
        raise UserError("user.bad_argument", "xq needs one query and heads * head_dim % 32 == 0")
    out = _xp(q).empty((n, heads * hd), dtype=np.float32) if out is None else out
    _check("out", out, (n, heads * hd))
    scale = np.float32(1.0 / math.sqrt(hd))  # as the reference: float32(1/sqrt(hd))
    if n == 1:
        t = start + 1
        launch = _decode_launch(heads, kv_heads, t)
        chunks = launch.grid[1]
        part = _xp(q).empty((heads, chunks, hd + 2), dtype=np.float32)  # (o, m, l) per chunk
        dims = _i32(heads, kv_heads, hd, ctx, t, decode_chunk(t, heads, kv_heads))
        args = (q, k_cache, v_cache, part, *dims, scale, _kv_half(k_cache))
        _launch(module, "attention_decode", launch, args)
        reduce = Launch((heads, 1, 1), (ATTN_THREADS, 1, 1))
        if xq is None:
            args = (part, out, *_i32(heads, hd, chunks))
            _launch(module, "attention_decode_reduce", reduce, args)
        else:
            _check("xq", xq, (heads * hd + heads * hd // 8,), np.uint8)
            args = (part, out, xq, *_i32(heads, hd, chunks))
            merge = Launch((-(-heads * hd // ATTN_THREADS), 1, 1), (ATTN_THREADS, 1, 1))
            _launch(module, "attention_decode_reduce_q8_1", merge, args)
    else:
        launch = _prefill_launch(n, heads)
        dims = _i32(n, heads, kv_heads, hd, ctx, start)
        args = (q, k_cache, v_cache, out, *dims, scale, _kv_half(k_cache))
        _launch(module, "attention_prefill", launch, args)
    return out


def attention_prefill(
    module: Any, q: Array, k_cache: Array, v_cache: Array, start: int, *, out: Array | None = None
) -> Array:
    """The prefill kernel for any n (attention() picks decode for n == 1)."""
    n, heads, hd, kv_heads, ctx = _check_attention(q, k_cache, v_cache, start)
    out = _xp(q).empty((n, heads * hd), dtype=np.float32) if out is None else out
    _check("out", out, (n, heads * hd))
    args = (q, k_cache, v_cache, out, *_i32(n, heads, kv_heads, hd, ctx, start))
    _launch(module, "attention_prefill", _prefill_launch(n, heads),
            (*args, np.float32(1.0 / math.sqrt(hd)), _kv_half(k_cache)))  # fmt: skip
    return out


def _flat(module: Any, symbol: str, a: Array, b: Array, out: Array | None) -> Array:
    _check("a", a)
    _check("b", b, tuple(a.shape))
    out = _xp(a).empty_like(a) if out is None else out
    _check("out", out, tuple(a.shape))
    _launch(module, symbol, _flat_launch(a.size), (a, b, out, *_i32(a.size)))
    return out


def swiglu(module: Any, gate: Array, up: Array, *, out: Array | None = None) -> Array:
    """silu(gate) * up for gate, up of any one shape (n, ffn); out may be gate or up."""
    return _flat(module, "swiglu", gate, up, out)


def add(module: Any, a: Array, b: Array, *, out: Array | None = None) -> Array:
    """a + b (the residual stream); out may be a or b."""
    return _flat(module, "add", a, b, out)


def kv_append(module: Any, k: Array, v: Array, k_cache: Array, v_cache: Array, start: int) -> None:
    """Write k, v (n, kv_heads, hd) into one layer's k_cache, v_cache (kv_heads, ctx, hd) at
    rows start..start+n-1 (``cache.k[layer]`` is contiguous and can be passed directly)."""
    n, kv_heads, hd = k.shape
    ctx = k_cache.shape[1]
    _check("k", k)
    _check("v", v, (n, kv_heads, hd))
    kv_half = _kv_half(k_cache)
    _check("k_cache", k_cache, (kv_heads, ctx, hd), k_cache.dtype)
    _check("v_cache", v_cache, (kv_heads, ctx, hd), k_cache.dtype)
    if start < 0 or start + n > ctx:
        raise UserError("user.context_overflow", f"{start + n} positions do not fit {ctx}")
    args = (k, v, k_cache, v_cache, *_i32(n, kv_heads, hd, ctx, start), kv_half)
    _launch(module, "kv_append", _kv_append_launch(n, kv_heads, hd), args)


def argmax(module: Any, x: Array, *, block: int = SAMPLING_BLOCK) -> Array:
    """x (vocab,) or (rows, vocab) -> (rows,) int32 indices of the maxima."""
    _check("x", x)
    rows, vocab = (1, x.shape[0]) if x.ndim == 1 else x.shape
    out = _xp(x).empty((rows,), dtype=np.int32)
    _launch(module, "argmax", _rows_launch(rows, block), (x, *_i32(vocab), out))
    return out


def softmax(
    module: Any, x: Array, temperature: float = 1.0, *, block: int = SAMPLING_BLOCK
) -> Array:
    """softmax(x / temperature) over the last axis of x (vocab,) or (rows, vocab)."""
    _check("x", x)
    if not temperature > 0:
        raise UserError("user.bad_sampler", f"temperature must be > 0, got {temperature}")
    rows, vocab = (1, x.shape[0]) if x.ndim == 1 else x.shape
    out = _xp(x).empty_like(x)
    args = (x, out, *_i32(vocab), np.float32(temperature))
    _launch(module, "softmax", _rows_launch(rows, block), args)
    return out


def sample(
    module: Any,
    logits: Array,
    *,
    top_k: int,
    top_p: float = 1.0,
    min_p: float = 0.0,
    temperature: float = 1.0,
    u: float,
    block: int = SAMPLING_BLOCK,
) -> Array:
    """Token id (1,) int32 drawn from logits (vocab,) with the uniform number u (see
    `sample_reference`). top_k must be 1..128: the kernel keeps its candidates in shared memory;
    for top_k = 0 (off) or larger k use the NumPy sampler."""
    (vocab,) = logits.shape
    _check("logits", logits)
    if not 1 <= top_k <= SAMPLE_MAX_K:
        raise UserError(
            "user.bad_sampler",
            f"the sampling kernel supports top_k 1..{SAMPLE_MAX_K}, got {top_k} "
            "(top_k = 0, no limit, needs the NumPy sampler)",
        )
    if not temperature > 0:
        raise UserError("user.bad_sampler", "temperature must be > 0 (0 = greedy: use argmax)")
    if not 0.0 <= u < 1.0:
        raise UserError("user.bad_sampler", f"u must be in [0, 1), got {u}")
    out = _xp(logits).empty((1,), dtype=np.int32)
    args = (logits, *_i32(vocab, top_k), np.float32(top_p), np.float32(min_p))
    args += (np.float32(temperature), np.float32(u), out)
    _launch(module, "sample_top_k_top_p", _rows_launch(1, block), args)
    return out
