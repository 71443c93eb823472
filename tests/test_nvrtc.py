"""Every GPU module compiles with NVRTC, the CUDA runtime compiler CuPy uses, without a GPU.

NVRTC ships on PyPI (``nvidia-cuda-nvrtc-cu12``, in the dev extra) and needs no driver or
device, so this runs everywhere the wheel exists: it compiles exactly the modules the device
backend and the registry hand to CuPy (`cupy_target.compile_request`: source, options with the
headers' digest, name expressions) with the options CuPy 14 adds on CUDA, and checks that every
name expression has a lowered name and that every kernel is in the binary. It proves the NVRTC
path compiles; only `make test-gpu` on a GPU proves the kernels run (see docs/kernels.md).

Options CuPy adds to a ``RawModule``'s own (cupy/_core/core.pyx, assemble_cupy_compiler_options;
cupy/cuda/compiler.py, _compile_with_cache_cuda and _compile_using_nvrtc_no_warning):
``--std=c++17`` unless a standard is given; include directories of its bundled CCCL, its own
headers and the CUDA runtime headers (search paths only: our sources include nothing under
NVRTC, which the compile here proves, as none of those paths exist here); ``-ftz=true``;
``-arch=sm_<cc>`` (a cubin) where NVRTC knows the device's architecture; and
``--device-as-default-execution-space``. Name expressions are added with
``nvrtcAddNameExpression`` before the compile and read back with ``nvrtcGetLoweredName``.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from workbench.kernels import ops_kernels as ops
from workbench.kernels import quant_kernels as qk
from workbench.kernels.cupy_target import CompileRequest, compile_request, is_name_expression
from workbench.kernels.registry import all_kernels, kernels_dir

# Hopper (the H100/H200 class), the newest architecture NVRTC 12.x compiles to a cubin for all
# minor versions, and Ampere.
ARCHS = ("sm_90", "sm_80")
CUPY_OPTIONS = ("--std=c++17", "-ftz=true", "--device-as-default-execution-space")


def _libnvrtc() -> ctypes.CDLL:
    try:
        import nvidia.cuda_nvrtc as pkg
    except ImportError:
        if sys.platform == "linux":  # the wheel exists: it is part of the dev extra
            pytest.fail("nvidia-cuda-nvrtc-cu12 is missing: pip install -e '.[dev]'")
        pytest.skip(f"no NVRTC wheel for {sys.platform}")
    libs = [p for d in pkg.__path__ for p in sorted(Path(d, "lib").glob("libnvrtc.so.*"))]
    assert libs, f"no libnvrtc.so.* under {list(pkg.__path__)}"
    return ctypes.CDLL(str(libs[0]))


@dataclass
class Compiled:
    binary: bytes  # the cubin (ELF)
    lowered: dict[str, str]  # name expression -> lowered name
    log: str


class NVRTC:
    """The few NVRTC calls CuPy's compile path makes, through ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(self, status: int, what: str, log: str = "") -> None:
        if status != 0:
            message = self.lib.nvrtcGetErrorString(status).decode()
            raise AssertionError(f"{what}: {message}\n{log}")

    def compile(self, req: CompileRequest, options: tuple[str, ...]) -> Compiled:
        lib, prog = self.lib, ctypes.c_void_p()
        self.check(
            lib.nvrtcCreateProgram(
                ctypes.byref(prog), req.code.encode(), b"kern.cu", 0, None, None
            ),
            "nvrtcCreateProgram",
        )
        try:
            for expr in req.name_expressions:
                self.check(lib.nvrtcAddNameExpression(prog, expr.encode()), expr)
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            buf = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetProgramLog(prog, buf), "log")
            log = buf.value.decode(errors="replace")
            self.check(status, f"{req.label} with {' '.join(options)}", log)
            lowered = {}
            for expr in req.name_expressions:
                name = ctypes.c_char_p()
                self.check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)), expr)
                lowered[expr] = name.value.decode()
            self.check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
            cubin = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
            return Compiled(cubin.raw, lowered, log)
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc() -> NVRTC:
    return NVRTC(_libnvrtc())


def gpu_modules() -> dict[str, tuple[CompileRequest, set[str]]]:
    """Every module the GPU path compiles (digest -> request, the kernels launched from it):
    one per registry entry's source and defines, and those the device backend builds."""
    out: dict[str, tuple[CompileRequest, set[str]]] = {}

    def add(req: CompileRequest, symbols: set[str]) -> None:
        out.setdefault(req.digest, (req, set()))[1].update(symbols)

    for spec in all_kernels().values():
        add(compile_request(spec), {spec.symbol})
    for source in ops.SOURCES:  # the device backend's operation modules: extern "C" kernels
        symbols = {s.symbol for s in all_kernels().values() if s.source == source}
        add(compile_request(kernels_dir() / source, options=(f"-I{kernels_dir()}",)), symbols)
    for op in qk.OPERATIONS:  # and its quantized modules: one per operation, every type
        path, options, names = qk.module_args(op)
        add(compile_request(Path(path), options=options, name_expressions=names), set(names))
    return out


MODULES = gpu_modules()


def test_the_modules_cover_every_kernel() -> None:
    launched = set().union(*(symbols for _, symbols in MODULES.values()))
    assert {s.symbol for s in all_kernels().values()} <= launched
    for req, _ in MODULES.values():
        assert any(o.startswith("-DWB_HEADERS_SHA=") for o in req.options), req.label


def _cases() -> list[tuple[str, str]]:
    """(module, arch): every module for sm_90; for sm_80 those of every source but matvec.hip,
    whose one module (the registry's and the device backend's alike: the whole file, every type)
    is the slowest to compile and takes no other code path on sm_80 than on sm_90 (the integer
    dot product is dp4a on both)."""
    return [
        (digest, arch)
        for digest in sorted(MODULES)
        for arch in ARCHS
        if arch == "sm_90" or Path(MODULES[digest][0].label).name != "matvec.hip"
    ]


@pytest.mark.parametrize(
    ("digest", "arch"), _cases(), ids=lambda v: MODULES[v][0].label[-24:] if v in MODULES else v
)
def test_nvrtc_compiles_every_module(nvrtc: NVRTC, digest: str, arch: str) -> None:
    req, symbols = MODULES[digest]
    options = (*req.options, *CUPY_OPTIONS, f"-arch={arch}")
    out = nvrtc.compile(req, options)
    assert out.binary.startswith(b"\x7fELF"), "NVRTC returned no cubin"
    assert set(out.lowered) == set(req.name_expressions)
    for symbol in sorted(symbols):
        name = out.lowered[symbol] if is_name_expression(symbol) else symbol
        if is_name_expression(symbol):
            assert name.startswith("_Z"), f"{symbol} lowered to {name!r}"
        # The ELF string table holds each kernel's name between NULs.
        assert b"\0" + name.encode() + b"\0" in out.binary, f"{symbol} ({name}) not in the cubin"
