"""The kernels for a batch of sequences on the emulator, at warp 32 and 64: the batched quantized
matvec (rows bit-identical to the one-row matvec, weights read once whatever the batch) and the
paged decode attention (ragged lengths, a sequence of one key, pages out of order in the pool,
fp32 and fp16 pools, bit-identical to the contiguous decode kernel). Inputs are fresh random data
each run; failures carry the seed (WORKBENCH_TEST_SEED=<seed> replays it)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from tests.test_kernels_quant import _blocks
from workbench.errors import UserError
from workbench.gguf.quants import block_layout, row_bytes
from workbench.kernels import ops_kernels as ops
from workbench.kernels import paged_kernels as pk
from workbench.kernels import quant_kernels as qk

Q = GGMLQuantizationType
WARPS = (32, 64)
# Legacy blocks of 32, K-quants of 256, both affine and not, and the float types.
TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F16, Q.F32)


@pytest.fixture(scope="module")
def emu_cache(shared_emu_cache: str) -> str:
    return shared_emu_cache


def _shapes(qtype: GGMLQuantizationType) -> list[tuple[int, int, int]]:
    """(n, rows, cols): rows that are not whole blocks of 16, one and several column tiles, a
    full batch of 32 and one past it (two launches)."""
    qk_ = block_layout(qtype)[0]
    cols = {1: (37, 520), 32: (96, 576), 256: (256, 768)}[qk_]
    return [(2, 37, cols[0]), (7, 21, cols[1]), (32, 5, cols[0]), (33, 3, cols[1])]


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_matvec_batch_rows_equal_the_one_row_matvec(warp, qtype, emu_cache, rng, seed) -> None:
    load = qk.emulator_loader(warp, emu_cache)
    for n, rows, cols in _shapes(qtype):
        raw = _blocks(rng, qtype, rows, cols)
        x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10.0)).astype(np.float32)
        buf = np.full(n * rows + 64, np.nan, np.float32)  # NaN: unwritten elements show
        out = buf[: n * rows].reshape(n, rows)
        qk.launch_matvec_batch(load, qtype, raw, x, out)
        assert np.isnan(buf[n * rows :]).all(), f"seed={seed}: written past the output"
        where = f"seed={seed} {qtype.name} n={n} rows={rows} cols={cols}"
        for b in range(n):
            one = np.empty(rows, np.float32)
            qk.launch_matvec(load, qtype, raw, np.ascontiguousarray(x[b]), one, warp)
            assert np.array_equal(one.view(np.uint32), out[b].view(np.uint32)), f"{where} row {b}"
        ref = qk.matvec_batch_reference(raw, x, qtype)
        scale = np.abs(ref).max() + 1e-30
        assert np.abs(out - ref).max() / scale < 1e-5, where


def test_matvec_batch_registry_entries_share_the_matvec_module() -> None:
    from workbench.gguf.quants import SUPPORTED_TYPES
    from workbench.kernels import registry

    kernels = registry.all_kernels()
    path, options, names = qk.module_args("matvec")
    assert qk.module_args("matvec_batch") == (path, options, names)
    for q in SUPPORTED_TYPES:
        spec = kernels[qk.kernel_name("matvec_batch", q)]
        assert spec.symbol in names and qk.symbol("matvec", q) in names
        assert str(spec.path) == path and set(spec.options) == set(options)
        for shape in spec.shapes:
            assert shape["cols"] % block_layout(q)[0] == 0 and shape["n"] > 1
            one = kernels[qk.kernel_name("matvec", q)].cost(rows=shape["rows"], cols=shape["cols"])
            many = spec.cost(**shape)  # the weights once: only x and y grow with n
            weights = shape["rows"] * row_bytes(q, shape["cols"])
            assert many.bytes - weights == shape["n"] * (one.bytes - weights)
    spec = kernels["attention_decode_paged"]
    for shape in spec.shapes:
        launch = spec.launch(**shape)
        assert launch.grid[2] == shape["n"] and launch.block == (256, 1, 1)


def test_matvec_batch_refuses_bad_shapes(emu_cache) -> None:
    load = qk.emulator_loader(32, emu_cache)
    raw = np.zeros((4, row_bytes(Q.Q8_0, 64)), np.uint8)
    with pytest.raises(UserError, match="shape"):
        qk.launch_matvec_batch(load, Q.Q8_0, raw, np.zeros((2, 32), np.float32),
                               np.zeros((2, 4), np.float32))  # fmt: skip


@pytest.mark.tool("clang")
@pytest.mark.parametrize("warp", WARPS)
def test_matvec_batch_reads_each_weight_once_whatever_the_batch(warp) -> None:
    """The memory counters: global loads are the weights once plus each block's copy of X's
    codes (n x cols bytes per block of 16 rows); the weights' share does not grow with n."""
    from workbench.engine.kernel_sanitize import profile_kernel

    rows, cols = 64, 1024
    blocks = rows // 16
    weights = rows * row_bytes(Q.Q4_0, cols)
    share = {}
    for n in (1, 2, 8, 32):
        p = profile_kernel("matvec_batch_q4_0", {"n": n, "rows": rows, "cols": cols},
                           warp_size=warp)  # fmt: skip
        loads = [c for c in p.report.lines if c.space == "global" and c.op == "load"]
        wide = sum(c.bytes_requested for c in loads if c.file.endswith("quant.h"))  # wb_ld16
        share[n] = wide - n * cols * blocks  # what is left of the 16-byte loads: the weights
    assert set(share.values()) == {share[1]}, share
    assert weights <= share[1] <= 1.1 * weights, (share, weights)


# --- paged attention ------------------------------------------------------------------------------


def _pool(rng, lens, page_size, kv_heads, hd, dtype, spare: int = 3):
    """Pools with room for every sequence plus spare pages, and tables handing out the pages in
    a random order (a sequence's pages are neither adjacent nor ascending)."""
    need = [-(-t // page_size) for t in lens]
    pages = sum(need) + spare
    perm = rng.permutation(pages).tolist()
    tables, i = [], 0
    for k in need:
        tables.append(perm[i : i + k])
        i += k
    shape = (pages, page_size, kv_heads, hd)
    k = rng.standard_normal(shape).astype(dtype)
    v = rng.standard_normal(shape).astype(dtype)
    return k, v, tables


CASES = [  # heads, kv_heads, hd, lens
    (8, 2, 32, [1, 16, 17, 100, 33]),  # GQA; one key; a page exactly; several chunks
    (12, 1, 16, [70, 1]),  # a group wider than one block's 8 heads
    (4, 4, 64, [5, 40, 129]),  # MHA
]


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=["gqa", "wide-group", "mha"])
def test_paged_attention(warp, dtype, case, emu_cache, rng, seed) -> None:
    heads, kv_heads, hd, lens = case
    m = ops.load_module("attention.hip", warp_size=warp, cache_dir=emu_cache)
    k, v, tables = _pool(rng, lens, 16, kv_heads, hd, dtype)
    q = rng.standard_normal((len(lens), heads, hd)).astype(np.float32)
    buf = np.full(len(lens) * heads * hd + 64, np.nan, np.float32)
    out = buf[: len(lens) * heads * hd].reshape(len(lens), heads * hd)
    pk.paged_attention(m, q, k, v, tables, lens, out=out)
    assert np.isnan(buf[out.size :]).all(), f"seed={seed}: written past the output"
    ref = pk.paged_attention_reference(q, k, v, tables, lens)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5, err_msg=f"seed={seed}")
    for s, t in enumerate(lens):  # each sequence as the contiguous kernel gives it alone
        kc = pk.gather_pages(k, tables[s], t)
        vc = pk.gather_pages(v, tables[s], t)
        alone = ops.attention(m, np.ascontiguousarray(q[s : s + 1]), kc, vc, t - 1)
        assert np.array_equal(alone.view(np.uint32), out[s : s + 1].view(np.uint32)), (
            f"seed={seed}: sequence {s} ({t} keys) differs from the contiguous decode"
        )


def test_paged_attention_with_longer_tables_and_the_engines_layout(emu_cache, rng, seed) -> None:
    """Tables longer than the lengths need (a sequence's pages for tokens still to come) and a
    pool layer of the engine's PagePool layout give the engine's attention."""
    from workbench.backends.numpy_backend import NumpyBackend

    m = ops.load_module("attention.hip", warp_size=32, cache_dir=emu_cache)
    lens = [3, 20]
    k, v, tables = _pool(rng, [t + 16 for t in lens], 16, 2, 16, np.float32)
    q = rng.standard_normal((2, 6, 16)).astype(np.float32)
    out = pk.paged_attention(m, q, k, v, tables, lens)
    for s, t in enumerate(lens):
        kc, vc = pk.gather_pages(k, tables[s], t), pk.gather_pages(v, tables[s], t)
        expect = NumpyBackend().attention(q[s : s + 1], kc, vc, t - 1)
        np.testing.assert_allclose(out[s : s + 1], expect, rtol=1e-4, atol=1e-5,
                                   err_msg=f"seed={seed}")  # fmt: skip


def test_paged_attention_refuses_bad_tables(emu_cache) -> None:
    m = ops.load_module("attention.hip", warp_size=32, cache_dir=emu_cache)
    k = np.zeros((3, 16, 1, 16), np.float32)
    q = np.zeros((1, 2, 16), np.float32)
    with pytest.raises(UserError, match="need 2 pages"):
        pk.paged_attention(m, q, k, k, [[0]], [17])
    with pytest.raises(UserError, match="outside"):
        pk.paged_attention(m, q, k, k, [[3]], [4])
    with pytest.raises(UserError, match="at least one key"):
        pk.paged_attention(m, q, k, k, [[0]], [0])


@pytest.mark.tool("clang")
def test_batch_kernels_are_sanitizer_clean(emu_cache) -> None:
    """memcheck, racecheck, initcheck and synccheck find nothing in either kernel at warp 32 and
    64 (the examples: a partial column tile, ragged lengths, one key, shuffled pages)."""
    from workbench.kernels.instrument import TOOLS
    from workbench.kernels.sanitize import sanitize_registered

    names = ["attention_decode_paged", "matvec_batch_q4_1", "matvec_batch_q6_k",
             "matvec_batch_f16"]  # fmt: skip
    reports = sanitize_registered(names, tools=TOOLS, warps=WARPS, cache_dir=emu_cache, seed=5)
    assert len(reports) == 2 * len(names)
    dirty = [(r.kernel, r.warp_size, f.message) for r in reports for f in r.findings]
    assert dirty == [], "seed 5: " + "\n".join(map(str, dirty))
