"""The %%hip cell magic in a real IPython shell, on the CPU emulator."""

from __future__ import annotations

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell

from workbench.widgets.magic import HipCellError, HipResult, parse_dims

BLOCK_SUM = """\
#include "wb.h"
WB_KERNEL void block_sum(const float* x, float* out, int n) {
  __shared__ float s[256];
  int t = threadIdx.x;
  int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}
"""

SETUP = """
import numpy as np
n = 1000
def make():
    x = rng.standard_normal(n).astype(np.float32)  # rng: the test's, set by _seeded
    return (x, np.zeros(4, np.float32), np.int32(n))
def ref_sum(x, out, n):
    return np.add.reduceat(x.astype(np.float64), [0, 256, 512, 768])
def wrong_sum(x, out, n):
    return ref_sum(x, out, n) + 1
"""


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "workbench")
    assert sh.run_cell(SETUP).success
    yield sh
    InteractiveShell.clear_instance()


@pytest.fixture(autouse=True)
def _seeded(shell, rng: np.random.Generator) -> None:
    shell.user_ns["rng"] = rng


def hip(shell, line: str, body: str = BLOCK_SUM):
    return shell.run_cell(f"%%hip {line}\n{body}")


def test_compile_check_and_bench_on_the_emulator(shell):
    r = hip(shell, "block_sum --grid 4 --block 256 --args make --check ref_sum --bench "
                   "--backend emulator --warmup-ms 1 --rep-ms 5")  # fmt: skip
    assert r.success, r.error_in_exec
    res = r.result
    assert isinstance(res, HipResult)
    assert res.kernel.backend == "emulator" and res.kernel.warp_size == 64
    assert res.check is not None and res.check.ok and res.check.total == 4
    assert res.check.max_abs_error < 1e-3
    assert res.bench is not None and res.bench.reps >= 3 and res.bench.p50_ms > 0
    text = repr(res)
    assert "check against ref_sum: OK" in text and "bench: p50" in text
    # The kernel is bound in the namespace and launches like a CuPy RawKernel.
    x = np.arange(512, dtype=np.float32)
    out = np.zeros(2, np.float32)
    shell.user_ns["block_sum"]((2,), (256,), (x, out, np.int32(512)))
    assert out.tolist() == [x[:256].sum(), x[256:].sum()]


def test_a_failed_check_is_one_readable_block(shell, capsys):
    r = hip(shell, "block_sum --grid 4 --block 256 --args make --check wrong_sum "
                   "--backend emulator")  # fmt: skip
    assert isinstance(r.error_in_exec, HipCellError)
    out = capsys.readouterr().out
    assert "user.check_failed" in out and "4 of 4 elements differ" in out
    assert "Traceback" not in out


def test_unwritten_outputs_are_caught(shell):
    """Outputs are poisoned: a kernel that skips the last block fails the check."""
    lazy = BLOCK_SUM.replace("if (t == 0)", "if (t == 0 && blockIdx.x < 3)")
    r = hip(shell, "block_sum --grid 4 --block 256 --args make --check ref_sum "
                   "--backend emulator", lazy)  # fmt: skip
    assert isinstance(r.error_in_exec, HipCellError)
    assert "argument 1[3]: got nan" in r.error_in_exec.text


def test_compile_error_shows_numbered_cell_lines(shell, capsys):
    bad = '#include "wb.h"\nWB_KERNEL void f(float* x) {\n  x[0] = y;\n}\n'
    r = hip(shell, "f --backend emulator", bad)
    err = r.error_in_exec
    assert isinstance(err, HipCellError)
    assert err.error.code == "backend.compile_failed"
    assert "<cell f>:3: error: 'y' was not declared" in err.text
    assert "> 3 |   x[0] = y;" in err.text and "  2 | WB_KERNEL void f" in err.text
    out = capsys.readouterr().out
    assert "> 3 |   x[0] = y;" in out and "Traceback" not in out
    from workbench.runtime.errorlog import default_log

    assert default_log().query(code="backend.compile_failed")[-1].kernel == "f"


def test_bad_usage_is_a_readable_error(shell):
    r = hip(shell, "block_sum --bench")
    assert isinstance(r.error_in_exec, HipCellError)
    assert "need --grid and --block" in r.error_in_exec.text
    r = hip(shell, "block_sum --grid 1 --block 256 --args make --check no_such_fn "
                   "--backend emulator")  # fmt: skip
    assert "no such function" in r.error_in_exec.text


@pytest.mark.tool("hipcc")
def test_arch_resource_report(shell):
    r = hip(shell, "block_sum --arch gfx90a --backend emulator")
    assert r.success, r.error_in_exec
    (res,) = r.result.resources
    assert res.arch == "gfx90a" and res.lds_bytes == 1024 and res.vgprs > 0
    assert "gfx90a (amd): VGPRs" in repr(r.result)


def test_arch_without_hipcc_is_a_clear_message(shell, monkeypatch):
    from workbench.kernels import toolchain

    monkeypatch.setattr(toolchain, "HIPCC", "no-such-hipcc")
    r = hip(shell, "block_sum --arch gfx90a --backend emulator")
    assert isinstance(r.error_in_exec, HipCellError)
    assert "backend.compiler_missing" in r.error_in_exec.text


def test_parse_dims():
    assert parse_dims("4") == (4,)
    assert parse_dims("4,2") == (4, 2) == parse_dims("(4, 2)") == parse_dims("4x2")
    assert parse_dims("n // 256 + 1", {"n": 1000}) == (4,)
