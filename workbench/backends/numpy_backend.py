"""The NumPy backend: the CPU reference every kernel is checked against, and the fallback.

Weights stay in their GGUF block form (memory-mapped). Decode multiplies by them directly through
fused dequantize-and-dot loops (`quant_cpu.matvec`); prefill multiplies the prompt by them with
the dequantization inside the GEMM's panels (`quant_gemm`, the common types), or dequantizes one
matrix at a time into a reused scratch buffer and hands the product to BLAS (the other types).
All activations are float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from threadpoolctl import ThreadpoolController, threadpool_limits

from workbench.backends import (
    compiler_pages,
    cpu_ops,
    fused_decode,
    fused_rows,
    paged_ops,
    prefill_attention,
    quant_batch,
    quant_cpu,
    quant_gemm,
)
from workbench.backends.fused_decode import FusedDecoder
from workbench.backends.fused_rows import FusedRowsDecoder
from workbench.gguf.quants import block_layout
from workbench.gguf.reader import ModelSpec, Tensor

# Elementwise operations with at least this many values run on the kernels' threads: below it,
# waking them costs more than they save (a decode token's 1536 SwiGLU values take 2 us).
_PARALLEL_VALUES = 1 << 14


@dataclass(frozen=True)
class Weight:
    """A weight as the backend holds it: block bytes for matrices, float32 for vectors."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # matrices: (rows, row_bytes) uint8 blocks; vectors: (n,) float32


def _norm(norm: Weight | None, eps: float) -> tuple[np.ndarray, float] | None:
    """An RMSNorm weight and eps as `quant_gemm` takes them, or None."""
    return None if norm is None else (norm.data, eps)


class NumpyBackend:
    name = "numpy"
    xp = np

    def __init__(self, threads: int | None = None, *, fused: bool = True) -> None:
        """threads: kernel threads (default: the physical cores); fused: decode a token in one
        compiled call (`fused_decode`) instead of one call per operation."""
        if threads is None:
            # One thread per physical core: a second hyper-thread of a core adds no bandwidth
            # or FMA units to these kernels, only contention.
            threads = quant_cpu.default_threads()
        quant_cpu.set_threads(threads)  # validates the count
        # BLAS uses its own pool; cap it too so --threads means what it says.
        threadpool_limits(threads)
        self.threads = quant_cpu.get_threads()
        # The BLAS libraries, to run the prompt's attention on one thread (`_one_blas_thread`)
        self._blas = ThreadpoolController().select(user_api="blas").lib_controllers
        # RoPE's cos and sin tables, the last ones built for each layout: {layout: (key, tables)}
        self._rope_tables: dict[str, tuple[tuple, tuple[np.ndarray, np.ndarray]]] = {}
        self._scratch: np.ndarray | None = None  # (n,) float32, grown to the largest matrix
        self.fused = fused

    def fused_decoder(self, transformer: Any) -> FusedDecoder | None:
        """The one-call decoder for ``transformer``'s weights, or None to decode per operation."""
        if not self.fused:
            return None
        return FusedDecoder.build(transformer, self.threads)

    def fused_rows_decoder(self, transformer: Any) -> FusedRowsDecoder | None:
        """The one-call decode step of several paged sequences (`engine.runner`), or None."""
        if not self.fused:
            return None
        return FusedRowsDecoder.build(transformer, self.threads)

    def warm_up(self, transformer: Any | None = None) -> None:
        """Compile (or load from numba's disk cache) every numba kernel a generation runs, on
        inputs of zeros, then give back LLVM's library pages (`compiler_pages`). Idempotent.

        Always the fused decode steps (one sequence; several in pages); with ``transformer``,
        also for each of its weight types the prefill's dequantization and the last position's
        matrix-vector product, and RMSNorm, RoPE, the prefill's attention and a batch's SwiGLU
        (and the per-operation decode's attention when fused decode is off).
        Their argument types do not depend on shapes, so nothing compiles or loads at the first
        real token. None of this reads the weights: run before the first forward pass, the
        compiler's resident pages are gone before the weights' are there, and the two never
        add up in the process's peak resident memory."""
        fused_decode.warm_up()
        fused_rows.warm_up()
        if transformer is not None:
            self._warm_up_operations(transformer)
        compiler_pages.release()

    def _warm_up_operations(self, tf: Any) -> None:
        """The per-operation kernels a generation of ``tf`` runs, each called once on zeros."""
        spec = tf.spec
        layer_types = {
            getattr(lw, name).qtype for lw in tf.layers for name in fused_decode.MATRICES
        }
        # Decode runs matvec on every matrix when it is not fused, else only on the output (the
        # prompt's last position).
        matvec_types = {tf.output.qtype} | (set() if self.fused else layer_types)
        for qtype in sorted(layer_types | matvec_types | {tf.tok_embd.qtype}):
            values, block_bytes = block_layout(qtype)
            w = Weight("warm_up", qtype, (1, values), np.zeros((1, block_bytes), np.uint8))
            x = np.zeros((2, values), np.float32)  # (n, cols)
            if qtype in layer_types:
                self.linear_cols(w, x.T)  # prefill: dequantize, then BLAS
            if qtype in matvec_types:
                self.linear(w, x[:1])
            if qtype == tf.tok_embd.qtype:
                self.embed(w, np.zeros(1, np.int64))
        x = np.zeros((1, spec.dim), np.float32)  # (n, dim)
        self.rmsnorm(x, tf.output_norm, spec.norm_eps)  # the last position's
        self.rmsnorm_cols(np.zeros((spec.dim, 2), np.float32), tf.output_norm, spec.norm_eps)
        q = np.zeros((1, spec.n_heads, spec.head_dim), np.float32)  # (n, heads, hd)
        self.rope(q, 0, spec, tf.rope_factors)
        qt = np.zeros((spec.n_heads * spec.head_dim, 2), np.float32)  # a prompt of 2 positions
        self.rope_cols(qt, 0, spec, tf.rope_factors)
        self.swiglu_rows(x, x)  # a batch's (the fused decodes call the same kernel)
        big = np.zeros((2, _PARALLEL_VALUES // 2), np.float32)
        self.swiglu(big, big)  # a prompt's, on the kernels' threads
        kv = np.zeros((spec.n_kv_heads, 2, spec.head_dim), np.float32)  # (kv_heads, ctx, hd)
        self.attention_cols(qt, kv, kv, 0)  # the prefill's
        if not self.fused:
            self.attention(q, kv, kv, 0)

    # -- weights ---------------------------------------------------------------------------
    def load_weight(self, t: Tensor) -> Weight:
        if len(t.shape) == 1:
            # Norm weights and RoPE factors: small, needed as float32 every call.
            vec = quant_cpu.dequantize(t.qtype, t.raw.reshape(1, -1)).reshape(t.shape)
            return Weight(t.name, GGMLQuantizationType.F32, t.shape, vec)
        return Weight(t.name, t.qtype, t.shape, t.raw)

    # -- operations ------------------------------------------------------------------------
    def embed(self, w: Weight, ids: np.ndarray) -> np.ndarray:
        """ids (n,) -> (n, dim) float32 rows of the embedding table."""
        return quant_cpu.get_rows(w.qtype, w.data, np.asarray(ids, dtype=np.int64))

    def linear(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """x (n, cols) float32 -> (n, rows) = x @ W.T."""
        if x.shape[0] == 1:
            return quant_cpu.matvec(w.qtype, w.data, x[0])[None, :]
        scratch = self._scratch_for(w)
        # One thread pool at a time. numba's OpenMP workers spin-wait after each parallel region
        # and starved BLAS's threads on the same cores (2 cores: 15-70 tok/s instead of 300+), so
        # the dequantization runs on the calling thread and BLAS, which does almost all the work,
        # keeps every core. (`quant_cpu.matmul(workers=N)` instead splits rows over a plain pool
        # with single-threaded BLAS: steadier on a machine shared with other jobs, but on a quiet
        # 2-core machine prefill ran at 184-207 tok/s with it against 274-320 with BLAS's threads.)
        threads = quant_cpu.get_threads()
        quant_cpu.set_threads(1)
        try:
            return quant_cpu.matmul(w.qtype, w.data, x, scratch=scratch)
        finally:
            quant_cpu.set_threads(threads)

    # -- a prompt feature-major (`Transformer.forward` when `prefill_cols` is set) ------------
    # Every activation is (features, n), a position per column. OpenBLAS runs W @ xt faster
    # than x @ W.T at a prompt's shapes (the same products; docs/performance.md), and each
    # operation below gives the bits its row-major twin gives, except that BLAS sums the
    # products in its own order for each orientation.
    prefill_cols = True

    def linear_cols(self, w: Weight, xt: np.ndarray) -> np.ndarray:
        """xt (cols, n) float32 -> (rows, n) = W @ xt: on the blocks with the kernels' threads
        for the types `quant_gemm` multiplies, else dequantized on this thread for BLAS's
        (`quant_cpu.matmul_cols`)."""
        if w.qtype in quant_gemm.FUSED_TYPES:
            return quant_cpu.matmul_cols(w.qtype, w.data, xt)
        return quant_cpu.matmul_cols(w.qtype, w.data, xt, scratch=self._scratch_for(w))

    def linear_qkv_cols(
        self, q: Weight, k: Weight, v: Weight, xt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """xt (cols, n) -> (Q @ xt, K @ xt, V @ xt): a layer's three attention inputs, in one
        parallel region where `quant_gemm` multiplies all three (`gemm_qkv_cols`). The bits of
        three ``linear_cols``."""
        if q.qtype == k.qtype == v.qtype and q.qtype in quant_gemm.FUSED_TYPES:
            return quant_gemm.gemm_qkv_cols(q.qtype, q.data, k.data, v.data, xt)
        return self.linear_cols(q, xt), self.linear_cols(k, xt), self.linear_cols(v, xt)

    def qkv_rope_kv_cols(
        self,
        q: Weight,
        k: Weight,
        v: Weight,
        xt: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start: int,
        spec: ModelSpec,
        factors: Weight | None,
        norm: Weight | None = None,
        eps: float = 0.0,
    ) -> np.ndarray:
        """A layer's attention inputs from xt (cols, n): K and V into one layer's cache
        (kv_heads, ctx, hd) at start.., RoPE on Q and K; returns Q (heads*hd, n), rotated. In
        one parallel region, each panel rotated and stored while in L1, where `quant_gemm`
        multiplies all three and the pairs are adjacent ("norm" RoPE, the llama family's:
        `gemm_qkv_rope_kv_cols`); else ``linear_qkv_cols``, ``rope_cols`` and
        ``kv_append_cols``, whose bits it gives either way. With ``norm``, xt is the residual
        stream and the products take ``rmsnorm_cols(xt, norm, eps)``, computed inside the
        region where it runs (each thread normalizes its own copy)."""
        hd = k_cache.shape[2]
        if (
            q.qtype == k.qtype == v.qtype
            and q.qtype in quant_gemm.FUSED_TYPES
            and spec.rope_mode == "norm"
            and hd % quant_gemm.MR == 0
            and k_cache.flags.c_contiguous
            and v_cache.flags.c_contiguous
        ):
            positions = range(start, start + xt.shape[1])
            cos_t, sin_t = self._tables("cols", positions, spec, factors)  # (rope_dim/2, n)
            raws = (q.data, k.data, v.data)
            return quant_gemm.gemm_qkv_rope_kv_cols(
                q.qtype, *raws, xt, cos_t, sin_t, k_cache, v_cache, start, _norm(norm, eps)
            )
        if norm is not None:
            xt = self.rmsnorm_cols(xt, norm, eps)
        qt, kt, vt = self.linear_qkv_cols(q, k, v, xt)
        self.rope_cols(qt, start, spec, factors)
        self.rope_cols(kt, start, spec, factors)
        self.kv_append_cols(k_cache, v_cache, kt, vt, start)
        return qt

    def linear_add_cols(self, w: Weight, xt: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """residual (rows, n) += W @ xt (cols, n), in place and returned: a layer's output
        projection added to the residual stream, the add inside the product's panels for the
        types `quant_gemm` multiplies (`gemm_add_cols`). The bits of ``add(residual,
        linear_cols(w, xt))``."""
        if w.qtype in quant_gemm.FUSED_TYPES:
            return quant_gemm.gemm_add_cols(w.qtype, w.data, xt, residual)
        residual += self.linear_cols(w, xt)
        return residual

    def linear_swiglu_cols(
        self, gate: Weight, up: Weight, xt: np.ndarray, norm: Weight | None = None, eps: float = 0.0
    ) -> np.ndarray:
        """xt (cols, n) -> (ffn, n) = silu(gate @ xt) * (up @ xt): a feed-forward's first half,
        SwiGLU inside the products' panels where `quant_gemm` multiplies both
        (`gemm_swiglu_cols`). The bits of ``swiglu(linear_cols(gate, xt), linear_cols(up,
        xt))``; with ``norm``, of xt normalized first (``rmsnorm_cols(xt, norm, eps)``, inside
        the products' region where it runs, as in ``qkv_rope_kv_cols``)."""
        if gate.qtype == up.qtype and gate.qtype in quant_gemm.FUSED_TYPES:
            return quant_gemm.gemm_swiglu_cols(gate.qtype, gate.data, up.data, xt, _norm(norm, eps))
        if norm is not None:
            xt = self.rmsnorm_cols(xt, norm, eps)
        return self.swiglu(self.linear_cols(gate, xt), self.linear_cols(up, xt))

    def rmsnorm_cols(self, xt: np.ndarray, w: Weight, eps: float) -> np.ndarray:
        """xt (dim, n) -> (dim, n): `rmsnorm` of each column."""
        out = np.empty_like(xt)  # (dim, n)
        cpu_ops.rmsnorm_cols(np.ascontiguousarray(xt), w.data, eps, out)
        return out

    def rope_cols(
        self, xt: np.ndarray, start: int, spec: ModelSpec, factors: Weight | None
    ) -> None:
        """Rotate xt (heads*head_dim, n) in place, column i for position start+i (`rope`)."""
        positions = range(start, start + xt.shape[1])
        cos_t, sin_t = self._tables("cols", positions, spec, factors)  # (rope_dim/2, n) each
        cpu_ops.rope_cols(xt, cos_t, sin_t, xt.shape[0] // spec.head_dim, spec.rope_mode == "neox")

    def kv_append_cols(
        self, k_cache: np.ndarray, v_cache: np.ndarray, kt: np.ndarray, vt: np.ndarray, start: int
    ) -> None:
        """Write kt, vt (kv_heads*hd, n) into one layer's cache (kv_heads, ctx, hd) at start.."""
        n_kv, _, hd = k_cache.shape
        n = kt.shape[1]
        k_cache[:, start : start + n] = kt.reshape(n_kv, hd, n).transpose(0, 2, 1)
        v_cache[:, start : start + n] = vt.reshape(n_kv, hd, n).transpose(0, 2, 1)

    def attention_cols(
        self, qt: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int
    ) -> np.ndarray:
        """`attention` feature-major: qt (heads*hd, n) -> (heads*hd, n). On the kernels' threads
        with the GEMM's micro-kernels where they are fast (`prefill_attention`: 2-4x faster
        than BLAS at SmolLM2's shapes), else through BLAS, as the row-major `attention`."""
        if prefill_attention.USED:
            return prefill_attention.attention_cols(qt, k_cache, v_cache, start)
        n_kv, _, hd = k_cache.shape
        n = qt.shape[1]
        group = qt.shape[0] // hd // n_kv
        q = qt.reshape(n_kv, group, hd, n).transpose(0, 1, 3, 2)  # (kv_heads, group, n, hd)
        out = self._attention_groups(q.reshape(n_kv, group * n, hd), n, k_cache, v_cache, start)
        # out (kv_heads, group*n, hd) -> (heads*hd, n)
        return np.ascontiguousarray(out.reshape(n_kv, group, n, hd).transpose(0, 1, 3, 2)).reshape(
            n_kv * group * hd, n
        )

    def _scratch_for(self, w: Weight) -> np.ndarray:
        """The dequantization buffer, grown to hold w: (>= rows*cols,) float32."""
        size = w.shape[0] * w.shape[1]
        if self._scratch is None or self._scratch.size < size:
            self._scratch = np.empty(size, dtype=np.float32)
        return self._scratch

    # -- the batched runner's decode step (`workbench.engine.runner`) ------------------------
    linear_rows_max = quant_batch.MAX_ROWS  # rows worth a `linear_rows` call over a `linear`

    def linear_rows(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """x (n, cols), one decode row per sequence -> (n, rows) = x @ W.T, the weights read
        once for all rows; row i does not depend on the others (`quant_batch.matvec_rows`)."""
        return quant_batch.matvec_rows(w.qtype, w.data, x)

    def rope_rows(
        self, x: np.ndarray, positions: tuple[int, ...], spec: ModelSpec, factors: Weight | None
    ) -> None:
        """Rotate x (n, heads, head_dim) in place, row i for position positions[i]."""
        # Every layer of a step rotates at the same positions: the tables are built once (apart
        # from `rope`'s, which a prefill chunk in the same step uses).
        cos, sin = self._tables("rows", positions, spec, factors)  # (n, rope_dim/2) each
        cpu_ops.rope(x, cos, sin, spec.rope_mode == "neox")

    def attention_paged(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, tables: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """One query position per sequence, read through page tables.

        q (n, heads, hd); k, v (pages, page_size, kv_heads, hd) one layer of the page pool;
        tables (n, max_pages) int64; lengths (n,) int64 positions each row sees. -> (n, heads*hd).
        """
        out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)
        paged_ops.attention_decode_paged(np.ascontiguousarray(q), k, v, tables, lengths, out)
        return out

    def rmsnorm(self, x: np.ndarray, w: Weight, eps: float) -> np.ndarray:
        """x (n, dim) -> (n, dim): x / sqrt(mean(x^2) + eps) * w, as llama.cpp (eps inside sqrt)."""
        # The mean of squares is accumulated in float64 (ggml does the same) so that long rows
        # with large activations do not lose the small components.
        out = np.empty_like(x)  # (n, dim)
        cpu_ops.rmsnorm(np.ascontiguousarray(x), w.data, eps, out)
        return out

    def rope(self, x: np.ndarray, start: int, spec: ModelSpec, factors: Weight | None) -> None:
        """Rotate x (n, heads, head_dim) in place for positions start..start+n-1.

        "norm" pairs adjacent elements (2i, 2i+1), as llama.cpp does for llama (its converter
        permutes Q and K so this equals HF's rotate-half); "neox" pairs i with i + rope_dim/2.
        """
        # Every layer's q and k of one forward pass share the positions: build the tables once.
        positions = range(start, start + x.shape[0])
        cos, sin = self._tables("prompt", positions, spec, factors)  # (n, rope_dim/2) each
        cpu_ops.rope(x, cos, sin, spec.rope_mode == "neox")

    def _tables(
        self, slot: str, positions: range | tuple[int, ...], spec: ModelSpec, factors: Weight | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """RoPE's cos, sin for ``positions``: (n, rope_dim/2) each, or (rope_dim/2, n) for the
        "cols" slot. Built only when they differ from the slot's last ones: every layer of a
        forward pass rotates at the same positions."""
        key = (positions, spec, None if factors is None else factors.name)
        last = self._rope_tables.get(slot)
        if last is None or last[0] != key:
            cos, sin = cpu_ops.rope_tables_at(positions, spec, factors)  # (n, rope_dim/2) each
            if slot == "cols":
                cos, sin = np.ascontiguousarray(cos.T), np.ascontiguousarray(sin.T)
            last = self._rope_tables[slot] = (key, (cos, sin))
        return last[1]

    def kv_append(
        self, k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray, start: int
    ) -> None:
        """Write k, v (n, kv_heads, hd) into one layer's cache (kv_heads, ctx, hd) at start.."""
        n = k.shape[0]
        k_cache[:, start : start + n] = k.transpose(1, 0, 2)
        v_cache[:, start : start + n] = v.transpose(1, 0, 2)

    def attention(
        self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int
    ) -> np.ndarray:
        """Causal grouped-query attention.

        q (n, heads, hd) for positions start..start+n-1; k_cache, v_cache (kv_heads, ctx, hd)
        hold one layer's cache, filled up to start+n. Returns (n, heads*hd).
        """
        n, n_heads, hd = q.shape
        t = start + n
        if n == 1:
            out = np.empty(n_heads * hd, dtype=np.float32)
            cpu_ops.attention_decode(q[0], k_cache, v_cache, t, out)
            return out[None, :]
        n_kv = k_cache.shape[0]
        group = n_heads // n_kv
        # Query heads h = g*group + j share KV head g, as in llama.cpp and HF.
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n, hd)
        out = self._attention_groups(qg, n, k_cache, v_cache, start)  # (kv_heads, group*n, hd)
        return out.reshape(n_kv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, n_heads * hd)

    @contextlib.contextmanager
    def _one_blas_thread(self) -> Iterator[None]:
        """BLAS on the calling thread only, inside. The prompt's attention multiplies small
        matrices (SmolLM2: 384 x 64 by 64 x 128 per KV head), which one thread does faster
        than two that must meet; and a second BLAS thread, once woken, spins on its core for
        OpenBLAS's timeout after the call (about 0.5 ms here), where the next product's numba
        threads want to run (the output projection took 1.07 against 0.70 ms for the same
        product elsewhere in the layer). Setting the count directly costs about a microsecond;
        `threadpool_limits` re-reads the loaded libraries, about 250 us."""
        for lib in self._blas:
            lib.set_num_threads(1)
        try:
            yield
        finally:
            for lib in self._blas:
                lib.set_num_threads(self.threads)

    def _attention_groups(
        self, qg: np.ndarray, n: int, k_cache: np.ndarray, v_cache: np.ndarray, start: int
    ) -> np.ndarray:
        """The prefill's causal attention with a KV head's query heads stacked: qg (kv_heads,
        group*n, hd), row j*n + i the query head j of the group at position start + i
        -> (kv_heads, group*n, hd)."""
        with self._one_blas_thread():
            return self._attention_groups_blas(qg, n, k_cache, v_cache, start)

    def _attention_groups_blas(
        self, qg: np.ndarray, n: int, k_cache: np.ndarray, v_cache: np.ndarray, start: int
    ) -> np.ndarray:
        hd = qg.shape[2]
        t = start + n
        k, v = k_cache[:, :t], v_cache[:, :t]  # (kv_heads, t, hd)
        scores = np.matmul(qg, k.transpose(0, 2, 1))  # (kv_heads, group*n, t)
        scores *= np.float32(1.0 / np.sqrt(hd))
        # Row i sees cache positions <= start + i: the rest becomes -inf, then 0. A compiled
        # loop per row: NumPy's masked add and row maxima and sums over the 4-D scores took
        # three times as long as its exp (SmolLM2's 128-token prefill: 0.35 of 0.7 ms a layer).
        cpu_ops.causal_shift(scores.reshape(-1, n, t), start)
        np.exp(scores, out=scores)
        cpu_ops.normalize_rows(scores.reshape(-1, t))
        return np.matmul(scores, v)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The residual stream: a + b, (n, dim) each."""
        return a + b

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, elementwise: (n, ffn) each, or (ffn, n) in a prompt feature-major.

        The compiled loop the fused decodes run (`cpu_ops.swiglu`, with the vectorised
        `cpu_ops.exp32`), its rows over the kernels' threads when there are enough values: a
        prompt's five NumPy passes (negate, exp, add, divide, multiply) took 10-13 ms of a
        SmolLM2 prefill on one thread."""
        gate, up = np.ascontiguousarray(gate), np.ascontiguousarray(up)
        out = np.empty(gate.shape, dtype=np.float32)  # gate's shape
        rows = (gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
        loop = cpu_ops.swiglu_parallel if gate.size >= _PARALLEL_VALUES else cpu_ops.swiglu
        loop(*rows, out.reshape(-1, out.shape[-1]))
        return out

    def swiglu_rows(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """`swiglu` for a batch's rows (`engine.runner`), through the compiled loop the fused
        decodes run (`cpu_ops.swiglu`, with `cpu_ops.exp32`): a row comes out exactly as the
        fused batched step computes it. The prefill keeps NumPy's exp, within an ulp or two of
        it."""
        out = np.empty(gate.shape, dtype=np.float32)  # (n, ffn)
        cpu_ops.swiglu(np.ascontiguousarray(gate), np.ascontiguousarray(up), out)
        return out

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def synchronize(self) -> None:
        """NumPy work is done when a call returns."""
