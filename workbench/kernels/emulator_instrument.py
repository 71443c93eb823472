"""Instrumented emulator builds and their reports (tools= and counters= of `EmulatorModule`).

The instrumented variant of a module is a separate cached shared object compiled by clang with
SanitizerCoverage's load/store tracing (``-fsanitize-coverage=func,trace-loads,trace-stores``,
no sanitizer runtime): every load and store of kernel code, including those in included headers
such as ``quant.h``, calls back into the emulator runtime with its address and the return address
of the call. The emulator's own header is left out through an ignore list. ``-g`` gives the line
table that names each access's file and line (resolved once per distinct address with
``addr2line``); vectorizers are off so that one source access stays one access of its own width.
The plain variant is untouched, so a launch without tools costs what it did.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from workbench.errors import BackendError
from workbench.kernels.instrument import (
    KINDS,
    Finding,
    KernelReport,
    LineCounters,
    TargetSpec,
    totals_of,
)

CLANG_NAMES = ("clang++", "clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15",
               "clang++-14")  # fmt: skip
INSTRUMENT_FLAGS = (
    "-g",
    "-DWB_EMU_INSTRUMENTED=1",
    "-fsanitize-coverage=func,trace-loads,trace-stores",
    "-fno-vectorize",
    "-fno-slp-vectorize",
)
# Functions that must not call back: the emulator's own (wb_emu::, the trampolines, the callbacks
# themselves, the standard library they inline) and the atomics / __ldg that report themselves.
IGNORE_LIST = """\
fun:_ZN6wb_emu*
fun:wb_emu_*
fun:__sanitizer_cov_*
fun:_ZNSt*
fun:_ZSt*
fun:_ZNKSt*
fun:_Z9atomic*
fun:_Z10atomic*
fun:_Z20wb_emu_atomic_update*
fun:_Z5__ldg*
"""

_KIND_BY_CODE = {
    1: "out_of_bounds_read",
    2: "out_of_bounds_write",
    3: "misaligned_access",
    4: "shared_race_raw",
    5: "shared_race_war",
    6: "shared_race_waw",
    7: "global_race_waw",
    8: "uninitialized_shared_read",
    9: "barrier_divergence",
}
_SPACES = ("global", "shared")
_OPS = ("load", "store", "atomic")
TOOL_FLAGS = {"memcheck": 1, "racecheck": 2, "initcheck": 4, "synccheck": 8}
COUNTERS_FLAG = 16


def find_clang() -> str:
    """The clang++ that builds instrumented modules; one clear error when there is none."""
    path = next((p for p in map(shutil.which, CLANG_NAMES) if p), None)
    if path is None:
        raise BackendError(
            "backend.compiler_missing",
            "instrumented emulator runs (tools=, counters=) need clang++ for its SanitizerCoverage "
            "load/store tracing; install it (Debian/Ubuntu: apt-get install clang)",
        )
    return path


# --- ctypes mirrors of wb_emu_abi.h / wb_emu_instr.h ---------------------------------------------


class Buffer(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_size_t),
        ("size", ctypes.c_size_t),
        ("lo", ctypes.c_size_t),
        ("hi", ctypes.c_size_t),
        ("arg", ctypes.c_int),
    )


class Instr(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("segment_bytes", ctypes.c_uint32),
        ("banks", ctypes.c_uint32),
        ("bank_bytes", ctypes.c_uint32),
        ("buffers", ctypes.POINTER(Buffer)),
        ("nbuffers", ctypes.c_int),
        ("module_ranges", ctypes.c_void_p),
        ("results", ctypes.c_void_p),
    )


class SiteOut(ctypes.Structure):
    _fields_ = (
        ("pc", ctypes.c_uint64),
        ("space", ctypes.c_int32),
        ("op", ctypes.c_int32),
        ("requests", ctypes.c_uint64),
        ("lanes", ctypes.c_uint64),
        ("bytes_requested", ctypes.c_uint64),
        ("bytes_moved", ctypes.c_uint64),
        ("bank_cycles", ctypes.c_uint64),
        ("ideal_cycles", ctypes.c_uint64),
    )


class FindingOut(ctypes.Structure):
    _fields_ = (
        ("kind", ctypes.c_int32),
        ("arg", ctypes.c_int32),
        ("pc", ctypes.c_uint64),
        ("other_pc", ctypes.c_uint64),
        ("file", ctypes.c_char_p),
        ("line", ctypes.c_int32),
        ("other_line", ctypes.c_int32),
        ("other_file", ctypes.c_char_p),
        ("block", ctypes.c_uint32 * 3),
        ("thread", ctypes.c_uint32 * 3),
        ("count", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("address", ctypes.c_uint64),
        ("order", ctypes.c_uint64),
    )


def bind_results(lib: ctypes.CDLL) -> None:
    lib.wb_emu_results_new.restype = ctypes.c_void_p
    lib.wb_emu_results_free.argtypes = (ctypes.c_void_p,)
    lib.wb_emu_results_collect.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))
    lib.wb_emu_results_collect.restype = ctypes.c_int
    lib.wb_emu_results_sites.argtypes = (ctypes.c_void_p,)
    lib.wb_emu_results_sites.restype = ctypes.POINTER(SiteOut)
    lib.wb_emu_results_findings.argtypes = (ctypes.c_void_p,)
    lib.wb_emu_results_findings.restype = ctypes.POINTER(FindingOut)


def read_results(lib: ctypes.CDLL, handle: int) -> tuple[list[SiteOut], list[FindingOut]]:
    nf = ctypes.c_int(0)
    ns = lib.wb_emu_results_collect(handle, ctypes.byref(nf))
    sp = lib.wb_emu_results_sites(handle)
    fp = lib.wb_emu_results_findings(handle)
    sites = [SiteOut.from_buffer_copy(sp[i]) for i in range(ns)]
    findings = []
    for i in range(nf.value):
        f = fp[i]
        copy = FindingOut.from_buffer_copy(f)
        # the strings live in the module: read them now
        copy._file = f.file.decode() if f.file else None  # type: ignore[attr-defined]
        copy._other = f.other_file.decode() if f.other_file else None  # type: ignore[attr-defined]
        findings.append(copy)
    return sites, findings


# --- source lines ------------------------------------------------------------------------------


class LineTable:
    """Source lines of a module's code addresses, resolved once per address with addr2line."""

    def __init__(self, so_path: Path, skip_dirs: tuple[Path, ...]) -> None:
        self.so_path = so_path
        self.skip = tuple(str(d) for d in skip_dirs)
        self._cache: dict[int, tuple[str, int]] = {}

    def resolve(self, pcs: set[int]) -> None:
        todo = sorted(pc for pc in pcs if pc and pc not in self._cache)
        if not todo:
            return
        tool = shutil.which("addr2line")
        if tool is None:
            raise BackendError(
                "backend.compiler_missing",
                "instrumented emulator runs need addr2line (binutils) to name source lines",
            )
        proc = subprocess.run(
            [tool, "-e", str(self.so_path), "-i", "-a", *(hex(pc - 1) for pc in todo)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        frames: dict[int, list[tuple[str, int]]] = defaultdict(list)
        current = None
        for row in proc.stdout.splitlines():
            if row.startswith("0x"):
                current = int(row, 16) + 1
                continue
            file, _, rest = row.rpartition(":")
            line = rest.split(" ")[0]
            if current is not None and line.isdigit():
                frames[current].append((file, int(line)))
        for pc in todo:
            chain = frames.get(pc, [])
            # innermost first: skip the emulator's own header (an inlined atomic, __ldg)
            pick = next((f for f in chain if not f[0].startswith(self.skip)), None)
            self._cache[pc] = pick or (chain[0] if chain else ("?", 0))

    def __getitem__(self, pc: int) -> tuple[str, int]:
        return self._cache.get(pc, ("?", 0))


def build_report(
    kernel: str,
    target: TargetSpec,
    warp_size: int,
    tools: tuple[str, ...],
    counters: bool,
    sites: list[SiteOut],
    raw: list[FindingOut],
    table: LineTable,
    arg_types: tuple[str, ...],
    arg_sizes: dict[int, int],
) -> KernelReport:
    table.resolve({s.pc for s in sites} | {f.pc for f in raw} | {f.other_pc for f in raw})
    lines: list[LineCounters] = []
    if counters:
        acc: dict[tuple[str, int, str, str], list[int]] = defaultdict(lambda: [0] * 6)
        for s in sites:
            file, line = table[s.pc]
            a = acc[(file, line, _SPACES[s.space], _OPS[s.op])]
            a[0] += s.requests
            a[1] += s.lanes
            a[2] += s.bytes_requested
            a[3] += s.bytes_moved
            a[4] += s.bank_cycles
            a[5] += s.ideal_cycles
        for (file, line, space, op), a in sorted(acc.items()):
            shared = space == "shared"
            lines.append(
                LineCounters(
                    file=file,
                    line=line,
                    space=space,
                    op=op,
                    requests=a[0],
                    active_lanes=a[1] / a[0] if a[0] else 0.0,
                    bytes_requested=a[2],
                    bytes_moved=a[2] if shared else a[3],
                    efficiency=1.0 if shared or not a[3] else a[2] / a[3],
                    bank_conflict_ways=(a[4] / a[5] if a[5] else 1.0) if shared else 1.0,
                )
            )
    findings = _findings(raw, table, tools, arg_types, arg_sizes)
    return KernelReport(
        kernel=kernel,
        target=target.name,
        warp_size=warp_size,
        tools=tools,
        findings=findings,
        lines=lines,
        totals=totals_of(lines) if counters else {},
    )


def _findings(
    raw: list[FindingOut],
    table: LineTable,
    tools: tuple[str, ...],
    arg_types: tuple[str, ...],
    arg_sizes: dict[int, int],
) -> list[Finding]:
    groups: dict[tuple, tuple[FindingOut, int, tuple]] = {}
    for f in raw:
        kind = _KIND_BY_CODE[f.kind]
        if KINDS[kind] not in tools:
            continue
        if kind == "barrier_divergence":
            where = (f._file or "?", f.line)  # type: ignore[attr-defined]
            other = (f._other, f.other_line or None)  # type: ignore[attr-defined]
        else:
            where = table[f.pc]
            other = table[f.other_pc] if f.other_pc else (None, None)
        key = (kind, where, other)
        if key in groups:
            first, count, _ = groups[key]
            keep = f if f.order < first.order else first
            groups[key] = (keep, count + f.count, (where, other))
        else:
            groups[key] = (f, f.count, (where, other))
    out: list[Finding] = []
    for (kind, _, _), (f, count, (where, other)) in groups.items():
        block = (f.block[0], f.block[1], f.block[2])
        thread = (f.thread[0], f.thread[1], f.thread[2])
        arg = f.arg if f.arg >= 0 else None
        out.append(
            Finding(
                tool=KINDS[kind],
                kind=kind,
                file=where[0],
                line=where[1],
                block=block,
                thread=thread,
                message=_message(kind, where, other, f, count, arg, arg_types, arg_sizes),
                count=count,
                other_file=other[0],
                other_line=other[1],
                arg=arg,
                offset=f.offset if kind in ("out_of_bounds_read", "out_of_bounds_write") else None,
                address=f.address or None,
            )
        )
    out.sort(key=lambda x: (x.file, x.line, x.kind))
    return out


def _message(
    kind: str,
    where: tuple[str, int],
    other: tuple,
    f: FindingOut,
    count: int,
    arg: int | None,
    arg_types: tuple[str, ...],
    arg_sizes: dict[int, int],
) -> str:
    at = f"{Path(where[0]).name}:{where[1]}"
    who = f"block ({f.block[0]}, {f.block[1]}, {f.block[2]}) thread ({f.thread[0]}, " \
          f"{f.thread[1]}, {f.thread[2]})"  # fmt: skip
    times = f" ({count} times)" if count > 1 else ""
    oth = f"{Path(other[0]).name}:{other[1]}" if other[0] else "another thread's access"
    if kind in ("out_of_bounds_read", "out_of_bounds_write"):
        verb = "reads" if kind.endswith("read") else "writes"
        if arg is None:
            return f"{at}: {who} {verb} address {f.address:#x}, outside every buffer{times}"
        name = f"argument {arg} ({arg_types[arg]}, {arg_sizes.get(arg, 0)} bytes)"
        if f.offset == 0:
            side = "just past the end of"
        elif f.offset > 0:
            side = f"{f.offset} bytes past the end of"
        else:
            side = f"{-f.offset} bytes before the start of"
        return f"{at}: {who} {verb} {side} {name}{times}: check the index bound"
    if kind == "misaligned_access":
        return f"{at}: {who} accesses address {f.address:#x}, not aligned to its size{times}"
    if kind.startswith("shared_race"):
        pair = {"raw": "reads what", "war": "writes what", "waw": "writes what"}[kind[-3:]]
        did = {"raw": "wrote", "war": "read", "waw": "wrote"}[kind[-3:]]
        return (
            f"{at}: {who} {pair} another thread {did} at {oth} in the same barrier interval"
            f"{times}: a __syncthreads() is missing between them"
        )
    if kind == "global_race_waw":
        return (
            f"{at}: {who} writes a global address another thread or block also writes without "
            f"an atomic{times}"
        )
    if kind == "uninitialized_shared_read":
        return f"{at}: {who} reads shared memory no thread of its block has written{times}"
    return (
        f"{at}: threads of block ({f.block[0]}, {f.block[1]}, {f.block[2]}) wait at different "
        f"barriers ({at} and {oth}){times}: every thread must reach the same __syncthreads()"
    )
