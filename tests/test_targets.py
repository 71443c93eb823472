"""targets.get_function / launch on the CPU emulator, and the CuPy target through a fake cupy."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import tools
from workbench.errors import BackendError, UserError
from workbench.kernels import cupy_target, registry, targets
from workbench.kernels.registry import Cost, KernelSpec, Launch

SOURCE = """\
#include "wb.h"

// out[b] = sum of x over block b (blockDim.x a power of two, at most 256).
WB_KERNEL void block_sum(const float* WB_RESTRICT x, float* WB_RESTRICT out) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// out[i] = SCALE * x[i] + warpSize (the warp width the kernel ran with).
template <int SCALE>
__global__ void scale(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = SCALE * x[i] + (float)warpSize;
}
"""


def _spec(path: Path, name: str, symbol: str, **defines: int) -> KernelSpec:
    def launch(n: int, block: int = 64) -> Launch:
        return Launch(((n + block - 1) // block, 1, 1), (block, 1, 1))

    return KernelSpec(
        name=name,
        source=str(path),  # absolute: KernelSpec.path is kernels_dir() / source
        symbol=symbol,
        launch=launch,
        reference=lambda *a: None,
        cost=lambda **_: Cost(0, 0),
        defines=defines,
    )


@pytest.fixture
def specs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, KernelSpec]:
    path = tmp_path / "targets_probe.hip"
    path.write_text(SOURCE)
    out = {
        "sum": _spec(path, "sum", "block_sum"),
        "scale3": _spec(path, "scale3", "scale<3>"),
        "scale5": _spec(path, "scale5", "scale<5>"),
    }
    monkeypatch.setattr(registry, "KERNEL_MODULES", ())
    monkeypatch.setattr(registry, "_REGISTRY", dict(out))
    targets.clear_cache()
    cupy_target.clear_cache()
    yield out
    targets.clear_cache()
    cupy_target.clear_cache()


def test_name_expressions_cover_the_source_siblings(specs: dict[str, KernelSpec]) -> None:
    assert cupy_target.spec_name_expressions(specs["sum"]) == ("scale<3>", "scale<5>")
    assert cupy_target.is_name_expression("scale<3>")
    assert not cupy_target.is_name_expression("block_sum")


def test_unknown_target(specs: dict[str, KernelSpec]) -> None:
    with pytest.raises(UserError, match="unknown target"):
        targets.get_function(specs["sum"], "opencl")


# --- the emulator ------------------------------------------------------------------------------


@pytest.fixture
def emulator(specs: dict[str, KernelSpec]) -> dict[str, KernelSpec]:
    tools.require("c++")
    return specs


def test_emulator_launch(emulator: dict[str, KernelSpec]) -> None:
    x = np.arange(256, dtype=np.float32)
    out = np.zeros(4, dtype=np.float32)
    targets.launch(emulator["sum"], "emulator", (x, out), n=256, block=64)
    np.testing.assert_allclose(out, x.reshape(4, 64).sum(axis=1))


def test_emulator_templates_and_warp_size(emulator: dict[str, KernelSpec]) -> None:
    x = np.arange(100, dtype=np.float32)
    out = np.zeros_like(x)
    targets.launch(emulator["scale5"], "emulator", (x, out, np.int32(100)), n=100)
    np.testing.assert_allclose(out, 5 * x + 64)  # default warp: a CDNA wavefront
    kernel = targets.get_function(emulator["scale3"], "emulator", warp_size=32)
    kernel((2,), (64,), (x, out, np.int32(100)))
    np.testing.assert_allclose(out, 3 * x + 32)


def test_emulator_module_cache(emulator: dict[str, KernelSpec], tmp_path: Path) -> None:
    a = targets.get_function(emulator["scale3"], "emulator")
    b = targets.get_function(emulator["scale5"], "emulator")
    assert a.module is b.module  # one module per source, options, target and warp size
    assert targets.get_function(emulator["scale3"], "emulator", 32).module is not a.module
    # An edited source is a new module.
    emulator["sum"].path.write_text(SOURCE.replace("SCALE * x[i]", "SCALE * x[i] + 1.f"))
    c = targets.get_function(emulator["scale3"], "emulator")
    assert c.module is not a.module
    x = np.ones(64, dtype=np.float32)
    out = np.zeros_like(x)
    c((1,), (64,), (x, out, np.int32(64)))
    np.testing.assert_allclose(out, 3 + 1 + 64)


# --- CuPy, faked -------------------------------------------------------------------------------


class FakeCompileException(Exception):
    """Shaped like cupy.cuda.compiler.CompileException."""

    def __init__(self, msg: str, source: str, name: str, options: tuple, backend: str) -> None:
        super().__init__()
        self._msg, self.source, self.name, self.options, self.backend = (
            msg,
            source,
            name,
            options,
            backend,
        )

    def get_message(self) -> str:
        return self._msg

    __str__ = get_message


def _fake_cupy(calls: list[dict[str, Any]], *, fail_with: str | None = None, warp: int = 64):
    cupy = types.ModuleType("cupy")

    class RawModule:
        def __init__(self, *, code: str, options: tuple, name_expressions: tuple | None) -> None:
            self.code, self.options, self.name_expressions = code, options, name_expressions
            self.launches: list[tuple] = []
            calls.append({"code": code, "options": options, "name_expressions": name_expressions})

        def compile(self) -> None:
            if fail_with is not None:
                raise FakeCompileException(fail_with, self.code, "/tmp/x/kern.cu", (), "hiprtc")

        def get_function(self, name: str):
            def kernel(grid, block, args, shared_mem=0):
                self.launches.append((name, grid, block, args, shared_mem))

            kernel.module = self
            return kernel

    class Device:
        id = 0

    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(
        Device=Device,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"warpSize": warp}),
        compiler=types.SimpleNamespace(CompileException=FakeCompileException),
    )
    return cupy


def test_cupy_missing(specs: dict[str, KernelSpec], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(BackendError) as e:
        cupy_target.load_module(specs["sum"])
    assert e.value.code == "backend.unavailable"
    assert e.value.message == cupy_target.INSTALL_HINT
    with pytest.raises(BackendError, match="pip install rocm-workbench"):
        targets.get_function(specs["sum"], "cupy")


def test_cupy_load_and_cache(specs: dict[str, KernelSpec], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls))
    m1 = cupy_target.load_module(specs["sum"])
    assert len(calls) == 1
    assert calls[0]["code"] == SOURCE
    assert f"-I{registry.kernels_dir()}" in calls[0]["options"]
    assert calls[0]["name_expressions"] == ("scale<3>", "scale<5>")
    assert cupy_target.load_module(specs["scale3"]) is m1  # same source and options: cached
    assert len(calls) == 1
    m2 = cupy_target.load_module(specs["sum"], options=("-DEXTRA=1",))
    assert m2 is not m1 and "-DEXTRA=1" in calls[1]["options"]
    cupy_target.load_module('extern "C" __global__ void f() {}')
    assert calls[2]["name_expressions"] is None
    assert len(calls) == 3


def test_cupy_cache_key() -> None:
    k = cupy_target.module_key("code", ["-DA=1"], ["f<1>"], 0)
    assert k == cupy_target.module_key("code", ("-DA=1",), ("f<1>",), 0)
    assert k != cupy_target.module_key("code ", ["-DA=1"], ["f<1>"], 0)
    assert k != cupy_target.module_key("code", ["-DA=2"], ["f<1>"], 0)
    assert k != cupy_target.module_key("code", ["-DA=1"], ["f<2>"], 0)
    assert k != cupy_target.module_key("code", ["-DA=1"], ["f<1>"], 1)


def test_each_source_is_one_module_for_the_registry_and_the_device_backend() -> None:
    """The registry's kernels of one source and defines, and the device backend's quantized
    module of that source, are one compile request: the same source is never compiled twice
    for different orders of its name expressions or for an extern "C" kernel beside templates."""
    from workbench.kernels import quant_kernels as qk

    mv = [s for s in registry.all_kernels().values() if s.source == "matvec.hip"]
    assert {s.symbol for s in mv} >= {"rmsnorm_q8_1", "matvec<WB_Q4_1>", "matvec_fused<WB_Q8_0>"}
    digests = {cupy_target.compile_request(s).digest for s in mv}
    path, options, names = qk.module_args("matvec")
    backend = cupy_target.compile_request(Path(path), options=options, name_expressions=names)
    assert digests == {backend.digest}
    swapped = cupy_target.compile_request(Path(path), options=options, name_expressions=names[::-1])
    assert swapped.digest == backend.digest


def test_cupy_compile_error(specs: dict[str, KernelSpec], monkeypatch: pytest.MonkeyPatch) -> None:
    lines = SOURCE.splitlines()
    bad = next(i for i, line in enumerate(lines, 1) if "if (i < n)" in line)
    log = f"/tmp/x/kern.cu:{bad}:11: error: use of undeclared identifier 'n'\n1 error generated.\n"
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls, fail_with=log))
    with pytest.raises(BackendError) as e:
        cupy_target.load_module(specs["scale3"])
    err = e.value
    assert err.code == "backend.compile_failed"
    assert err.context["log"] == log
    assert f"> {bad} | {lines[bad - 1]}" in err.context["source_lines"]
    assert err.context["source_lines"][0] == (
        f"/tmp/x/kern.cu:{bad}: error: use of undeclared identifier 'n'"
    )
    assert "hiprtc could not compile" in err.message and lines[bad - 1] in err.message
    # A failed compile is not cached.
    with pytest.raises(BackendError):
        cupy_target.load_module(specs["scale3"])
    assert len(calls) == 2


def test_cupy_target_launch(specs: dict[str, KernelSpec], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls, warp=64))
    x, out = object(), object()
    targets.launch(specs["scale5"], "cupy", (x, out, 100), n=100)
    kernel = targets.get_function(specs["scale5"], "cupy")
    assert kernel.module.launches == [("scale<5>", (2, 1, 1), (64, 1, 1), (x, out, 100), 0)]
    assert len(calls) == 1  # one compile for both
    assert targets.get_function(specs["sum"], "cupy", warp_size=64).module is kernel.module
    with pytest.raises(UserError, match="warp size is 64"):
        targets.get_function(specs["sum"], "cupy", warp_size=32)
