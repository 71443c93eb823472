"""The CuPy target: a kernel source as a ``cupy.RawModule`` on the GPU.

CuPy compiles with hiprtc on ROCm and NVRTC on CUDA (it picks the one its build targets) and
caches the binaries on disk itself; this module adds the kernels' include directory, keeps
compiled modules in-process (keyed by a hash of the source and the options), and turns a
``CompileException`` into a ``backend.compile_failed`` error with the compiler log and the
numbered source lines around each error. CuPy is imported only when used: without it,
`load_module` raises ``backend.unavailable``.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.errors import BackendError
from workbench.kernels.registry import KernelSpec, all_kernels, kernels_dir
from workbench.kernels.toolchain import format_compile_log

INSTALL_HINT = "CuPy is not installed: pip install rocm-workbench[rocm] or [cuda]"
_LOG_LIMIT = 20_000
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")

_modules: dict[tuple, Any] = {}
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


def module_key(
    code: str, options: Sequence[str], name_expressions: Sequence[str], device: Any = None
) -> tuple:
    """The in-process cache key: a hash of the source, the options, the name expressions and
    the device (its id; a module belongs to the device it was loaded on)."""
    digest = hashlib.sha256(code.encode()).hexdigest()
    return (digest, tuple(options), tuple(name_expressions), device)


def load_module(
    spec_or_source: KernelSpec | str | Path,
    *,
    options: Sequence[str] = (),
    name_expressions: Sequence[str] | None = None,
) -> Any:
    """A compiled ``cupy.RawModule`` for a registry kernel, source text (``str``) or file
    (``Path``). ``options`` are added to the spec's defines and the include directory of wb.h;
    ``name_expressions`` to the spec's template instances. Compiles now (not at the first
    `get_function`), so a compile error surfaces here as ``backend.compile_failed``.
    """
    if isinstance(spec_or_source, KernelSpec):
        spec = spec_or_source
        code = spec.path.read_text()
        opts = [*spec.options, *options]
        exprs = [*spec_name_expressions(spec), *(name_expressions or ())]
        label = str(spec.path)
    elif isinstance(spec_or_source, Path):
        code = spec_or_source.read_text()
        opts, exprs, label = list(options), list(name_expressions or ()), str(spec_or_source)
    else:
        code = spec_or_source
        opts, exprs, label = list(options), list(name_expressions or ()), "<source>"
    include = f"-I{kernels_dir()}"
    if include not in opts:
        opts.append(include)
    exprs = list(dict.fromkeys(exprs))

    cupy = import_cupy()
    key = module_key(code, opts, exprs, _device_id(cupy))
    with _lock:
        module = _modules.get(key)
        if module is not None:
            return module
        module = cupy.RawModule(
            code=code, options=tuple(opts), name_expressions=tuple(exprs) or None
        )
        try:
            module.compile()
        except _compile_exception(cupy) as e:
            raise _compile_error(e, code, opts, label) from None
        _modules[key] = module
        return module


def clear_cache() -> None:
    """Forget the compiled modules (CuPy's own disk cache stays)."""
    with _lock:
        _modules.clear()


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


def _compile_error(e: Exception, code: str, options: Sequence[str], label: str) -> BackendError:
    get_message = getattr(e, "get_message", None)
    log = get_message() if callable(get_message) else str(e)
    name = getattr(e, "name", None) or label
    source = getattr(e, "source", None) or code
    summary, lines = format_compile_log(
        log, sources={str(name): source}, main_source=source, include_dirs=[kernels_dir()]
    )
    backend = getattr(e, "backend", None) or "the runtime compiler"
    return BackendError(
        "backend.compile_failed",
        f"{backend} could not compile {label}:\n{summary}",
        kernel_source=label,
        options=list(options),
        log=log[-_LOG_LIMIT:],
        source_lines=lines,
    )
