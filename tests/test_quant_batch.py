"""The batched matvec (`quant_batch.matvec_rows`): every row bit for bit the same as alone.

A sequence's greedy tokens must not depend on who it is batched with, so each row of a batch is
compared bit for bit with the same row as a batch of one, for every type, batch sizes around the
groups of four and eight, serial and threaded loops, seeded random data; and with
`quant_cpu.matvec` (the single-caller path) to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from numba import njit

from tests.test_quant_cpu import Rand, assert_bits_equal, finite_data, ncols, random_blocks
from workbench.backends import quant_batch as qb
from workbench.backends import quant_cpu as qc
from workbench.backends import quant_simd
from workbench.backends.quant_blocks import _dot_blocks16
from workbench.errors import UserError
from workbench.gguf.quants import SUPPORTED_TYPES


@pytest.fixture
def r(seed: int) -> Rand:
    return Rand(seed, np.random.default_rng(seed))


@pytest.fixture(params=["serial", "parallel"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(qc, "_PAR_MIN_BYTES", 1 << 62 if request.param == "serial" else 0)
    return request.param


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_rows_bit_identical_to_each_row_alone(qtype: Q, path: str, r: Rand) -> None:
    cols = ncols(qtype, r)
    rows = int(r.rng.integers(1, 60))
    raw = finite_data(qtype, rows, cols, r)
    w = dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)  # (rows, cols)
    for n in (1, 2, 3, 4, 5, 7, 8, 10, 12, 13, qb.MAX_ROWS):
        # Rows of very different magnitudes: a shared accumulator would show at once.
        x = r.rng.standard_normal((n, cols)) * 10.0 ** r.rng.integers(-3, 3, (n, 1))
        x = x.astype(np.float32)
        out = np.full((n, rows), np.nan, np.float32)  # poisoned: unwritten values show
        got = qb.matvec_rows(qtype, raw, x, out)
        assert got is out
        for i in range(n):
            what = f"{qtype.name} {path} row {i} of {n} {raw.shape} {r}"
            assert_bits_equal(got[i], qb.matvec_rows(qtype, raw, x[i : i + 1])[0], what)
            one = qc.matvec(qtype, raw, x[i])
            # Another summation order: float32 rounding of the terms' magnitudes, not of the
            # result's (a row that cancels to a small value keeps the terms' absolute error).
            tol = 4 * np.finfo(np.float32).eps * np.sqrt(cols) * (np.abs(w) @ np.abs(x[i]))
            assert (np.abs(got[i] - one) <= tol).all(), f"against matvec: {what}"


def test_a_row_does_not_depend_on_its_neighbours(r: Rand) -> None:
    """The same row at another place in another batch gives the same bits."""
    qtype = Q.Q4_1
    raw = finite_data(qtype, 40, 256, r)
    x = r.rng.standard_normal((7, 256)).astype(np.float32)
    alone = qb.matvec_rows(qtype, raw, x[3:4])
    other = np.concatenate([r.rng.standard_normal((5, 256)).astype(np.float32), x[3:4]])
    assert_bits_equal(qb.matvec_rows(qtype, raw, x)[3], alone[0], f"in a batch of 7 {r}")
    assert_bits_equal(qb.matvec_rows(qtype, raw, other)[5], alone[0], f"last of 6 {r}")


def test_bad_input_is_a_user_error(r: Rand) -> None:
    raw = finite_data(Q.Q8_0, 4, 64, r)
    with pytest.raises(UserError, match=r"x must be \(n, 64\)"):
        qb.matvec_rows(Q.Q8_0, raw, np.zeros(64, np.float32))
    with pytest.raises(UserError, match="x must be"):
        qb.matvec_rows(Q.Q8_0, raw, np.zeros((2, 32), np.float32))
    assert qb.matvec_rows(Q.Q8_0, raw, np.zeros((0, 64), np.float32)).shape == (0, 4)


# Head sizes that take each path of the decode attention's weighted sum: 64-lane groups, 32-lane
# groups, then 8-lane groups, then single lanes.
HEAD_DIMS = [3, 8, 44, 64, 72]


def test_exp32_is_within_an_ulp_and_vectorises_to_the_same_bits(r: Rand) -> None:
    """`cpu_ops.exp32` against float64 over its whole range; a loop LLVM vectorises (the
    attention's flags), one it does not, and the 16-lane `wexp32` give the same bits; outside
    the range it clamps."""
    from workbench.backends import cpu_ops

    @njit(fastmath=cpu_ops.ATTENTION_MATH)
    def wide(x, y):
        for i in range(x.shape[0]):
            y[i] = cpu_ops.exp32(x[i])

    @njit
    def plain(x, y):
        for i in range(x.shape[0]):
            y[i] = cpu_ops.exp32(x[i])

    @njit
    def in_place(x):
        cpu_ops.exp_in_place(x)

    x = np.concatenate([
        np.linspace(-87.3, 88.3, 200_001, dtype=np.float32),
        r.rng.uniform(-30, 5, 100_000).astype(np.float32),
        np.array([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5], np.float32),
    ])  # fmt: skip
    y, y1 = np.empty_like(x), np.empty_like(x)
    wide(x, y)
    plain(x, y1)
    assert np.array_equal(y.view(np.uint32), y1.view(np.uint32)), f"{r}"
    want = np.exp(x.astype(np.float64))
    ulps = np.abs(y - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.5, f"{ulps.max()} ulp at x={x[np.argmax(ulps)]} {r}"
    ends = np.array([-np.inf, -1e4, -100.0, 100.0, 1e4, np.inf, np.nan], np.float32)
    out, out1 = np.empty_like(ends), np.empty_like(ends)
    plain(ends, out)
    wide(ends[:-1], out1[:-1])  # the attention's flags assume no NaN
    assert (out[:3] == 0).all() and (out[3:6] == np.inf).all() and np.isnan(out[6]), out
    assert np.array_equal(out[:-1], out1[:-1]), out1
    # 16 lanes in vector IR (`wexp32`, through `exp_in_place`): the same bits, ends included;
    # an odd length takes the scalar tail, a strided view the scalar loop
    everything = np.concatenate([x, ends, np.float32([1e-30, -87.3365478515625, 88.3762626647949])])
    for got in (everything.copy(), everything[:-5].copy(), np.repeat(everything, 3)[::3]):
        want = np.empty_like(got)
        plain(got, want)
        in_place(got)
        same = np.ascontiguousarray(got).view(np.uint32) == want.view(np.uint32)
        assert same.all(), f"{got.strides} {got[~same][:4]} {r}"


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_decode_attention_matches_float64(hd: int, r: Rand) -> None:
    """`cpu_ops.attention_decode` against the softmax formula in float64 (GQA, 3 query heads
    per KV head)."""
    from workbench.backends import cpu_ops

    kvh, group, ctx = 2, 3, 50
    t = int(r.rng.integers(1, ctx))
    q = (2 * r.rng.standard_normal((kvh * group, hd))).astype(np.float32)  # sharp softmax
    k = r.rng.standard_normal((kvh, ctx, hd)).astype(np.float32)
    v = r.rng.standard_normal((kvh, ctx, hd)).astype(np.float32)
    out = np.full(kvh * group * hd, np.nan, np.float32)
    cpu_ops.attention_decode(q, k, v, t, out)
    for h in range(kvh * group):
        g = h // group
        s = k[g, :t].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(hd)  # (t,)
        p = np.exp(s - s.max())
        want = (p / p.sum()) @ v[g, :t].astype(np.float64)  # (hd,)
        got = out[h * hd : (h + 1) * hd]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"head {h} {r}")


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_paged_attention_reads_through_page_tables(hd: int, r: Rand) -> None:
    """Each row equals `cpu_ops.attention_decode` on its own gathered cache bit for bit (the
    same loop, `cpu_ops.decode_head_kernel`, with another row lookup), and does not change
    with the other rows of the batch."""
    from workbench.backends import cpu_ops, paged_ops

    size, kvh, group, n_pages = 4, 2, 3, 40
    k = r.rng.standard_normal((n_pages, size, kvh, hd)).astype(np.float32)
    v = r.rng.standard_normal((n_pages, size, kvh, hd)).astype(np.float32)
    lengths = r.rng.integers(1, 9 * size, 5)
    pages = r.rng.permutation(n_pages)
    tables = np.zeros((5, 9), np.int64)
    used = 0
    for i, t in enumerate(lengths):
        need = -(-int(t) // size)
        tables[i, :need] = pages[used : used + need]
        used += need
    q = r.rng.standard_normal((5, kvh * group, hd)).astype(np.float32)
    out = np.empty((5, kvh * group * hd), np.float32)
    paged_ops.attention_decode_paged(q, k, v, tables, lengths.astype(np.int64), out)
    for i, t in enumerate(lengths):
        rows = k[tables[i]].reshape(-1, kvh, hd)[:t].transpose(1, 0, 2)  # (kv_heads, t, hd)
        vals = v[tables[i]].reshape(-1, kvh, hd)[:t].transpose(1, 0, 2)
        want = np.empty(kvh * group * hd, np.float32)
        cpu_ops.attention_decode(q[i], np.ascontiguousarray(rows), np.ascontiguousarray(vals),
                                 int(t), want)  # fmt: skip
        assert_bits_equal(out[i], want, f"row {i} paged vs contiguous {r}")
        one = np.empty((1, kvh * group * hd), np.float32)
        paged_ops.attention_decode_paged(q[i : i + 1], k, v, tables[i : i + 1],
                                         lengths[i : i + 1].astype(np.int64), one)  # fmt: skip
        assert_bits_equal(one[0], out[i], f"row {i} alone vs in the batch {r}")


def test_paged_attention_wants_a_power_of_two_page_size() -> None:
    """The page lookup is a shift and a mask, so a page size of 3 is refused, not misread."""
    from workbench.backends import paged_ops

    k = np.zeros((2, 3, 1, 8), np.float32)
    q = np.zeros((1, 1, 8), np.float32)
    out = np.empty((1, 8), np.float32)
    tables, lengths = np.zeros((1, 2), np.int64), np.full(1, 4, np.int64)
    with pytest.raises(ValueError, match="power of two"):
        paged_ops.attention_decode_paged(q, k, k, tables, lengths, out)


@pytest.mark.parametrize("route", ["lane-wise", "this CPU's"])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_nibble_weights_are_exact_on_both_routes(
    qtype: Q, route: str, r: Rand, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q4_0 and Q4_1 blocks decode to ``(q - 8) d`` and ``d q + m`` (one rounding) whether the
    kernel converts each code (the route without AVX-512) or looks its weight up in a table of
    the block's 16 (the AVX-512 route, compiled on a CPU that has it): both give these bits."""
    if route == "lane-wise":
        monkeypatch.setattr(quant_simd, "_PERMUTE_TABLES", False)
    code = int(qtype)
    nb = int(r.rng.integers(1, 6))
    raw = random_blocks(qtype, 8, 32 * nb, r)  # (8, nb * block bytes)

    @njit(fastmath=True)  # compiled here, with the route the flag now selects
    def weights(raw: np.ndarray, out: np.ndarray) -> None:
        unit = np.zeros(out.shape[1], np.float32)  # (cols,) picks one weight per dot product
        for i in range(raw.shape[0]):
            for j in range(out.shape[1]):
                unit[j] = 1.0
                out[i, j] = _dot_blocks16(code, raw[i], unit, nb)
                unit[j] = 0.0

    got = np.empty((8, 32 * nb), np.float32)
    weights(raw, got)
    blocks = raw.reshape(8, nb, -1)  # (8, nb, block bytes)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (8, nb)
    first = 4 if qtype == Q.Q4_1 else 2
    qs = blocks[:, :, first : first + 16].astype(np.int64)  # (8, nb, 16)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float64)  # (8, nb, 32)
    if qtype == Q.Q4_1:
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        want = d[..., None] * q + m[..., None]  # exact in float64, rounded once below
    else:
        want = (q - 8.0) * d[..., None]
    np.testing.assert_array_equal(got, want.reshape(8, -1).astype(np.float32), f"{route} {r}")
