"""The operation kernels (rmsnorm, rope, attention, elementwise, sampling) on the CPU emulator.

Every kernel is checked against its NumPy reference on fresh random inputs (the seed is printed:
rerun with ``-s`` to see it), with the output poisoned with NaN before the launch so unwritten
elements show, at warp widths 32 and 64, and on sizes that are not multiples of the block or
tile. The references themselves are checked against the NumPy engine.

Benchmark note (not a timed test): a 1536x576 RMSNorm with 256-thread blocks took 0.43-0.60 s
on the emulator (Boost.Context fibers) on this 2-core machine while it was loaded, warp 32 and 64
alike; DESIGN.md's target is "well under a second".
"""

from __future__ import annotations

import os
import secrets
from types import SimpleNamespace

import numpy as np
import pytest

from workbench.backends.numpy_backend import NumpyBackend, Weight
from workbench.engine.sampler import Sampler, SamplerConfig
from workbench.errors import UserError
from workbench.kernels import ops_kernels as ops
from workbench.kernels import registry

pytestmark = pytest.mark.tool("c++")

WARPS = (32, 64)


@pytest.fixture(scope="module")
def modules(shared_emu_cache: str):
    """Each source compiled once per warp width (the emulator caches the shared objects)."""
    cache = shared_emu_cache
    made: dict[tuple[str, int], object] = {}

    def get(source: str, warp_size: int):
        if (source, warp_size) not in made:
            made[source, warp_size] = ops.load_module(source, warp_size=warp_size, cache_dir=cache)
        return made[source, warp_size]

    return get


def rng_for(name: str) -> np.random.Generator:
    """A fresh generator; its seed is printed, so a failure shows it (WORKBENCH_TEST_SEED=N
    replays it)."""
    seed = int(os.environ.get("WORKBENCH_TEST_SEED") or secrets.randbits(63))
    print(f"{name}: seed={seed}")
    return np.random.default_rng(seed)


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def nan_like(shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, np.nan, dtype=np.float32)


# --- rmsnorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("n", "dim", "block"), [(1, 576, 256), (3, 100, 64), (17, 1000, 256)])
def test_rmsnorm(modules, warp: int, n: int, dim: int, block: int) -> None:
    rng = rng_for(f"rmsnorm {n}x{dim}")
    x, w = randn(rng, n, dim, scale=3.0), randn(rng, dim)
    out = ops.rmsnorm(modules("rmsnorm.hip", warp), x, w, 1e-5, out=nan_like((n, dim)), block=block)
    # float accumulation against the float64 reference: ~(dim/B + log2 B) * 2^-24 relative
    np.testing.assert_allclose(out, ops.rmsnorm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rmsnorm_reference_is_the_engine() -> None:
    rng = rng_for("rmsnorm reference")
    x, w = randn(rng, 5, 64), randn(rng, 64)
    weight = Weight("w", None, (64,), w)  # type: ignore[arg-type]
    expect = NumpyBackend().rmsnorm(x, weight, 1e-6)
    np.testing.assert_array_equal(ops.rmsnorm_reference(x, w, 1e-6), expect)


# --- rope -----------------------------------------------------------------------------------------

ROPE_CASES = [
    # n, heads, head_dim, rope_dim, pos0, base, rope_scale, with factors
    (1, 9, 64, 64, 2047, 10000.0, 1.0, False),  # one decode step late in SmolLM2's context
    (3, 3, 64, 32, 5, 10000.0, 2.0, True),  # partial rotation, scaled positions, factors
    (17, 2, 48, 48, 100_000, 500000.0, 1.0, False),  # long positions: angles need double
]


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope(modules, warp: int, mode: str, case: tuple) -> None:
    n, heads, hd, rope_dim, pos0, base, scale, with_factors = case
    rng = rng_for(f"rope {mode} {case}")
    x = randn(rng, n, heads, hd)
    ff = rng.uniform(0.5, 4.0, rope_dim // 2).astype(np.float32) if with_factors else None
    expect = ops.rope_reference(
        x, pos0, mode=mode, rope_dim=rope_dim, base=base, rope_scale=scale, freq_factors=ff
    )
    got = x.copy()
    ops.rope(modules("rope.hip", warp), got, pos0, mode=mode, rope_dim=rope_dim, base=base,
             rope_scale=scale, freq_factors=ff)  # fmt: skip
    # the same float32 cos/sin as the reference; only a fused multiply-add may differ (an ulp)
    np.testing.assert_allclose(got, expect, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])  # untouched


@pytest.mark.parametrize("warp", WARPS)
def test_rope_from_a_whole_context_table(modules, warp: int) -> None:
    """A backend's table for positions 0.. gives the bits of the per-call table at any offset,
    and a table that misses the positions is refused."""
    rng = rng_for("rope table")
    x = randn(rng, 3, 2, 16)
    ff = rng.uniform(0.5, 4.0, 6).astype(np.float32)
    table = ops.rope_table(600, 12, 500000.0, 2.0, ff)  # (600, 6, 2)
    a, b = x.copy(), x.copy()
    kw = dict(mode="norm", rope_dim=12, base=500000.0, rope_scale=2.0, freq_factors=ff)
    ops.rope(modules("rope.hip", warp), a, 597, **kw)
    ops.rope(modules("rope.hip", warp), b, 597, **kw, table=table)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match=r"covers positions 0\.\.599"):
        ops.rope(modules("rope.hip", warp), b, 598, **kw, table=table)


@pytest.mark.parametrize("mode", ["norm", "neox"])
def test_rope_reference_is_the_engine(mode: str) -> None:
    rng = rng_for("rope reference")
    x = randn(rng, 4, 3, 16)
    spec = SimpleNamespace(rope_dim=12, rope_base=10000.0, rope_scale=2.0, rope_mode=mode)
    expect = x.copy()
    NumpyBackend().rope(expect, 7, spec, None)  # in place, as the engine calls it
    got = ops.rope_reference(x, 7, mode=mode, rope_dim=12, base=10000.0, rope_scale=2.0)
    np.testing.assert_array_equal(got, expect)


# --- attention ------------------------------------------------------------------------------------


def kv_cache(rng: np.random.Generator, kv_heads: int, ctx: int, hd: int, t: int):
    """(kv_heads, ctx, hd) caches with rows past t poisoned: a kernel reading them goes NaN."""
    k, v = randn(rng, kv_heads, ctx, hd), randn(rng, kv_heads, ctx, hd)
    k[:, t:] = np.nan
    v[:, t:] = np.nan
    return k, v


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(
    ("n", "start", "heads", "kv_heads", "hd"),
    [(17, 0, 9, 3, 64), (3, 5, 4, 4, 128), (20, 13, 6, 2, 40), (1, 0, 2, 1, 64)],
)
def test_attention_prefill(modules, warp, n, start, heads, kv_heads, hd) -> None:
    rng = rng_for(f"prefill n={n} start={start} hd={hd}")
    t, ctx = start + n, start + n + 7
    q = randn(rng, n, heads, hd)
    k, v = kv_cache(rng, kv_heads, ctx, hd, t)
    out = ops.attention_prefill(modules("attention.hip", warp), q, k, v, start,
                                out=nan_like((n, heads * hd)))  # fmt: skip
    expect = ops.attention_reference(q, k, v, start)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("t", "hd"), [(1, 64), (33, 64), (100, 128), (45, 24)])
def test_attention_decode(modules, warp: int, t: int, hd: int) -> None:
    rng = rng_for(f"decode t={t} hd={hd}")
    heads, kv_heads = 9, 3
    q = randn(rng, 1, heads, hd, scale=2.0)  # sharper softmax: the running max matters
    k, v = kv_cache(rng, kv_heads, t + 5, hd, t)
    out = ops.attention(modules("attention.hip", warp), q, k, v, t - 1,
                        out=nan_like((1, heads * hd)))  # fmt: skip
    expect = ops.attention_reference(q, k, v, t - 1)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "t"), [(20, 2, 300), (4, 4, 70), (8, 1, 1), (9, 3, 1500)]
)
def test_attention_decode_chunks_and_groups(modules, warp: int, heads: int, kv_heads: int, t: int):
    """Flash-decoding: several key chunks (a ragged last one), a GQA group wider than one block
    (10 heads: slices of 8 and 2), one head per KV head, one key."""
    rng = rng_for(f"decode chunks heads={heads} kv={kv_heads} t={t}")
    hd = 32
    q = randn(rng, 1, heads, hd, scale=2.0)
    k, v = kv_cache(rng, kv_heads, t + 3, hd, t)
    launch = ops._decode_launch(heads, kv_heads, t)
    assert launch.grid[1] == -(-t // ops.decode_chunk(t, heads, kv_heads))
    out = ops.attention(modules("attention.hip", warp), q, k, v, t - 1,
                        out=nan_like((1, heads * hd)))  # fmt: skip
    expect = ops.attention_reference(q, k, v, t - 1)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=3e-6)


def test_attention_reference_is_the_engine() -> None:
    rng = rng_for("attention reference")
    q = randn(rng, 5, 6, 8)
    k, v = randn(rng, 2, 9, 8), randn(rng, 2, 9, 8)
    expect = NumpyBackend().attention(q, k, v, 4)
    # float32 sums in different orders: a few ulps apart (1e-6 failed about 1 run in 8)
    np.testing.assert_allclose(ops.attention_reference(q, k, v, 4), expect, rtol=1e-5, atol=1e-6)


def test_attention_refuses_large_heads(modules) -> None:
    q = np.zeros((2, 2, 192), np.float32)
    k = np.zeros((1, 4, 192), np.float32)
    with pytest.raises(UserError, match="head_dim <= 128"):
        ops.attention(modules("attention.hip", 32), q, k, k, 0)


# --- elementwise ----------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("shape", [(1, 1536), (3, 77), (17, 300)])
def test_swiglu_and_add(modules, warp: int, shape: tuple[int, int]) -> None:
    rng = rng_for(f"elementwise {shape}")
    mod = modules("elementwise.hip", warp)
    gate, up = randn(rng, *shape, scale=4.0), randn(rng, *shape)
    gate.flat[0] = -200.0  # exp(200) overflows: the result must still be -0, not NaN
    out = ops.swiglu(mod, gate, up, out=nan_like(shape))
    np.testing.assert_allclose(out, ops.swiglu_reference(gate, up), rtol=2e-6, atol=1e-7)
    # The NumPy backend runs the fused decodes' compiled loop (`cpu_ops.exp32`): ulps from
    # NumPy's exp at most, and a batch's rows come out as the same bits.
    got = NumpyBackend().swiglu(gate, up)
    np.testing.assert_allclose(got, ops.swiglu_reference(gate, up), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(NumpyBackend().swiglu_rows(gate, up), got)
    assert got.flat[0] == 0  # exp(200) overflows: a zero, the limit, not NaN
    out = ops.add(mod, gate, up, out=nan_like(shape))
    np.testing.assert_array_equal(out, gate + up)


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("n", "start"), [(1, 0), (3, 10), (17, 4)])
def test_kv_append(modules, warp: int, n: int, start: int) -> None:
    rng = rng_for(f"kv_append n={n} start={start}")
    kv_heads, hd, ctx = 3, 40, 24
    k, v = randn(rng, n, kv_heads, hd), randn(rng, n, kv_heads, hd)
    layers = 2
    kc, vc = nan_like((layers, kv_heads, ctx, hd)), nan_like((layers, kv_heads, ctx, hd))
    ek, ev = ops.kv_append_reference(k, v, kc[1], vc[1], start)
    ops.kv_append(modules("elementwise.hip", warp), k, v, kc[1], vc[1], start)
    np.testing.assert_array_equal(kc[1], ek)  # NaN elsewhere compares equal to NaN: untouched
    np.testing.assert_array_equal(vc[1], ev)
    assert np.isnan(kc[0]).all() and np.isnan(vc[0]).all()  # other layers untouched


# --- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1000), (3, 4099)])
def test_argmax(modules, warp: int, rows: int, vocab: int) -> None:
    rng = rng_for(f"argmax {rows}x{vocab}")
    mod = modules("sampling.hip", warp)
    x = randn(rng, rows, vocab)
    best = x.max(axis=1)
    x[0, [vocab - 1, 7, 500]] = best[0] + 1.0  # a three-way tie: the lowest index wins
    got = ops.argmax(mod, x, block=256)
    np.testing.assert_array_equal(got, ops.argmax_reference(x))
    assert got[0] == 7
    x[-1, [900, 40]] = np.nan  # numpy.argmax returns the first NaN
    np.testing.assert_array_equal(ops.argmax(mod, x, block=256), ops.argmax_reference(x))
    assert ops.argmax(mod, x[-1].copy(), block=256)[0] == 40


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("rows", "vocab", "temperature"), [(1, 1000, 1.0), (2, 3001, 0.7)])
def test_softmax(modules, warp: int, rows: int, vocab: int, temperature: float) -> None:
    rng = rng_for(f"softmax {rows}x{vocab}")
    x = randn(rng, rows, vocab, scale=5.0)
    got = ops.softmax(modules("sampling.hip", warp), x, temperature, block=256)
    np.testing.assert_allclose(got, ops.softmax_reference(x, temperature), rtol=2e-5, atol=1e-9)


SAMPLE_CASES = [
    # vocab, top_k, top_p, min_p, temperature
    (1000, 40, 0.95, 0.05, 0.8),  # the engine's defaults
    (3001, 128, 1.0, 0.0, 1.3),  # the largest k, no other filter
    (513, 5, 0.5, 0.0, 0.5),
    (100, 1, 1.0, 0.0, 1.0),  # top-1 is greedy
]


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sample(modules, warp: int, case: tuple) -> None:
    vocab, top_k, top_p, min_p, temp = case
    rng = rng_for(f"sample {case}")
    logits = randn(rng, vocab, scale=3.0)
    logits[rng.integers(0, vocab, 5)] = logits.max()  # ties at the top: order by index
    mod = modules("sampling.hip", warp)
    for u in (*rng.random(4), 0.0):
        kw = dict(top_k=top_k, top_p=top_p, min_p=min_p, temperature=temp, u=float(u))
        got = int(ops.sample(mod, logits, block=256, **kw)[0])
        want = ops.sample_reference(logits, **kw)
        if got != want:
            # The kernel's cumulative sums are float32, the reference's float64: a u within
            # their rounding of a boundary may fall on either side of it (seen: u 1.5e-7 past
            # the boundary between the 47th and 48th candidates). Then the pick must be one of
            # the two tokens on either side of it.
            near = {
                ops.sample_reference(logits, **{**kw, "u": float(u) + d}) for d in (-1e-5, 1e-5)
            }
            assert got in near and len(near) == 2, (u, got, want)


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("vocab", "top_k"), [(3000, 1), (3000, 7), (3000, 128), (50, 50)])
def test_sample_radix_select_on_plateaus(modules, warp: int, vocab: int, top_k: int) -> None:
    """The radix select's hard cases: few distinct values (the k-th one shared by many tokens, of
    which the lowest indices are taken), -inf tokens, -0.0 equal to +0.0, k = vocab. Every
    candidate is reachable by some u, so sweeping u checks the whole selected set and order."""
    rng = rng_for(f"sample plateaus {vocab} {top_k}")
    logits = (rng.integers(-3, 3, vocab) * 0.5).astype(np.float32)
    logits[rng.integers(0, vocab, vocab // 10)] = -np.inf
    logits[rng.integers(0, vocab, vocab // 10)] = -0.0
    mod = modules("sampling.hip", warp)
    for u in np.linspace(0.0, 0.999, 24):
        kw = dict(top_k=top_k, top_p=1.0, min_p=0.0, temperature=1.0, u=float(u))
        got = int(ops.sample(mod, logits, **kw)[0])
        assert got == ops.sample_reference(logits, **kw), (u, got)


def test_sample_reference_is_the_engine_sampler() -> None:
    """With u = the generator's next random(), the reference picks what Sampler picks."""
    rng = rng_for("sampler")
    for _ in range(20):
        logits = randn(rng, 300, scale=3.0)
        seed = int(rng.integers(2**31))
        config = SamplerConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=seed)
        u = np.random.default_rng(seed).random()
        expect = Sampler(config)(logits)
        got = ops.sample_reference(logits, top_k=40, top_p=0.9, min_p=0.05, temperature=0.8, u=u)
        assert got == expect


def test_sample_refuses_large_k(modules) -> None:
    logits = np.zeros(300, np.float32)
    with pytest.raises(UserError, match=r"top_k 1\.\.128"):
        ops.sample(modules("sampling.hip", 32), logits, top_k=129, u=0.5)
    with pytest.raises(UserError, match=r"top_k 1\.\.128"):
        ops.sample(modules("sampling.hip", 32), logits, top_k=0, u=0.5)


# --- registry -------------------------------------------------------------------------------------

NAMES = ("rmsnorm", "rope_norm", "rope_neox", "attention_prefill", "attention_decode", "swiglu",
         "add", "kv_append", "argmax", "softmax", "sample_top_k_top_p")  # fmt: skip


def test_registry_entries() -> None:
    kernels = registry.all_kernels()
    for name in NAMES:
        spec = kernels[name]
        assert spec.path.is_file() and spec.source in ops.SOURCES
        assert spec.symbol in spec.path.read_text()
        assert spec.shapes, name
        for shape in spec.shapes:
            launch = spec.launch(**shape)
            assert all(g >= 1 for g in launch.grid) and launch.block[0] % 64 == 0, name
            cost = spec.cost(**shape)
            assert cost.bytes > 0 and cost.flops >= 0, name


def test_rmsnorm_registry_launch_covers_every_row():
    """Regression: the registry's geometry must take the representative shapes' names (n, dim)."""
    from workbench.kernels.registry import get

    spec = get("rmsnorm")
    for shape in spec.shapes:
        assert spec.launch(**shape).grid[0] == shape["n"]


# --- fp16 KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", WARPS)
def test_kv_append_fp16_rounds_as_numpy(modules, warp: int) -> None:
    """An fp16 cache receives k, v rounded to nearest even, bit for bit NumPy's astype."""
    rng = rng_for("kv_append fp16")
    n, kv_heads, hd, ctx, start = 3, 2, 40, 9, 4
    k, v = randn(rng, n, kv_heads, hd, scale=300.0), randn(rng, n, kv_heads, hd)
    kc = np.full((kv_heads, ctx, hd), np.nan, np.float16)
    vc = np.full((kv_heads, ctx, hd), np.nan, np.float16)
    ek, ev = ops.kv_append_reference(k, v, kc, vc, start)
    ops.kv_append(modules("elementwise.hip", warp), k, v, kc, vc, start)
    np.testing.assert_array_equal(kc.view(np.uint16), ek.view(np.uint16))
    np.testing.assert_array_equal(vc.view(np.uint16), ev.view(np.uint16))


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize(("n", "start"), [(1, 0), (1, 200), (5, 30)])
def test_attention_reads_an_fp16_cache(modules, warp: int, n: int, start: int) -> None:
    """Decode (n = 1, several chunks) and prefill on an fp16 cache equal the float32 reference
    on the same values widened: only the storage changes, not the arithmetic."""
    rng = rng_for(f"attention fp16 n={n} start={start}")
    heads, kv_heads, hd, t = 6, 2, 64, start + n
    q = randn(rng, n, heads, hd, scale=2.0)
    k, v = kv_cache(rng, kv_heads, t + 3, hd, t)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    out = ops.attention(modules("attention.hip", warp), q, k16, v16, start,
                        out=nan_like((n, heads * hd)))  # fmt: skip
    expect = ops.attention_reference(q, k16.astype(np.float32), v16.astype(np.float32), start)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=3e-6)


def test_kv_cache_of_another_type_is_refused(modules) -> None:
    q = np.zeros((1, 2, 8), np.float32)
    k = np.zeros((1, 4, 8), np.float64)
    with pytest.raises(UserError, match="float32 or float16"):
        ops.attention(modules("attention.hip", 32), q, k, k, 0)
