"""The CPU emulator: runs the HIP kernel sources in ``kernels/`` without a GPU.

`EmulatorModule` and `EmulatedKernel` mirror ``cupy.RawModule`` and ``cupy.RawKernel`` so the
launcher can treat both targets alike::

    mod = EmulatorModule(path="kernels/rmsnorm.hip", options=("-DBLOCK=256",),
                         name_expressions=("rmsnorm<256>",), warp_size=64)
    kern = mod.get_function("rmsnorm<256>")
    kern((rows,), (256,), (x, w, out, np.int32(cols), np.float32(eps)), shared_mem=0)

Arguments are NumPy arrays (passed as device pointers: their data address; they must be
C-contiguous) and NumPy scalars (passed by value with their exact C type). Like CuPy, a Python
``int`` is an int64 and a ``float`` a float64; the emulator knows each kernel's parameter types
and refuses a mismatch instead of letting the kernel read garbage.

How it works: the source is compiled by the host C++ compiler against ``kernels/emulator/
wb_emu.h`` into a shared object with one launch trampoline per kernel (the extern "C" kernels
found by preprocessing the source, plus the name expressions). The trampolines hand the kernel
to the emulator runtime (``kernels/emulator/wb_emu_runtime.cpp``, built once per cache), which
runs every GPU thread as a fiber: Boost.Context's fcontext when available (tens of nanoseconds
a switch), glibc's ucontext otherwise (a system call per switch, ten times slower or more). Which
one ran is `EmulatorModule.fiber`. Shared objects are cached by a hash of everything that shapes
them (preprocessed source, options, name expressions, emulator headers, compiler version).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import BackendError, InternalError, RecoverableError, UserError
from workbench.kernels import emulator_memory as guard
from workbench.kernels.emulator_args import (
    _DTYPES,
    _MAX_BLOCK,
    _MAX_GRID,
    _SCALAR_FORMATS,
    _c_name,
    _dims,
    _Param,
    _params,
)
from workbench.kernels.emulator_build import (
    _COMPILE_FLAGS,
    _LOG_LIMIT,
    _RUNTIME_FLAGS,
    _atomic_write,
    _build_so,
    _discover_kernels,
    _errors,
    _hip_shim,
    _parse_options,
    _run_compiler,
    _sha256,
    _Toolchain,
    _toolchain,
    _trampoline,
)
from workbench.kernels.emulator_instrument import (
    COUNTERS_FLAG,
    IGNORE_LIST,
    INSTRUMENT_FLAGS,
    TOOL_FLAGS,
    Buffer,
    Instr,
    LineTable,
    bind_results,
    build_report,
    find_clang,
    read_results,
)
from workbench.kernels.instrument import DEFAULT_TARGET, KernelReport, check_tools, target_spec
from workbench.kernels.registry import kernels_dir

# Bump when the generated wrapper or the compile flags change in a way the hashed inputs miss.
EMULATOR_VERSION = "2"

FIBERS = ("fcontext", "ucontext")
SCHEDULES = ("fixed", "random")
# Read-only arguments up to this size are staged too in instrumented runs (their out-of-bounds
# reads then return poison); larger ones (model weights) are watched in place.
_STAGE_READONLY_BYTES = 64 << 20
WARP_SIZES = (32, 64)
MAX_THREADS = 8  # default cap on OS threads running blocks
# This process's default for modules built without ``threads`` (None: the CPU count, at most
# MAX_THREADS); `set_default_threads` changes it, e.g. in one of several sweep workers that
# share the CPUs.
_default_threads: int | None = None


def set_default_threads(threads: int | None) -> None:
    """OS threads that modules built from now on without ``threads`` run blocks on (None: the
    CPU count, at most `MAX_THREADS`)."""
    global _default_threads
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError("kernel.bad_option", f"threads must be a positive int, not {threads!r}")
    _default_threads = threads


# --- where things are -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``<workbench home>/emulator``: the home is ``$WORKBENCH_HOME`` or the platform cache dir."""
    from workbench.store import default_home  # the one function that reads WORKBENCH_HOME

    return default_home() / "emulator"


# --- the runtime (fibers, scheduler), one per fiber kind and cache ------------------------------


class _ApiHead(ctypes.Structure):
    _fields_ = (
        ("abi_version", ctypes.c_uint32),
        ("stack_bytes", ctypes.c_uint32),
        ("fiber_name", ctypes.c_char_p),
    )


@dataclass(frozen=True)
class _Runtime:
    fiber: str
    path: Path
    lib: ctypes.CDLL
    api: int  # address of the runtime's Api table, passed to every launch
    note: str  # why "auto" fell back to ucontext ("" otherwise)


_runtimes: dict[tuple[str, str, str], _Runtime] = {}
_runtime_lock = threading.Lock()


def _runtime(tc: _Toolchain, fiber: str, cache_dir: Path) -> _Runtime:
    with _runtime_lock:
        key = (tc.path, fiber, str(cache_dir))
        if key not in _runtimes:
            if fiber == "auto":
                try:
                    rt = _load_runtime(tc, "fcontext", cache_dir)
                except BackendError as e:
                    rt = _load_runtime(tc, "ucontext", cache_dir)
                    rt = _Runtime(rt.fiber, rt.path, rt.lib, rt.api, f"fcontext unavailable: {e}")
            else:
                rt = _load_runtime(tc, fiber, cache_dir)
            _runtimes[key] = rt
        return _runtimes[key]


def _load_runtime(tc: _Toolchain, fiber: str, cache_dir: Path) -> _Runtime:
    emu = kernels_dir() / "emulator"
    source = emu / "wb_emu_runtime.cpp"
    flags = [*_RUNTIME_FLAGS, f"-DWB_EMU_FIBER_{fiber.upper()}=1", f"-I{emu}"]
    libs = ["-lboost_context"] if fiber == "fcontext" else []
    digest = _sha256(
        EMULATOR_VERSION,
        tc.version,
        json.dumps(flags + libs),
        source.read_bytes(),
        (emu / "wb_emu_abi.h").read_bytes(),
        (emu / "wb_emu_instr.h").read_bytes(),
    )
    path = cache_dir / f"runtime-{fiber}-{digest[:24]}.so"
    try:
        if not path.exists():
            _build_so([tc.path, *flags], source, path, libs)
        lib = ctypes.CDLL(str(path))
    except (BackendError, OSError) as e:
        log = e.context.get("log", "") if isinstance(e, BackendError) else str(e)
        if fiber == "fcontext":
            raise BackendError(
                "backend.fiber_unavailable",
                "Boost.Context fibers are unavailable (on Debian/Ubuntu: apt-get install "
                "libboost-context-dev); " + (log.strip().splitlines() or ["no compiler output"])[0],
                fiber=fiber,
                log=log[-_LOG_LIMIT:],
            ) from e
        raise
    get_api = lib.wb_emu_runtime_api
    get_api.restype = ctypes.c_void_p
    api = get_api()
    head = _ApiHead.from_address(api)
    name = head.fiber_name.decode()
    bind_results(lib)
    if name != fiber:
        raise InternalError(
            "internal.emulator_runtime", f"runtime {path} reports fiber {name!r}, not {fiber!r}"
        )
    return _Runtime(fiber, path, lib, api, "")


# --- ctypes mirrors of wb_emu_abi.h -------------------------------------------------------------


class _Dim3(ctypes.Structure):
    _fields_ = (("x", ctypes.c_uint32), ("y", ctypes.c_uint32), ("z", ctypes.c_uint32))


class _LaunchDesc(ctypes.Structure):
    _fields_ = (
        ("grid", _Dim3),
        ("block", _Dim3),
        ("warp_size", ctypes.c_uint32),
        ("workers", ctypes.c_uint32),
        ("shared_bytes", ctypes.c_size_t),
        ("kernel_name", ctypes.c_char_p),
        ("schedule", ctypes.c_uint32),
        ("seed", ctypes.c_uint64),
        ("instr", ctypes.c_void_p),
    )


class _ErrorInfo(ctypes.Structure):
    _fields_ = (
        ("kind", ctypes.c_int),
        ("has_thread", ctypes.c_int),
        ("block", _Dim3),
        ("thread", _Dim3),
        ("message", ctypes.c_char * 4096),
    )


_LAUNCH_ARGTYPES = (
    ctypes.c_void_p,
    ctypes.POINTER(_LaunchDesc),
    ctypes.c_void_p,
    ctypes.POINTER(_ErrorInfo),
)

# ErrorKind in wb_emu_abi.h -> error code (kinds 5-7 are mapped in EmulatedKernel._launch_error)
_KERNEL_ERRORS = {
    1: "kernel.deadlock",
    2: "kernel.divergence",
    3: "kernel.trap",
    4: "kernel.fault",
}


class KernelError(InternalError):
    """An emulated kernel deadlocked, diverged at a barrier, trapped or faulted.

    A bug in kernel code, reported with the block (and, where one thread is to blame, the
    thread) in ``context["block_idx"]`` / ``context["thread_idx"]``. Internal because the
    workbench's own kernels run here; tools for kernel authors present it as their bug.
    """


class KernelBoundsError(KernelError):
    """A kernel wrote outside a buffer argument (caught by the guard zones, or stopped by an
    instrumented run): the kernel author's bug, so a user error; the process carries on."""

    category = "user"


# --- modules and kernels ----------------------------------------------------------------------


class EmulatorModule:
    """A kernel source compiled for the CPU emulator; the counterpart of ``cupy.RawModule``.

    ``code`` or ``path`` is the source. ``options`` take ``-DNAME[=VAL]``, ``-UNAME`` and
    ``-IDIR`` (GPU-only options are ignored). ``name_expressions`` name template instances
    (``"rmsnorm<256>"``) to make available through `get_function`, beside every non-template
    kernel found in the source. ``warp_size`` (32 or 64) is the warp width shuffles and votes
    run with. ``fiber`` picks the context switch: ``"auto"`` (fcontext when Boost.Context is
    installed, else ucontext), ``"fcontext"`` or ``"ucontext"``. ``threads`` is the number of OS
    threads running blocks in parallel (default: the CPU count, at most 8). ``cache_dir``
    defaults to `default_cache_dir`; ``compiler`` to the first of c++, g++, clang++ on PATH.

    Instrumented runs: ``tools`` (any of ``instrument.TOOLS``: memcheck, racecheck, initcheck,
    synccheck) and ``counters=True`` (per-line memory traffic modelled on ``target``, a key of
    ``instrument.TARGETS``) build a separate instrumented variant with clang (see
    `workbench.kernels.emulator_instrument`); each launch then leaves a `KernelReport` in
    ``kernel.last_report``. ``schedule="random"`` runs a block's ready threads in an order drawn
    from ``seed`` instead of round-robin.

    ``arch`` (an AMD target such as ``"gfx90a"``) compiles the source as hipcc does for that
    target as far as the preprocessor goes: ``__gfx90a__`` is defined, so its architecture-specific
    branches (wb.h's ``WB_HAS_MFMA``: the matrix-core builtins, which need ``warp_size=64``) are
    the ones emulated. ``None`` (the default) emulates no particular architecture.

    Attributes: ``fiber`` (the implementation in use), ``fiber_note`` (why auto fell back),
    ``so_path`` (the compiled module), ``cache_hit`` (True when it came from the cache),
    ``kernel_names``.
    """

    def __init__(
        self,
        code: str | None = None,
        *,
        path: str | Path | None = None,
        options: tuple[str, ...] = (),
        name_expressions: Sequence[str] | None = None,
        include_dirs: Sequence[str | Path] = (),
        warp_size: int = 32,
        cache_dir: str | Path | None = None,
        compiler: str | None = None,
        fiber: str = "auto",
        threads: int | None = None,
        tools: Sequence[str] = (),
        counters: bool = False,
        target: str = DEFAULT_TARGET,
        schedule: str = "fixed",
        seed: int | None = None,
        arch: str | None = None,
    ) -> None:
        if (code is None) == (path is None):
            raise UserError("kernel.bad_source", "give exactly one of code= and path=")
        if warp_size not in WARP_SIZES:
            raise UserError("kernel.bad_launch", f"warp_size must be 32 or 64, not {warp_size!r}")
        if fiber not in ("auto", *FIBERS):
            raise UserError(
                "kernel.bad_option",
                f"fiber must be 'auto', 'fcontext' or 'ucontext', not {fiber!r}",
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UserError("kernel.bad_option", f"threads must be a positive int, not {threads!r}")
        if schedule not in SCHEDULES:
            raise UserError(
                "kernel.bad_option", f"schedule must be 'fixed' or 'random', not {schedule!r}"
            )
        self.tools = check_tools(tools)
        self.counters = bool(counters)
        self.target = target_spec(target)
        self.instrumented = bool(self.tools) or self.counters
        self.schedule = schedule
        self.seed = 0 if seed is None else int(seed)
        self.warp_size = warp_size
        self.threads = threads or _default_threads or max(1, min(os.cpu_count() or 1, MAX_THREADS))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)

        defines, includes = _parse_options(options)
        if arch is not None:
            if not re.fullmatch(r"gfx[0-9a-f]{3,4}", arch):
                raise UserError(
                    "user.bad_target",
                    f"arch must be an AMD target such as 'gfx90a' or 'gfx942', not {arch!r}",
                )
            defines.append(f"-D__{arch}__=1")  # what hipcc predefines for the target
        self.arch = arch
        tc = _toolchain(compiler)
        self._runtime = _runtime(tc, fiber, self.cache_dir)
        self.fiber = self._runtime.fiber
        self.fiber_note = self._runtime.note

        if code is not None:
            src_dir = self.cache_dir / "src"
            src_dir.mkdir(exist_ok=True)
            source = src_dir / f"{_sha256(code)[:24]}.hip"
            if not source.exists():
                _atomic_write(source, code)
        else:
            source = Path(path).expanduser().resolve()  # type: ignore[arg-type]
            if not source.is_file():
                raise UserError("kernel.bad_source", f"kernel source {source} does not exist")
        self.source = source

        includes += ["-I" + str(Path(d).expanduser().resolve()) for d in include_dirs]
        kdir = kernels_dir()
        search = [f"-I{_hip_shim(self.cache_dir)}", f"-I{kdir / 'emulator'}", f"-I{kdir}",
                  *includes]  # fmt: skip
        prelude = f'#include "wb_emu.h"\n#include "{source}"\n'

        # Discovery: preprocess (no system headers: fast) to find the kernels; the preprocessed
        # text is also what the cache key hashes, so edits to any included header count.
        pre_cmd = [tc.path, "-E", "-P", "-x", "c++", "-std=c++17", "-DWB_EMULATOR=1",
                   "-DWB_EMU_DISCOVERY=1", *defines, *search, "-"]  # fmt: skip
        proc = _run_compiler(pre_cmd, stdin=prelude)
        if proc.returncode != 0:
            raise self._compile_error(proc.stdout + proc.stderr, " ".join(pre_cmd), {})
        names = _discover_kernels(proc.stdout)
        names += [e for e in (name_expressions or ()) if e not in names]
        if not names:
            raise UserError(
                "kernel.not_found",
                f'{source} defines no extern "C" __global__ kernel and no name_expressions '
                "were given",
            )
        self.kernel_names = tuple(names)

        emu = kdir / "emulator"
        flags = [*_COMPILE_FLAGS, *defines, *search]
        build_tc = tc
        if self.instrumented:
            build_tc = _toolchain(find_clang())
            ignore = self.cache_dir / f"sancov-ignore-{_sha256(IGNORE_LIST)[:16]}.txt"
            if not ignore.exists():
                _atomic_write(ignore, IGNORE_LIST)
            flags += [*INSTRUMENT_FLAGS, f"-fsanitize-coverage-ignorelist={ignore}"]
        digest = _sha256(
            EMULATOR_VERSION,
            build_tc.version,
            json.dumps(flags),
            json.dumps(names),
            proc.stdout,
            (emu / "wb_emu.h").read_bytes(),
            (emu / "wb_emu_abi.h").read_bytes(),
            (emu / "wb_emu_mfma.h").read_bytes(),
        )
        self.so_path = self.cache_dir / f"module-{digest[:32]}.so"
        self.cache_hit = self.so_path.exists()
        if not self.cache_hit:
            wrapper = self.cache_dir / f"module-{digest[:32]}.cpp"
            text = prelude + "\n" + "".join(_trampoline(i, n) for i, n in enumerate(names))
            _atomic_write(wrapper, text)
            try:
                _build_so([build_tc.path, *flags], wrapper, self.so_path)
            except BackendError as e:
                raise self._compile_error(
                    e.context.get("log", ""), e.context.get("command", ""), {str(wrapper): text}
                ) from None
        try:
            self._lib = ctypes.CDLL(str(self.so_path))
        except OSError as e:
            raise BackendError(
                "backend.load_failed", f"loading the emulated module {self.so_path} failed: {e}"
            ) from e
        self._kernels: dict[str, EmulatedKernel] = {}
        self._ranges_fn = 0
        self._lines: LineTable | None = None
        if self.instrumented:
            self._ranges_fn = ctypes.cast(self._lib.wb_emu_module_ranges, ctypes.c_void_p).value
            self._lines = LineTable(self.so_path, (emu,))

    def source_lines(self, file: str | Path) -> list[str]:
        """The text lines of ``file`` (a `Finding`'s or `LineCounters`' file), for display."""
        return Path(file).read_text(errors="replace").splitlines()

    def _compile_error(self, log: str, command: str, extra: dict[str, str]) -> BackendError:
        errors = _errors(log, extra)
        detail = "\n".join(
            f"  {error}\n      {code.split(': ', 1)[1]}" for error, code in errors[:5]
        )
        if any(code.startswith(tuple(extra)) for _, code in errors):
            detail += "\n  (in a launch trampoline: is every name expression a kernel template?)"
        return BackendError(
            "backend.compile_failed",
            f"the emulator could not compile {self.source}:\n{detail or log.strip()[-2000:]}",
            kernel_source=str(self.source),
            command=command,
            log=log[-_LOG_LIMIT:],
            source_lines=[code for _, code in errors],
        )

    def get_function(self, name: str) -> EmulatedKernel:
        """The kernel ``name``: an extern "C" symbol or one of the name expressions."""
        if name not in self._kernels:
            if name not in self.kernel_names:
                raise UserError(
                    "kernel.not_found",
                    f"no kernel {name!r} in {self.source} (available: "
                    f"{', '.join(self.kernel_names)}; templates need name_expressions)",
                    kernel=name,
                )
            self._kernels[name] = EmulatedKernel(self, name, self.kernel_names.index(name))
        return self._kernels[name]

    def __repr__(self) -> str:
        return (
            f"EmulatorModule({self.source.name}, kernels={list(self.kernel_names)}, "
            f"warp_size={self.warp_size}, fiber={self.fiber!r}, arch={self.arch!r})"
        )


class EmulatedKernel:
    """One kernel of an `EmulatorModule`; the counterpart of ``cupy.RawKernel``.

    ``param_types`` lists the C types of the kernel's parameters, as the compiler saw them.
    """

    def __init__(self, module: EmulatorModule, name: str, index: int) -> None:
        self.module = module
        self.name = name
        self.fiber = module.fiber
        self.warp_size = module.warp_size
        lib = module._lib
        sig = getattr(lib, f"wb_emu_signature_{index}")
        sig.restype = ctypes.c_int
        sig.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
        buf = ctypes.create_string_buffer(4096)
        sig(buf, len(buf))
        self._codes = tuple(c for c in buf.value.decode().split(",") if c)
        self.param_types = tuple(_c_name(c) for c in self._codes)
        self._params, self._arg_bytes = _params(self._codes)
        self._launch = getattr(lib, f"wb_emu_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = _LAUNCH_ARGTYPES
        self._cname = name.encode()
        self.last_report: KernelReport | None = None

    def __repr__(self) -> str:
        return f"EmulatedKernel({self.name}({', '.join(self.param_types)}), fiber={self.fiber!r})"

    def __call__(
        self,
        grid: tuple[int, ...] | int,
        block: tuple[int, ...] | int,
        args: tuple | list,
        *,
        shared_mem: int = 0,
        stream: object | None = None,
    ) -> None:
        """Run the kernel to completion (``stream`` is accepted for CuPy parity and ignored)."""
        g = _dims(grid, "grid", _MAX_GRID)
        b = _dims(block, "block", _MAX_BLOCK)
        if b[0] * b[1] * b[2] > 1024:
            raise UserError(
                "kernel.bad_launch",
                f"block {b} has {b[0] * b[1] * b[2]} threads; a block has at most 1024",
                kernel=self.name,
            )
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise UserError(
                "kernel.bad_launch", f"shared_mem must be a byte count >= 0, not {shared_mem!r}"
            )
        if not isinstance(args, (tuple, list)):
            raise UserError("kernel.bad_args", f"args must be a tuple, not {type(args).__name__}")
        if len(args) != len(self._params):
            raise UserError(
                "kernel.bad_args",
                f"{self.name} takes {len(self._params)} arguments "
                f"({', '.join(self.param_types)}), {len(args)} given",
                kernel=self.name,
            )
        buf = ctypes.create_string_buffer(self._arg_bytes)
        for p, a in zip(self._params, args):
            self._pack(buf, p, a)
        mod = self.module
        staged: list[guard.Staged] = []
        try:
            buffers = self._stage(buf, args, staged)
            desc = _LaunchDesc(
                _Dim3(*g), _Dim3(*b), self.warp_size, mod.threads, int(shared_mem), self._cname,
                int(mod.schedule == "random"), mod.seed & (2**64 - 1), None,
            )  # fmt: skip
            rt = mod._runtime.lib
            handle = rt.wb_emu_results_new() if mod.instrumented else None
            try:
                if mod.instrumented:
                    instr = self._instr(buffers, handle)
                    desc.instr = ctypes.addressof(instr)
                base = ctypes.addressof(buf)
                argv = (ctypes.c_void_p * max(1, len(self._params)))(
                    *[base + p.offset for p in self._params]
                )
                err = _ErrorInfo()
                rc = self._launch(mod._runtime.api, ctypes.byref(desc), argv, ctypes.byref(err))
                if mod.instrumented:
                    self.last_report = self._report(handle, buffers)
            finally:
                if handle is not None:
                    rt.wb_emu_results_free(handle)
            damage = [(s, d) for s in staged if (d := s.damage()) is not None]
            if rc != 0:
                raise self._launch_error(err, g, b, int(shared_mem), staged)
            if damage and not mod.instrumented:  # instrumented: the findings tell it all
                raise self._guard_error(damage, g, b)
        finally:
            for s in staged:
                s.finish()

    def _stage(
        self, buf: ctypes.Array, args: Sequence[Any], staged: list[guard.Staged]
    ) -> list[tuple[int, int, int, int, int]]:
        """Swap guarded copies in for the arguments that need them (see emulator_memory);
        returns (base, size, lo, hi, arg) of every pointer argument, staged or not.

        An array passed twice shares one copy (an in-place operation must read its own writes);
        arguments that partly overlap another are passed in place, unguarded."""
        ptrs = [(p, a) for p, a in zip(self._params, args) if p.code.startswith("p:")]
        spans = [(a.ctypes.data, a.ctypes.data + a.nbytes) for _, a in ptrs]
        by_span: dict[tuple[int, int], guard.Staged] = {}
        out = []
        for (p, a), span in zip(ptrs, spans):
            partial = any(
                o != span and o[0] < span[1] and span[0] < o[1] for o in spans if o[1] > o[0]
            )
            same = [(q, b) for (q, b), o in zip(ptrs, spans) if o == span]
            writable = any(not q.const and b.flags.writeable for q, b in same)
            small = a.nbytes <= _STAGE_READONLY_BYTES
            if span in by_span:
                s = by_span[span]
            elif not partial and (writable or (self.module.instrumented and small)):
                s = guard.stage(a, p.index, copy_back=writable)
                staged.append(s)
                by_span[span] = s
            else:
                out.append((span[0], a.nbytes, span[0], span[1], p.index))
                continue
            struct.pack_into("P", buf, p.offset, s.base)
            out.append((s.base, s.size, s.lo, s.hi, p.index))
        return out

    def _instr(self, buffers: list[tuple[int, int, int, int, int]], handle: int) -> Instr:
        mod = self.module
        flags = sum(TOOL_FLAGS[t] for t in mod.tools) | (COUNTERS_FLAG if mod.counters else 0)
        arr = (Buffer * max(1, len(buffers)))(*[Buffer(*x) for x in buffers])
        instr = Instr(
            flags, mod.target.segment_bytes, mod.target.shared_banks, mod.target.bank_bytes,
            arr, len(buffers), mod._ranges_fn, handle,
        )  # fmt: skip
        instr._keep = arr  # type: ignore[attr-defined]
        return instr

    def _report(self, handle: int, buffers: list[tuple[int, int, int, int, int]]) -> KernelReport:
        mod = self.module
        sites, raw = read_results(mod._runtime.lib, handle)
        assert mod._lines is not None
        return build_report(
            self.name, mod.target, self.warp_size, mod.tools, mod.counters, sites, raw,
            mod._lines, self.param_types, {x[4]: x[1] for x in buffers},
        )  # fmt: skip

    def _guard_error(
        self, damage: list[tuple[guard.Staged, tuple[int, int]]], grid: tuple, block: tuple
    ) -> KernelBoundsError:
        parts = []
        for s, (first, last) in damage:
            arg = s.arg
            n = s.size
            if first >= n:
                where = f"{first - n} to {last - n} bytes past the end"
            elif last < 0:
                where = f"{-first} to {-last} bytes before the start"
            else:
                where = f"from {-first} bytes before the start to {last - n} bytes past the end"
            parts.append(
                f"argument {arg} ({self.param_types[arg]}, {s.size} bytes): written {where}"
            )
        return KernelBoundsError(
            "kernel.out_of_bounds",
            f"kernel {self.name} wrote outside its buffers: {'; '.join(parts)}. The buffers "
            "were guarded, nothing else was touched; run it with tools=('memcheck',) to see "
            "the line, block and thread (a missing `if (i < n)`?)",
            kernel=self.name,
            grid=grid,
            block=block,
            warp_size=self.warp_size,
        )

    def _pack(self, buf: ctypes.Array, p: _Param, a: Any) -> None:
        where = f"argument {p.index} of {self.name} ({_c_name(p.code)})"
        if p.code.startswith("p:"):
            if not isinstance(a, np.ndarray):
                raise UserError(
                    "kernel.bad_args",
                    f"{where} must be a NumPy array, not {type(a).__name__}",
                    kernel=self.name,
                )
            if not a.flags.c_contiguous:
                raise UserError(
                    "kernel.bad_args",
                    f"{where} is not C-contiguous (shape {a.shape}, strides {a.strides}); "
                    "pass np.ascontiguousarray(...)",
                    kernel=self.name,
                )
            pointee = p.code[2:]
            if pointee in ("f32", "f64") and a.dtype.kind == "f" and a.dtype != _DTYPES[pointee]:
                raise UserError(
                    "kernel.bad_args",
                    f"{where} points at {_c_name(pointee)} but the array holds {a.dtype}",
                    kernel=self.name,
                )
            struct.pack_into("P", buf, p.offset, a.ctypes.data)
        elif p.code in _SCALAR_FORMATS:
            value = self._scalar(p, a, where)
            struct.pack_into(_SCALAR_FORMATS[p.code], buf, p.offset, value)
        else:
            raw = a.tobytes() if isinstance(a, np.generic) else a
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != p.size:
                raise UserError(
                    "kernel.bad_args",
                    f"{where} takes {p.size} bytes (a NumPy structured scalar or bytes)",
                    kernel=self.name,
                )
            ctypes.memmove(ctypes.addressof(buf) + p.offset, bytes(raw), p.size)

    def _scalar(self, p: _Param, a: Any, where: str) -> Any:
        want = _DTYPES[p.code]
        # CuPy passes Python scalars as int64 / float64 / bool: accept them only where they fit.
        if isinstance(a, bool) and not isinstance(a, np.generic):
            given = np.dtype(np.bool_)
        elif isinstance(a, int) and not isinstance(a, np.generic):
            given = np.dtype(np.int64)
        elif isinstance(a, float) and not isinstance(a, np.generic):
            given = np.dtype(np.float64)
        elif isinstance(a, np.generic):
            given = a.dtype
        else:
            raise UserError(
                "kernel.bad_args",
                f"{where} must be a NumPy scalar such as np.{want.name}(...), "
                f"not {type(a).__name__}",
                kernel=self.name,
            )
        if given != want:
            raise UserError(
                "kernel.bad_args",
                f"{where} was given a {given} value; pass np.{want.name}(...) so the kernel "
                "receives exactly the bytes it expects",
                kernel=self.name,
            )
        return a.item() if isinstance(a, np.generic) else a

    def _launch_error(
        self,
        err: _ErrorInfo,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        shared: int,
        staged: Sequence[guard.Staged] = (),
    ) -> Exception:
        message = err.message.decode(errors="replace")
        where = f" [emulator: {self.fiber} fibers, warp size {self.warp_size}]"
        ctx: dict[str, Any] = {
            "kernel": self.name,
            "grid": grid,
            "block": block,
            "shared_mem": shared,
            "warp_size": self.warp_size,
            "fiber": self.fiber,
        }
        if err.kind in _KERNEL_ERRORS or err.kind == 8:
            ctx["block_idx"] = (err.block.x, err.block.y, err.block.z)
            if err.has_thread:
                ctx["thread_idx"] = (err.thread.x, err.thread.y, err.thread.z)
            if self.last_report is not None:
                ctx["report"] = self.last_report
            fault = re.search(r"at address (0x[0-9a-f]+)", message)
            owner = guard.owner_of(list(staged), int(fault.group(1), 16)) if fault else None
            if err.kind == 8 or owner is not None:
                if owner is not None:
                    ctx["arg"] = owner.arg
                    message += (
                        f" (in the guard page of argument {owner.arg}, "
                        f"{self.param_types[owner.arg]}, {owner.size} bytes: an index past its "
                        "end; run with tools=('memcheck',) to see the line)"
                    )
                lines = [f for f in (self.last_report.findings if self.last_report else [])
                         if f.kind == "out_of_bounds_write"]  # fmt: skip
                if lines:
                    message += f"; {lines[0].message}"
                return KernelBoundsError("kernel.out_of_bounds", message + where, **ctx)
            return KernelError(_KERNEL_ERRORS[err.kind], message + where, **ctx)
        if err.kind == 5:
            return UserError("kernel.bad_launch", message, **ctx)
        if err.kind == 6:
            return RecoverableError("kernel.out_of_memory", message + where, **ctx)
        return InternalError(
            "internal.emulator", f"{message}{where} (error kind {err.kind})", **ctx
        )
