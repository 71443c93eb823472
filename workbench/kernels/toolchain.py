"""Offline compilers: build the kernel sources for real GPUs and read their resource reports.

No GPU is needed: ``hipcc`` (AMD) and ``nvcc`` (NVIDIA) compile for any target they know, and
both tell how many registers, how much shared memory and scratch a kernel uses and whether it
spills. `check` does this for registry kernels and several targets at once (each source is
compiled once per target, with every registered symbol of it), `compile_source` for one source,
`asm` prints one kernel's machine code.

What the compilers report (measured with Debian's hipcc 5.2 / clang 15 and CUDA 13's nvcc):

- AMD, ``-Rpass-analysis=kernel-resource-usage``, one remark per line and function::

      f.hip:2:1: remark: Function Name: k_sum [-Rpass-analysis=kernel-resource-usage]
      f.hip:2:1: remark:     SGPRs: 13 ...
      f.hip:2:1: remark:     VGPRs: 7 ...
      f.hip:2:1: remark:     AGPRs: 0 ...                      (gfx908/gfx90a/gfx940 only)
      f.hip:2:1: remark:     ScratchSize [bytes/lane]: 0 ...
      f.hip:2:1: remark:     Occupancy [waves/SIMD]: 8 ...
      f.hip:2:1: remark:     SGPRs Spill: 0 ...
      f.hip:2:1: remark:     VGPRs Spill: 0 ...
      f.hip:2:1: remark:     LDS Size [bytes/block]: 1024 ...

  Every field the report has is printed by this version, occupancy included (the compiler
  computes it from the registers, the LDS and the kernel's maximum work-group size), so nothing
  is derived here. A field a compiler does not print stays ``None`` (unknown), never a guess.
- NVIDIA, ``-Xptxas -v``::

      ptxas info    : Compiling entry function '_Z2tkILi128EEvPf' for 'sm_90'
      ptxas info    : Function properties for _Z2tkILi128EEvPf
          0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
      ptxas info    : Used 12 registers, used 1 barriers, 512 bytes smem

  ptxas leaves out ``smem`` when a kernel uses none (so 0 is what it means). It says nothing of
  occupancy, which depends on the block size chosen at launch; it stays ``None``.

Template kernels are compiled through a small wrapper that includes the source and instantiates
a probe kernel per registered symbol: ``template __global__ void wb_check_probe_<I,
decltype(&EXPR), &EXPR>()``. That instantiates ``EXPR`` (a name expression such as
``dequant<WB_Q4_1>``), proves the symbol exists, and the probe's own mangled name, demangled,
names the instance, which maps the compiler's mangled names back to the registry's symbols.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import BackendError, UserError

if TYPE_CHECKING:
    from workbench.kernels.registry import KernelSpec

AMD_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx1030")
NVIDIA_ARCHS = ("sm_90",)
DEFAULT_ARCHS = (*AMD_ARCHS, *NVIDIA_ARCHS)
DEFAULT_JOBS = 2  # compiler processes at once (CI runners have two cores)
COMPILE_TIMEOUT_S = 300

HIPCC = "hipcc"
NVCC = "nvcc"
INSTALL_HINTS = {
    HIPCC: "hipcc not found: apt-get install hipcc (Debian/Ubuntu) or install ROCm",
    NVCC: "nvcc not found: install the CUDA toolkit (it provides nvcc)",
}

_LOG_LIMIT = 20_000  # characters of compiler output kept in an error's context
_CONTEXT_LINES = 2  # source lines shown before and after an offending line
_PROBE = "wb_check_probe_"


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelResources:
    """What the compiler reports for one kernel function on one target; None: not reported.

    AMD: ``vgprs``, ``agprs`` (CDNA's accumulation registers), ``sgprs``, ``lds_bytes`` (static
    LDS per block), ``scratch_bytes`` (private segment per lane), ``sgpr_spills`` and
    ``vgpr_spills`` (registers spilled), ``occupancy`` (waves per SIMD). NVIDIA: ``registers``
    (per thread), ``shared_bytes`` (static shared memory per block), ``scratch_bytes`` (stack
    frame per thread), ``spill_store_bytes``, ``spill_load_bytes``, ``barriers``.
    """

    function: str  # the name in the object code (mangled for C++ kernels)
    arch: str
    vendor: str  # "amd" or "nvidia"
    vgprs: int | None = None
    agprs: int | None = None
    sgprs: int | None = None
    lds_bytes: int | None = None
    scratch_bytes: int | None = None
    sgpr_spills: int | None = None
    vgpr_spills: int | None = None
    occupancy: int | None = None
    registers: int | None = None
    shared_bytes: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    barriers: int | None = None

    @property
    def spills(self) -> int | None:
        """Total spills: registers (AMD) or bytes stored (NVIDIA); None when not reported."""
        parts = (
            (self.sgpr_spills, self.vgpr_spills)
            if self.vendor == "amd"
            else (self.spill_store_bytes, self.spill_load_bytes)
        )
        known = [p for p in parts if p is not None]
        return sum(known) if known else None


@dataclass(frozen=True)
class CompileResult:
    """One source compiled for one target."""

    source: str
    arch: str
    command: str
    seconds: float
    functions: dict[str, KernelResources]  # by object-code name (probes left out)
    symbols: dict[str, str]  # registered symbol or name expression -> object-code name
    log: str = ""

    def resources(self, symbol: str) -> KernelResources:
        try:
            return self.functions[self.symbols[symbol]]
        except KeyError:
            raise BackendError(
                "backend.compile_failed",
                f"the {self.arch} build of {self.source} has no kernel {symbol!r} "
                f"(found: {', '.join(sorted(self.functions)) or 'none'})",
                kernel_source=self.source,
                arch=self.arch,
            ) from None


@dataclass(frozen=True)
class ResourceReport:
    """`check`'s answer for one registry kernel on one target: resources, or why there are none.

    ``error_code`` is ``backend.compile_failed`` (the kernel is broken) or
    ``backend.compiler_missing`` (this machine cannot build for the target).
    """

    kernel: str  # registry name
    symbol: str
    source: str
    arch: str
    resources: KernelResources | None = None
    error_code: str | None = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.resources is not None


# --- compiler logs -------------------------------------------------------------------------------

# clang/hipcc/hiprtc: "file:12:5: error: ..."; nvcc/NVRTC: "file(12): error: ...".
_DIAG = re.compile(
    r"^(?P<file>[^\s:()][^:()\n]*?)(?::(?P<line>\d+):(?:\d+:)?|\((?P<line2>\d+)\):)\s*"
    r"(?:fatal )?error\s*(?:[A-Z#]\d+[^:]*)?:\s*(?P<what>.*)$",
    re.MULTILINE,
)


def format_compile_log(
    log: str,
    *,
    sources: Mapping[str, str] | None = None,
    main_source: str | None = None,
    include_dirs: Sequence[str | Path] = (),
    max_errors: int = 5,
) -> tuple[str, list[str]]:
    """The first errors of a compiler log, each with its numbered source lines around it.

    Returns (a readable summary, the excerpt lines). File names in the log are looked up in
    ``sources`` (name -> text; by full name, then by base name), then on disk (as given, then
    under ``include_dirs``); a name found nowhere (an RTC compiler's temporary file) is taken to
    be ``main_source``. Shared by the offline toolchain and the CuPy target.
    """
    sources = dict(sources or {})
    by_base = {Path(k).name: v for k, v in sources.items()}
    blocks: list[str] = []
    excerpt: list[str] = []
    seen: set[tuple[str, int]] = set()
    for m in _DIAG.finditer(log):
        file = m.group("file").strip()
        line = int(m.group("line") or m.group("line2"))
        if (file, line) in seen:
            continue
        seen.add((file, line))
        text = _source_text(file, sources, by_base, main_source, include_dirs)
        header = f"{file}:{line}: error: {m.group('what').strip()}"
        lines = text.splitlines() if text is not None else []
        numbered = []
        if 1 <= line <= len(lines):
            lo, hi = max(1, line - _CONTEXT_LINES), min(len(lines), line + _CONTEXT_LINES)
            width = len(str(hi))
            for n in range(lo, hi + 1):
                mark = ">" if n == line else " "
                numbered.append(f"{mark} {n:>{width}} | {lines[n - 1]}")
        blocks.append("\n".join([header, *numbered]))
        excerpt += [header, *numbered]
        if len(blocks) == max_errors:
            break
    if not blocks:
        tail = log.strip()[-2000:]
        return (tail or "(the compiler printed nothing)"), []
    return "\n".join(blocks), excerpt


def _source_text(
    file: str,
    sources: Mapping[str, str],
    by_base: Mapping[str, str],
    main_source: str | None,
    include_dirs: Sequence[str | Path],
) -> str | None:
    if file in sources:
        return sources[file]
    if Path(file).name in by_base:
        return by_base[Path(file).name]
    for candidate in (Path(file), *(Path(d) / file for d in include_dirs)):
        try:
            if candidate.is_file():
                return candidate.read_text(errors="replace")
        except OSError:
            continue
    return main_source


# --- parsing the reports -------------------------------------------------------------------------

_AMD_FUNC = re.compile(r"remark: Function Name: (\S+)")
_AMD_FIELD = re.compile(r"remark:\s+(?P<key>[A-Za-z][A-Za-z ]*?)(?: \[[^\]]*\])?: (?P<val>\d+)\b")
_AMD_KEYS = {
    "SGPRs": "sgprs",
    "VGPRs": "vgprs",
    "AGPRs": "agprs",
    "ScratchSize": "scratch_bytes",
    "Occupancy": "occupancy",
    "SGPRs Spill": "sgpr_spills",
    "VGPRs Spill": "vgpr_spills",
    "LDS Size": "lds_bytes",
}


def parse_amd_remarks(log: str, arch: str) -> dict[str, KernelResources]:
    """Per function, the fields of clang's kernel-resource-usage remarks (see the module doc)."""
    out: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        m = _AMD_FUNC.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        m = _AMD_FIELD.search(line)
        if m and current is not None and m.group("key") in _AMD_KEYS:
            current[_AMD_KEYS[m.group("key")]] = int(m.group("val"))
    return {
        name: KernelResources(function=name, arch=arch, vendor="amd", **fields)
        for name, fields in out.items()
    }


_NV_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_NV_PROPS = re.compile(r"Function properties for (\S+)")
_NV_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_NV_USED = re.compile(r"Used (\d+) registers")
_NV_SMEM = re.compile(r"(\d+) bytes smem")
_NV_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas_info(log: str, arch: str) -> dict[str, KernelResources]:
    """Per entry function, ptxas's ``-v`` report (see the module doc)."""
    entries: dict[str, dict[str, int]] = {}
    frames: dict[str, dict[str, int]] = {}
    entry: str | None = None
    props: str | None = None
    for line in log.splitlines():
        if m := _NV_ENTRY.search(line):
            entry = m.group(1)
            entries.setdefault(entry, {})
            continue
        if m := _NV_PROPS.search(line):
            props = m.group(1)
            continue
        if (m := _NV_FRAME.search(line)) and props is not None:
            frames[props] = {
                "scratch_bytes": int(m.group(1)),
                "spill_store_bytes": int(m.group(2)),
                "spill_load_bytes": int(m.group(3)),
            }
            continue
        if (m := _NV_USED.search(line)) and entry is not None:
            smem = _NV_SMEM.search(line)
            bars = _NV_BARRIERS.search(line)
            entries[entry].update(
                registers=int(m.group(1)),
                shared_bytes=int(smem.group(1)) if smem else 0,  # ptxas omits "0 bytes smem"
            )
            if bars:
                entries[entry]["barriers"] = int(bars.group(1))
    return {
        name: KernelResources(
            function=name, arch=arch, vendor="nvidia", **{**frames.get(name, {}), **fields}
        )
        for name, fields in entries.items()
    }


# --- compiling -----------------------------------------------------------------------------------


def vendor_of(arch: str) -> str:
    """ "amd" for gfx targets, "nvidia" for sm_ targets; anything else is refused."""
    if re.fullmatch(r"gfx[0-9a-f]{3,4}", arch):
        return "amd"
    if re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        return "nvidia"
    raise UserError(
        "user.bad_arch",
        f"unknown target {arch!r}: give an AMD gfx name (gfx90a) or an NVIDIA sm_ name (sm_90)",
    )


def compiler_for(arch: str, *, hipcc: str | None = None, nvcc: str | None = None) -> str:
    """The compiler's path for ``arch``; backend.compiler_missing when it is not installed."""
    name = (hipcc or HIPCC) if vendor_of(arch) == "amd" else (nvcc or NVCC)
    path = shutil.which(name)
    if path is None:
        hint = INSTALL_HINTS.get(Path(name).name, f"{name} not found on PATH")
        raise BackendError("backend.compiler_missing", hint, compiler=name, arch=arch)
    return path


def _wrapper(source: Path, symbols: Sequence[str]) -> str:
    lines = [
        f'#include "{source}"',
        f"template <int I, typename T, T F> __global__ void {_PROBE}() {{}}",
    ]
    for i, sym in enumerate(symbols):
        lines.append(f"template __global__ void {_PROBE}<{i}, decltype(&{sym}), &{sym}>();")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMPILE_TIMEOUT_S,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as e:
        raise BackendError(
            "backend.compile_failed",
            f"{Path(cmd[0]).name} did not finish in {COMPILE_TIMEOUT_S} s",
            command=" ".join(cmd),
        ) from e


def _command(
    compiler: str, arch: str, wrapper: Path, options: Sequence[str], out: str, *, asm: bool
) -> tuple[list[str], dict[str, str]]:
    include = f"-I{_kernels_dir()}"
    opts = [*options, *([include] if include not in options else [])]
    if vendor_of(arch) == "amd":
        mode = ["-S"] if asm else ["-c", "-Rpass-analysis=kernel-resource-usage"]
        # -std=c++17 as the emulator and NVRTC (hipcc 5.2 would default to C++11).
        cmd = [compiler, f"--offload-arch={arch}", "--cuda-device-only", *mode, "-x", "hip",
               "-std=c++17", "-O3", *opts, str(wrapper), "-o", out]  # fmt: skip
        return cmd, {"HIP_PLATFORM": "amd"}
    mode = ["-ptx"] if asm else ["-cubin", "-Xptxas", "-v"]
    cmd = [compiler, "-x", "cu", f"--gpu-architecture={arch}", *mode, *opts, str(wrapper),
           "-o", out]  # fmt: skip
    return cmd, {}


def _kernels_dir() -> Path:
    from workbench.kernels.registry import kernels_dir

    return kernels_dir()


def _build(
    source: str | Path,
    arch: str,
    options: Sequence[str],
    symbols: Sequence[str],
    *,
    asm: bool,
    hipcc: str | None,
    nvcc: str | None,
) -> tuple[str, str, str, float]:
    """Compile; returns (stdout or assembly, log, command, seconds). Raises on failure."""
    compiler = compiler_for(arch, hipcc=hipcc, nvcc=nvcc)
    source = Path(source).resolve()
    if not source.is_file():
        raise UserError("kernel.bad_source", f"kernel source {source} does not exist")
    with tempfile.TemporaryDirectory(prefix="wb-toolchain-") as tmp:
        wrapper = Path(tmp) / f"check_{source.stem}.hip"
        wrapper_text = _wrapper(source, symbols)
        wrapper.write_text(wrapper_text)
        out = str(Path(tmp) / ("out.s" if asm else "out.o"))
        cmd, env = _command(compiler, arch, wrapper, options, out, asm=asm)
        t0 = time.perf_counter()
        proc = _run(cmd, env)
        seconds = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            summary, lines = format_compile_log(
                log, sources={str(wrapper): wrapper_text}, include_dirs=[_kernels_dir()]
            )
            raise BackendError(
                "backend.compile_failed",
                f"{Path(compiler).name} could not compile {source.name} for {arch}:\n{summary}",
                kernel_source=str(source),
                arch=arch,
                command=" ".join(cmd),
                log=log[-_LOG_LIMIT:],
                source_lines=lines,
            )
        text = Path(out).read_text(errors="replace") if asm else ""
    return text, log, " ".join(cmd), seconds


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(dict.fromkeys(names))
    filt = shutil.which("c++filt")
    if filt is None and any(n.startswith("_Z") for n in names):
        raise BackendError(
            "backend.compiler_missing",
            "c++filt not found (it maps C++ kernel names back to their name expressions): "
            "apt-get install binutils",
            compiler="c++filt",
        )
    if not names or filt is None:
        return {n: n for n in names}
    proc = subprocess.run([filt], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    if proc.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


_PROBE_DEMANGLED = re.compile(rf"^void {_PROBE}<(\d+), .*?, &(.*)>\(\)$")


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _resolve(symbols: Sequence[str], names: Iterable[str], source: str) -> dict[str, str]:
    """Registered symbol -> object-code name, through the probes (see the module doc)."""
    names = list(names)
    demangled = _demangle(names)
    kernels = {n: d for n, d in demangled.items() if _PROBE not in n}
    out: dict[str, str] = {}
    for sym in symbols:
        if sym in kernels:  # an extern "C" kernel keeps its name
            out[sym] = sym
    for name, text in demangled.items():
        m = _PROBE_DEMANGLED.match(text)
        if _PROBE not in name or not m:
            continue
        sym = symbols[int(m.group(1))] if int(m.group(1)) < len(symbols) else None
        if sym is None or sym in out:
            continue
        target = m.group(2).strip()
        if target.startswith("(") and target.endswith(")"):
            target = target[1:-1]
        plain = target.split("(", 1)[0].strip()  # extern "C" kernels demangle as "f" or "f(...)"
        for kname, ktext in kernels.items():
            if _squash(ktext) == _squash(target) or kname == plain:
                out[sym] = kname
                break
    return out


def compile_source(
    source: str | Path,
    arch: str,
    *,
    options: Sequence[str] = (),
    symbols: Sequence[str] = (),
    hipcc: str | None = None,
    nvcc: str | None = None,
) -> CompileResult:
    """Compile one source for one target and parse its resource report.

    ``symbols`` are the extern "C" names and name expressions to instantiate and map back
    (`CompileResult.resources`). ``options``: ``-D``/``-I`` flags (the kernels directory is always
    on the include path). Raises BackendError ``backend.compiler_missing`` or
    ``backend.compile_failed`` (with ``log``, ``command`` and numbered ``source_lines`` in its
    context).
    """
    symbols = list(dict.fromkeys(symbols))
    _, log, command, seconds = _build(
        source, arch, options, symbols, asm=False, hipcc=hipcc, nvcc=nvcc
    )
    parse = parse_amd_remarks if vendor_of(arch) == "amd" else parse_ptxas_info
    found = parse(log, arch)
    mapping = _resolve(symbols, found, str(source))
    functions = {n: r for n, r in found.items() if _PROBE not in n}
    return CompileResult(
        source=str(source),
        arch=arch,
        command=command,
        seconds=seconds,
        functions=functions,
        symbols=mapping,
        log=log[-_LOG_LIMIT:],
    )


def _group(specs: Iterable[KernelSpec]) -> dict[tuple[str, tuple[str, ...]], list[KernelSpec]]:
    groups: dict[tuple[str, tuple[str, ...]], list[KernelSpec]] = {}
    for spec in specs:
        groups.setdefault((str(spec.path), spec.options), []).append(spec)
    return groups


def check(
    kernels: Iterable[KernelSpec] | None = None,
    archs: Sequence[str] = DEFAULT_ARCHS,
    *,
    jobs: int = DEFAULT_JOBS,
    hipcc: str | None = None,
    nvcc: str | None = None,
) -> list[ResourceReport]:
    """Compile registry kernels (default: all) for ``archs``; one report per kernel and target.

    Each (source, defines) is compiled once per target with all its symbols; ``jobs`` compiler
    processes run at once. Never raises for a kernel: a failed build or a missing compiler is a
    report with ``error_code`` and ``error`` set (`ResourceReport.ok` is False).
    """
    if kernels is None:
        from workbench.kernels.registry import all_kernels

        kernels = all_kernels().values()
    for arch in archs:
        vendor_of(arch)
    groups = _group(kernels)
    tasks = [(key, arch) for key in groups for arch in archs]

    def run(task: tuple[tuple[str, tuple[str, ...]], str]) -> list[ResourceReport]:
        (path, options), arch = task
        specs = groups[(path, options)]
        try:
            result = compile_source(
                path,
                arch,
                options=options,
                symbols=[s.symbol for s in specs],
                hipcc=hipcc,
                nvcc=nvcc,
            )
        except BackendError as e:
            return [
                ResourceReport(s.name, s.symbol, s.source, arch, error_code=e.code, error=e.message)
                for s in specs
            ]
        reports = []
        for s in specs:
            try:
                res = result.resources(s.symbol)
            except BackendError as e:
                reports.append(
                    ResourceReport(
                        s.name,
                        s.symbol,
                        s.source,
                        arch,
                        error_code=e.code,
                        error=e.message,
                        seconds=result.seconds,
                    )
                )
                continue
            reports.append(
                ResourceReport(s.name, s.symbol, s.source, arch, res, seconds=result.seconds)
            )
        return reports

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(run, tasks))
    order = {a: i for i, a in enumerate(archs)}
    flat = [r for rs in results for r in rs]
    return sorted(flat, key=lambda r: (order[r.arch], r.kernel))


# --- assembly ------------------------------------------------------------------------------------


def asm(
    kernel: KernelSpec | str,
    arch: str,
    *,
    source: str | Path | None = None,
    options: Sequence[str] = (),
    hipcc: str | None = None,
    nvcc: str | None = None,
) -> str:
    """The machine code of one kernel: AMD GCN/CDNA/RDNA assembly (with its kernel descriptor)
    or, for NVIDIA, PTX (this toolkit has no SASS disassembler installed: no cuobjdump).

    ``kernel`` is a registry entry or its name; or a symbol with ``source=`` a file.
    """
    if isinstance(kernel, str) and source is None:
        from workbench.kernels.registry import get

        kernel = get(kernel)
    if isinstance(kernel, str):
        symbol, path, opts = kernel, Path(source), tuple(options)  # type: ignore[arg-type]
    else:
        symbol, path, opts = kernel.symbol, kernel.path, (*kernel.options, *options)
    text, _, _, _ = _build(path, arch, opts, [symbol], asm=True, hipcc=hipcc, nvcc=nvcc)
    return _asm_of(text, [symbol], path, arch)[symbol]


def asm_many(
    kernels: Sequence[KernelSpec | str],
    arch: str,
    *,
    hipcc: str | None = None,
    nvcc: str | None = None,
) -> dict[str, str]:
    """`asm` of several registry kernels (entries or names) -> {name: code}, each source and
    option set compiled once for all of its kernels (the quantized modules hold every type)."""
    from workbench.kernels.registry import get

    specs = [get(k) if isinstance(k, str) else k for k in kernels]
    groups: dict[tuple[Path, tuple[str, ...]], list[KernelSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.path, tuple(spec.options)), []).append(spec)
    out: dict[str, str] = {}
    for (path, opts), group in groups.items():
        symbols = [spec.symbol for spec in group]
        text, _, _, _ = _build(path, arch, opts, symbols, asm=True, hipcc=hipcc, nvcc=nvcc)
        codes = _asm_of(text, symbols, path, arch)
        out.update({spec.name: codes[spec.symbol] for spec in group})
    return out


def _asm_of(text: str, symbols: Sequence[str], path: Path, arch: str) -> dict[str, str]:
    """Each symbol's function in the compiled module's assembly (AMD) or PTX, headed by a comment
    naming it (and its demangled name)."""
    amd = vendor_of(arch) == "amd"
    labels = _asm_functions(text, amd=amd)
    mapping = _resolve(list(symbols), labels, str(path))
    comment = ";" if amd else "//"
    out = {}
    for symbol in symbols:
        if symbol not in mapping:
            raise BackendError(
                "backend.compile_failed",
                f"no kernel {symbol!r} in the {arch} code of {path.name} "
                f"(found: {', '.join(n for n in labels if _PROBE not in n) or 'none'})",
                kernel_source=str(path),
                arch=arch,
            )
        name = mapping[symbol]
        body = _slice_amd(text, name) if amd else _slice_ptx(text, name)
        full = _demangle([name])[name] if name.startswith("_Z") else name
        out[symbol] = (
            f"{comment} {symbol} [{arch}]: {name}"
            + (f" ({full})" if full != name else "")
            + "\n"
            + body
        )
    return out


def _asm_functions(text: str, *, amd: bool) -> list[str]:
    if amd:
        return re.findall(r"^\t\.globl\t(\S+)$", text, re.MULTILINE)
    return re.findall(r"^\.visible \.entry (\S+?)\(", text, re.MULTILINE)


def _slice_amd(text: str, name: str) -> str:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{name}:"))
    # Back over the directives that open the function (.protected/.globl/.p2align/.type).
    while start > 0 and lines[start - 1].startswith("\t.") and "\t.size\t" not in lines[start - 1]:
        start -= 1
    end = next(
        (i for i in range(start, len(lines)) if lines[i].startswith(f"\t.size\t{name},")),
        len(lines) - 1,
    )
    return "\n".join(lines[start : end + 1]) + "\n"


def _slice_ptx(text: str, name: str) -> str:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f".visible .entry {name}("))
    end = next((i for i in range(start, len(lines)) if lines[i] == "}"), len(lines) - 1)
    return "\n".join(lines[start : end + 1]) + "\n"
