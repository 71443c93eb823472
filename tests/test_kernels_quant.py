"""The GGUF block kernels (kernels/dequant.hip, get_rows.hip, matvec.hip, matmul.hip) on the CPU
emulator, at warp widths 32 and 64, for every supported tensor type.

dequant and get_rows must be bit-identical to gguf.quants.dequantize; matvec and matmul are
compared with a float64 reference under a rounding-error bound (see `_dot_tolerance`). Inputs are
fresh random data every run; each failure message carries the seed that reproduces it
(``WORKBENCH_TEST_SEED=<seed> pytest ...``). Outputs are poisoned with NaN before each launch and
surrounded by a NaN guard region that must stay untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from workbench.errors import BackendError
from workbench.gguf.quants import SUPPORTED_TYPES, block_layout
from workbench.kernels import quant_kernels as qk
from workbench.kernels import registry
from workbench.kernels.emulator import EmulatorModule, KernelError

Q = GGMLQuantizationType
TYPES = [pytest.param(q, id=q.name) for q in SUPPORTED_TYPES]
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf-py cannot quantize these

# Byte offsets of the fp16 scale fields of the K-quant blocks (ggml's block_q2_K { scales[16],
# qs[64], d, dmin }, block_q3_K { hmask[32], qs[64], scales[12], d }, block_q4_K / block_q5_K
# { d, dmin, ... }, block_q6_K { ql[128], qh[64], scales[16], d }). Random blocks get finite,
# moderate scales there, so dot products are finite and the tolerance meaningful.
_K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
Warp = tuple[int, qk.ModuleLoader]  # (warp width, emulator module loader at that width)
Seeded = tuple[np.random.Generator, str]  # (generator, "seed=..." for failure messages)
GUARD = 64  # NaN elements after every output; a kernel writing past its output changes them


@pytest.fixture(scope="module")
def emu_cache(shared_emu_cache: str) -> str:
    """One emulator cache for the module: each source compiles once for both warp widths."""
    return shared_emu_cache


@pytest.fixture(scope="module", params=[32, 64], ids=["wave32", "wave64"])
def warp(request: pytest.FixtureRequest, emu_cache: str) -> Warp:
    return request.param, qk.emulator_loader(request.param, emu_cache)


@pytest.fixture
def seeded(seed: int) -> Iterator[Seeded]:
    """tests/conftest.py's seed (WORKBENCH_TEST_SEED=N replays one), also for messages."""
    yield np.random.default_rng(seed), f"seed={seed}"


def _poisoned(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(output view, whole buffer): a NaN float32 buffer with GUARD NaNs after the output."""
    size = int(np.prod(shape))
    buf = np.full(size + GUARD, np.nan, np.float32)
    return buf[:size].reshape(shape), buf


def _guard_intact(buf: np.ndarray) -> bool:
    return bool(np.isnan(buf[-GUARD:]).all())


def _blocks(
    rng: np.random.Generator, qtype: GGMLQuantizationType, rows: int, cols: int
) -> np.ndarray:
    """(rows, row_bytes) uint8 of valid ``qtype`` data: gguf's quantizer where it has one, else
    random bytes with finite scales of moderate size."""
    elements, nbytes = block_layout(qtype)
    if qtype not in K_QUANTS:
        w = (rng.standard_normal((rows, cols)) * rng.uniform(0.1, 2.0)).astype(np.float32)
        raw = np.asarray(gguf_quantize(w, qtype))
        return np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows, cols // elements, nbytes), dtype=np.uint8)
    for off in _K_SCALE_FIELDS[qtype]:
        scale = rng.uniform(2.0**-10, 2.0**-4, raw.shape[:2]) * rng.choice([-1, 1], raw.shape[:2])
        raw[:, :, off : off + 2] = (
            scale.astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
        )
    return raw.reshape(rows, -1)


def _cols_for(qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Row lengths: one block, a few, and 512; odd lengths for the float types (block of 1)."""
    elements = block_layout(qtype)[0]
    if elements == 1:
        return (1, 37, 200)
    if elements == 256:
        return (256, 512)
    return (32, 96, 512)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _dot_tolerance(w: np.ndarray, x: np.ndarray, length: int) -> np.ndarray:
    """Bound on |float32 result - exact| for dot products of length ``length``.

    Recursive float32 summation (fmaf chains, then a butterfly or nothing) of ``length`` terms
    errs by at most about length * u * sum|w_i x_i| (u = 2**-24, first order; Higham, Accuracy
    and Stability, 3.1). The blocked forms add at most a few roundings per term (the chunk's
    scale * sum(code * x), the offset * sum(x) term, the reference's own float32 dequantized
    weights are exact inputs): twice that bound covers them. A wrong element, nibble, scale or
    missing chunk moves the result by about |w_i x_i|, i.e. ~1/length of sum|w x|, far above
    2 * length * u * sum|w x| for these lengths (<= 512: 6e-5 of the sum)."""
    return 2.0 * length * 2.0**-24 * (np.abs(w) @ np.abs(x)) + 1e-30


# --- dequant ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_bit_identical(warp: Warp, seeded: Seeded, qtype: GGMLQuantizationType) -> None:
    _, loader = warp
    rng, seed = seeded
    for rows in (1, 7, 33):
        for cols in _cols_for(qtype):
            raw = _blocks(rng, qtype, rows, cols)
            out, buf = _poisoned((rows, cols))
            qk.launch_dequant(loader, qtype, raw, out)
            ref = qk.dequant_reference(raw, qtype)
            bad = np.argwhere(out.view(np.uint32) != ref.view(np.uint32))
            assert _bits_equal(out, ref), f"{seed} {qtype.name} {rows}x{cols}: first bad {bad[:3]}"
            assert _guard_intact(buf), f"{seed} {qtype.name}: wrote past the output"


@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_any_bytes(warp: Warp, seeded: Seeded, qtype: GGMLQuantizationType) -> None:
    """Arbitrary bytes, so every code and every fp16 scale (subnormals, Inf, NaN payloads, -0)
    occurs: the decode must still match gguf bit for bit."""
    _, loader = warp
    rng, seed = seeded
    elements, nbytes = block_layout(qtype)
    blocks = max(1, 4096 // nbytes)  # ~4 KiB of blocks
    raw = rng.integers(0, 256, (3, blocks * nbytes), dtype=np.uint8)
    out, _ = _poisoned((3, blocks * elements))
    qk.launch_dequant(loader, qtype, raw, out)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = qk.dequant_reference(raw, qtype)
    # Every finite and infinite value bit for bit; NaNs only as NaNs: IEEE 754 leaves the payload
    # of an operation on two NaNs (Q4_1's NaN d * q + NaN m) to the implementation (NumPy's SIMD
    # loops may swap the operands; GPUs return a canonical NaN).
    same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(out) & np.isnan(ref))
    assert same.all(), f"{seed} {qtype.name}: first bad {np.argwhere(~same)[:3]}"


# --- get_rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_get_rows_bit_identical(warp: Warp, seeded: Seeded, qtype: GGMLQuantizationType) -> None:
    _, loader = warp
    rng, seed = seeded
    table_rows, cols = 33, _cols_for(qtype)[-1]
    table = _blocks(rng, qtype, table_rows, cols)
    ref_table = qk.dequant_reference(table, qtype)
    for n in (1, 3, 17):
        ids = rng.integers(0, table_rows, n).astype(np.int32)
        ids[0] = table_rows - 1  # the last row, and a repeat
        if n > 2:
            ids[1:3] = (0, ids[0])
        out, buf = _poisoned((n, cols))
        qk.launch_get_rows(loader, qtype, ids, table, out)
        assert _bits_equal(out, ref_table[ids]), f"{seed} {qtype.name} n={n} ids={ids}"
        assert _bits_equal(out, qk.get_rows_reference(ids, table, qtype)), seed
        assert _guard_intact(buf), f"{seed} {qtype.name}: wrote past the output"


def test_get_rows_rejects_bad_id(warp: Warp, rng: np.random.Generator) -> None:
    _, loader = warp
    table = _blocks(rng, Q.Q8_0, 4, 32)
    with pytest.raises(KernelError, match="id >= 0"):
        qk.launch_get_rows(
            loader, Q.Q8_0, np.array([1, 4], np.int32), table, np.zeros((2, 32), np.float32)
        )


# --- matvec -------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_matvec(warp: Warp, seeded: Seeded, qtype: GGMLQuantizationType) -> None:
    """Float types: W @ x. Quantized types: W @ x8 (x rounded to Q8_1, integer dot products),
    checked against that exact product under the float32 bound, and against W @ x under the
    rounding of x alone (|W| @ d/2 per element): nothing else may move the result."""
    warp_size, loader = warp
    rng, seed = seeded
    for rows in (1, 7, 33):
        for cols in _cols_for(qtype):
            raw = _blocks(rng, qtype, rows, cols)
            x = rng.standard_normal(cols).astype(np.float32)
            out, buf = _poisoned((rows,))
            qk.launch_matvec(loader, qtype, raw, x, out, warp_size)
            msg = f"{seed} {qtype.name} {rows}x{cols} wave{warp_size}"
            assert _guard_intact(buf), f"{msg}: wrote past the output"
            assert_matvec_within_bound(out, raw, x, qtype, msg)


def assert_matvec_within_bound(
    out: np.ndarray, raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType, msg: str
) -> None:
    """``out`` = launch_matvec of raw and x, on any target. Float types: W @ x within the
    float32 bound. The integer path: W @ x8 (x rounded to Q8_1) within that bound, and W @ x
    within it plus the rounding of x alone (|W| @ d/2 per element)."""
    rows, cols = raw.shape[0], x.shape[0]
    w = qk.dequant_reference(raw, qtype).astype(np.float64)
    exact = qk.matvec_reference(raw, x, qtype)
    if not qk.is_integer_path(qtype):
        err = np.abs(out - exact)
        assert np.all(err <= _dot_tolerance(w, x.astype(np.float64), cols)), msg
        return
    x8, d = _q8_1_values(x)
    tol = _dot_tolerance(w, x8, cols)
    if qtype in (Q.Q4_1, Q.Q5_1):  # the offset term m * s (s: fp16 sum of x8)
        m = raw.reshape(rows, -1, block_layout(qtype)[1])[:, :, 2:4].copy()
        m = np.abs(m.view(np.float16)[..., 0].astype(np.float64))  # (rows, blocks)
        tol += 4 * 2.0**-24 * (m @ np.abs(x8.reshape(-1, 32)).sum(axis=1))
    err = np.abs(out - qk.matvec_q8_reference(raw, x, qtype))
    assert np.all(err <= tol), f"{msg}: max err {err.max()} vs W @ x8"
    x_err = np.abs(w) @ np.repeat(d / 2, 32)  # |x - x8| <= d/2 per element
    if qtype in (Q.Q4_1, Q.Q5_1):  # plus m times the fp16 rounding of s
        x_err += 2.0**-11 * (m @ np.abs(x8.reshape(-1, 32)).sum(axis=1))
    assert np.all(np.abs(out - exact) <= x_err + tol), f"{msg}: vs W @ x"


def _q8_1_values(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x8 (cols,) float64: x rounded to Q8_1, d (cols / 32,) float64: its scales)."""
    xq = qk.quantize_q8_1_reference(x)
    cols = x.shape[0]
    d = xq[cols:].view(np.float16).reshape(-1, 2)[:, 0].astype(np.float64)
    return xq[:cols].view(np.int8).astype(np.float64) * np.repeat(d, 32), d


# --- matmul -------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_matmul(warp: Warp, seeded: Seeded, qtype: GGMLQuantizationType) -> None:
    _, loader = warp
    rng, seed = seeded
    cols_options = _cols_for(qtype)
    # (n, rows): single tile with ragged edges, and n > TM, rows > TN: several tiles each way.
    for n, rows, cols in ((1, 7, cols_options[0]), (3, 33, cols_options[1]),
                          (17, 1, cols_options[-1]), (33, 65, cols_options[-1])):  # fmt: skip
        raw = _blocks(rng, qtype, rows, cols)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        out, buf = _poisoned((n, rows))
        qk.launch_matmul(loader, qtype, x, raw, out)
        w = qk.dequant_reference(raw, qtype).astype(np.float64)
        ref = qk.matmul_reference(x, raw, qtype)
        err = np.abs(out - ref)
        tol = _dot_tolerance(np.abs(x.astype(np.float64)), np.abs(w).T, cols)
        assert np.all(err <= tol), f"{seed} {qtype.name} n={n} {rows}x{cols}: max err {err.max()}"
        assert _guard_intact(buf), f"{seed} {qtype.name}: wrote past the output"


# --- registry and layout checks -----------------------------------------------------------------


def test_registry_entries() -> None:
    kernels = registry.all_kernels()
    for op in qk.OPERATIONS:
        path, options, names = qk.module_args(op)
        for q in SUPPORTED_TYPES:
            spec = kernels[qk.kernel_name(op, q)]
            assert spec.symbol in names and spec.path == registry.kernels_dir() / spec.source
            assert str(spec.path) == path and set(spec.options) == set(options)
            elements = block_layout(q)[0]
            for shape in spec.shapes:
                assert shape["cols"] % elements == 0, (spec.name, shape)
                launch = spec.launch(**shape, warp_size=64)
                threads = launch.block[0] * launch.block[1] * launch.block[2]
                assert 0 < threads <= 1024 and threads % 64 == 0
                cost = spec.cost(**shape)
                assert cost.bytes > 0 and cost.flops > 0
    # SmolLM2's output matrix is Q8_0 (49152 x 576); K-quants cannot hold 576-element rows.
    assert {"rows": 49152, "cols": 576} in kernels["matvec_q8_0"].shapes
    assert all(s["cols"] == 1536 for s in kernels["matvec_q4_k"].shapes)
    assert kernels["matvec_q4_1"].cost(rows=576, cols=576).flops == 2 * 576 * 576
    assert kernels["matvec_q4_1"].launch(rows=17, cols=32, warp_size=32).grid == (2, 1, 1)


def test_matvec_launch_is_the_same_at_every_warp_width() -> None:
    """A row's lanes (MATVEC_THREADS / MATVEC_ROWS_PER_BLOCK) fit in the narrowest warp, so one
    geometry serves wave32 and wave64."""
    for warp_size in (32, 64):
        launch = qk.matvec_launch(rows=576, warp_size=warp_size)
        assert launch == qk.matvec_launch(rows=576)
        assert qk.MATVEC_THREADS // qk.MATVEC_ROWS_PER_BLOCK <= 32
        assert launch.grid[0] * qk.MATVEC_ROWS_PER_BLOCK >= 576


def test_layout_drift_fails_the_build(emu_cache: str) -> None:
    """quant.h's block sizes are static_asserted against gguf's table: a table that disagrees
    (here Q4_0 claimed 19 bytes) must stop the build."""
    path, options, names = qk.module_args("dequant")
    good = f"-DWB_GGUF_BYTES_Q4_0={block_layout(Q.Q4_0)[1]}"
    assert good in options
    bad = tuple("-DWB_GGUF_BYTES_Q4_0=19" if o == good else o for o in options)
    with pytest.raises(BackendError, match=r"gguf\.GGML_QUANT_SIZES"):
        EmulatorModule(path=path, options=bad, name_expressions=names, cache_dir=emu_cache)


def test_wrappers_check_arguments(warp: Warp) -> None:
    warp_size, loader = warp
    raw = np.zeros((2, 34), np.uint8)  # two Q8_0 rows of one block
    with pytest.raises(Exception, match="shape"):
        qk.launch_matvec(loader, Q.Q8_0, raw, np.zeros(33, np.float32), np.zeros(2, np.float32),
                         warp_size)  # fmt: skip
    with pytest.raises(Exception, match="whole 34-byte blocks"):
        qk.launch_dequant(
            loader, Q.Q8_0, np.zeros((2, 35), np.uint8), np.zeros((2, 32), np.float32)
        )


def test_module_args_are_built_once_per_operation() -> None:
    """Every launch asks for its module's arguments; building them (options from gguf's table,
    the name expressions of every type, the kernels' path) cost ~110 us a launch on the first
    GPU run, 20-50x a decode matvec's device time. They are computed once."""
    assert qk.module_args("matvec") is qk.module_args("matvec")
    assert qk.module_args("matvec_batch") == qk.module_args("matvec")  # one module per source
