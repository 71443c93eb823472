"""Without any tool, a kernel writing outside its buffer is a readable error, never a dead process;
and kernels written the way HIP tutorials write them (`#include <hip/hip_runtime.h>`) compile."""

from __future__ import annotations

import mmap
import shutil
from pathlib import Path

import numpy as np
import pytest

from workbench.kernels import emulator_memory as guard
from workbench.kernels.emulator import EmulatorModule, KernelBoundsError, KernelError

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)

SOURCE = r"""
#include <hip/hip_runtime.h>

// the classic missing `if (i < n)`
__global__ void fill(float* y, int n) {
  int i = hipBlockIdx_x * hipBlockDim_x + hipThreadIdx_x;
  y[i] = 2.0f * i;
}

__global__ void write_at(float* y, long long i) {
  if (threadIdx.x == 0) y[i] = 1.0f;
}

__global__ void copy(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}
"""


@pytest.fixture(scope="module")
def mod(tmp_path_factory: pytest.TempPathFactory) -> EmulatorModule:
    code = SOURCE.replace("__global__ void", 'extern "C" __global__ void')
    return EmulatorModule(code, warp_size=64, cache_dir=tmp_path_factory.mktemp("guards"))


def test_hip_runtime_include_compiles(mod: EmulatorModule) -> None:
    assert set(mod.kernel_names) == {"fill", "write_at", "copy"}
    x = np.random.default_rng(3).standard_normal(100).astype(np.float32)
    y = np.zeros(100, np.float32)
    mod.get_function("copy")((2,), (64,), (x, y, np.int32(100)))
    np.testing.assert_array_equal(y, x, err_msg="seed 3")


def test_write_past_the_end_is_a_kernel_error_naming_the_argument(mod: EmulatorModule) -> None:
    y = np.zeros(1000, np.float32)
    with pytest.raises(KernelBoundsError) as e:
        mod.get_function("fill")((4,), (256,), (y, np.int32(1000)))  # 24 floats past the end
    err = e.value
    assert isinstance(err, KernelError) and err.category == "user"
    text = str(err)
    assert "fill" in text and "argument 0 (float*, 4000 bytes)" in text
    assert "0 to 95 bytes past the end" in text and "memcheck" in text
    # the elements in bounds were written and copied back
    np.testing.assert_array_equal(y, 2.0 * np.arange(1000, dtype=np.float32))
    # and the process goes on: the same kernel launched correctly works
    z = np.zeros(1024, np.float32)
    mod.get_function("fill")((4,), (256,), (z, np.int32(1024)))
    assert z[-1] == 2046.0


def test_write_into_the_guard_page_is_a_kernel_error(mod: EmulatorModule) -> None:
    y = np.zeros(1000, np.float32)
    span = (y.nbytes + guard.GUARD_BYTES + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    index = (span + 64) // 4  # 64 bytes into the PROT_NONE page after the tail zone
    with pytest.raises(KernelBoundsError) as e:
        mod.get_function("write_at")((1,), (64,), (y, np.int64(index)))
    assert e.value.context["arg"] == 0 and e.value.context["thread_idx"] == (0, 0, 0)
    assert "guard page of argument 0" in str(e.value)


def test_read_only_arguments_are_passed_in_place(mod: EmulatorModule) -> None:
    x = np.arange(300, dtype=np.float32)
    x.flags.writeable = False
    y = np.zeros(300, np.float32)
    mod.get_function("copy")((5,), (64,), (x, y, np.int32(300)))
    np.testing.assert_array_equal(y, x)


def test_guarded_staging_poisons_and_reports_damage() -> None:
    a = np.arange(10, dtype=np.int32)
    s = guard.stage(a, 0, copy_back=True)
    try:
        zone = s.view()
        assert (zone[: guard.GUARD_BYTES] == guard.POISON).all()
        assert s.damage() is None and s.base % mmap.PAGESIZE == 0
        zone[guard.GUARD_BYTES + a.nbytes + 8] = 0
        zone[guard.GUARD_BYTES - 4] = 0
        assert s.damage() == (-4, a.nbytes + 8)
    finally:
        s.finish()
    np.testing.assert_array_equal(a, np.arange(10))


def test_source_lines_reads_the_file(tmp_path: Path, mod: EmulatorModule) -> None:
    assert "#include <hip/hip_runtime.h>" in mod.source_lines(mod.source)


def test_an_array_passed_twice_shares_one_guarded_copy(mod: EmulatorModule) -> None:
    # fill(y) then copy(y, y): the one copy is written back once, with the kernel's values
    x = np.zeros(256, dtype=np.float32)
    mod.get_function("fill")((4,), (64,), (x, np.int32(256)))
    mod.get_function("copy")((4,), (64,), (x, x, np.int32(256)))
    np.testing.assert_array_equal(x, 2.0 * np.arange(256, dtype=np.float32))
    # overlapping views are passed in place: y[i] = x[i] with y = x shifted by one element. One
    # block, whose threads run in order: several blocks run on several OS threads, and a later
    # block could overwrite an element before an earlier one read it (a race on a GPU too).
    buf = np.arange(201, dtype=np.float32)
    mod.get_function("copy")((1,), (256,), (buf[1:], buf[:-1], np.int32(200)))
    np.testing.assert_array_equal(buf[:-1], np.arange(1, 201, dtype=np.float32))
