"""The decode step's fused kernels (kernels/matvec.hip, rope.hip, attention.hip) against their
composed NumPy references and against the unfused kernels, at warp 32 and 64 with ragged shapes;
the float types' wide-load matvec; and the counters' bars for the fused products. Inputs are
random; a failure names its seed (``WORKBENCH_TEST_SEED=<seed>`` replays it)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from workbench.kernels import fused_kernels as fk
from workbench.kernels import ops_kernels as ops
from workbench.kernels import quant_kernels as qk
from workbench.kernels.emulator import EmulatorModule

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
TYPES = (Q.Q4_0, Q.Q5_1, Q.Q8_0, *FLOAT_TYPES)


@pytest.fixture(scope="module")
def emu_cache(shared_emu_cache: str) -> str:
    return shared_emu_cache


def _raw(rng: np.random.Generator, qtype: GGMLQuantizationType, rows: int, cols: int):
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.1, 2.0)).astype(np.float32)
    if qtype == Q.F32:
        return w.view(np.uint8).copy()
    if qtype == Q.F16:
        return w.astype(np.float16).view(np.uint8).copy()
    if qtype == Q.BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).copy()
    return np.ascontiguousarray(np.asarray(gguf_quantize(w, qtype))).view(np.uint8)


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> bool:
    return bool(np.allclose(a, b, rtol=tol, atol=tol * max(1e-30, float(np.abs(b).max()))))


def _xq(x: np.ndarray) -> np.ndarray:
    xq = fk.q8_1_buffer(x, x.shape[0])
    xq[:] = qk.quantize_q8_1_reference(x)
    return xq


# --- RMSNorm + Q8_1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("warp_size", [32, 64])
def test_rmsnorm_q8_1_is_rmsnorm_then_quantize(warp_size: int, emu_cache: str, seed: int) -> None:
    """h within float rounding of the float64 RMSNorm; the codes bit-identical to Q8_1 of the
    kernel's own h; 100 columns (no Q8_1) still normalize."""
    rng = np.random.default_rng(seed)
    loader = qk.emulator_loader(warp_size, emu_cache)
    for cols in (32, 96, 576, 1536, 100):
        x = (rng.standard_normal(cols) * rng.uniform(0.01, 50)).astype(np.float32)
        w = rng.standard_normal(cols).astype(np.float32)
        h = np.full(cols, np.nan, np.float32)
        xq = fk.q8_1_buffer(x, cols) if cols % 32 == 0 else None
        fk.launch_rmsnorm_q8_1(loader, x, w, 1e-5, h, xq)
        ref, _ = fk.norm_q8_1_reference(x, w, 1e-5, quant=False)
        assert _close(h, ref, 1e-5), f"seed={seed} cols={cols}"
        if xq is not None:
            bad = np.flatnonzero(xq != qk.quantize_q8_1_reference(h))
            assert bad.size == 0, f"seed={seed} cols={cols}: Q8_1 bytes differ at {bad[:5]}"


# --- matvec_fused ---------------------------------------------------------------------------------


def _plain(loader, qtype, raw, x) -> np.ndarray:
    y = np.empty(raw.shape[0], np.float32)
    qk.launch_matvec(loader, qtype, raw, x, y, 64)
    return y


@pytest.mark.parametrize("warp_size", [32, 64])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_split_is_three_matvecs_in_one_launch(
    warp_size: int, qtype: GGMLQuantizationType, emu_cache: str, seed: int
) -> None:
    """Q, K and V of ragged row counts (one not a multiple of 16, one shorter than a block) equal
    three matvec launches bit for bit, and their references."""
    rng = np.random.default_rng(seed)
    loader = qk.emulator_loader(warp_size, emu_cache)
    for rows, cols in (((40, 17, 3), 96), ((64, 33, 16), 2560)):
        raws = [_raw(rng, qtype, r, cols) for r in rows]
        x = rng.standard_normal(cols).astype(np.float32)
        ys = [np.full(r, np.nan, np.float32) for r in rows]
        fk.launch_matvec_fused(loader, qtype, raws, x, _xq(x), ys, mode="split")
        for raw, y in zip(raws, ys, strict=True):
            assert np.array_equal(y, _plain(loader, qtype, raw, x)), f"seed={seed} {rows}x{cols}"
            (ref,) = fk.matvec_fused_reference([raw], x, qtype)
            assert _close(y, ref), f"seed={seed} {rows}x{cols}"


@pytest.mark.parametrize("warp_size", [32, 64])
@pytest.mark.parametrize("qtype", (Q.Q4_0, Q.Q8_0, Q.F16), ids=lambda q: q.name)
def test_swiglu_with_quantize_tail(
    warp_size: int, qtype: GGMLQuantizationType, emu_cache: str, seed: int
) -> None:
    """silu(gate x) * (up x) for 8 rows of each per block (the swiglu kernel's bits), then
    the last block quantizes the whole output: bit-identical to quantize_q8_1 of it, and the
    counter is back at zero for the next launch."""
    rng = np.random.default_rng(seed)
    loader = qk.emulator_loader(warp_size, emu_cache)
    elementwise = ops.load_module("elementwise.hip", warp_size=warp_size, cache_dir=emu_cache)
    for rows, cols in ((96, 64), (160, 576)):
        gate, up = _raw(rng, qtype, rows, cols), _raw(rng, qtype, rows, cols)
        x = rng.standard_normal(cols).astype(np.float32)
        y, tq = np.full(rows, np.nan, np.float32), fk.q8_1_buffer(x, rows)
        counter = np.zeros(1, np.uint32)
        fk.launch_matvec_fused(
            loader, qtype, [gate, up], x, _xq(x), [y], mode="swiglu", tail="quant", tail_q=tq,
            counter=counter,
        )  # fmt: skip
        g, u = _plain(loader, qtype, gate, x), _plain(loader, qtype, up, x)
        assert np.array_equal(y, ops.swiglu(elementwise, g, u)), f"seed={seed} rows={rows}"
        (ref,) = fk.matvec_fused_reference([gate, up], x, qtype, mode="swiglu")
        assert _close(y, ref, 1e-3), f"seed={seed} rows={rows}"
        assert np.array_equal(tq, qk.quantize_q8_1_reference(y)), f"seed={seed} rows={rows}"
        assert counter[0] == 0
    with pytest.raises(Exception, match="multiple of 32"):  # 3 rows cannot be Q8_1
        small = _raw(rng, qtype, 3, 64)
        fk.launch_matvec_fused(
            loader, qtype, [small, small], x[:64], _xq(x[:64]), [np.empty(3, np.float32)],
            mode="swiglu", tail="quant", tail_q=np.empty(3, np.uint8), counter=counter,
        )  # fmt: skip


@pytest.mark.parametrize("warp_size", [32, 64])
@pytest.mark.parametrize("qtype", (Q.Q5_1, Q.F32), ids=lambda q: q.name)
def test_residual_add_with_norm_tail(
    warp_size: int, qtype: GGMLQuantizationType, emu_cache: str, seed: int
) -> None:
    """y += W x in place, then the last block's RMSNorm and Q8_1 of the new y: the same bits as
    matvec + add, and as rmsnorm_q8_1 of the result."""
    rng = np.random.default_rng(seed)
    loader = qk.emulator_loader(warp_size, emu_cache)
    rows, cols = 96, 160
    raw = _raw(rng, qtype, rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    res = rng.standard_normal(rows).astype(np.float32)
    w = rng.standard_normal(rows).astype(np.float32)
    y = res.copy()
    th, tq = np.full(rows, np.nan, np.float32), fk.q8_1_buffer(x, rows)
    counter = np.zeros(1, np.uint32)
    for _ in range(2):  # the counter resets itself: a second launch runs its tail too
        y[:] = res
        fk.launch_matvec_fused(
            loader, qtype, [raw], x, _xq(x), [y], mode="add", tail="norm", tail_w=w, eps=1e-6,
            tail_h=th, tail_q=tq, counter=counter,
        )  # fmt: skip
        assert counter[0] == 0
    assert np.array_equal(y, res + _plain(loader, qtype, raw, x)), f"seed={seed}"
    y2 = np.full(rows, np.nan, np.float32)  # out of place: the residual read from another buffer
    fk.launch_matvec_fused(loader, qtype, [raw], x, _xq(x), [y2], mode="add", residual=res)
    assert np.array_equal(y2, y), f"seed={seed}"
    (ref,) = fk.matvec_fused_reference([raw], x, qtype, mode="add", residual=res)
    assert _close(y, ref), f"seed={seed}"
    h2, q2 = np.empty(rows, np.float32), fk.q8_1_buffer(x, rows)
    fk.launch_rmsnorm_q8_1(loader, y, w, 1e-6, h2, q2)
    assert np.array_equal(th, h2) and np.array_equal(tq, q2), f"seed={seed}"


# --- the float types' wide loads ------------------------------------------------------------------


@pytest.mark.parametrize("warp_size", [32, 64])
@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda q: q.name)
def test_float_matvec_at_any_alignment(
    warp_size: int, qtype: GGMLQuantizationType, emu_cache: str, seed: int
) -> None:
    """16-byte chunks from rows of any length (ragged columns: chunks reaching into the next row
    or past the matrix), several x tiles, and matrices 1..15 bytes off alignment (elements
    straddling chunks take the element path): all equal the float64 reference."""
    rng = np.random.default_rng(seed)
    loader = qk.emulator_loader(warp_size, emu_cache)
    for rows, cols in ((3, 37), (17, 100), (35, 4500)):
        raw = _raw(rng, qtype, rows, cols)
        x = rng.standard_normal(cols).astype(np.float32)
        ref = qk.matvec_reference(raw, x, qtype)
        for offset in (0, 1, 2, 6, 15):
            buf = np.zeros(raw.nbytes + 32, np.uint8)
            start = -buf.ctypes.data % 16 + offset
            shifted = buf[start : start + raw.nbytes].reshape(raw.shape)
            shifted[:] = raw
            out = np.full(rows, np.nan, np.float32)
            qk.launch_matvec(loader, qtype, shifted, x, out, warp_size)
            assert _close(out, ref), f"seed={seed} {rows}x{cols} offset {offset}"


# --- RoPE + KV write, attention merge + Q8_1 ------------------------------------------------------


@pytest.mark.parametrize("warp_size", [32, 64])
@pytest.mark.parametrize("mode", ["norm", "neox"])
def test_rope_kv_is_rope_then_kv_append(
    warp_size: int, mode: str, emu_cache: str, seed: int
) -> None:
    """q rotated in place, k rotated into the cache and v copied, fp16 and float32 caches,
    rope_dim below head_dim (the rest untouched), against rope + kv_append and the reference."""
    rng = np.random.default_rng(seed)
    m = ops.load_module("rope.hip", warp_size=warp_size, cache_dir=emu_cache)
    e = ops.load_module("elementwise.hip", warp_size=warp_size, cache_dir=emu_cache)
    heads, kv_heads, ctx, pos = 6, 2, 40, 13
    # head_dim is the block: below one warp, and over two warps of 32 (a partial last one)
    for hd, rope_dim, dtype in ((24, 24, np.float16), (24, 16, np.float32), (72, 72, np.float16)):
        table = ops.rope_table(64, rope_dim, 10000.0)
        q = rng.standard_normal((heads, hd), dtype=np.float32)
        k, v = (rng.standard_normal((kv_heads, hd), dtype=np.float32) for _ in range(2))
        kc, vc = (rng.standard_normal((kv_heads, ctx, hd)).astype(dtype) for _ in range(2))
        q2, kc2, vc2 = q.copy(), kc.copy(), vc.copy()
        ops.rope_kv(m, q2, k, v, kc2, vc2, pos, mode=mode, rope_dim=rope_dim, table=table)
        q_out = np.full_like(q, np.nan)  # out of place: every element written, q unchanged
        ops.rope_kv(m, q, k, v, kc.copy(), vc.copy(), pos, mode=mode, rope_dim=rope_dim,
                    table=table, q_out=q_out)  # fmt: skip
        assert np.array_equal(q_out, q2), f"seed={seed}"
        q3, k3, kc3, vc3 = q.copy()[None], k.copy()[None], kc.copy(), vc.copy()
        ops.rope(m, q3, pos, mode=mode, rope_dim=rope_dim, base=10000.0, table=table)
        ops.rope(m, k3, pos, mode=mode, rope_dim=rope_dim, base=10000.0, table=table)
        ops.kv_append(e, k3, np.ascontiguousarray(v[None]), kc3, vc3, pos)
        what = f"seed={seed} hd={hd} rope_dim={rope_dim} {np.dtype(dtype).name}"
        assert np.array_equal(q2, q3[0]) and np.array_equal(kc2, kc3), what
        assert np.array_equal(vc2, vc3), what
        rq, rk, rv = ops.rope_kv_reference(
            q, k, v, kc, vc, pos, mode=mode, rope_dim=rope_dim, base=10000.0
        )
        assert _close(q2, rq, 1e-5) and np.array_equal(vc2, rv), what
        assert _close(kc2.astype(np.float32), rk.astype(np.float32), 1e-3), what


@pytest.mark.parametrize("warp_size", [32, 64])
def test_attention_merge_writes_q8_1(warp_size: int, emu_cache: str, seed: int) -> None:
    """The decode merge with xq writes the same out as without, and xq = quantize_q8_1(out), for
    heads narrower than a Q8_1 block (16), and outputs over more than one block of threads."""
    rng = np.random.default_rng(seed)
    m = ops.load_module("attention.hip", warp_size=warp_size, cache_dir=emu_cache)
    for heads, kv_heads, hd, t in ((4, 2, 16, 70), (9, 3, 64, 5), (5, 5, 96, 300)):
        kc, vc = (rng.standard_normal((kv_heads, 320, hd), dtype=np.float32) for _ in range(2))
        q = rng.standard_normal((1, heads, hd), dtype=np.float32)
        plain = ops.attention(m, q, kc, vc, t - 1)
        xq = fk.q8_1_buffer(q, heads * hd)
        out = ops.attention(m, q, kc, vc, t - 1, xq=xq)
        assert np.array_equal(out, plain), f"seed={seed}"
        assert np.array_equal(xq, qk.quantize_q8_1_reference(out[0])), f"seed={seed}"


# --- counters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("warp_size", [32, 64])
@pytest.mark.parametrize(
    ("qtype", "mode"),
    [(Q.Q4_0, "split"), (Q.Q8_0, "swiglu"), (Q.Q4_K, "add"), (Q.F16, "split"), (Q.F32, "add"),
     (Q.BF16, "swiglu")],
    ids=lambda v: getattr(v, "name", v),
)  # fmt: skip
@pytest.mark.tool("clang")
def test_fused_counters_show_wide_coalesced_weight_loads(
    warp_size: int, qtype: GGMLQuantizationType, mode: str, emu_cache: str, seed: int
) -> None:
    """The matvec bars hold for the fused products and the float types' matvec: global loads
    average >= 8 bytes per active lane per request, global efficiency >= 0.9, every tool clean
    (the tails' last-block handshake included)."""
    rng = np.random.default_rng(seed)
    cols = 512 if qtype == Q.Q4_K else 576
    nmat = {"split": 3, "swiglu": 2, "add": 1}[mode]
    rows = (64, 32, 32)[:nmat] if mode == "split" else (64,) * nmat
    raws = [rng.integers(0, 256, (r, qk.row_bytes(qtype, cols)), dtype=np.uint8) for r in rows]
    if not qk.is_integer_path(qtype):  # finite weights for the float types
        raws = [_raw(rng, qtype, r, cols) for r in rows]
    x = rng.standard_normal(cols).astype(np.float32)
    path, options, names = qk.module_args("matvec")
    module = EmulatorModule(
        path=path, options=options, name_expressions=names, warp_size=warp_size,
        tools=("memcheck", "racecheck", "initcheck", "synccheck"), counters=True,
        target="gfx90a", cache_dir=emu_cache,
    )  # fmt: skip
    ys = [np.zeros(r, np.float32) for r in rows] if mode == "split" else [np.zeros(64, np.float32)]
    tail = {"split": {}, "swiglu": {"tail": "quant"}, "add": {"tail": "norm"}}[mode]
    if tail:
        tail |= {"tail_q": fk.q8_1_buffer(x, 64), "counter": np.zeros(1, np.uint32)}
    if mode == "add":
        tail |= {"tail_w": np.ones(64, np.float32), "tail_h": np.zeros(64, np.float32)}
    fk.launch_matvec_fused(lambda *_: module, qtype, raws, x, _xq(x), ys, mode=mode, **tail)
    report = module.get_function(qk.symbol("matvec_fused", qtype)).last_report
    assert report is not None and not report.findings, f"seed={seed}: {report.findings}"
    loads = [c for c in report.lines if c.space == "global" and c.op == "load"]
    lane_requests = sum(c.requests * c.active_lanes for c in loads)
    per_lane = sum(c.bytes_requested for c in loads) / lane_requests
    assert per_lane >= 8.0, f"seed={seed}: {per_lane:.2f} bytes per active lane per request"
    assert report.totals["efficiency"] >= 0.9, f"seed={seed}: {report.totals}"
