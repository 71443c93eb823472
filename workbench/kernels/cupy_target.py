"""The CuPy target: a kernel source compiled for the GPU and loaded as a `CupyModule`.

CuPy compiles with hiprtc on ROCm and NVRTC on CUDA (it picks the one its build targets). This
module decides what is compiled (`compile_request`: the source, its options and name
expressions) and keeps what was compiled:

- Every cache is keyed by the headers too. CuPy's own disk cache hashes the source text and the
  options but not the files the source includes (``wb.h``, ``quant.h``), so a digest of every
  header the source includes, transitively, is passed as ``-DWB_HEADERS_SHA=<digest>``: a changed
  header changes the options, so no cache (CuPy's or ours) can hand back a stale binary.
- CuPy on ROCm does not disk-cache modules built with name expressions (it must recompile to
  learn the lowered names), so every process would rebuild every template instance through
  hiprtc. We keep our own on-disk cache of code objects: the binary (``.hsaco`` / ``.cubin``)
  and the lowered names, keyed by source, headers, options, name expressions, the device's
  architecture and the compiler's version, loaded with ``cupy.RawModule(path=...)``. Where this
  CuPy lacks the compiler entry points it needs, modules are built by ``RawModule(code=...)``.
- Compiled modules stay in-process per device, and each module keeps its function handles (no
  ``get_function`` per launch).

A ``CompileException`` becomes ``backend.compile_failed`` with the compiler log and the numbered
source lines around each error. CuPy is imported only when used: without it, `load_module`
raises ``backend.unavailable``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import BackendError
from workbench.kernels.registry import KernelSpec, all_kernels, kernels_dir
from workbench.kernels.toolchain import format_compile_log

INSTALL_HINT = "CuPy is not installed: pip install rocm-workbench[rocm] or [cuda]"
HEADERS_DEFINE = "WB_HEADERS_SHA"
_LOG_LIMIT = 20_000
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)
# Bump when the layout of a disk-cache entry changes: old entries are then never read.
_DISK_FORMAT = 1

_modules: dict[tuple, CupyModule] = {}
_lock = threading.Lock()


def import_cupy() -> Any:
    """The cupy module, or backend.unavailable with the install command."""
    try:
        return importlib.import_module("cupy")
    except ImportError as e:
        raise BackendError("backend.unavailable", INSTALL_HINT) from e


def is_name_expression(symbol: str) -> bool:
    """True for a C++ name expression (``dequant<WB_Q4_1>``), False for an extern "C" name."""
    return _IDENTIFIER.fullmatch(symbol) is None


def spec_name_expressions(spec: KernelSpec) -> tuple[str, ...]:
    """Name expressions to compile with ``spec``'s source: those of every registered kernel that
    shares its source and defines, so one module serves them all."""
    siblings = [
        s.symbol
        for s in all_kernels().values()
        if s.source == spec.source and s.options == spec.options
    ]
    exprs = {sym for sym in (*siblings, spec.symbol) if is_name_expression(sym)}
    return tuple(sorted(exprs))


# --- what is compiled ------------------------------------------------------------------------


def included_headers(code: str, include_dirs: Sequence[Path]) -> list[Path]:
    """The files ``code`` includes with ``#include "..."``, transitively, found in
    ``include_dirs`` (an includer's own directory first, as compilers search). Sorted."""
    found: dict[Path, None] = {}
    stack: list[tuple[str, Path | None]] = [(code, None)]
    while stack:
        text, here = stack.pop()
        for name in _QUOTED_INCLUDE.findall(text):
            dirs = ([here] if here is not None else []) + list(include_dirs)
            path = next((d / name for d in dirs if (d / name).is_file()), None)
            if path is None or path.resolve() in found:
                continue  # not ours (the compiler will say if it is missing), or seen
            found[path.resolve()] = None
            stack.append((path.read_text(), path.resolve().parent))
    return sorted(found)


def headers_digest(code: str, include_dirs: Sequence[Path]) -> str:
    """A digest of every header ``code`` includes (names and contents)."""
    h = hashlib.sha256()
    for path in included_headers(code, include_dirs):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CompileRequest:
    """One module to compile: exactly what is handed to CuPy (and to NVRTC in the tests)."""

    code: str
    options: tuple[str, ...]  # defines, -I of wb.h, -DWB_HEADERS_SHA=<digest of the headers>
    name_expressions: tuple[str, ...]  # template instances; () when all entries are extern "C"
    label: str  # the source file, for messages

    @property
    def digest(self) -> str:
        """Hash of the source, options (so the headers) and name expressions."""
        h = hashlib.sha256(self.code.encode())
        for part in (*self.options, "\0", *self.name_expressions):
            h.update(b"\0" + part.encode())
        return h.hexdigest()


def compile_request(
    spec_or_source: KernelSpec | str | Path,
    *,
    options: Sequence[str] = (),
    name_expressions: Sequence[str] | None = None,
) -> CompileRequest:
    """The module for a registry kernel, source text (``str``) or file (``Path``): the spec's
    defines and template instances plus ``options`` and ``name_expressions``, the include
    directory of wb.h, and the digest of the included headers."""
    if isinstance(spec_or_source, KernelSpec):
        spec = spec_or_source
        code = spec.path.read_text()
        opts = [*spec.options, *options]
        exprs = [*spec_name_expressions(spec), *(name_expressions or ())]
        label, here = str(spec.path), spec.path.parent
    elif isinstance(spec_or_source, Path):
        code = spec_or_source.read_text()
        opts, exprs = list(options), list(name_expressions or ())
        label, here = str(spec_or_source), spec_or_source.parent
    else:
        code = spec_or_source
        opts, exprs, label, here = list(options), list(name_expressions or ()), "<source>", None
    include = f"-I{kernels_dir()}"
    if include not in opts:
        opts.append(include)
    dirs = ([here] if here is not None else []) + [Path(o[2:]) for o in opts if o.startswith("-I")]
    opts = [o for o in opts if not o.startswith(f"-D{HEADERS_DEFINE}=")]
    opts.append(f"-D{HEADERS_DEFINE}={headers_digest(code, dirs)}")
    # Sorted: the order of name expressions changes nothing in the module, so requests that differ
    # only there are one module (one compile, one cache entry).
    return CompileRequest(code, tuple(opts), tuple(sorted(set(exprs))), label)


def module_key(
    code: str, options: Sequence[str], name_expressions: Sequence[str], device: Any = None
) -> tuple:
    """The in-process cache key: a hash of the source, the options (which carry the headers'
    digest), the name expressions, and the device (a module belongs to the device it was
    loaded on)."""
    req = CompileRequest(code, tuple(options), tuple(name_expressions), "")
    return (req.digest, device)


# --- modules ---------------------------------------------------------------------------------


class CupyModule:
    """A loaded module: ``get_function(name)`` for an extern "C" name or a name expression,
    each handle looked up once."""

    def __init__(self, raw: Any, lowered: dict[str, str] | None = None) -> None:
        self.raw = raw  # the cupy.RawModule
        self.lowered = dict(lowered or {})  # name expression -> lowered (mangled) name
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get_function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            with self._lock:
                fn = self._functions.get(name)
                if fn is None:
                    fn = self.raw.get_function(self.lowered.get(name, name))
                    self._functions[name] = fn
        return fn


def default_cache_dir() -> Path:
    """``<workbench home>/gpu``: the home is ``$WORKBENCH_HOME`` or the platform cache dir."""
    from workbench.store import default_home  # the one function that reads WORKBENCH_HOME

    return default_home() / "gpu"


def load_module(
    spec_or_source: KernelSpec | str | Path,
    *,
    options: Sequence[str] = (),
    name_expressions: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> CupyModule:
    """A compiled module for a registry kernel, source text (``str``) or file (``Path``) (see
    `compile_request`). Compiles now, not at the first launch, so a compile error surfaces here
    as ``backend.compile_failed``. ``cache_dir``: our code-object cache (default
    `default_cache_dir`)."""
    req = compile_request(spec_or_source, options=options, name_expressions=name_expressions)
    cupy = import_cupy()
    key = (req.digest, _device_id(cupy))
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = _build(cupy, req, Path(cache_dir) if cache_dir else None)
            _modules[key] = module
        return module


def clear_cache() -> None:
    """Forget the in-process modules (the disk caches stay)."""
    with _lock:
        _modules.clear()


def warp_size(cupy: Any) -> int:
    """The current device's warp (wavefront) width, from its properties: 64 on CDNA, 32 on
    RDNA and NVIDIA. (``Device().attributes`` would query every attribute and fail on any.)"""
    return int(cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["warpSize"])


def device_arch(cupy: Any) -> str:
    """The current device's architecture as the compilers name it: ``gfx90a`` (gcnArchName
    without its feature flags such as ``:sramecc+:xnack-``) on ROCm, ``sm_90`` on CUDA."""
    runtime = cupy.cuda.runtime
    arch = runtime.getDeviceProperties(cupy.cuda.Device().id).get("gcnArchName") or ""
    if isinstance(arch, bytes):
        arch = arch.decode()
    if runtime.is_hip and arch:
        return arch.split(":", 1)[0]
    return f"sm_{cupy.cuda.Device().compute_capability}"


def _build(cupy: Any, req: CompileRequest, cache_dir: Path | None) -> CupyModule:
    compiler = _compiler_api(cupy)
    if compiler is None:  # this CuPy lacks what our disk cache needs: CuPy compiles and caches
        raw = cupy.RawModule(
            code=req.code, options=req.options, name_expressions=req.name_expressions or None
        )
        try:
            raw.compile()
        except _compile_exception(cupy) as e:
            raise _compile_error(e, req) from None
        return CupyModule(raw)
    disk = _DiskCache(cache_dir or default_cache_dir(), req, compiler.target)
    entry = disk.load()
    if entry is None:
        try:
            binary, lowered = compiler.compile(req)
        except _compile_exception(cupy) as e:
            raise _compile_error(e, req) from None
        entry = disk.save(binary, lowered)
    path, lowered = entry
    return CupyModule(cupy.RawModule(path=str(path)), lowered)


@dataclass(frozen=True)
class _Compiler:
    """CuPy's runtime-compiler entry point, with the options CuPy itself adds to a RawModule."""

    cupy: Any
    target: str  # architecture, compiler version, CuPy version: part of every disk key

    def compile(self, req: CompileRequest) -> tuple[bytes, dict[str, str]]:
        compiler = self.cupy.cuda.compiler
        options = self.cupy._core.core.assemble_cupy_compiler_options(req.options)
        # What CuPy's compile-with-cache adds on each platform (denormals flushed to zero).
        is_hip = bool(self.cupy.cuda.runtime.is_hip)
        options += ("-fcuda-flush-denormals-to-zero",) if is_hip else ("-ftz=true",)
        binary, mapping = compiler.compile_using_nvrtc(
            req.code,
            options,
            filename="kern.cu",
            name_expressions=req.name_expressions or None,
            cache_in_memory=True,
        )
        if isinstance(binary, str):  # PTX
            binary = binary.encode()
        return bytes(binary), dict(mapping or {})


def _compiler_api(cupy: Any) -> _Compiler | None:
    """The compiler entry points our disk cache uses, or None where this CuPy lacks them."""
    try:
        compiler = cupy.cuda.compiler
        if not callable(compiler.compile_using_nvrtc):
            return None
        if not callable(cupy._core.core.assemble_cupy_compiler_options):
            return None
        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(cupy.cuda.Device().id)
        arch = props.get("gcnArchName") if runtime.is_hip else None
        if not arch:
            arch = f"sm_{cupy.cuda.Device().compute_capability}"
        if isinstance(arch, bytes):
            arch = arch.decode()
        version = cupy.cuda.nvrtc.getVersion()
        return _Compiler(cupy, f"{arch} rtc{version} cupy{cupy.__version__}")
    except Exception:  # missing attribute, no device: fall back to CuPy's own path
        return None


class _DiskCache:
    """``<dir>/<key>.bin`` (the code object) and ``<key>.json`` (lowered names)."""

    def __init__(self, root: Path, req: CompileRequest, target: str) -> None:
        key = hashlib.sha256(f"{_DISK_FORMAT}\0{req.digest}\0{target}".encode()).hexdigest()
        self.binary = root / f"{key[:32]}.bin"
        self.meta = root / f"{key[:32]}.json"
        self.req = req

    def load(self) -> tuple[Path, dict[str, str]] | None:
        try:
            meta = json.loads(self.meta.read_text())
            lowered = dict(meta["lowered"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not self.binary.is_file() or set(lowered) != set(self.req.name_expressions):
            return None
        return self.binary, lowered

    def save(self, binary: bytes, lowered: dict[str, str]) -> tuple[Path, dict[str, str]]:
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        meta = {"source": self.req.label, "lowered": lowered}
        # Written under temporary names, then renamed: a reader never sees half an entry, and
        # the binary is in place before the index that names it.
        for path, data in ((self.binary, binary), (self.meta, json.dumps(meta).encode())):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return self.binary, lowered


def _compile_exception(cupy: Any) -> type[Exception]:
    """``cupy.cuda.compiler.CompileException`` (what RawModule.compile raises on a bad source)."""
    compiler = getattr(getattr(cupy, "cuda", None), "compiler", None)
    if compiler is None:
        try:
            compiler = importlib.import_module("cupy.cuda.compiler")
        except ImportError:
            compiler = None
    exc = getattr(compiler, "CompileException", None)
    return exc if isinstance(exc, type) and issubclass(exc, Exception) else _NeverRaised


class _NeverRaised(Exception):
    pass


def _device_id(cupy: Any) -> Any:
    try:
        return cupy.cuda.Device().id
    except Exception:  # no usable device: the compile itself will say so
        return None


def _compile_error(e: Exception, req: CompileRequest) -> BackendError:
    get_message = getattr(e, "get_message", None)
    log = get_message() if callable(get_message) else str(e)
    name = getattr(e, "name", None) or req.label
    source = getattr(e, "source", None) or req.code
    summary, lines = format_compile_log(
        log, sources={str(name): source}, main_source=source, include_dirs=[kernels_dir()]
    )
    backend = getattr(e, "backend", None) or "the runtime compiler"
    return BackendError(
        "backend.compile_failed",
        f"{backend} could not compile {req.label}:\n{summary}",
        kernel_source=req.label,
        options=list(req.options),
        log=log[-_LOG_LIMIT:],
        source_lines=lines,
    )
