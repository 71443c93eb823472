"""The CPU quant kernels against gguf-py's reference dequantization.

Fresh random data every run; the seed is printed and named in every assertion message, and
``WORKBENCH_TEST_SEED=<seed>`` replays a failing run. Block data comes from gguf-py's quantizer
where it has one, and from random block bytes (with finite fp16 scales) for every block type, so
that every code value occurs, including ones a quantizer never writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq
from gguf.constants import QK_K

from tests.synth import F16_FIELDS
from workbench.backends import quant_cpu as qc
from workbench.errors import ModelError, UserError
from workbench.gguf.quants import FLOAT_TYPES, SUPPORTED_TYPES, block_layout


@dataclass
class Rand:
    seed: int
    rng: np.random.Generator

    def __str__(self) -> str:
        return f"seed={self.seed} (replay: WORKBENCH_TEST_SEED={self.seed})"


@pytest.fixture
def r(seed: int) -> Rand:
    """tests/conftest.py's seed, kept beside the generator for assertion messages."""
    return Rand(seed, np.random.default_rng(seed))


@pytest.fixture(params=["serial", "parallel"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the single-thread loop and through the threaded loop."""
    monkeypatch.setattr(qc, "_PAR_MIN_BYTES", 1 << 62 if request.param == "serial" else 0)
    return request.param


def ncols(qtype: Q, r: Rand) -> int:
    """A random row width in whole blocks; float types get any width, so 8-lane tails occur."""
    values = block_layout(qtype)[0]
    if values == 1:
        return int(r.rng.integers(1, 200))
    return values * int(r.rng.integers(1, 7 if values == QK_K else 20))


def finite_f16(r: Rand, n: int) -> np.ndarray:
    """n fp16 scales: mostly normal, some subnormal, some (signed) zeros."""
    v = r.rng.uniform(-1.5, 1.5, n) * 10.0 ** r.rng.integers(-4, 1, n)
    kind = r.rng.integers(0, 10, n)
    v = np.where(kind == 0, r.rng.uniform(-6e-5, 6e-5, n), v)  # fp16 subnormals
    v = np.where(kind == 1, 0.0, v)
    v = np.where(kind == 2, -0.0, v)
    return v.astype(np.float16)


def random_blocks(qtype: Q, rows: int, cols: int, r: Rand) -> np.ndarray:
    """(rows, row_bytes): random bytes; for block types the fp16 fields are finite."""
    values, nbytes = block_layout(qtype)
    raw = r.rng.integers(0, 256, (rows, cols // values, nbytes), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        raw[..., off : off + 2] = (
            finite_f16(r, rows * (cols // values)).view(np.uint8).reshape(rows, cols // values, 2)
        )
    return raw.reshape(rows, -1)


def quantized(qtype: Q, rows: int, cols: int, r: Rand) -> np.ndarray:
    """(rows, row_bytes) from gguf-py's quantizer, or random blocks where it has none."""
    w = (r.rng.standard_normal((rows, cols)) * r.rng.uniform(0.01, 3)).astype(np.float32)
    if qtype == Q.F32:
        return w.view(np.uint8)
    if qtype == Q.F16:
        return w.astype(np.float16).view(np.uint8)
    try:
        return gq.quantize(w, qtype).view(np.uint8).reshape(rows, -1)
    except NotImplementedError:  # gguf-py has no K-quant quantizer
        return random_blocks(qtype, rows, cols, r)


def finite_data(qtype: Q, rows: int, cols: int, r: Rand) -> np.ndarray:
    if qtype in FLOAT_TYPES:
        return quantized(qtype, rows, cols, r)
    return random_blocks(qtype, rows, cols, r)


def reference(qtype: Q, raw: np.ndarray) -> np.ndarray:
    return gq.dequantize(raw, qtype)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape, f"{what}: {got.dtype} {got.shape}"
    g, w = got.view(np.uint32), np.ascontiguousarray(want, dtype=np.float32).view(np.uint32)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {g.size} values differ, first at flat index {bad[0]}:"
        f" got {got.flat[bad[0]]!r} (0x{g.flat[bad[0]]:08x}),"
        f" want {want.flat[bad[0]]!r} (0x{w.flat[bad[0]]:08x})"
    )


def assert_dot_close(got: np.ndarray, w: np.ndarray, x: np.ndarray, what: str) -> None:
    """got ~ x @ w.T (or w @ x) in float64; the tolerance scales with sum |w| |x| per output."""
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    want = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(np.isfinite(got)), f"{what}: non-finite output"
    worst = int(np.argmax(err - 1e-5 * scale))
    assert np.all(err <= 1e-5 * scale + 1e-30), (
        f"{what}: error {err.flat[worst]:.3e} exceeds 1e-5 * {scale.flat[worst]:.3e}"
        f" (got {got.flat[worst]!r}, want {want.flat[worst]!r})"
    )


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_identical(qtype: Q, path: str, r: Rand) -> None:
    cols = ncols(qtype, r)
    for rows, make in ((1, quantized), (37, quantized), (1, random_blocks), (53, random_blocks)):
        raw = make(qtype, rows, cols, r)
        what = f"{qtype.name} {path} {make.__name__} {raw.shape} {r}"
        out = np.full((rows, cols), np.nan, np.float32)  # poisoned: unwritten values show
        got = qc.dequantize(qtype, raw, out)
        assert got is out, what
        assert_bits_equal(got, reference(qtype, raw), what)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_shapes(qtype: Q, r: Rand) -> None:
    cols = ncols(qtype, r)
    raw = quantized(qtype, 6, cols, r)
    want = reference(qtype, raw)
    what = f"{qtype.name} {r}"
    assert_bits_equal(qc.dequantize(qtype, raw[2]), want[2], f"1-D row, {what}")
    row_bytes = raw.shape[1]
    assert_bits_equal(
        qc.dequantize(qtype, raw.reshape(2, 3, row_bytes)), want.reshape(2, 3, cols), what
    )
    # Non-contiguous rows (every other row of a larger array) and read-only memory.
    assert_bits_equal(qc.dequantize(qtype, raw[::2]), want[::2], f"strided, {what}")
    ro = raw.copy()
    ro.flags.writeable = False
    assert_bits_equal(qc.dequantize(qtype, ro), want, f"read-only, {what}")
    assert qc.dequantize(qtype, raw[:0]).shape == (0, cols)


def test_f16_every_code() -> None:
    """All 65536 fp16 codes, NaN payloads, infinities and subnormals included."""
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(1, -1)
    assert_bits_equal(qc.dequantize(Q.F16, raw), reference(Q.F16, raw), "F16 codes")
    # The same codes as the d field of Q8_0 blocks (scale widening inside the block kernels).
    _, nbytes = block_layout(Q.Q8_0)
    blocks = np.full((1 << 16, nbytes), 1, np.uint8)
    blocks[:, :2] = raw.reshape(-1, 2)
    blocks[:, 2:] = np.arange(nbytes - 2, dtype=np.uint8) - 16  # codes -16..15
    blocks = blocks.reshape(64, -1)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference, as in ours
        want = reference(Q.Q8_0, blocks)
    assert_bits_equal(qc.dequantize(Q.Q8_0, blocks), want, "Q8_0 scales")


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_matvec(qtype: Q, path: str, r: Rand) -> None:
    cols = ncols(qtype, r)
    for rows, make in ((1, quantized), (45, quantized), (70, finite_data)):
        raw = make(qtype, rows, cols, r)
        w = reference(qtype, raw)
        x = (r.rng.standard_normal(cols) * r.rng.uniform(0.1, 10)).astype(np.float32)
        out = np.full(rows, np.nan, np.float32)
        got = qc.matvec(qtype, raw, x, out)
        assert got is out
        assert_dot_close(got, w, x, f"{qtype.name} {path} matvec {raw.shape} {r}")
    # x as a row of a 2-D array and as float64: converted, same result.
    x2 = np.stack([x, -x]).astype(np.float64)
    assert_dot_close(qc.matvec(qtype, raw, x2[1]), w, -x, f"{qtype.name} float64 x {r}")


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_matmul(qtype: Q, r: Rand, monkeypatch: pytest.MonkeyPatch) -> None:
    cols = ncols(qtype, r)
    rows = 29
    raw = finite_data(qtype, rows, cols, r)
    w = reference(qtype, raw)
    for n in (1, 3, 17):
        x = r.rng.standard_normal((n, cols)).astype(np.float32)
        what = f"{qtype.name} matmul n={n} {raw.shape} {r}"
        out = np.full((n, rows), np.nan, np.float32)
        assert qc.matmul(qtype, raw, x, out) is out
        assert_dot_close(out, w, x, what)
        # A scratch buffer holding 4 rows: W goes to BLAS in 8 chunks, the last one short.
        scratch = np.full(4 * cols + 3, np.nan, np.float32)
        assert_dot_close(qc.matmul(qtype, raw, x, scratch=scratch), w, x, f"scratch, {what}")
    # Without scratch, chunks of at most _CHUNK_BYTES.
    monkeypatch.setattr(qc, "_CHUNK_BYTES", 5 * 4 * cols)
    assert_dot_close(qc.matmul(qtype, raw, x), w, x, f"small chunks, {qtype.name} {r}")
    # Rows split across a thread pool, each slice dequantized and multiplied by its own thread.
    monkeypatch.setattr(qc, "_PAR_MIN_BYTES", 0)
    monkeypatch.setattr(qc, "_SLICE_ROWS", 2)  # 29 rows: 4 or 6 slices, the last ones shorter
    for workers in (2, 3):
        out = np.full((n, rows), np.nan, np.float32)
        assert qc.matmul(qtype, raw, x, out, workers=workers) is out
        assert_dot_close(out, w, x, f"workers={workers}, {qtype.name} {r}")


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_matmul_cols(qtype: Q, r: Rand, monkeypatch: pytest.MonkeyPatch) -> None:
    cols = ncols(qtype, r)
    rows = 29
    raw = finite_data(qtype, rows, cols, r)
    w = reference(qtype, raw)
    for n in (1, 3, 17):
        xt = r.rng.standard_normal((cols, n)).astype(np.float32)  # a position per column
        what = f"{qtype.name} matmul_cols n={n} {raw.shape} {r}"
        out = np.full((rows, n), np.nan, np.float32)
        assert qc.matmul_cols(qtype, raw, xt, out) is out
        assert_dot_close(out.T, w, xt.T, what)
        # A scratch buffer holding 4 rows: 8 chunks, the last one short.
        scratch = np.full(4 * cols + 3, np.nan, np.float32)
        got = qc.matmul_cols(qtype, raw, xt, scratch=scratch)
        assert_dot_close(got.T, w, xt.T, f"scratch, {what}")
        # xt given transposed (not C-contiguous) and as float64: converted, same result.
        x = np.ascontiguousarray(xt.T, dtype=np.float64)
        assert_dot_close(qc.matmul_cols(qtype, raw, x.T).T, w, xt.T, f"float64 view, {what}")
    monkeypatch.setattr(qc, "_CHUNK_BYTES", 5 * 4 * cols)
    assert_dot_close(qc.matmul_cols(qtype, raw, xt).T, w, xt.T, f"small chunks, {qtype.name} {r}")


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_get_rows(qtype: Q, path: str, r: Rand) -> None:
    cols = ncols(qtype, r)
    rows = 80
    raw = random_blocks(qtype, rows, cols, r)
    want = reference(qtype, raw)
    ids = r.rng.integers(0, rows, 40)
    ids[:3] = (0, rows - 1, ids[3])  # both ends and a repeat
    what = f"{qtype.name} {path} get_rows {r}"
    assert_bits_equal(qc.get_rows(qtype, raw, ids), want[ids], what)
    assert_bits_equal(qc.get_rows(qtype, raw, ids.astype(np.uint16)), want[ids], what)
    ids2 = ids[:12].reshape(3, 4).astype(np.int32)
    assert_bits_equal(qc.get_rows(qtype, raw, ids2), want[ids2], f"2-D ids, {what}")
    assert qc.get_rows(qtype, raw, np.array([], np.int64)).shape == (0, cols)


def test_unsupported_type() -> None:
    raw = np.zeros((2, 64), np.uint8)
    for op in (
        lambda t: qc.dequantize(t, raw),
        lambda t: qc.matvec(t, raw, np.zeros(64, np.float32)),
        lambda t: qc.matmul(t, raw, np.zeros((2, 64), np.float32)),
        lambda t: qc.matmul_cols(t, raw, np.zeros((64, 2), np.float32)),
        lambda t: qc.get_rows(t, raw, np.array([0])),
    ):
        for qtype in (Q.IQ2_XXS, Q.TQ1_0):
            with pytest.raises(ModelError) as e:
                op(qtype)
            assert e.value.code == "model.unsupported_type"
            assert qtype.name in str(e.value) and "Q4_1" in str(e.value)


def test_bad_shapes() -> None:
    _, nbytes = block_layout(Q.Q4_1)
    raw = np.zeros((8, 18 * nbytes), np.uint8)  # 8 rows of 576 values
    x = np.zeros(576, np.float32)

    def code(fn):
        with pytest.raises(UserError) as e:
            fn()
        return e.value.code, str(e.value)

    c, msg = code(lambda: qc.matvec(Q.Q4_1, raw, np.zeros(577, np.float32)))
    assert c == "user.bad_shape" and "(577,)" in msg and "(576,)" in msg, msg
    c, msg = code(lambda: qc.matvec(Q.Q4_1, raw[:, :-1], x))
    assert c == "user.bad_shape" and f"{nbytes}-byte" in msg and str(raw.shape[1] - 1) in msg
    c, msg = code(lambda: qc.dequantize(Q.Q4_1, raw[:, :-3]))
    assert c == "user.bad_shape" and str(raw.shape[1] - 3) in msg, msg
    c, msg = code(lambda: qc.matvec(Q.Q4_1, raw[0], x))
    assert c == "user.bad_shape" and "2-D" in msg, msg
    c, msg = code(lambda: qc.matmul(Q.Q4_1, raw, np.zeros((3, 575), np.float32)))
    assert c == "user.bad_shape" and "(3, 575)" in msg and "576" in msg, msg
    c, msg = code(lambda: qc.matmul(Q.Q4_1, raw, x))
    assert c == "user.bad_shape" and "(576,)" in msg, msg
    c, msg = code(lambda: qc.matvec(Q.Q4_1, raw.view(np.int8), x))
    assert c == "user.bad_dtype" and "int8" in msg, msg
    c, msg = code(lambda: qc.matvec(Q.Q4_1, raw, x, np.zeros(9, np.float32)))
    assert c == "user.bad_out" and "(8,)" in msg and "(9,)" in msg, msg
    c, msg = code(lambda: qc.dequantize(Q.Q4_1, raw, np.zeros((8, 576), np.float64)))
    assert c == "user.bad_out" and "float64" in msg, msg
    c, msg = code(lambda: qc.matmul(Q.Q4_1, raw, np.zeros((2, 576), np.float32), np.zeros((8, 2))))
    assert c == "user.bad_out", msg
    c, msg = code(
        lambda: qc.matmul(Q.Q4_1, raw, np.zeros((2, 576), np.float32), scratch=np.zeros(575))
    )
    assert c == "user.bad_scratch" and "576" in msg, msg
    c, msg = code(lambda: qc.matmul_cols(Q.Q4_1, raw, np.zeros((3, 576), np.float32)))
    assert c == "user.bad_shape" and "(3, 576)" in msg and "(576, n)" in msg, msg
    c, msg = code(lambda: qc.matmul_cols(Q.Q4_1, raw, np.zeros((576, 2)), np.zeros((2, 8))))
    assert c == "user.bad_out" and "(8, 2)" in msg, msg
    c, msg = code(lambda: qc.matmul_cols(Q.Q4_1, raw, np.zeros((576, 2)), scratch=np.zeros(9)))
    assert c == "user.bad_scratch" and "matmul_cols" in msg, msg
    for ids in (np.array([0, 8]), np.array([-1]), np.array([0.0])):
        c, msg = code(lambda ids=ids: qc.get_rows(Q.Q4_1, raw, ids))
        assert c == "user.bad_ids", msg
    assert "[0, 8)" in code(lambda: qc.get_rows(Q.Q4_1, raw, np.array([3, 8])))[1]


def test_threads() -> None:
    before = qc.get_threads()
    limit = numba.config.NUMBA_NUM_THREADS
    try:
        qc.set_threads(1)
        assert qc.get_threads() == 1
        qc.set_threads(limit)
        assert qc.get_threads() == limit
        for bad in (0, limit + 1, -1, 1.5, True, "2"):
            with pytest.raises(UserError) as e:
                qc.set_threads(bad)
            assert e.value.code == "user.bad_threads" and str(limit) in str(e.value)
        assert qc.get_threads() == limit
    finally:
        qc.set_threads(before)


def test_matmul_slices_hand_out_each_slice_once_and_pass_errors_on() -> None:
    seen: list[tuple[int, int]] = []
    slices = qc._Slices(np.array([0, 3, 5, 9]), lambda a, b: seen.append((a, b)))
    helper = threading.Thread(target=slices.run)
    helper.start()
    slices.run()
    slices.wait()
    helper.join()
    assert sorted(seen) == [(0, 3), (3, 5), (5, 9)]

    def fail(a: int, b: int) -> None:
        if a == 3:
            raise ValueError("slice 3:5")

    slices = qc._Slices(np.array([0, 3, 5, 9]), fail)
    slices.run()
    with pytest.raises(ValueError, match="slice 3:5"):
        slices.wait()
