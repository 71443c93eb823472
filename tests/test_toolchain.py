"""The offline toolchain (hipcc / nvcc resource reports, ISA), its log formatter and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests import tools
from workbench.cli import main
from workbench.errors import BackendError
from workbench.kernels import registry, toolchain
from workbench.kernels.registry import Cost, KernelSpec, Launch

needs_hipcc = pytest.mark.tool("hipcc")
needs_nvcc = pytest.mark.tool("nvcc")

# A small kernel with known static shared memory: 256 floats (1024 bytes) in block_sum, and
# B floats in the template (512 bytes for tile<128>, 128 bytes for tile<32>).
SOURCE = """\
#include "wb.h"

WB_KERNEL void block_sum(const float* WB_RESTRICT x, float* WB_RESTRICT out, int n) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = t < n ? x[blockIdx.x * blockDim.x + t] : 0.f;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

template <int B>
__global__ void tile(float* out) {
  __shared__ float s[B];
  s[threadIdx.x % B] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[B - 1 - threadIdx.x % B];
}
"""
SYMBOLS = ("block_sum", "tile<128>", "tile<32>")

BROKEN = """\
#include "wb.h"

WB_KERNEL void broken(float* out) {
  out[threadIdx.x] = undeclared_value;
}
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toolchain") / "probe.hip"
    path.write_text(SOURCE)
    return path


@pytest.fixture(scope="module")
def amd_result(source: Path) -> toolchain.CompileResult:
    tools.require("hipcc")
    return toolchain.compile_source(source, "gfx90a", symbols=SYMBOLS)


@pytest.fixture(scope="module")
def nv_result(source: Path) -> toolchain.CompileResult:
    tools.require("nvcc")
    return toolchain.compile_source(source, "sm_90", symbols=SYMBOLS)


@needs_hipcc
def test_amd_resources_are_parsed(amd_result: toolchain.CompileResult) -> None:
    assert set(amd_result.symbols) == set(SYMBOLS)
    r = amd_result.resources("block_sum")
    assert r.function == "block_sum" and r.vendor == "amd" and r.arch == "gfx90a"
    assert r.vgprs is not None and 0 < r.vgprs <= 512
    assert r.sgprs is not None and r.sgprs > 0
    assert r.agprs == 0
    assert r.lds_bytes == 256 * 4
    assert r.scratch_bytes == 0 and r.spills == 0
    assert r.occupancy is not None and 1 <= r.occupancy <= 8  # gfx90a: at most 8 waves/SIMD
    assert amd_result.resources("tile<128>").lds_bytes == 128 * 4
    assert amd_result.resources("tile<32>").lds_bytes == 32 * 4
    assert amd_result.symbols["tile<32>"] == "_Z4tileILi32EEvPf"
    assert not any(toolchain._PROBE in name for name in amd_result.functions)


@needs_nvcc
def test_nvidia_resources_are_parsed(nv_result: toolchain.CompileResult) -> None:
    assert set(nv_result.symbols) == set(SYMBOLS)
    r = nv_result.resources("block_sum")
    assert r.vendor == "nvidia" and r.arch == "sm_90"
    assert r.registers is not None and 0 < r.registers <= 255
    assert r.shared_bytes == 256 * 4
    assert r.spill_store_bytes == 0 and r.spill_load_bytes == 0 and r.spills == 0
    assert r.occupancy is None  # ptxas does not report it
    assert nv_result.resources("tile<128>").shared_bytes == 128 * 4
    assert nv_result.resources("tile<32>").shared_bytes == 32 * 4


@needs_hipcc
def test_unknown_symbol_in_result_is_an_error(amd_result: toolchain.CompileResult) -> None:
    with pytest.raises(BackendError) as e:
        amd_result.resources("nope")
    assert e.value.code == "backend.compile_failed"


@pytest.mark.parametrize(
    "arch", [pytest.param("gfx90a", marks=needs_hipcc), pytest.param("sm_90", marks=needs_nvcc)]
)
def test_compile_error_has_log_and_numbered_lines(tmp_path: Path, arch: str) -> None:
    path = tmp_path / "broken.hip"
    path.write_text(BROKEN)
    with pytest.raises(BackendError) as e:
        toolchain.compile_source(path, arch, symbols=["broken"])
    err = e.value
    assert err.code == "backend.compile_failed"
    assert "undeclared_value" in err.context["log"]
    assert arch in err.context["command"]
    lines = err.context["source_lines"]
    assert lines[0].startswith(f"{path}:4: error:")
    assert ">" + " 4 |   out[threadIdx.x] = undeclared_value;" in lines
    assert "  3 | WB_KERNEL void broken(float* out) {" in lines
    assert "undeclared_value;" in err.message


@needs_hipcc
def test_unknown_symbol_fails_to_compile(source: Path) -> None:
    with pytest.raises(BackendError) as e:
        toolchain.compile_source(source, "gfx90a", symbols=["no_such_kernel"])
    assert e.value.code == "backend.compile_failed"
    assert any("no_such_kernel" in line for line in e.value.context["source_lines"])


@pytest.mark.parametrize("arch,name", [("gfx90a", "hipcc"), ("sm_90", "nvcc")])
def test_missing_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: Path, arch: str, name: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no compiler at all
    with pytest.raises(BackendError) as e:
        toolchain.compile_source(source, arch, symbols=["block_sum"])
    assert e.value.code == "backend.compiler_missing"
    assert e.value.message.startswith(f"{name} not found")
    if name == "hipcc":
        assert "apt-get install hipcc" in e.value.message


def test_missing_compiler_is_a_report_in_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, "block_sum")
    monkeypatch.setenv("PATH", str(tmp_path))
    (report,) = toolchain.check([spec], ["gfx90a"])
    assert not report.ok and report.error_code == "backend.compiler_missing"


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown target"):
        toolchain.vendor_of("gfx9000x")
    assert toolchain.vendor_of("gfx1030") == "amd" and toolchain.vendor_of("sm_90") == "nvidia"


def test_parsers_on_recorded_output() -> None:
    amd = """\
f.hip:2:1: remark: Function Name: k [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     SGPRs: 13 [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     VGPRs: 7 [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     ScratchSize [bytes/lane]: 16 [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     Occupancy [waves/SIMD]: 16 [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     SGPRs Spill: 1 [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     VGPRs Spill: 2 [-Rpass-analysis=kernel-resource-usage]
f.hip:2:1: remark:     LDS Size [bytes/block]: 1024 [-Rpass-analysis=kernel-resource-usage]
"""
    (r,) = toolchain.parse_amd_remarks(amd, "gfx1030").values()
    assert (r.sgprs, r.vgprs, r.scratch_bytes, r.occupancy, r.lds_bytes) == (13, 7, 16, 16, 1024)
    assert r.agprs is None  # RDNA has none and the compiler prints none: unknown, not 0
    assert (r.sgpr_spills, r.vgpr_spills, r.spills) == (1, 2, 3)

    nv = """\
ptxas info    : Compiling entry function 'a' for 'sm_90'
ptxas info    : Function properties for a
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 12544 bytes smem
ptxas info    : Compiling entry function 'b' for 'sm_90'
ptxas info    : Function properties for b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
"""
    res = toolchain.parse_ptxas_info(nv, "sm_90")
    a, b = res["a"], res["b"]
    assert (a.registers, a.shared_bytes, a.scratch_bytes, a.barriers) == (40, 12544, 8, 1)
    assert (a.spill_store_bytes, a.spill_load_bytes, a.spills) == (8, 4, 12)
    assert (b.registers, b.shared_bytes, b.spills) == (10, 0, 0)


def test_format_compile_log_nvrtc_style_uses_main_source() -> None:
    code = "a\nb\nc\nd\ne bad\nf\ng\n"
    log = '/tmp/tmpabc/kern.cu(5): error: identifier "bad" is undefined\n'
    summary, lines = toolchain.format_compile_log(log, main_source=code)
    assert lines == [
        '/tmp/tmpabc/kern.cu:5: error: identifier "bad" is undefined',
        "  3 | c",
        "  4 | d",
        "> 5 | e bad",
        "  6 | f",
        "  7 | g",
    ]
    assert summary == "\n".join(lines)
    summary, lines = toolchain.format_compile_log("ld: something odd happened\n")
    assert lines == [] and summary == "ld: something odd happened"


@needs_hipcc
def test_asm_amd(source: Path) -> None:
    text = toolchain.asm("tile<32>", "gfx90a", source=source)
    assert text.startswith("; tile<32> [gfx90a]: _Z4tileILi32EEvPf (void tile<32>(float*))\n")
    assert "s_endpgm" in text and ".amdhsa_kernel _Z4tileILi32EEvPf" in text
    assert "block_sum" not in text


@needs_nvcc
def test_asm_nvidia(source: Path) -> None:
    text = toolchain.asm("block_sum", "sm_90", source=source)
    assert text.startswith("// block_sum [sm_90]: block_sum\n.visible .entry block_sum(")
    assert "bar.sync" in text
    assert "tile" not in text


# --- the registered kernels: this is what makes CI fail when a kernel does not compile -----------


def _assert_all_compiled(arch: str) -> None:
    kernels = registry.all_kernels()
    assert kernels, "no kernels registered"
    reports = toolchain.check(kernels.values(), [arch])
    assert {r.kernel for r in reports} == set(kernels)
    failed = [f"{r.kernel}: {r.error}" for r in reports if not r.ok]
    assert not failed, "\n\n".join(failed)
    for r in reports:
        res = r.resources
        assert res is not None
        assert (res.vgprs if arch.startswith("gfx") else res.registers) > 0, r


@needs_hipcc
@pytest.mark.parametrize("arch", ["gfx908", "gfx90a", "gfx940", "gfx1030"])
def test_every_registered_kernel_compiles_for_amd(arch: str) -> None:
    """CI fails when any kernel does not build for any AMD target the issue names."""
    _assert_all_compiled(arch)


INTEGER_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(scope="module")
def matvec_isa_gfx90a() -> dict[str, str]:
    """The gfx90a code of every integer-quant matvec: matvec.hip compiled once for all of them."""
    return toolchain.asm_many([f"matvec_{q}" for q in INTEGER_TYPES], "gfx90a")


@needs_hipcc
@pytest.mark.parametrize("qtype", INTEGER_TYPES)
def test_integer_matvec_isa_uses_dot4(qtype: str, matvec_isa_gfx90a: dict[str, str]) -> None:
    """Every quantized matvec dots its codes with v_dot4 on gfx90a (WB_DOT4_I8), and reads the
    staged weights with 16-byte loads."""
    text = matvec_isa_gfx90a[f"matvec_{qtype}"]
    assert text.startswith(f"; matvec<WB_{qtype.upper()}> [gfx90a]"), text[:80]
    assert re.search(r"\bv_dot4c?_i32_i8", text), f"matvec_{qtype}: no v_dot4 on gfx90a"
    assert "global_load_dwordx4" in text, f"matvec_{qtype}: no 16-byte global loads"


@needs_nvcc
def test_every_registered_kernel_compiles_for_sm_90() -> None:
    _assert_all_compiled("sm_90")


# --- the CLI -----------------------------------------------------------------------------------


def _spec(
    tmp_path: Path, symbol: str, name: str = "probe_kernel", code: str = SOURCE
) -> KernelSpec:
    path = tmp_path / f"{name}.hip"
    path.write_text(code)
    return KernelSpec(
        name=name,
        source=str(path),  # absolute: KernelSpec.path is kernels_dir() / source
        symbol=symbol,
        launch=lambda **_: Launch((1, 1, 1), (256, 1, 1)),
        reference=lambda *a: None,
        cost=lambda **_: Cost(0, 0),
        description="a test kernel",
    )


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, KernelSpec]:
    specs = {
        "probe_sum": _spec(tmp_path, "block_sum", "probe_sum"),
        "probe_tile": _spec(tmp_path, "tile<128>", "probe_tile"),
        "probe_broken": _spec(tmp_path, "broken", "probe_broken", BROKEN),
    }
    monkeypatch.setattr(registry, "KERNEL_MODULES", ())
    monkeypatch.setattr(registry, "_REGISTRY", dict(specs))
    return specs


def test_cli_list(fake_registry: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["kernels", "list"]) == 0
    out = capsys.readouterr().out
    assert "probe_tile" in out and "tile<128>" in out and "a test kernel" in out
    assert main(["kernels", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(fake_registry)


@needs_hipcc
def test_cli_check_table_and_failure(fake_registry: dict, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        ["kernels", "check", "--arch", "gfx90a", "--kernel", "probe_sum", "--kernel", "probe_tile"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "VGPRs" in out and "occupancy" in out
    row = next(line for line in out.splitlines() if line.startswith("probe_tile"))
    assert " 512 " in row  # LDS of tile<128>

    rc = main(["kernels", "check", "--arch", "gfx90a", "--json"])
    captured = capsys.readouterr()
    assert rc == 5  # probe_broken does not compile
    data = json.loads(captured.out)
    by_name = {r["kernel"]: r for r in data["reports"]}
    assert by_name["probe_sum"]["ok"] and by_name["probe_sum"]["resources"]["lds_bytes"] == 1024
    assert by_name["probe_broken"]["error_code"] == "backend.compile_failed"
    assert "backend.compile_failed" in captured.err


def test_cli_check_missing_compiler_policy(
    fake_registry: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    # Default targets: missing compilers are skipped, one line each, and do not fail.
    assert main(["kernels", "check", "--kernel", "probe_sum"]) == 0
    out = capsys.readouterr().out
    assert "gfx90a: skipped: hipcc not found" in out and "sm_90: skipped: nvcc not found" in out
    # A target asked for by name must be built.
    assert main(["kernels", "check", "--arch", "sm_90", "--kernel", "probe_sum"]) == 5
    assert "backend.compiler_missing" in capsys.readouterr().err


@needs_hipcc
def test_cli_asm(fake_registry: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["kernels", "asm", "probe_tile", "--arch", "gfx90a"]) == 0
    out = capsys.readouterr().out
    assert "_Z4tileILi128EEvPf:" in out and "s_endpgm" in out


def test_cli_rejects_unknown_arch(fake_registry: dict) -> None:
    with pytest.raises(SystemExit) as e:
        main(["kernels", "check", "--arch", "gfx90a,vax"])
    assert e.value.code == 2


def test_missing_cxxfilt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    assert toolchain._demangle(["plain_c_kernel"]) == {"plain_c_kernel": "plain_c_kernel"}
    with pytest.raises(BackendError) as e:
        toolchain._demangle(["_Z4tileILi32EEvPf"])
    assert e.value.code == "backend.compiler_missing" and "binutils" in e.value.message
