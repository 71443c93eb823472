"""Decode attention of many sequences straight from the paged KV cache (NumPy backend).

The batched runner (`workbench.engine.runner`) keeps keys and values in pages of the shared pool
(`workbench.engine.pages`): position p of a sequence is row ``p % page_size`` of page
``table[p // page_size]``. `attention_decode_paged` reads them through the page tables, so no
sequence's cache is copied into a contiguous buffer. Each (sequence, head) does exactly the
arithmetic of `cpu_ops.attention_decode` on its positions, in the same order, and nothing that
depends on the other sequences: a sequence's output does not depend on who it is batched with.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def attention_decode_paged(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    tables: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
) -> None:
    """One query position per sequence, its keys and values through its page table.

    q (n, heads, hd); k, v (pages, page_size, kv_heads, hd) one layer of the pool; tables
    (n, max_pages) int64 page ids; lengths (n,) int64 positions each query sees (its own
    included) -> out (n, heads*hd). Query head h reads KV head h // (heads / kv_heads).
    """
    n, heads, hd = q.shape
    size = k.shape[1]
    group = heads // k.shape[2]
    scale = np.float32(1.0 / math.sqrt(hd))
    for job in prange(n * heads):
        i = job // heads
        h = job - i * heads
        g = h // group
        t = lengths[i]
        scores = np.empty(t, dtype=np.float32)  # (t,)
        m = -np.inf
        for j in range(t):
            page = tables[i, j // size]
            row = j - (j // size) * size
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[i, h, d] * k[page, row, g, d]
            s = acc * scale
            scores[j] = s
            m = max(m, s)
        total = np.float32(0.0)
        for j in range(t):
            e = np.exp(scores[j] - m)
            scores[j] = e
            total += e
        for d in range(hd):
            out[i, h * hd + d] = 0.0
        for j in range(t):
            page = tables[i, j // size]
            row = j - (j // size) * size
            p = scores[j] / total
            for d in range(hd):
                out[i, h * hd + d] += p * v[page, row, g, d]
