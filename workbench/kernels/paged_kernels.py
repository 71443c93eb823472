"""Paged decode attention: one query per sequence for many sequences at once, each reading its
keys and values through its own page table from one layer of a page pool (kernels/attention.hip's
``attention_decode_paged``, then ``attention_decode_reduce``).

The pool layer is (pages, page_size, kv_heads, hd), float32 or fp16 (`workbench.engine.pages`
lays out every layer so); a sequence's position p is row ``p % page_size`` of page
``table[p // page_size]``. Each sequence is split into chunks as `ops_kernels.attention` would
split it alone (`ops_kernels.decode_chunk` of its own length), so its output is bit-identical to
the contiguous decode kernel on its gathered keys whatever it is batched with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.kernels import ops_kernels as ops
from workbench.kernels.registry import Cost, KernelSpec, Launch, register

Array = Any  # numpy.ndarray or cupy.ndarray


def gather_pages(layer: np.ndarray, table: Sequence[int], length: int) -> np.ndarray:
    """Positions 0..length-1 of one sequence from a pool layer (pages, page_size, kv_heads, hd)
    -> (kv_heads, length, hd), the contiguous cache layout."""
    page_size = layer.shape[1]
    idx = np.asarray(table[: -(-length // page_size)], dtype=np.int64)
    rows = layer[idx].reshape(-1, *layer.shape[2:])[:length]  # (length, kv_heads, hd)
    return np.ascontiguousarray(rows.transpose(1, 0, 2))


def paged_attention_reference(
    q: np.ndarray,
    k_pool: np.ndarray,
    v_pool: np.ndarray,
    tables: Sequence[Sequence[int]],
    lens: Sequence[int],
) -> np.ndarray:
    """q (n, heads, hd), pool layers (pages, page_size, kv_heads, hd) -> (n, heads*hd): sequence
    s's query attends to its keys 0..lens[s]-1 (its last position), as `attention_reference`."""
    out = []
    for s, (table, t) in enumerate(zip(tables, lens, strict=True)):
        k = gather_pages(k_pool, table, t).astype(np.float32)
        v = gather_pages(v_pool, table, t).astype(np.float32)
        out.append(ops.attention_reference(q[s : s + 1], k, v, t - 1))
    return np.concatenate(out)


def chunks_of(lens: Sequence[int], heads: int, kv_heads: int) -> list[int]:
    """Keys per chunk of each sequence: what the contiguous decode kernel takes for it alone."""
    return [ops.decode_chunk(int(t), heads, kv_heads) for t in lens]


def _launch(heads: int, kv_heads: int, lens: Sequence[int]) -> Launch:
    groups = -(-(heads // kv_heads) // ops.DECODE_HEADS)
    chunks = max(-(-t // c) for t, c in zip(lens, chunks_of(lens, heads, kv_heads), strict=True))
    return Launch((kv_heads, chunks, len(lens) * groups), (ops.ATTN_THREADS, 1, 1))


def ragged_lens(n: int, t: int) -> list[int]:
    """The registry shapes' ragged lengths: n sequences from t / n to t keys."""
    return [max(1, t * (s + 1) // n) for s in range(n)]


def _shape_launch(n: int, heads: int, kv_heads: int, t: int, **_: int) -> Launch:
    return _launch(heads, kv_heads, ragged_lens(n, t))


def _cost(n: int, heads: int, head_dim: int, t: int, kv_heads: int = 1, **_: int) -> Cost:
    # every sequence's keys and values once per group slice, its page table, q, out, partials
    lens = ragged_lens(n, t)
    launch = _launch(heads, kv_heads, lens)
    groups, chunks = launch.grid[2] // n, launch.grid[1]
    kv = 2 * sum(lens) * head_dim * kv_heads * groups
    partials = 2 * n * heads * chunks * (head_dim + 2)
    tables = sum(-(-t // 16) for t in lens) + 2 * n
    return Cost(
        bytes=4 * (kv + 2 * n * heads * head_dim + partials + tables),
        flops=4 * head_dim * heads * sum(lens),
    )


register(
    KernelSpec(
        "attention_decode_paged", "attention.hip", "attention_decode_paged", _shape_launch,
        paged_attention_reference, _cost,
        "decode attention for n sequences through their page tables (ragged lengths), "
        "flash-decoding chunks, K/V read once per GQA group",
        shapes=(
            {"n": 8, "heads": 9, "kv_heads": 3, "head_dim": 64, "t": 512, "page_size": 16},
            {"n": 32, "heads": 9, "kv_heads": 3, "head_dim": 64, "t": 2048, "page_size": 16},
        ),
    )
)  # fmt: skip


def _table_array(
    tables: Sequence[Sequence[int]], lens: Sequence[int], page_size: int, pages: int
) -> np.ndarray:
    """(n, max_pages) int32: each table's pages that its length uses, checked, zeros after."""
    width = max(1, max(-(-t // page_size) for t in lens))
    host = np.zeros((len(tables), width), np.int32)  # (n, max_pages)
    for s, (table, t) in enumerate(zip(tables, lens, strict=True)):
        need = -(-t // page_size)
        if len(table) < need:
            raise UserError(
                "user.bad_argument",
                f"sequence {s}: {t} keys need {need} pages, its table has {len(table)}",
            )
        host[s, :need] = table[:need]
    if host.min() < 0 or host.max() >= pages:
        raise UserError("user.bad_argument", f"a page table names a page outside 0..{pages - 1}")
    return host


def paged_attention(
    module: Any,
    q: Array,
    k_pool: Array,
    v_pool: Array,
    tables: Sequence[Sequence[int]],
    lens: Sequence[int],
    *,
    out: Array | None = None,
) -> Array:
    """q (n, heads, hd): the query of each of n sequences at its last position lens[s] - 1;
    k_pool, v_pool (pages, page_size, kv_heads, hd) float32 or fp16, one layer of the pool;
    tables[s]: sequence s's pages (at least ceil(lens[s] / page_size)) -> out (n, heads*hd).
    ``module`` is attention.hip's (`ops_kernels.load_module`)."""
    n, heads, hd = q.shape
    pages, page_size, kv_heads, _ = k_pool.shape
    ops._check("q", q)
    kv_half = ops._kv_half(k_pool)
    ops._check("k_pool", k_pool, (pages, page_size, kv_heads, hd), k_pool.dtype)
    ops._check("v_pool", v_pool, (pages, page_size, kv_heads, hd), k_pool.dtype)
    if hd > ops.ATTN_HD_MAX:
        raise UserError(
            "user.bad_argument",
            f"attention kernels support head_dim <= {ops.ATTN_HD_MAX}, not {hd}",
        )
    if heads % kv_heads:
        raise UserError("user.bad_argument", f"{heads} heads do not group over {kv_heads}")
    lens = [int(t) for t in lens]
    if len(tables) != n or len(lens) != n or n < 1:
        raise UserError("user.bad_argument", f"{n} queries need {n} page tables and lengths")
    if min(lens) < 1:
        raise UserError("user.bad_argument", "every sequence needs at least one key")
    xp = ops._xp(q)
    table_arr = xp.asarray(_table_array(tables, lens, page_size, pages))  # (n, max_pages)
    out = xp.empty((n, heads * hd), dtype=np.float32) if out is None else out
    ops._check("out", out, (n, heads * hd))
    launch = _launch(heads, kv_heads, lens)
    chunks = launch.grid[1]
    part = xp.empty((n, heads, chunks, hd + 2), dtype=np.float32)  # (o, m, l) per chunk
    lens_arr = xp.asarray(np.asarray(lens, np.int32))  # (n,)
    chunk_arr = xp.asarray(np.asarray(chunks_of(lens, heads, kv_heads), np.int32))  # (n,)
    args = (q, k_pool, v_pool, table_arr, lens_arr, chunk_arr, part,
            *ops._i32(heads, kv_heads, hd, page_size, table_arr.shape[1]),
            np.float32(1.0 / math.sqrt(hd)), kv_half)  # fmt: skip
    ops._launch(module, "attention_decode_paged", launch, args)
    reduce = Launch((n * heads, 1, 1), (ops.ATTN_THREADS, 1, 1))
    ops._launch(module, "attention_decode_reduce", reduce,
                (part, out, *ops._i32(n * heads, hd, chunks)))  # fmt: skip
    return out
