"""The CPU emulator runs HIP kernels with GPU semantics, and reports kernel bugs clearly.

The kernels live in tests/emulator_kernels/; each test checks one against NumPy on fresh random
inputs, with outputs poisoned (NaN / 0xFF bytes) before the launch so unwritten elements show.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import BackendError, UserError
from workbench.kernels.emulator import (
    EmulatorModule,
    KernelError,
    default_cache_dir,
    kernels_dir,
)

KERNELS = Path(__file__).parent / "emulator_kernels"
TEMPLATES = ("scale_add<2>", "scale_add<3>")

pytestmark = pytest.mark.tool("c++")


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Explicit, because session fixtures run before conftest's WORKBENCH_HOME isolation.
    return tmp_path_factory.mktemp("emulator-cache")


@pytest.fixture(scope="session")
def module(cache: Path):
    """basics.hip for a warp size (and fiber kind); the shared object is compiled once."""
    made: dict[tuple[int, str], EmulatorModule] = {}

    def get(warp_size: int = 32, fiber: str = "auto") -> EmulatorModule:
        if (warp_size, fiber) not in made:
            made[warp_size, fiber] = EmulatorModule(
                path=KERNELS / "basics.hip",
                name_expressions=TEMPLATES,
                warp_size=warp_size,
                fiber=fiber,
                cache_dir=cache,
            )
        return made[warp_size, fiber]

    return get


@pytest.fixture(scope="session")
def faults(cache: Path):
    made: dict[int, EmulatorModule] = {}

    def get(warp_size: int = 32) -> EmulatorModule:
        if warp_size not in made:
            made[warp_size] = EmulatorModule(
                path=KERNELS / "faults.hip", warp_size=warp_size, cache_dir=cache
            )
        return made[warp_size]

    return get


def poisoned(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    out = np.empty(shape, dtype)
    out.view(np.uint8)[...] = 0xFF  # NaN for floats, -1 / max for integers
    return out


# --- execution model -----------------------------------------------------------------------------


def test_block_reduction_through_shared_memory(module, rng: np.random.Generator) -> None:
    blocks, threads = 37, 256
    x = rng.standard_normal(blocks * threads).astype(np.float32)
    x[:threads] = np.abs(x[:threads]) + 0.5  # block 0: every value positive
    out, counts = poisoned(blocks, np.float32), poisoned((blocks, 3), np.int32)
    module().get_function("block_sum")(blocks, threads, (x, out, counts))
    chunks = x.reshape(blocks, threads)
    np.testing.assert_allclose(out, chunks.sum(1, dtype=np.float64), rtol=1e-5, atol=1e-4)
    pos = chunks > 0
    np.testing.assert_array_equal(counts[:, 0], pos.sum(1))
    np.testing.assert_array_equal(counts[:, 1], pos.all(1))
    np.testing.assert_array_equal(counts[:, 2], pos.any(1))
    assert counts[0, 1] == 1


@pytest.mark.parametrize("warp_size", [32, 64])
def test_warp_shuffles(module, rng: np.random.Generator, warp_size: int) -> None:
    blocks, threads = 3, 192
    n = blocks * threads
    x = rng.integers(-1000, 1000, n).astype(np.float32)  # integers: sums are exact
    out = poisoned((n, 5), np.float32)
    module(warp_size).get_function("warp_shuffles")(blocks, threads, (x, out))
    warps = x.reshape(-1, warp_size)
    lane = np.arange(warp_size)
    np.testing.assert_array_equal(out[:, 0], np.repeat(warps.sum(1), warp_size))
    np.testing.assert_array_equal(out[:, 1], np.repeat(x.reshape(-1, 8).sum(1), 8))
    down = np.where(lane + 1 < warp_size, np.roll(warps, -1, axis=1), warps)
    np.testing.assert_array_equal(out[:, 2], down.ravel())
    up = np.where(lane >= 2, np.roll(warps, 2, axis=1), warps)
    np.testing.assert_array_equal(out[:, 3], up.ravel())
    np.testing.assert_array_equal(out[:, 4], np.repeat(warps[:, 3], warp_size))


@pytest.mark.parametrize("warp_size", [32, 64])
def test_ballot_any_all(module, rng: np.random.Generator, warp_size: int) -> None:
    blocks, threads = 2, 256
    n = blocks * threads
    pred = (rng.random(n) < 0.5).astype(np.int32)
    pred[:warp_size] = 1  # one warp all true
    pred[warp_size : 2 * warp_size] = 0  # one all false
    ballot, any_all = poisoned(n, np.uint64), poisoned((n, 2), np.int32)
    module(warp_size).get_function("warp_votes")(blocks, threads, (pred, ballot, any_all))
    warps = pred.reshape(-1, warp_size).astype(np.uint64)
    bits = (warps << np.arange(warp_size, dtype=np.uint64)).sum(1, dtype=np.uint64)
    np.testing.assert_array_equal(ballot, np.repeat(bits, warp_size))
    np.testing.assert_array_equal(any_all[:, 0], np.repeat(warps.any(1), warp_size))
    np.testing.assert_array_equal(any_all[:, 1], np.repeat(warps.all(1), warp_size))


def test_partial_mask_waits_only_for_named_lanes(module, rng: np.random.Generator) -> None:
    x = rng.standard_normal(128).astype(np.float32)
    out = poisoned(128, np.float32)
    module().get_function("partial_mask")(1, 128, (x, out))
    lane = np.arange(128) % 32
    np.testing.assert_array_equal(out, np.where(lane < 16, x[np.arange(128) ^ 1], x))


def test_atomics_from_many_blocks(module, rng: np.random.Generator) -> None:
    n, nbins = 50_000, 37
    values = rng.integers(0, nbins, n).astype(np.int32)
    bins = np.zeros(nbins, np.int32)
    top, total = np.array([-1], np.int32), np.zeros(1, np.float32)
    module().get_function("histogram")(64, 128, (values, np.int32(n), bins, top, total))
    np.testing.assert_array_equal(bins, np.bincount(values, minlength=nbins))
    assert top[0] == values.max()
    assert total[0] == pytest.approx(values.sum(), rel=1e-5)  # float adds in any order


@pytest.mark.parametrize(
    ("grid", "block"),
    [(7, 64), ((5,), (33,)), ((3, 4), (8, 6)), ((2, 3, 2), (4, 2, 5)), ((1, 1, 3), (1, 1, 64))],
)
def test_grid_and_block_indexing(module, grid, block) -> None:
    g = (*np.atleast_1d(grid), 1, 1)[:3]
    b = (*np.atleast_1d(block), 1, 1)[:3]
    total = int(np.prod(g) * np.prod(b))
    out, coords = poisoned(total, np.int64), poisoned((total, 6), np.int32)
    module().get_function("global_index")(grid, block, (out, coords))
    np.testing.assert_array_equal(out, np.arange(total))
    # index = ((bz, by, bx), (tz, ty, tx)) in C order: the last coordinate fastest
    bz, by, bx, tz, ty, tx = np.unravel_index(np.arange(total), (*g[::-1], *b[::-1]))
    np.testing.assert_array_equal(coords, np.stack([tx, ty, tz, bx, by, bz], 1))


def test_dynamic_shared_memory(module, rng: np.random.Generator) -> None:
    blocks, threads = 9, 128
    x = rng.standard_normal(blocks * threads).astype(np.float32)
    out, first = poisoned(blocks * threads, np.float32), np.zeros(blocks, np.uint32)
    kernel = module().get_function("reverse_dynamic")
    kernel(blocks, threads, (x, out, first), shared_mem=threads * 4)
    np.testing.assert_array_equal(out, x.reshape(blocks, threads)[:, ::-1].ravel())
    # every block starts from poisoned shared memory, not the previous block's data
    np.testing.assert_array_equal(first, np.full(blocks, 0xFFFFFFFF, np.uint32))


def test_template_kernels_through_name_expressions(module, rng: np.random.Generator) -> None:
    n = 1000
    x = rng.standard_normal(n).astype(np.float32)
    mod = module()
    assert set(TEMPLATES) <= set(mod.kernel_names)
    for name, scale in zip(TEMPLATES, (2, 3)):
        out = poisoned(n, np.float32)
        mod.get_function(name)((n + 255) // 256, 256, (x, np.float32(0.5), out, np.int32(n)))
        np.testing.assert_array_equal(out, x * np.float32(scale) + np.float32(0.5))


def test_scalar_arguments_keep_their_c_types(module) -> None:
    kernel = module().get_function("scalars")
    assert kernel.param_types[:6] == (
        "int32_t",
        "float",
        "uint32_t",
        "int64_t",
        "double",
        "uint16_t",
    )
    ints, floats = poisoned(4, np.int64), poisoned(2, np.float64)
    args = (np.int32(-123456789), np.float32(1.5e-3), np.uint32(4_000_000_000))
    args += (np.int64(-(2**40) - 7), np.float64(np.pi), np.uint16(65535), ints, floats)
    kernel(1, 32, args)
    np.testing.assert_array_equal(ints, [-123456789, 4_000_000_000, -(2**40) - 7, 65535])
    np.testing.assert_array_equal(floats, [np.float64(np.float32(1.5e-3)), np.pi])
    # Python int and float are int64 and float64 (as in CuPy): fine where the kernel wants those
    kernel(1, 1, (np.int32(1), np.float32(2), np.uint32(3), 4, 5.0, np.uint16(6), ints, floats))
    assert ints[2] == 4 and floats[1] == 5.0


@pytest.mark.parametrize(
    ("index", "value", "hint"),
    [(0, 7, "np.int32"), (1, np.float64(1.0), "np.float32"), (2, np.int32(1), "np.uint32")],
)
def test_scalar_of_the_wrong_type_is_refused(module, index: int, value, hint: str) -> None:
    args = [np.int32(1), np.float32(2), np.uint32(3), np.int64(4), np.float64(5), np.uint16(6)]
    args += [np.zeros(4, np.int64), np.zeros(2)]
    args[index] = value
    with pytest.raises(UserError, match=hint) as e:
        module().get_function("scalars")(1, 1, tuple(args))
    assert e.value.code == "kernel.bad_args"


def test_wb_h_half_and_bf16_conversions(module, rng: np.random.Generator) -> None:
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)  # every half, NaNs included
    n = 2 * halves.size
    h = np.tile(halves, 2)
    b = rng.integers(0, 65536, n).astype(np.uint16)
    exact = halves.view(np.float16).astype(np.float32)  # round-trips exactly
    edges = [65504, 65519.99, 65520, 1e-8, -3e-8, 2**-25, 1.5 * 2**-24, 0.0, -0.0, np.inf, -np.inf]
    edges = np.array(edges, np.float32)
    wide = rng.standard_normal(n - exact.size - edges.size).astype(np.float32)
    wide *= np.float32(2.0) ** rng.integers(-30, 20, wide.size).astype(np.float32)
    x = np.concatenate([exact, edges, wide])
    out, back = poisoned((n, 2), np.float32), poisoned((n, 2), np.uint16)
    module().get_function("conversions")((n + 255) // 256, 256, (h, b, x, out, back, np.int32(n)))
    np.testing.assert_array_equal(out[:, 0], h.view(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out[:, 1], (b.astype(np.uint32) << 16).view(np.float32))
    with np.errstate(over="ignore"):  # overflow to infinity is part of what is checked
        np.testing.assert_array_equal(back[:, 0], x.astype(np.float16).view(np.uint16))
    # bf16: round to nearest even of the top 16 bits (NumPy has no bfloat16); NaN stays NaN
    nan = np.isnan(x)
    bits = x.view(np.uint32).astype(np.uint64)
    rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(back[~nan, 1], rne[~nan])
    assert np.isnan((back[nan, 1].astype(np.uint32) << 16).view(np.float32)).all()


# --- fibers ---------------------------------------------------------------------------------------


@pytest.mark.tool("boost-context")
def test_auto_picks_fcontext_when_boost_is_there(module) -> None:
    mod = module()
    assert mod.fiber == "fcontext" and mod.fiber_note == ""
    assert "fcontext" in repr(mod.get_function("block_sum"))


def test_ucontext_fallback_runs_the_same_kernels(module, rng: np.random.Generator) -> None:
    mod = module(64, "ucontext")
    assert mod.fiber == "ucontext"
    blocks, threads = 4, 128
    x = rng.integers(-100, 100, blocks * threads).astype(np.float32)
    out, counts = poisoned(blocks, np.float32), poisoned((blocks, 3), np.int32)
    mod.get_function("block_sum")(blocks, threads, (x, out, counts))
    np.testing.assert_array_equal(out, x.reshape(blocks, threads).sum(1))
    shuffled = poisoned((blocks * threads, 5), np.float32)
    mod.get_function("warp_shuffles")(blocks, threads, (x, shuffled))
    np.testing.assert_array_equal(shuffled[:, 0], np.repeat(x.reshape(-1, 64).sum(1), 64))


def test_auto_falls_back_to_ucontext_without_boost(module, cache: Path, monkeypatch) -> None:
    from workbench.kernels import emulator

    module(32, "ucontext")  # the ucontext runtime is in the cache now
    real = emulator._load_runtime

    def no_boost(tc, fiber: str, cache_dir: Path):
        if fiber == "fcontext":
            raise BackendError("backend.fiber_unavailable", "Boost.Context is missing (simulated)")
        return real(tc, fiber, cache_dir)

    monkeypatch.setattr(emulator, "_load_runtime", no_boost)
    monkeypatch.setattr(emulator, "_runtimes", {})
    mod = EmulatorModule(path=KERNELS / "basics.hip", name_expressions=TEMPLATES, cache_dir=cache)
    assert mod.fiber == "ucontext" and "Boost.Context is missing" in mod.fiber_note
    x, out = np.ones(64, np.float32), poisoned(1, np.float32)
    mod.get_function("block_sum")(1, 64, (x, out, poisoned(3, np.int32)))
    assert out[0] == 64
    with pytest.raises(BackendError) as e:
        EmulatorModule(path=KERNELS / "basics.hip", fiber="fcontext", cache_dir=cache)
    assert e.value.code == "backend.fiber_unavailable"


# --- kernel bugs are reported, not hung or crashed ---------------------------------------------


def test_deadlock_names_the_block_and_the_threads(faults) -> None:
    with pytest.raises(KernelError) as e:
        faults().get_function("even_threads_sync")(2, 64, (np.zeros(128, np.float32),))
    err = e.value
    assert err.code == "kernel.deadlock"
    bx = err.context["block_idx"][0]
    assert f"block ({bx}, 0, 0)" in err.message
    assert "waiting at __syncthreads() (" in err.message
    assert "threads 0, 2, 4, ..., 62 (32 threads)" in err.message
    assert "exited: threads 1, 3, 5, ..., 63 (32 threads)" in err.message
    assert "fcontext" in err.message or "ucontext" in err.message


def test_threads_at_different_barriers_are_reported(faults) -> None:
    with pytest.raises(KernelError) as e:
        faults().get_function("divergent_barriers")(1, 64, (np.zeros(64, np.float32),))
    assert e.value.code == "kernel.divergence"
    assert "threads 0-31 (32 threads)" in e.value.message
    assert "threads 32-63 (32 threads)" in e.value.message


def test_lanes_missing_from_a_shuffle_are_reported(faults) -> None:
    with pytest.raises(KernelError, match=r"__shfl_xor_sync .*threads 0-15, 32-47") as e:
        faults().get_function("half_warp_shuffle")(1, 64, (np.zeros(64, np.float32),))
    assert e.value.code == "kernel.deadlock"
    assert "exited: threads 16-31, 48-63" in e.value.message


def test_32_bit_mask_on_64_wide_warps_is_reported(faults) -> None:
    out = poisoned(64, np.float32)
    faults(32).get_function("cuda_mask_shuffle")(1, 64, (out,))
    np.testing.assert_array_equal(out, np.arange(64) ^ 1)
    with pytest.raises(KernelError, match="WB_FULL_MASK") as e:
        faults(64).get_function("cuda_mask_shuffle")(1, 64, (out,))
    assert e.value.code == "kernel.divergence"
    assert e.value.context["thread_idx"] == (32, 0, 0)


@pytest.mark.parametrize(
    ("kernel", "what"), [("trap_one", "WB_TRAP()"), ("assert_one", "WB_ASSERT")]
)
def test_trap_and_assert_name_block_and_thread(faults, kernel: str, what: str) -> None:
    with pytest.raises(KernelError) as e:
        faults().get_function(kernel)(8, 64, (np.int32(5), np.int32(17)))
    err = e.value
    assert err.code == "kernel.trap"
    assert err.context["block_idx"] == (5, 0, 0) and err.context["thread_idx"] == (17, 0, 0)
    assert what in err.message and "faults.hip:" in err.message
    assert "block (5, 0, 0), thread (17, 0, 0)" in err.message


def test_cuda_trap_assert_and_abort_are_reported_too(cache: Path) -> None:
    src = (
        '#include "wb.h"\n'
        "WB_KERNEL void k(int which) {\n"
        "  if (threadIdx.x != 3) return;\n"
        "  if (which == 0) __trap();\n"
        "  if (which == 1) assert(which == 7);\n"
        "  if (which == 2) abort();\n"
        "}\n"
    )
    kernel = EmulatorModule(src, cache_dir=cache).get_function("k")
    for which, what in enumerate(("__trap()", "assert(which == 7) failed", "abort()")):
        with pytest.raises(KernelError, match=re.escape(what)) as e:
            kernel(2, 8, (np.int32(which),))
        assert e.value.code == "kernel.trap" and e.value.context["thread_idx"] == (3, 0, 0)


def test_bad_memory_access_is_reported_and_python_survives(faults) -> None:
    out = np.zeros(8 * 64, np.float32)
    kernel = faults().get_function("bad_write")
    with pytest.raises(KernelError, match="SIGSEGV") as e:
        kernel(8, 64, (out, np.int64(16), np.int32(6), np.int32(9)))
    assert e.value.code == "kernel.fault"
    assert e.value.context["block_idx"] == (6, 0, 0) and e.value.context["thread_idx"] == (9, 0, 0)
    out[:] = 0
    kernel(8, 64, (out, np.int64(16), np.int32(-1), np.int32(-1)))  # the emulator still works
    assert (out == 1).all()


# --- arguments, compilation, cache ----------------------------------------------------------------


def test_non_contiguous_array_is_refused(module) -> None:
    x = np.zeros((64, 2), np.float32)
    with pytest.raises(UserError, match="C-contiguous") as e:
        module().get_function("warp_shuffles")(1, 64, (x[:, 0], np.zeros((64, 5), np.float32)))
    assert e.value.code == "kernel.bad_args"


def test_argument_count_dtype_and_name_are_checked(module) -> None:
    mod = module()
    with pytest.raises(UserError, match="takes 2 arguments"):
        mod.get_function("warp_shuffles")(1, 32, (np.zeros(32, np.float32),))
    with pytest.raises(UserError, match="float64"):
        mod.get_function("warp_shuffles")(1, 32, (np.zeros(32), np.zeros((32, 5), np.float32)))
    with pytest.raises(UserError, match=r"available: .*block_sum"):
        mod.get_function("no_such_kernel")
    with pytest.raises(UserError, match="at most 1024"):
        mod.get_function("block_sum")(1, (32, 64), (np.zeros(1), np.zeros(1), np.zeros(3)))


def test_compile_error_carries_the_log_and_the_line(cache: Path) -> None:
    src = '#include "wb.h"\nWB_KERNEL void broken(float* x) {\n  x[0] = undeclared_name;\n}\n'
    with pytest.raises(BackendError) as e:
        EmulatorModule(src, cache_dir=cache)
    err = e.value
    assert err.code == "backend.compile_failed"
    assert "undeclared_name" in err.context["log"] and "error" in err.context["log"]
    assert any(line.endswith("x[0] = undeclared_name;") for line in err.context["source_lines"])
    assert "error: 'undeclared_name' was not declared" in err.message


def test_missing_compiler_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as e:
        EmulatorModule("", cache_dir=tmp_path, compiler="no-such-compiler-wb")
    assert e.value.code == "backend.compiler_missing"


def test_second_construction_hits_the_cache(cache: Path, rng: np.random.Generator) -> None:
    src = (
        f"// {rng.integers(2**62)}: a source this cache has not seen\n"
        '#include "wb.h"\n'
        "WB_KERNEL void twice(const float* x, float* y, int n) {\n"
        "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i < n) y[i] = 2.f * x[i];\n"
        "}\n"
    )
    first = EmulatorModule(src, cache_dir=cache, options=("-DUNUSED=1", "-std=c++17"))
    assert not first.cache_hit
    stamp = first.so_path.stat().st_mtime_ns
    second = EmulatorModule(src, cache_dir=cache, options=("-DUNUSED=1", "-std=c++17"))
    assert second.cache_hit and second.so_path == first.so_path
    assert second.so_path.stat().st_mtime_ns == stamp
    other = EmulatorModule(src, cache_dir=cache, options=("-DUNUSED=2",))
    assert not other.cache_hit and other.so_path != first.so_path  # defines are part of the key
    x, y = rng.standard_normal(100).astype(np.float32), poisoned(100, np.float32)
    second.get_function("twice")(1, 128, (x, y, np.int32(100)))
    np.testing.assert_array_equal(y, 2 * x)


def test_unknown_option_is_refused(cache: Path) -> None:
    with pytest.raises(UserError, match="--frobnicate"):
        EmulatorModule("", cache_dir=cache, options=("--frobnicate",))


def test_default_cache_dir_follows_workbench_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "emulator"
    assert (kernels_dir() / "wb.h").is_file()
