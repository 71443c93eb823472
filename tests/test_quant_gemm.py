"""`quant_gemm`: the prompt's products with the dequantization inside the GEMM.

Checked against a float64 product of gguf-py's dequantization, at shapes that exercise every
edge of the tiling (rows past the last whole panel of 8, positions past the last tile of 32 or
16, fewer panels than threads), on one thread and on several. The seed of the random blocks is
in each failure message (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.test_quant_cpu import Rand, assert_dot_close, finite_data, reference
from workbench.backends import cpu_ops, quant_cpu, quant_gemm
from workbench.gguf.quants import block_layout


@pytest.fixture
def r(seed: int) -> Rand:
    return Rand(seed, np.random.default_rng(seed))


@pytest.mark.parametrize("qtype", sorted(quant_gemm._KIND, key=lambda t: t.name), ids=str)
def test_gemm_cols_is_the_dequantized_product(qtype: Q, r: Rand, numba_threads: int) -> None:
    values = block_layout(qtype)[0]
    cols = values * 3 if values > 1 else 45  # float32: a row length that is no block multiple
    for rows in (1, 8, 13, 29):
        raw = finite_data(qtype, rows, cols, r)
        w = reference(qtype, raw)  # (rows, cols)
        for n in (1, 5, 16, 17, 32, 48, 70):
            xt = r.rng.standard_normal((cols, n)).astype(np.float32)  # (cols, n)
            got = quant_gemm.gemm_cols(qtype, raw, xt)
            what = f"{qtype.name} rows={rows} n={n} threads={numba_threads} {r}"
            assert got.shape == (rows, n) and got.flags.c_contiguous, what
            assert_dot_close(got.T, w, xt.T, what)
        # A transposed view of x (n, cols) and W's rows out of a bigger array: the same product
        wide = np.concatenate([raw, raw], axis=1)[:, : raw.shape[1]]  # rows not contiguous
        for n in (32, 70):  # xt used as given, and padded
            x = r.rng.standard_normal((n, cols)).astype(np.float32)
            got = quant_gemm.gemm_cols(qtype, wide, x.T)
            assert_dot_close(got.T, w, x, f"views, {qtype.name} rows={rows} n={n} {r}")


def test_matmul_cols_takes_the_fused_path_for_its_types(r: Rand, monkeypatch) -> None:
    """The fused types never reach BLAS; the others still do, and both give the product."""
    calls = []
    original = quant_gemm.gemm_cols

    def spy(qtype, raw, xt):
        calls.append(qtype)
        return original(qtype, raw, xt)

    monkeypatch.setattr(quant_gemm, "gemm_cols", spy)
    for qtype in (Q.Q4_1, Q.Q6_K):
        cols = block_layout(qtype)[0] * 2
        raw = finite_data(qtype, 10, cols, r)
        xt = r.rng.standard_normal((cols, 4)).astype(np.float32)
        out = np.full((10, 4), np.nan, np.float32)
        assert quant_cpu.matmul_cols(qtype, raw, xt, out) is out
        assert_dot_close(out.T, reference(qtype, raw), xt.T, f"{qtype.name} {r}")
    assert calls == ([Q.Q4_1] if Q.Q4_1 in quant_gemm.FUSED_TYPES else [])  # AVX-512 only


@pytest.mark.parametrize("qtype", sorted(quant_gemm._KIND, key=lambda t: t.name), ids=str)
def test_the_epilogues_give_the_bits_of_their_own_passes(
    qtype: Q, r: Rand, numba_threads: int
) -> None:
    """SwiGLU and the residual add inside the panels: exactly `cpu_ops.swiglu` of the two
    products, and the float32 sum of the residual and the product, at every edge of the tiling;
    the residual updated in place. Three products in one region: each one's own bits."""
    values = block_layout(qtype)[0]
    cols = values * 2 if values > 1 else 40
    for rows, n in ((8, 32), (13, 17), (29, 70), (3, 1)):
        gate, up = finite_data(qtype, rows, cols, r), finite_data(qtype, rows, cols, r)
        xt = r.rng.standard_normal((cols, n)).astype(np.float32)  # (cols, n)
        what = f"{qtype.name} rows={rows} n={n} threads={numba_threads} {r}"
        g, u = quant_gemm.gemm_cols(qtype, gate, xt), quant_gemm.gemm_cols(qtype, up, xt)
        want = np.empty_like(g)
        cpu_ops.swiglu(g, u, want)
        got = quant_gemm.gemm_swiglu_cols(qtype, gate, up, xt)
        assert got.shape == (rows, n) and got.flags.c_contiguous, what
        np.testing.assert_array_equal(got, want, what)
        # Q, K and V in one region: three matrices of different heights, panels split unevenly
        v = finite_data(qtype, rows + 11, cols, r)
        got = quant_gemm.gemm_qkv_cols(qtype, gate, up, v, xt)
        for one, raw in zip(got, (gate, up, v)):
            assert one.flags.c_contiguous, what
            np.testing.assert_array_equal(one, quant_gemm.gemm_cols(qtype, raw, xt), what)
        residual = r.rng.standard_normal((rows, n)).astype(np.float32)  # (rows, n)
        want = residual + g
        assert quant_gemm.gemm_add_cols(qtype, gate, xt, residual) is residual, what
        np.testing.assert_array_equal(residual, want, what)


def test_the_epilogues_reject_operands_that_do_not_match(r: Rand) -> None:
    raw = finite_data(Q.Q8_0, 8, 64, r)
    xt = np.zeros((64, 4), np.float32)
    with pytest.raises(ValueError, match="gate"):
        quant_gemm.gemm_swiglu_cols(Q.Q8_0, raw, raw[:4], xt)
    for residual in (
        np.zeros((8, 5), np.float32),
        np.zeros((8, 4)),
        np.zeros((4, 8), np.float32).T,
    ):
        with pytest.raises(ValueError, match="residual"):
            quant_gemm.gemm_add_cols(Q.Q8_0, raw, xt, residual)
    with pytest.raises(ValueError, match="64"):  # xt's rows are not W's columns
        quant_gemm.gemm_swiglu_cols(Q.Q8_0, raw, raw, np.zeros((32, 4), np.float32))
    with pytest.raises(ValueError, match="32"):
        quant_gemm.gemm_qkv_cols(Q.Q8_0, raw, raw, finite_data(Q.Q8_0, 8, 32, r), xt)


def test_swiglu_keeps_its_own_arithmetic_when_the_driver_compiles_it_first(tmp_path) -> None:
    """numba compiles a function first called from a compiled caller with the caller's
    floating-point flags and reuses that code for every later call: the driver, which calls
    `cpu_ops.swiglu` as its epilogue, must not be fast-math, or SwiGLU everywhere (the decode
    too) divides with a reciprocal. A fresh process with an empty cache, the driver first."""
    code = """
import numpy as np
from gguf import GGMLQuantizationType as Q
from workbench.backends import cpu_ops, quant_gemm
raw = np.zeros((8, 34), np.uint8)  # Q8_0, 8 x 32
quant_gemm.gemm_swiglu_cols(Q.Q8_0, raw, raw, np.zeros((32, 16), np.float32))
rng = np.random.default_rng(0)
g = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
u = rng.standard_normal((4, 1000)).astype(np.float32)
e = -g
for row in e:
    cpu_ops.exp_in_place(row)
out = np.empty_like(g)
cpu_ops.swiglu(g, u, out)
bad = int((out != g / (np.float32(1) + e) * u).sum())
assert bad == 0, f"{bad} of {g.size} values differ from IEEE float32 arithmetic"
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("hd", "rope_dim"), [(16, 16), (32, 16)], ids=["whole head", "partial"])
def test_rope_and_the_kv_append_inside_the_products_give_their_bits(
    hd: int, rope_dim: int, r: Rand, numba_threads: int
) -> None:
    """Q with RoPE, K with RoPE into the cache, V into the cache, in one region: the bits of the
    three products, `cpu_ops.rope_cols` and the cache writes; the cache untouched elsewhere."""
    qtype, heads, n_kv, ctx = Q.Q8_0, 4, 2, 80
    cols = 64
    q, k, v = (finite_data(qtype, h * hd, cols, r) for h in (heads, n_kv, n_kv))
    for start, n in ((0, 32), (5, 21), (40, 1)):
        xt = r.rng.standard_normal((cols, n)).astype(np.float32)  # (cols, n)
        angles = np.outer(np.arange(rope_dim // 2), np.arange(start, start + n)) * 0.37
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        want_q, want_k, want_v = (quant_gemm.gemm_cols(qtype, raw, xt) for raw in (q, k, v))
        cpu_ops.rope_cols(want_q, cos, sin, heads, False)
        cpu_ops.rope_cols(want_k, cos, sin, n_kv, False)
        k_cache, v_cache = (r.rng.standard_normal((n_kv, ctx, hd)).astype(np.float32) for _ in "kv")
        want_kc, want_vc = k_cache.copy(), v_cache.copy()
        want_kc[:, start : start + n] = want_k.reshape(n_kv, hd, n).transpose(0, 2, 1)
        want_vc[:, start : start + n] = want_v.reshape(n_kv, hd, n).transpose(0, 2, 1)
        got = quant_gemm.gemm_qkv_rope_kv_cols(
            qtype, q, k, v, xt, cos, sin, k_cache, v_cache, start
        )
        what = f"hd={hd} rope_dim={rope_dim} {start=} {n=} {numba_threads=} {r}"
        np.testing.assert_array_equal(got, want_q, what)
        np.testing.assert_array_equal(k_cache, want_kc, what)
        np.testing.assert_array_equal(v_cache, want_vc, what)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.F32], ids=str)
def test_the_norm_inside_the_region_gives_the_bits_of_its_own_pass(
    qtype: Q, r: Rand, numba_threads: int
) -> None:
    """With ``norm``, SwiGLU's and Q, K, V's products take xt through `cpu_ops.rmsnorm_cols`
    first, each thread its own copy: the bits of that pass followed by the products, at the
    tiling's edges (n not a multiple of the tiles: the padded columns normalize to zeros)."""
    cols, hd, n_kv = 64, 16, 2
    w = r.rng.standard_normal(cols).astype(np.float32)  # (cols,) the norm's weight
    gate, up = finite_data(qtype, 24, cols, r), finite_data(qtype, 24, cols, r)
    q, k, v = (finite_data(qtype, h * hd, cols, r) for h in (4, n_kv, n_kv))
    for n in (32, 21, 1):
        xt = r.rng.standard_normal((cols, n)).astype(np.float32) * np.float32(5)  # (cols, n)
        h = np.empty_like(xt)
        cpu_ops.rmsnorm_cols(xt, w, 1e-5, h)
        what = f"{qtype.name} {n=} {numba_threads=} {r}"
        want = quant_gemm.gemm_swiglu_cols(qtype, gate, up, h)
        got = quant_gemm.gemm_swiglu_cols(qtype, gate, up, xt, norm=(w, 1e-5))
        np.testing.assert_array_equal(got, want, what)
        tables = np.ones((hd // 2, n), np.float32), np.zeros((hd // 2, n), np.float32)
        caches = [[np.zeros((n_kv, 40, hd), np.float32) for _ in "kv"] for _ in range(2)]
        want = quant_gemm.gemm_qkv_rope_kv_cols(qtype, q, k, v, h, *tables, *caches[0], 3)
        got = quant_gemm.gemm_qkv_rope_kv_cols(
            qtype, q, k, v, xt, *tables, *caches[1], 3, norm=(w, 1e-5)
        )
        np.testing.assert_array_equal(got, want, what)
        for a, b in zip(*caches):
            np.testing.assert_array_equal(b, a, what)
    with pytest.raises(ValueError, match="norm weight"):
        quant_gemm.gemm_swiglu_cols(qtype, gate, up, xt, norm=(w[:-1], 1e-5))


def test_rope_inside_the_products_rejects_what_it_cannot_do(r: Rand) -> None:
    qtype = Q.Q8_0
    q, kv = finite_data(qtype, 32, 32, r), finite_data(qtype, 16, 32, r)
    xt = np.zeros((32, 4), np.float32)
    tables = np.zeros((8, 4), np.float32)
    cache = np.zeros((1, 8, 16), np.float32)  # (kv_heads, ctx, hd)
    with pytest.raises(ValueError, match="cannot take 4 at 6"):  # past the context
        quant_gemm.gemm_qkv_rope_kv_cols(qtype, q, kv, kv, xt, tables, tables, cache, cache, 6)
    with pytest.raises(ValueError, match="not heads"):  # K of 16 rows over 2 KV heads of 16
        wide = np.zeros((2, 8, 16), np.float32)
        quant_gemm.gemm_qkv_rope_kv_cols(qtype, q, kv, kv, xt, tables, tables, wide, wide, 0)
    with pytest.raises(ValueError, match="RoPE tables"):
        quant_gemm.gemm_qkv_rope_kv_cols(
            qtype, q, kv, kv, xt, tables[:, :3], tables, cache, cache, 0
        )
    with pytest.raises(ValueError, match="caches"):  # not C-contiguous
        view = np.zeros((1, 8, 32), np.float32)[:, :, :16]
        quant_gemm.gemm_qkv_rope_kv_cols(qtype, q, kv, kv, xt, tables, tables, view, view, 0)
