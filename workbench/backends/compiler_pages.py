"""Give back the resident pages of LLVM's shared library once every kernel is loaded.

numba compiles and loads kernels through llvmlite, one shared library (``libllvmlite.so``, about
180 MB, all of LLVM). Loading it runs LLVM's static constructors, which touch code all over it,
and the kernel maps each touched file page's whole page-cache folio (large folios on recent
kernels): about 100 MB of that library are resident after ``import numba`` and again after the
first kernel is loaded from numba's disk cache, nearly a third of a generation's peak resident
memory. Once the kernels a generation runs are loaded, none of that code runs again: compiled
kernels live in LLVM's own anonymous memory and call numba's helper libraries, not LLVM.

`release` drops those pages from this process's page tables (``madvise(MADV_DONTNEED)``). Only
mappings of the library that are read-only and hold no private (copied-on-write) page qualify,
so what comes back on a later access is the file's own bytes, exactly what was dropped: a later
compile still works and faults in the code it needs. The pages stay in the page cache; what
shrinks is this process's resident set.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

# The shared libraries holding LLVM: llvmlite's own (statically linked LLVM), or a separate
# libLLVM where llvmlite is built against one.
LIBRARY_NAMES = ("libllvmlite", "libLLVM")

_SMAPS = Path("/proc/self/smaps")


def releasable(smaps: str) -> list[tuple[int, int]]:
    """(start, end) addresses of LLVM's mappings in ``smaps`` (the text of /proc/PID/smaps)
    that are read-only and hold no private page; only their pages may be dropped safely."""
    spans = []
    span: tuple[int, int] | None = None
    for line in smaps.splitlines():
        fields = line.split(maxsplit=5)
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode path
            span = None
            path = fields[5].strip() if len(fields) > 5 else ""
            if "w" not in fields[1] and any(n in Path(path).name for n in LIBRARY_NAMES):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                span = (start, end)
        elif fields[0] == "Anonymous:" and span is not None and fields[1] == "0":
            spans.append(span)
    return spans


def release() -> int:
    """Drop this process's resident pages of LLVM's library; returns the bytes of address range
    advised (0 where /proc/self/smaps or madvise is missing, i.e. not Linux)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        smaps = _SMAPS.read_text()
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    advised = 0
    for start, end in releasable(smaps):
        # Failure leaves the pages resident, which is only a missed saving.
        if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            advised += end - start
    return advised
