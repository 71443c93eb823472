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


# --- --sanitize and --profile: the instrumented emulator under the cell ------------------------

TRANSPOSE_TILED = """\
#include "wb.h"
#define TILE 32
WB_KERNEL void transpose(const float* in, float* out, int n) {
  __shared__ float tile[TILE][TILE + PAD];
  int x = blockIdx.x * TILE + threadIdx.x;
  for (int j = threadIdx.y; j < TILE; j += blockDim.y)
    tile[j][threadIdx.x] = in[(blockIdx.y * TILE + j) * n + x];
  BARRIER
  x = blockIdx.y * TILE + threadIdx.x;
  for (int j = threadIdx.y; j < TILE; j += blockDim.y)
    out[(blockIdx.x * TILE + j) * n + x] = tile[threadIdx.x][j];
}
"""
TRANSPOSE_NAIVE = """\
#include "wb.h"
WB_KERNEL void transpose(const float* in, float* out, int n) {
  int x = blockIdx.x * 32 + threadIdx.x;
  for (int y = blockIdx.y * 32 + threadIdx.y; y < (blockIdx.y + 1) * 32; y += blockDim.y)
    out[x * n + y] = in[y * n + x];
}
"""
TRANSPOSE_SETUP = """
tn = 64
def tmake():  # distinct values: a misplaced element shows
    a = np.arange(tn * tn, dtype=np.float32).reshape(tn, tn)
    return a, np.empty((tn, tn), np.float32), np.int32(tn)
def transposed(a, out, n):
    return a.T
"""
TRANSPOSE_LINE = "transpose --grid 2,2 --block 32,8 --args tmake --backend emulator"


def _tiled(pad: int, barrier: bool = True) -> str:
    return TRANSPOSE_TILED.replace("PAD", str(pad)).replace(
        "BARRIER", "__syncthreads();" if barrier else "// (no barrier)"
    )


def _line_counters(result, text: str, space: str, op: str):
    """The counters of the cell line containing ``text``."""
    cell = result.profile
    lines = cell.report.lines
    (match,) = [
        c for c in lines
        if c.space == space and c.op == op and text in cell.read_lines(c.file)[c.line - 1]
    ]  # fmt: skip
    return match


@pytest.mark.tool("clang")
def test_profile_shows_efficiency_and_bank_conflicts_as_hand_arithmetic(shell):
    assert shell.run_cell(TRANSPOSE_SETUP).success
    line = f"{TRANSPOSE_LINE} --check transposed --profile --target sm_90"
    naive = hip(shell, line, TRANSPOSE_NAIVE)
    assert naive.success, naive.error_in_exec
    res = naive.result
    assert res.kernel.warp_size == 32 and res.check.ok  # sm_90's warp width
    load = _line_counters(res, "in[y * n + x]", "global", "load")
    store = _line_counters(res, "out[x * n + y]", "global", "store")
    assert load.efficiency == 1.0 and load.active_lanes == 32.0
    assert store.efficiency == 0.125  # 4 bytes used of each 32-byte sector
    assert store.bytes_moved == 8 * store.bytes_requested == 8 * 64 * 64 * 4
    text = repr(res)
    assert "memory counters for sm_90 (warp 32)" in text and "time floor on sm_90" in text
    assert "12.5%" in text and "<cell transpose>" in text

    ways = {}
    for pad in (0, 1):
        r = hip(shell, line, _tiled(pad))
        assert r.success, r.error_in_exec
        read = _line_counters(r.result, "tile[threadIdx.x][j]", "shared", "load")
        ways[pad] = read.bank_conflict_ways
        for c in r.result.profile.report.lines:
            if c.space == "global":
                assert c.efficiency == 1.0, (pad, c)
    assert ways == {0: 32.0, 1: 1.0}


@pytest.mark.tool("clang")
def test_sanitize_finds_the_missing_barrier_at_both_lines(shell):
    assert shell.run_cell(TRANSPOSE_SETUP).success
    clean = hip(shell, f"{TRANSPOSE_LINE} --sanitize", _tiled(1))
    assert clean.success, clean.error_in_exec
    assert clean.result.sanitize.findings == []
    assert "no findings" in repr(clean.result)

    racy_src = _tiled(1, barrier=False)
    for warp in (32, 64):
        r = hip(shell, f"{TRANSPOSE_LINE} --sanitize --tools racecheck --warp {warp}", racy_src)
        assert r.success, r.error_in_exec
        rows = r.result.sanitize.findings
        assert rows and all(f["tool"] == "racecheck" for f in rows), rows
        read = (
            racy_src.splitlines().index(
                "    out[(blockIdx.x * TILE + j) * n + x] = tile[threadIdx.x][j];"
            )
            + 1
        )
        write = (
            racy_src.splitlines().index(
                "    tile[j][threadIdx.x] = in[(blockIdx.y * TILE + j) * n + x];"
            )
            + 1
        )
        wheres = {f["where"] for f in rows}
        assert f"<cell transpose>:{read} vs <cell transpose>:{write}" in wheres or (
            f"<cell transpose>:{write} vs <cell transpose>:{read}" in wheres
        ), wheres
        assert all(f["kind"].startswith("shared_race") for f in rows)
        assert "racecheck" in repr(r.result) and "finding(s)" in repr(r.result)


def test_sanitize_and_profile_need_a_launch(shell):
    r = hip(shell, "transpose --sanitize --backend emulator", _tiled(1))
    assert isinstance(r.error_in_exec, HipCellError)
    assert "need --grid and --block" in r.error_in_exec.text
    r = hip(shell, "transpose --grid 1 --block 32 --profile --backend emulator", _tiled(1))
    assert "need --args" in r.error_in_exec.text
    assert shell.run_cell(TRANSPOSE_SETUP).success  # the arguments, so the tool is what fails
    r = hip(shell, f"{TRANSPOSE_LINE} --sanitize --tools leakcheck", _tiled(1))
    assert "unknown tool" in r.error_in_exec.text


WILD = """\
#include "wb.h"
WB_KERNEL void wild(float* out, int n) {
  int i = threadIdx.x;
  out[i + OFFSET] = 1.0f;
}
"""


@pytest.mark.tool("clang")
def test_sanitize_reports_writes_past_the_end_and_a_stopped_launch(shell):
    assert shell.run_cell(
        "def wmake():\n    return np.zeros(256, np.float32), np.int32(256)"
    ).success
    line = "wild --grid 1 --block 256 --args wmake --sanitize --tools memcheck --backend emulator"
    r = hip(shell, line, WILD.replace("OFFSET", "1"))
    assert r.success, r.error_in_exec
    (f,) = r.result.sanitize.findings
    assert (f["kind"], f["where"], f["thread"], f["count"]) == (
        "out_of_bounds_write",
        "<cell wild>:4",
        "(255,0,0)",
        1,
    )
    assert r.result.sanitize.stopped == ""

    far = hip(shell, line, WILD.replace("OFFSET", "(1 << 26)"))  # past every guard zone
    assert far.success, far.error_in_exec
    cell = far.result.sanitize
    assert cell.stopped.startswith("kernel.out_of_bounds") and "<cell wild>:4" in cell.stopped
    assert [f["where"] for f in cell.findings] == ["<cell wild>:4"]
    assert "the emulator stopped the launch" in repr(far.result)
