"""One forward pass over a batch of sequences whose keys and values live in pages.

The rows of every sequence in the step (one per decoding sequence, a chunk for a prefilling one)
go through the elementwise operations (embedding, norms, residual adds, SwiGLU) together. The
weight products run per sequence through the backend's own `linear`, so a decoding row takes the
same one-row kernel (and the same accumulation order) whatever else is in the step, and a
prefill chunk the same matrix product: a sequence's tokens do not depend on who it is batched
with. (A single caller's `Engine.generate` decodes through the NumPy backend's fused one-call
path instead, which agrees with these per-operation kernels to about 1e-6, not bit for bit.)
Attention gathers each sequence's pages into one contiguous run of
positions and calls the backend's attention, as the single-caller path does on its own cache.

A backend with kernels for many decoding rows (the device backend's `linear_rows` and
`paged_attention`) gets each run of adjacent one-token slices as one call instead: the weights are
read once for all of them, each row still bit-identical to the one-row kernel, and attention reads
every sequence's keys from its pages in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.engine.model import Transformer
from workbench.engine.pages import PagePool

# (page table, first position, token ids) of one sequence's rows in a step
Slice = tuple[list[int], int, list[int]]


def forward(tf: Transformer, pool: PagePool, slices: list[Slice]) -> list[Any]:
    """Run every slice's tokens at its positions; return each slice's last-position logits
    (vocab,), in order. Keys and values are written into the slices' pages."""
    spec, be = tf.spec, tf.backend
    hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    bounds = []
    row = 0
    for _, _, toks in slices:
        bounds.append((row, row + len(toks)))
        row += len(toks)
    # A backend with kernels for many one-token rows (the device backend: `linear_rows`, one
    # weight read for all of them, and `paged_attention` over the page tables in place) takes
    # each run of adjacent decoding slices as one call; otherwise every slice is its own call.
    paged = hasattr(be, "paged_attention") and hasattr(be, "linear_rows")
    runs: list[list[Any]] = []  # [first row, end row, rows of one-token slices only]
    for a, b in bounds:
        one = paged and b - a == 1
        if one and runs and runs[-1][2]:
            runs[-1][1] = b
        else:
            runs.append([a, b, one])

    def linear(w: Any, h: Any) -> Any:
        parts = [be.linear_rows(w, h[a:b]) if one else be.linear(w, h[a:b]) for a, b, one in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    ids = np.asarray([t for _, _, toks in slices for t in toks], dtype=np.int64)
    x = be.embed(tf.tok_embd, ids)  # (rows, dim)
    decoding = [j for j, (a, b) in enumerate(bounds) if paged and b - a == 1]  # slices
    for i, lw in enumerate(tf.layers):
        h = be.rmsnorm(x, lw.attn_norm, spec.norm_eps)  # (rows, dim)
        q_all = linear(lw.attn_q, h)  # (rows, heads*hd)
        k_all = linear(lw.attn_k, h)  # (rows, kv_heads*hd)
        v_all = linear(lw.attn_v, h)  # (rows, kv_heads*hd)
        att: list[Any] = [None] * len(slices)
        queries: list[Any] = []  # the decoding slices' rotated queries (1, heads, hd)
        for j, ((a, b), (table, start, _)) in enumerate(zip(bounds, slices, strict=True)):
            n = b - a
            q = q_all[a:b].reshape(n, nh, hd)  # (n, heads, hd)
            k = k_all[a:b].reshape(n, nkv, hd)  # (n, kv_heads, hd)
            v = v_all[a:b].reshape(n, nkv, hd)  # (n, kv_heads, hd)
            be.rope(q, start, spec, tf.rope_factors)
            be.rope(k, start, spec, tf.rope_factors)
            pool.write(i, table, start, k, v)
            if j in decoding:
                queries.append(q)
            else:
                kc, vc = pool.gather(i, table, start + n)  # (kv_heads, start+n, hd) each
                att[j] = be.attention(q, kc, vc, start)  # (n, heads*hd)
        if decoding:  # every decoding slice's query against its own pages, one launch
            q = np.concatenate(queries)  # (d, heads, hd)
            tables = [slices[j][0] for j in decoding]
            lens = [slices[j][1] + 1 for j in decoding]
            out = be.paged_attention(q, pool.k[i], pool.v[i], tables, lens)  # (d, heads*hd)
            for r, j in enumerate(decoding):
                att[j] = out[r : r + 1]
        x = be.add(x, linear(lw.attn_output, att[0] if len(att) == 1 else np.concatenate(att)))
        h = be.rmsnorm(x, lw.ffn_norm, spec.norm_eps)
        ff = be.swiglu(linear(lw.ffn_gate, h), linear(lw.ffn_up, h))  # (rows, ffn)
        x = be.add(x, linear(lw.ffn_down, ff))
    last = x[[b - 1 for _, b in bounds]]  # (slices, dim)
    h = be.rmsnorm(last, tf.output_norm, spec.norm_eps)
    return [be.linear(tf.output, h[j : j + 1])[0] for j in range(len(slices))]
