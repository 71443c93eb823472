"""Decode attention of many sequences straight from the paged KV cache (NumPy backend).

The batched runner (`workbench.engine.runner`) keeps keys and values in pages of the shared pool
(`workbench.engine.pages`): position p of a sequence is row ``p % page_size`` of page
``table[p // page_size]``. `attention_decode_paged` reads them through the page tables, so no
sequence's cache is copied into a contiguous buffer. Each (sequence, head) runs the loop of
`cpu_ops.attention_decode` (`cpu_ops.decode_head_kernel`, with the page-table row lookup) on its
positions, and nothing that depends on the other sequences: a sequence's output does not depend
on who it is batched with.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from workbench.backends.cpu_ops import ATTENTION_MATH, decode_head_kernel


@njit(nogil=True, inline="always")
def _paged_row(cache: np.ndarray, where: tuple, j: int) -> np.ndarray:
    """The (hd,) row of position j in a pool layer (pages, page_size, kv_heads, hd), ``where``
    = (the sequence's page table (max_pages,), log2 of page_size, KV head g). A shift and a mask
    rather than a division: the lookup runs three times per position, and a 64-bit division
    took most of a head's time."""
    table, shift, g = where
    return cache[table[j >> shift], j & ((1 << shift) - 1), g]


_attention_head = decode_head_kernel(_paged_row)


@njit(nogil=True, inline="always")
def _log2(size: int) -> int:
    """log2 of a page size (a power of two: the callers check with `check_page_size`)."""
    shift = 0
    while (1 << shift) < size:
        shift += 1
    return shift


def check_page_size(size: int) -> None:
    """Refuse a pool whose page size is not a power of two (the row lookup shifts and masks)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"the page size must be a power of two, not {size}")


@njit(cache=True, nogil=True, fastmath=ATTENTION_MATH)
def attention_head_paged(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, table: np.ndarray, t: int, h: int,
    scores: np.ndarray, out: np.ndarray,
) -> None:  # fmt: skip
    """Query head h of one sequence's q (heads, hd) over its positions 0..t-1, through its page
    table (max_pages,) into one layer of the pool, k, v (pages, page_size, kv_heads, hd)
    -> out[h*hd : (h+1)*hd]; scores (>= t,) scratch; page_size a power of two. Compiled
    once: `attention_decode_paged` and the fused batched decode (`fused_rows`) both call it, so
    they compute alike."""
    hd = q.shape[1]
    group = q.shape[0] // k.shape[2]
    scale = np.float32(1.0 / math.sqrt(hd))
    _attention_head(q, k, v, (table, _log2(k.shape[1]), h // group), t, h, scale, scores, out)


def attention_decode_paged(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    tables: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
) -> None:
    """One query position per sequence, its keys and values through its page table.

    q (n, heads, hd); k, v (pages, page_size, kv_heads, hd) one layer of the pool, page_size a
    power of two; tables (n, max_pages) int64 page ids; lengths (n,) int64 positions each query
    sees (its own included) -> out (n, heads*hd). Query head h reads KV head
    h // (heads / kv_heads).
    """
    check_page_size(k.shape[1])
    _attention_decode_paged(q, k, v, tables, lengths, out)


@njit(parallel=True, cache=True, nogil=True, fastmath=ATTENTION_MATH)
def _attention_decode_paged(q, k, v, tables, lengths, out):
    n, heads, _ = q.shape
    for job in prange(n * heads):
        i = job // heads
        h = job - i * heads
        t = lengths[i]
        scores = np.empty(t, dtype=np.float32)  # (t,)
        attention_head_paged(q[i], k, v, tables[i], t, h, scores, out[i])
