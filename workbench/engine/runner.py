"""One forward pass over a batch of sequences whose keys and values live in pages.

A step holds decode rows (one position of each decoding sequence) and at most one prefill chunk
(several positions of one sequence). All rows go through the elementwise operations (embedding,
norms, residual adds, SwiGLU) together: row-by-row arithmetic.

On a backend with the batched decode operations (the NumPy backend: ``linear_rows``,
``rope_rows``, ``attention_paged``) the decode rows of all sequences take each weight product as
one call that reads the weights once for all of them (`quant_batch.matvec_rows`), and attention
reads every sequence's keys and values through its page table, with nothing copied. Each row's
arithmetic is the same whatever else is in the batch, so a sequence's tokens do not depend on who
it is batched with (a sequence alone takes the same calls with one row). A prompt chunk of at
most ``linear_rows_max`` rows joins the decode rows in the batched products; a longer one takes
the backend's `linear` (a matrix product). A chunk's attention gathers its pages into one
contiguous run of positions, as the single-caller path does on its own cache. Backends without
the batched operations run every slice through `linear` and the gathered attention.

A step of decode rows only goes, where the backend has it, through its one-call decode step
(`Transformer.decode_rows`, the NumPy backend's `fused_rows`), which computes each row as these
operations do, without a Python-level call per operation. (A single caller's `Engine.generate`
decodes through the NumPy backend's fused one-sequence path instead, which agrees with these
kernels to about 1e-6, not bit for bit.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.engine.model import Transformer
from workbench.engine.pages import PAGE_SIZE, PagePool

# (page table, first position, token ids) of one sequence's rows in a step
Slice = tuple[list[int], int, list[int]]


def forward(tf: Transformer, pool: PagePool, slices: list[Slice]) -> list[Any]:
    """Run every slice's tokens at its positions; return each slice's last-position logits
    (vocab,), in order. Keys and values are written into the slices' pages."""
    be = tf.backend
    if tf.decode_rows is not None and all(len(toks) == 1 for _, _, toks in slices):
        return list(_decode_rows(tf, pool, slices))
    batched = hasattr(be, "linear_rows") and hasattr(be, "attention_paged")
    if batched:
        order = [j for j, s in enumerate(slices) if len(s[2]) == 1]
        order += [j for j, s in enumerate(slices) if len(s[2]) > 1]
        n_decode = sum(1 for s in slices if len(s[2]) == 1)
    else:
        order, n_decode = list(range(len(slices))), 0
    ordered = [slices[j] for j in order]
    last = _forward(tf, pool, ordered, n_decode if batched else None)
    out: list[Any] = [None] * len(slices)
    for j, lg in zip(order, last, strict=True):
        out[j] = lg
    return out


def _page_tables(slices: list[Slice]) -> tuple[tuple[int, ...], np.ndarray]:
    """The positions of decode rows (one per slice) and their page tables (n, width) int64:
    each sequence's pages up to the one that receives its position, padded to one width with
    page 0 (never read: each row's length stops its attention at its own positions)."""
    positions = tuple(start for _, start, _ in slices)
    tables = np.zeros((len(slices), max(p // PAGE_SIZE + 1 for p in positions)), dtype=np.int64)
    for i, (table, p, _) in enumerate(slices):
        tables[i, : p // PAGE_SIZE + 1] = table[: p // PAGE_SIZE + 1]
    return positions, tables


def _decode_rows(tf: Transformer, pool: PagePool, slices: list[Slice]) -> Any:
    """Logits (n, vocab) of a step of decode rows only, through the backend's one-call step."""
    positions, tables = _page_tables(slices)
    ids = np.asarray([toks[0] for _, _, toks in slices], dtype=np.int64)  # (n,)
    return tf.decode_rows(ids, np.asarray(positions, dtype=np.int64), tables, pool.k, pool.v)


def _forward(
    tf: Transformer, pool: PagePool, slices: list[Slice], n_decode: int | None
) -> list[Any]:
    """`forward` with the slices ordered: the first ``n_decode`` are single decode rows (taken
    together through the batched operations), the rest go one by one. ``n_decode`` None: the
    backend has no batched operations."""
    spec, be = tf.spec, tf.backend
    hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    dn = n_decode or 0
    bounds = []
    row = dn
    for _, _, toks in slices[dn:]:
        bounds.append((row, row + len(toks)))
        row += len(toks)
    if dn:
        positions, tables = _page_tables(slices[:dn])  # tables (dn, width)
        # Page and row of each decode position.
        wpage = tables[np.arange(dn), np.asarray(positions) // PAGE_SIZE]  # (dn,)
        wrow = np.asarray([p % PAGE_SIZE for p in positions], dtype=np.int64)  # (dn,)
        lengths = np.asarray([p + 1 for p in positions], dtype=np.int64)  # (dn,)

    # A prompt chunk of a few rows goes through the batched product with the decode rows: read
    # once per weight row costs it less than a matrix product, which first dequantizes every
    # weight matrix. Whether a chunk does depends on its own size only, so its rows' arithmetic
    # does not depend on the rest of the step.
    rmax = getattr(be, "linear_rows_max", 0) if n_decode is not None else 0
    small = [b - a <= rmax for a, b in bounds]

    def linear(w: Any, h: Any) -> Any:
        parts = []
        lo, hi = 0, dn  # a run of rows for linear_rows: the decode rows, then small chunks
        for (a, b), sm in zip(bounds, small, strict=True):
            if sm:
                hi = b
                continue
            if hi > lo:
                parts.append(be.linear_rows(w, h[lo:hi]))
            parts.append(be.linear(w, h[a:b]))
            lo = hi = b
        if hi > lo:
            parts.append(be.linear_rows(w, h[lo:hi]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # A batch's rows take the backend's SwiGLU for rows where it has one: the fused batched
    # step's own arithmetic (the NumPy backend's `swiglu_rows`).
    swiglu = getattr(be, "swiglu_rows", be.swiglu)
    ids = np.asarray([t for _, _, toks in slices for t in toks], dtype=np.int64)
    x = be.embed(tf.tok_embd, ids)  # (rows, dim)
    for i, lw in enumerate(tf.layers):
        h = be.rmsnorm(x, lw.attn_norm, spec.norm_eps)  # (rows, dim)
        q_all = linear(lw.attn_q, h)  # (rows, heads*hd)
        k_all = linear(lw.attn_k, h)  # (rows, kv_heads*hd)
        v_all = linear(lw.attn_v, h)  # (rows, kv_heads*hd)
        att = []
        if dn:
            q = q_all[:dn].reshape(dn, nh, hd)  # (dn, heads, hd)
            k = k_all[:dn].reshape(dn, nkv, hd)  # (dn, kv_heads, hd)
            v = v_all[:dn].reshape(dn, nkv, hd)  # (dn, kv_heads, hd)
            be.rope_rows(q, positions, spec, tf.rope_factors)
            be.rope_rows(k, positions, spec, tf.rope_factors)
            pool.k[i, wpage, wrow] = k
            pool.v[i, wpage, wrow] = v
            att.append(be.attention_paged(q, pool.k[i], pool.v[i], tables, lengths))
        for (a, b), (table, start, _) in zip(bounds, slices[dn:], strict=True):
            n = b - a
            q = q_all[a:b].reshape(n, nh, hd)  # (n, heads, hd)
            k = k_all[a:b].reshape(n, nkv, hd)  # (n, kv_heads, hd)
            v = v_all[a:b].reshape(n, nkv, hd)  # (n, kv_heads, hd)
            be.rope(q, start, spec, tf.rope_factors)
            be.rope(k, start, spec, tf.rope_factors)
            pool.write(i, table, start, k, v)
            kc, vc = pool.gather(i, table, start + n)  # (kv_heads, start+n, hd) each
            att.append(be.attention(q, kc, vc, start))  # (n, heads*hd)
        x = be.add(x, linear(lw.attn_output, att[0] if len(att) == 1 else np.concatenate(att)))
        h = be.rmsnorm(x, lw.ffn_norm, spec.norm_eps)
        ff = swiglu(linear(lw.ffn_gate, h), linear(lw.ffn_up, h))  # (rows, ffn)
        x = be.add(x, linear(lw.ffn_down, ff))
    ends = list(range(dn)) + [b - 1 for _, b in bounds]
    h = be.rmsnorm(x[ends], tf.output_norm, spec.norm_eps)  # (slices, dim)
    if n_decode is not None:  # every slice's logits from one read of the output matrix
        return list(be.linear_rows(tf.output, h))
    return [be.linear(tf.output, h[j : j + 1])[0] for j in range(len(ends))]
