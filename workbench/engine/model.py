"""The llama-family transformer forward pass, written once against a backend's operations.

Pure computation: no I/O, no timing, no printing. `prefill` runs a whole prompt as one batched
(matrix-matrix) pass; `decode_one_token` runs one position (matrix-vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.gguf.reader import GGUFModel, ModelSpec

LAYER_WEIGHTS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)  # fmt: skip


@dataclass
class LayerWeights:
    attn_norm: Any  # (dim,)
    attn_q: Any  # (heads*hd, dim)
    attn_k: Any  # (kv_heads*hd, dim)
    attn_v: Any  # (kv_heads*hd, dim)
    attn_output: Any  # (dim, heads*hd)
    ffn_norm: Any  # (dim,)
    ffn_gate: Any  # (ffn, dim)
    ffn_up: Any  # (ffn, dim)
    ffn_down: Any  # (dim, ffn)


class KVCache:
    """Keys and values of every layer, for positions 0..length-1.

    np.zeros reserves the full context lazily (pages are committed as positions are written), so a
    long context costs memory only when it is used.
    """

    def __init__(
        self, spec: ModelSpec, xp: Any = np, capacity: int | None = None, dtype: Any = np.float32
    ) -> None:
        self.capacity = capacity or spec.context_length
        shape = (spec.n_layers, spec.n_kv_heads, self.capacity, spec.head_dim)
        self.k = xp.zeros(shape, dtype=dtype)  # (layer, kv_heads, ctx, hd)
        self.v = xp.zeros(shape, dtype=dtype)  # (layer, kv_heads, ctx, hd)
        self.length = 0  # positions filled (for all layers, once a forward pass completes)

    def reset(self) -> None:
        self.length = 0


class Transformer:
    def __init__(self, model: GGUFModel, backend: Any) -> None:
        assert model.spec is not None
        self.spec = spec = model.spec
        self.backend = backend
        t = model.tensors
        self.tok_embd = backend.load_weight(t["token_embd.weight"])  # (vocab, dim)
        self.output_norm = backend.load_weight(t["output_norm.weight"])  # (dim,)
        out = t.get("output.weight", t["token_embd.weight"])
        self.output = backend.load_weight(out)  # (vocab, dim), tied to tok_embd when absent
        self.layers = [
            LayerWeights(
                **{w: backend.load_weight(t[f"blk.{i}.{w}.weight"]) for w in LAYER_WEIGHTS}
            )
            for i in range(spec.n_layers)
        ]
        freqs = t.get("rope_freqs.weight")
        self.rope_factors = (
            backend.load_weight(freqs) if freqs is not None else None
        )  # (rope_dim/2,)
        # A backend may decode a whole token in one call (the NumPy backend's fused path), and
        # a batch's decode step of several sequences in pages (`engine.runner`).
        make = getattr(backend, "fused_decoder", None)
        self._decode_fused = make(self) if make is not None else None
        make_rows = getattr(backend, "fused_rows_decoder", None)
        self.decode_rows = make_rows(self) if make_rows is not None else None

    def new_cache(self, capacity: int | None = None) -> KVCache:
        # The backend's cache element type: float32, or float16 on the device backend (default).
        dtype = getattr(self.backend, "kv_dtype", np.float32)
        return KVCache(self.spec, self.backend.xp, capacity, dtype)

    def forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False) -> Any:
        """Run tokens (n,) at positions cache.length.. and return logits.

        Returns (vocab,) for the last position, or (n, vocab) with ``all_logits``. Only the last
        position's logits are computed by default: the output projection is the largest matrix.
        """
        spec, be = self.spec, self.backend
        n = len(tokens)
        start = cache.length
        if n == 0:
            raise UserError("user.empty_input", "no tokens to run")
        if start + n > cache.capacity:
            raise UserError(
                "user.context_overflow",
                f"{start + n} tokens do not fit the context of {cache.capacity}",
                tokens=start + n,
                context=cache.capacity,
            )
        end = start + n
        if n == 1 and not all_logits and self._decode_fused is not None:
            logits = self._decode_fused(int(tokens[0]), cache)  # (vocab,)
            cache.length = end
            return logits

        x = be.embed(self.tok_embd, tokens)  # (n, dim)
        if n == 1 and not all_logits and getattr(be, "fused_decode", False):
            logits = self._decode_step(x, cache, start)
            cache.length = end
            return logits
        if n > 1 and getattr(be, "prefill_cols", False):
            x = self._layers_cols(x, cache, start)
        else:
            x = self._layers(x, cache, start)
        cache.length = end

        if not all_logits:
            x = x[-1:]
        logits = be.linear(self.output, be.rmsnorm(x, self.output_norm, spec.norm_eps))
        return logits if all_logits else logits[0]  # (n, vocab) or (vocab,)

    def _layers(self, x: Any, cache: KVCache, start: int) -> Any:
        """x (n, dim) through every layer at positions start.., the cache filled; -> (n, dim)."""
        spec, be = self.spec, self.backend
        hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        n = x.shape[0]
        for i, lw in enumerate(self.layers):
            h = be.rmsnorm(x, lw.attn_norm, spec.norm_eps)  # (n, dim)
            q = be.linear(lw.attn_q, h).reshape(n, nh, hd)  # (n, heads, hd)
            k = be.linear(lw.attn_k, h).reshape(n, nkv, hd)  # (n, kv_heads, hd)
            v = be.linear(lw.attn_v, h).reshape(n, nkv, hd)  # (n, kv_heads, hd)
            be.rope(q, start, spec, self.rope_factors)
            be.rope(k, start, spec, self.rope_factors)
            be.kv_append(cache.k[i], cache.v[i], k, v, start)
            att = be.attention(q, cache.k[i], cache.v[i], start)  # (n, heads*hd)
            x = be.add(x, be.linear(lw.attn_output, att))
            h = be.rmsnorm(x, lw.ffn_norm, spec.norm_eps)
            ff = be.swiglu(be.linear(lw.ffn_gate, h), be.linear(lw.ffn_up, h))  # (n, ffn)
            x = be.add(x, be.linear(lw.ffn_down, ff))
        return x

    def _layers_cols(self, x: Any, cache: KVCache, start: int) -> Any:
        """`_layers` feature-major, for backends with ``prefill_cols``: every activation is
        (features, n), a position per column, the orientation in which BLAS multiplies a
        prompt fastest. The same operations, with the norms, RoPE, the KV append, the residual
        adds and SwiGLU inside the products they go with (``qkv_rope_kv_cols``,
        ``linear_add_cols``, ``linear_swiglu_cols``); x (n, dim) -> (n, dim), a transposed
        view."""
        spec, be, eps, rf = self.spec, self.backend, self.spec.norm_eps, self.rope_factors
        xt = be.xp.ascontiguousarray(x.T)  # (dim, n)
        for i, lw in enumerate(self.layers):
            # q (heads*hd, n) of xt normalized, rotated; k rotated and v into the cache
            ks, vs, qkv = cache.k[i], cache.v[i], (lw.attn_q, lw.attn_k, lw.attn_v)
            q = be.qkv_rope_kv_cols(*qkv, xt, ks, vs, start, spec, rf, norm=lw.attn_norm, eps=eps)
            att = be.attention_cols(q, ks, vs, start)  # (heads*hd, n)
            xt = be.linear_add_cols(lw.attn_output, att, xt)  # xt += W_o @ att, in place
            # (ffn, n) of xt normalized
            ff = be.linear_swiglu_cols(lw.ffn_gate, lw.ffn_up, xt, norm=lw.ffn_norm, eps=eps)
            xt = be.linear_add_cols(lw.ffn_down, ff, xt)
        return xt.T

    def _decode_step(self, x: Any, cache: KVCache, start: int) -> Any:
        """One position through the device backend's fused operations: 7 kernel launches per
        layer (8 in the first, which normalizes the embedding), see docs/kernels.md "Fusion".
        x (1, dim) is the residual stream; returns logits (vocab,)."""
        spec, be, eps = self.spec, self.backend, self.spec.norm_eps
        act = be.norm_quant(x, self.layers[0].attn_norm, eps)  # rmsnorm_q8_1
        for i, lw in enumerate(self.layers):
            q, k, v = be.linear_qkv(lw.attn_q, lw.attn_k, lw.attn_v, act)  # 1 launch
            q = be.rope_kv(q, k, v, cache.k[i], cache.v[i], start, spec, self.rope_factors)  # 1
            att = be.attention_quant(q, cache.k[i], cache.v[i], start)  # split + merge: 2
            x, act = be.linear_add(lw.attn_output, att, x, lw.ffn_norm, eps)  # 1, norm as tail
            ff = be.linear_swiglu(lw.ffn_gate, lw.ffn_up, act)  # 1, Q8_1 as tail
            last = i + 1 == len(self.layers)
            norm = self.output_norm if last else self.layers[i + 1].attn_norm
            x, act = be.linear_add(lw.ffn_down, ff, x, norm, eps)  # 1, the next norm as tail
        return be.linear_act(self.output, act)[0]  # (vocab,)

    def prefill(self, tokens: np.ndarray, cache: KVCache) -> Any:
        return self.forward(np.asarray(tokens, dtype=np.int64), cache)

    def decode_one_token(self, token: int, cache: KVCache) -> Any:
        return self.forward(np.array([token], dtype=np.int64), cache)
