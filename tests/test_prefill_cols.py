"""The NumPy backend's feature-major prefill (`Transformer._layers_cols`).

Every operation of the prompt path has a twin over (features, n) activations, a position per
column. Each twin must give its row-major operation's bits, transposed: the only difference the
layout may make is BLAS's own order of sums in the products, which the engine tests bound
against a float64 reference (tests/test_engine.py). The seed of each test's random inputs is in
its failure report.
"""

from __future__ import annotations

from types import SimpleNamespace

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.test_quant_cpu import Rand, finite_data
from workbench.backends import prefill_attention
from workbench.backends.numpy_backend import NumpyBackend, Weight
from workbench.engine.generate import Engine
from workbench.engine.launcher import cost, kernel_name
from workbench.gguf.quants import block_layout


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def be() -> NumpyBackend:
    return NumpyBackend(threads=1)


@pytest.mark.parametrize(("n", "dim"), [(1, 64), (3, 100), (17, 576)])
def test_rmsnorm_cols_is_rmsnorm_transposed(be, rng, n: int, dim: int) -> None:
    x = randn(rng, n, dim) * np.float32(3)
    w = Weight("w", None, (dim,), randn(rng, dim))  # type: ignore[arg-type]
    want = be.rmsnorm(x, w, 1e-5)
    got = be.rmsnorm_cols(np.ascontiguousarray(x.T), w, 1e-5)
    assert got.shape == (dim, n)
    np.testing.assert_array_equal(got.T, want)


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize(
    ("heads", "hd", "rope_dim", "factors"), [(3, 16, 16, False), (2, 24, 12, True)]
)
def test_rope_cols_is_rope_transposed(be, rng, mode, heads, hd, rope_dim, factors) -> None:
    spec = SimpleNamespace(
        rope_dim=rope_dim, rope_base=10000.0, rope_scale=2.0, rope_mode=mode, head_dim=hd
    )
    ff = None
    if factors:
        ff = Weight("rope_freqs", None, (rope_dim // 2,), rng.uniform(0.5, 4, rope_dim // 2))  # type: ignore[arg-type]
    for start, n in ((0, 5), (7, 5), (7, 9)):  # the tables are cached per (start, n): rebuilt
        x = randn(rng, n, heads, hd)
        want = x.copy()
        be.rope(want, start, spec, ff)
        got = np.ascontiguousarray(x.reshape(n, heads * hd).T)  # (heads*hd, n)
        be.rope_cols(got, start, spec, ff)
        np.testing.assert_array_equal(got.T.reshape(n, heads, hd), want, err_msg=f"{start=}")


@pytest.mark.parametrize(
    ("n", "start", "heads", "kv_heads"), [(2, 0, 2, 2), (7, 0, 6, 2), (5, 4, 9, 3)]
)
def test_kv_append_and_attention_cols_are_the_row_operations_transposed(
    be, rng, monkeypatch, n: int, start: int, heads: int, kv_heads: int
) -> None:
    """Bit for bit on the BLAS path; `prefill_attention`, where it runs, sums in its own order
    (tests/test_prefill_attention.py bounds it against a float64 reference)."""
    monkeypatch.setattr(prefill_attention, "USED", False)
    hd, ctx = 8, 16
    q, k, v = randn(rng, n, heads, hd), randn(rng, n, kv_heads, hd), randn(rng, n, kv_heads, hd)
    old_k, old_v = randn(rng, kv_heads, ctx, hd), randn(rng, kv_heads, ctx, hd)  # earlier positions
    caches = [(old_k.copy(), old_v.copy()) for _ in range(2)]
    be.kv_append(*caches[0], k, v, start)

    def cols(a: np.ndarray) -> np.ndarray:  # (n, heads, hd) -> (heads*hd, n)
        return np.ascontiguousarray(a.reshape(n, -1).T)

    be.kv_append_cols(*caches[1], cols(k), cols(v), start)
    for a, b in zip(caches[0], caches[1]):
        np.testing.assert_array_equal(a, b)
    want = be.attention(q, *caches[0], start)  # (n, heads*hd)
    got = be.attention_cols(cols(q), *caches[1], start)
    assert got.shape == (heads * hd, n)
    np.testing.assert_array_equal(got.T, want)


def test_the_prompts_attention_runs_blas_on_one_thread(rng, monkeypatch) -> None:
    """Its small products on the calling thread, and the engine's BLAS thread count back after
    it, also when it fails."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")  # the machine's size, not a missing tool
    be = NumpyBackend(threads=2)
    seen = []
    inner = be._attention_groups_blas

    def spy(*args):
        seen.append(blas_threads())
        return inner(*args)

    monkeypatch.setattr(be, "_attention_groups_blas", spy)
    monkeypatch.setattr(prefill_attention, "USED", False)  # where it is True, no BLAS at all
    cache = randn(rng, 2, 8, 4)  # (kv_heads, ctx, hd)
    be.attention_cols(randn(rng, 4 * 4, 3), cache, cache, 0)
    assert seen == [{1}] and blas_threads() == {2}

    def fail(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(be, "_attention_groups_blas", fail)
    with pytest.raises(RuntimeError):
        be.attention_cols(randn(rng, 4 * 4, 3), cache, cache, 0)
    assert blas_threads() == {2}


def test_the_prompts_attention_takes_the_tiles_where_they_are_fast(be, rng, monkeypatch) -> None:
    """With `prefill_attention.USED`, the backend's result is that kernel's, and no BLAS runs."""
    monkeypatch.setattr(prefill_attention, "USED", True)
    monkeypatch.setattr(be, "_attention_groups_blas", None)  # calling it would raise
    q, cache = randn(rng, 6 * 8, 20), randn(rng, 3, 24, 8)  # (heads*hd, n), (kv_heads, ctx, hd)
    want = prefill_attention.attention_cols(q, cache, cache, 4)
    np.testing.assert_array_equal(be.attention_cols(q, cache, cache, 4), want)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K, Q.F16], ids=str)
def test_the_fused_products_are_their_operations(be, rng, seed: int, qtype: Q) -> None:
    """linear_qkv_cols, linear_swiglu_cols and linear_add_cols give the bits of the operations
    they replace, whether `quant_gemm` runs them (its types, with AVX-512) or the backend
    composes them."""
    cols = block_layout(qtype)[0] * 2
    gate, up, down = (
        Weight(name, qtype, (24, cols), finite_data(qtype, 24, cols, Rand(seed, rng)))
        for name in ("gate", "up", "down")
    )
    xt = randn(rng, cols, 21)  # (cols, n)
    for got, w in zip(be.linear_qkv_cols(gate, up, down, xt), (gate, up, down)):
        np.testing.assert_array_equal(got, be.linear_cols(w, xt), f"{seed=}")
    want = be.swiglu(be.linear_cols(gate, xt), be.linear_cols(up, xt))
    np.testing.assert_array_equal(be.linear_swiglu_cols(gate, up, xt), want, f"{seed=}")
    norm = Weight("norm", Q.F32, (cols,), randn(rng, cols))
    h = be.rmsnorm_cols(xt, norm, 1e-5)  # the norm inside the products: the pass's bits
    want = be.swiglu(be.linear_cols(gate, h), be.linear_cols(up, h))
    got = be.linear_swiglu_cols(gate, up, xt, norm=norm, eps=1e-5)
    np.testing.assert_array_equal(got, want, f"{seed=}")
    residual = randn(rng, 24, 21)  # (rows, n)
    want = be.add(residual, be.linear_cols(down, xt))
    assert be.linear_add_cols(down, xt, residual) is residual
    np.testing.assert_array_equal(residual, want, f"{seed=}")


@pytest.mark.parametrize("mode", ["norm", "neox"])
def test_qkv_rope_kv_cols_is_its_three_operations(be, rng, seed: int, mode: str) -> None:
    """The products, RoPE on Q and K and the KV append: in one region for "norm" pairs where
    `quant_gemm` runs, composed otherwise (neox), the same bits either way."""
    spec = SimpleNamespace(
        rope_dim=16, rope_base=10000.0, rope_scale=1.0, rope_mode=mode, head_dim=16
    )
    q, k, v = (
        Weight(name, Q.Q8_0, (rows, 64), finite_data(Q.Q8_0, rows, 64, Rand(seed, rng)))
        for name, rows in (("q", 64), ("k", 32), ("v", 32))
    )
    xt, start = randn(rng, 64, 21), 3  # (cols, n)
    caches = [tuple(np.zeros((2, 40, 16), np.float32) for _ in "kv") for _ in range(2)]
    want_q, kt, vt = be.linear_qkv_cols(q, k, v, xt)
    be.rope_cols(want_q, start, spec, None)
    be.rope_cols(kt, start, spec, None)
    be.kv_append_cols(*caches[0], kt, vt, start)
    got = be.qkv_rope_kv_cols(q, k, v, xt, *caches[1], start, spec, None)
    np.testing.assert_array_equal(got, want_q, f"{seed=}")
    for a, b in zip(caches[0], caches[1]):
        np.testing.assert_array_equal(b, a, f"{seed=}")
    # With the norm inside: the bits of rmsnorm_cols, then the same
    norm = Weight("norm", Q.F32, (64,), randn(rng, 64))
    h = be.rmsnorm_cols(xt, norm, 1e-5)
    want_q = be.qkv_rope_kv_cols(q, k, v, h, *caches[0], start, spec, None)
    got = be.qkv_rope_kv_cols(q, k, v, xt, *caches[1], start, spec, None, norm=norm, eps=1e-5)
    np.testing.assert_array_equal(got, want_q, f"{seed=}")
    for a, b in zip(caches[0], caches[1]):
        np.testing.assert_array_equal(b, a, f"{seed=}")


def test_linear_cols_is_profiled_as_the_product_it_is(tiny_model) -> None:
    engine = Engine(tiny_model, backend="numpy")
    w = engine.transformer.layers[0].attn_q
    xt = np.zeros((w.shape[1], 6), np.float32)
    assert kernel_name("linear_cols", (w, xt)) == kernel_name("linear", (w, xt.T))
    assert cost("linear_cols", (w, xt)) == cost("linear", (w, xt.T))
    # The fused ones as their products: the flops a prefill's GFLOP/s counts
    res = np.zeros((w.shape[0], 6), np.float32)
    assert kernel_name("linear_add_cols", (w, xt, res)) == kernel_name("linear_cols", (w, xt))
    assert cost("linear_add_cols", (w, xt, res)) == cost("linear_cols", (w, xt))
    assert kernel_name("linear_swiglu_cols", (w, w, xt)) == kernel_name("linear_cols", (w, xt))
    one = cost("linear_cols", (w, xt))
    assert cost("linear_swiglu_cols", (w, w, xt)) == (2 * one[0], 2 * one[1])
    for op in ("linear_qkv_cols", "qkv_rope_kv_cols"):  # (q, k, v, xt, then the cache's args)
        assert kernel_name(op, (w, w, w, xt, res)) == kernel_name("linear_cols", (w, xt))
        assert cost(op, (w, w, w, xt, res)) == (3 * one[0], 3 * one[1])
    spec = engine.spec
    assert kernel_name("rope_cols", (xt, 0, spec, None)) == f"rope_{spec.rope_mode}"
    assert kernel_name("attention_cols", (xt,)) == "attention_prefill"


def test_every_prompt_operation_has_its_row_twins_cost(tiny_model) -> None:
    """The registry's cost model of the kernel each operation is named after, from either
    layout's arguments: a profile reads the same GB/s and GFLOP/s whichever ran."""
    spec = Engine(tiny_model, backend="numpy").spec
    n, start, hd = 6, 3, spec.head_dim
    x = np.zeros((n, spec.n_heads, hd), np.float32)  # (n, heads, hd)
    kv = np.zeros((n, spec.n_kv_heads, hd), np.float32)  # (n, kv_heads, hd)
    cache = np.zeros((spec.n_kv_heads, 16, hd), np.float32)  # (kv_heads, ctx, hd)

    def cols(a: np.ndarray) -> np.ndarray:  # (n, ...) -> (features, n)
        return np.ascontiguousarray(a.reshape(n, -1).T)

    h = x.reshape(n, -1)
    twins = [
        ("rmsnorm", (h, None, 1e-5), (cols(h), None, 1e-5)),
        ("rope", (x, start, spec, None), (cols(x), start, spec, None)),
        ("kv_append", (cache, cache, kv, kv, start), (cache, cache, cols(kv), cols(kv), start)),
        ("attention", (x, cache, cache, start), (cols(x), cache, cache, start)),
    ]
    for op, row_args, col_args in twins:
        want = cost(op, row_args)
        assert want[0] and want[1] is not None, op
        assert cost(f"{op}_cols", col_args) == want, op
    pairs = n * start + n * (n + 1) // 2  # the (query, key) pairs each head sees
    assert cost("attention", (x, cache, cache, start))[1] == 4 * spec.n_heads * hd * pairs


@pytest.mark.parametrize("kind", ["Q4_1", "F32", "untied"])
def test_a_prompt_feature_major_gives_the_row_major_logits_and_cache(
    tiny_models, kind, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(tiny_models[kind], backend="numpy")
    tf = engine.transformer
    tokens = rng.integers(0, tf.spec.vocab_size, size=int(rng.integers(2, 30)))
    runs = {}
    for cols in (True, False):
        monkeypatch.setattr(NumpyBackend, "prefill_cols", cols)
        engine.profiler.clear()
        cache = tf.new_cache()
        tf.prefill(tokens[:3], cache)  # a prompt that continues a cache: start > 0
        logits = tf.forward(tokens[3:], cache, all_logits=True) if len(tokens) > 3 else None
        last = tf.prefill(tokens, tf.new_cache())
        names = {r.name for r in engine.profiler.records()}
        runs[cols] = (logits, last, cache, names)
    (lc, last_c, cache_c, names_c), (lr, last_r, cache_r, names_r) = runs[True], runs[False]
    scale = float(np.abs(last_r).max())
    np.testing.assert_allclose(last_c, last_r, rtol=0, atol=1e-6 * scale)
    if lc is not None:
        np.testing.assert_allclose(lc, lr, rtol=0, atol=1e-6 * scale)
    for a, b in zip(cache_c.k + cache_c.v, cache_r.k + cache_r.v):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
    # The same kernels by name, RoPE, the KV append, the residual adds and SwiGLU inside the
    # feature-major products (a continuation of one token takes the row path in both runs)
    inside = {"add", "swiglu", "kv_append", f"rope_{tf.spec.rope_mode}"}
    assert "attention_prefill" in names_c and names_c - inside == names_r - inside
