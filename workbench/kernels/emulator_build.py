"""Building emulated modules: the host compiler, compile options, kernel discovery, compiler
errors and the generated launch trampolines (used by `workbench.kernels.emulator`)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import BackendError, UserError
from workbench.store import file_lock

_COMPILE_FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    # Kernels reinterpret bytes freely (GGUF blocks, float bits); GPU compilers allow it.
    "-fno-strict-aliasing",
    "-Wl,-z,defs",  # an undefined symbol fails the build, not the load
    "-DWB_EMULATOR=1",
)
_RUNTIME_FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fvisibility=hidden",
    # A fault leaves kernel code by siglongjmp from a fiber's stack to the thread's own, which
    # glibc's fortified longjmp check could take for a jump into a dead frame.
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=0",
    "-Wl,-z,defs",
)
_LOG_LIMIT = 20_000  # characters of compiler output kept in an error's context


# --- the host compiler ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Toolchain:
    path: str
    version: str  # first line of --version plus the target triple: part of every cache key


_toolchains: dict[str | None, _Toolchain] = {}


def _toolchain(compiler: str | None) -> _Toolchain:
    if compiler in _toolchains:
        return _toolchains[compiler]
    names = [compiler] if compiler else ["c++", "g++", "clang++"]
    path = next((p for p in map(shutil.which, names) if p), None)
    if path is None:
        raise BackendError(
            "backend.compiler_missing",
            f"no C++ compiler found (looked for {', '.join(names)}); the CPU emulator needs one: "
            "on Debian/Ubuntu `apt-get install g++`",
            compiler=compiler,
        )
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout.splitlines()[0]
        target = subprocess.run(
            [path, "-dumpmachine"], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise BackendError(
            "backend.compiler_missing",
            f"the C++ compiler {path} does not run: {e}",
            compiler=path,
        ) from e
    tc = _Toolchain(path, f"{version} ({target})")
    _toolchains[compiler] = tc
    return tc


def _run_compiler(cmd: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C"}  # plain ASCII diagnostics, whatever the user's locale
    try:
        return subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=600, env=env
        )
    except FileNotFoundError as e:
        raise BackendError(
            "backend.compiler_missing", f"the C++ compiler {cmd[0]} disappeared: {e}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise BackendError(
            "backend.compile_failed", f"the C++ compiler ran for over {e.timeout} s", command=cmd
        ) from e


def _sha256(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write through a temp file and a rename: readers see nothing or everything."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_so(cmd_head: list[str], source: Path, target: Path, tail: Sequence[str] = ()) -> str:
    """Compile ``source`` into ``target`` through a temp file + atomic rename, so that nobody
    sees a half-written object. A lock file next to ``target`` serialises processes building the
    same object (parallel test workers, two notebooks): the later one waits, finds ``target``
    and returns without compiling (log ""). Returns the compiler log; raises `BackendError`
    ``backend.compile_failed`` on failure."""
    with file_lock(target.parent / f".{target.name}.lock"):
        if target.exists():
            return ""
        return _compile_so(cmd_head, source, target, tail)


def _compile_so(cmd_head: list[str], source: Path, target: Path, tail: Sequence[str]) -> str:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".so")
    os.close(fd)
    try:
        cmd = [*cmd_head, "-o", tmp, str(source), *tail]
        proc = _run_compiler(cmd)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise BackendError(
                "backend.compile_failed",
                f"compiling {source.name} failed",
                command=" ".join(cmd),
                log=log[-_LOG_LIMIT:],
            )
        os.replace(tmp, target)
        return log
    finally:
        Path(tmp).unlink(missing_ok=True)


_GLOBAL_MARK = re.compile(r"\b__wb_emu_global__\b")
_ATTRIBUTE = re.compile(r"__attribute__\s*\(\(.*?\)\)", re.S)
_KERNEL_NAME = re.compile(r"^\s*(?:[A-Za-z_]\w*\s+|\*\s*)*?([A-Za-z_]\w*)\s*\(", re.S)
_TEMPLATE = re.compile(r"\btemplate\b")
_ERROR_LINE = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: (?P<what>.*)$", re.M
)


def _discover_kernels(text: str) -> list[str]:
    """Names of the non-template kernels in preprocessed source (``__global__`` is a marker)."""
    names: list[str] = []
    for m in _GLOBAL_MARK.finditer(text):
        start = max(text.rfind(c, 0, m.start()) for c in ";{}") + 1
        if _TEMPLATE.search(text, start, m.start()):
            continue  # reachable only through name expressions
        rest = _ATTRIBUTE.sub(" ", text[m.end() : m.end() + 2000])
        found = _KERNEL_NAME.match(rest)
        if found and found.group(1) not in names:
            names.append(found.group(1))
    return names


def _parse_options(options: Sequence[str]) -> tuple[list[str], list[str]]:
    """``-D``/``-U``/``-I`` options as CuPy takes them; GPU-only options are ignored."""
    defines: list[str] = []
    includes: list[str] = []
    opts = list(options)
    i = 0
    while i < len(opts):
        opt = opts[i]
        if not isinstance(opt, str):
            raise UserError("kernel.bad_option", f"compile options are strings, got {opt!r}")
        if opt in ("-D", "-U", "-I") and i + 1 < len(opts):  # "-D", "NAME=1" as two items
            opt, i = opt + opts[i + 1], i + 1
        if opt.startswith(("-D", "-U")) and len(opt) > 2:
            defines.append(opt)
        elif opt.startswith("-I") and len(opt) > 2:
            includes.append("-I" + str(Path(opt[2:]).expanduser().resolve()))
        elif opt.startswith(("--include-path=",)):
            includes.append("-I" + str(Path(opt.split("=", 1)[1]).expanduser().resolve()))
        elif opt.startswith(("--define-macro=",)):
            defines.append("-D" + opt.split("=", 1)[1])
        elif _gpu_only_option(opt):
            pass
        else:
            raise UserError(
                "kernel.bad_option",
                f"compile option {opt!r} is not understood by the emulator (it takes -DNAME[=VAL], "
                "-UNAME, -IDIR and ignores GPU code-generation options such as -std=, -O3, "
                "--use_fast_math, --gpu-architecture=)",
                option=opt,
            )
        i += 1
    return defines, includes


def _gpu_only_option(opt: str) -> bool:
    prefixes = (
        "-std=",
        "--std=",
        "-O",
        "--gpu-architecture",
        "-arch",
        "--offload-arch",
        "-ffast-math",
        "--use_fast_math",
        "-use_fast_math",
        "--fmad",
        "-fmad",
        "--ftz",
        "--prec-div",
        "--prec-sqrt",
        "-lineinfo",
        "--generate-line-info",
        "-G",
        "--device-debug",
        "-g",
        "-Wno-",
        "-w",
        "--extra-device-vectorization",
        "--maxrregcount",
        "-fgpu-flush-denormals-to-zero",
        "-mcumode",
        "-mno-cumode",
        "-mwavefrontsize64",
        "-mno-wavefrontsize64",
    )
    return opt.startswith(prefixes)


def _errors(log: str, extra: dict[str, str]) -> list[tuple[str, str]]:
    """(``file:line: error: what``, ``file:line: code``) for the first 10 errors in the log."""
    out: list[tuple[str, str]] = []
    for m in _ERROR_LINE.finditer(log):
        file, line = m.group("file"), int(m.group("line"))
        where = f"{file}:{line}"
        text = extra.get(file)
        if text is None:
            try:
                text = Path(file).read_text(errors="replace")
            except OSError:
                text = ""
        lines = text.splitlines()
        code = lines[line - 1].strip() if 1 <= line <= len(lines) else ""
        entry = (f"{where}: error: {m.group('what')}", f"{where}: {code}")
        if entry not in out:
            out.append(entry)
        if len(out) == 10:
            break
    return out


def _hip_shim(cache_dir: Path) -> Path:
    """A directory whose ``hip/hip_runtime.h`` includes the emulator's stand-in, so that sources
    written for HIP (`#include <hip/hip_runtime.h>`) compile here (the file ships flat in the
    wheel; the directory lives in the cache)."""
    shim = cache_dir / "hip-shim"
    header = shim / "hip" / "hip_runtime.h"
    text = '#include "wb_emu_hip_runtime.h"\n'
    if not header.exists():
        header.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(header, text)
    return shim


def _trampoline(index: int, name: str) -> str:
    return (
        f"\n// {name}\n"
        f"WB_EMU_EXPORT int wb_emu_launch_{index}(const ::wb_emu::Api* api, "
        "const ::wb_emu::LaunchDesc* desc, void* const* argv, ::wb_emu::ErrorInfo* error) {\n"
        f"  return ::wb_emu::launch_kernel(&{name}, api, desc, argv, error);\n"
        "}\n"
        f"WB_EMU_EXPORT int wb_emu_signature_{index}(char* buf, std::size_t len) {{\n"
        f"  return ::wb_emu::signature(&{name}, buf, len);\n"
        "}\n"
    )
