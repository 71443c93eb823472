"""Guard zones around the buffers an emulated kernel may write.

A NumPy array's bytes sit in the process heap: a kernel writing a few elements past its end (the
classic missing ``if (i < n)``) would corrupt the allocator and kill the process later ("double
free or corruption"). So every pointer argument the kernel may write is passed as a staged copy:

    [PROT_NONE page][GUARD_BYTES poison][data, page-aligned][>= GUARD_BYTES poison][PROT_NONE page]

The poison is 0xFF bytes (a NaN as float, -1 as an integer), which an out-of-bounds read of a
guard zone returns. After the launch the zones are checked: a changed byte is a write outside
the buffer, reported by argument and offset; a write that reaches a PROT_NONE page faults and the
runtime turns the signal into an error. Read-only arguments (``const T*``) are passed in place:
they cannot corrupt anything, and copying the weights of a model for every launch would cost
more than the kernel.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from dataclasses import dataclass

import numpy as np

from workbench.errors import InternalError

GUARD_BYTES = 16 * 1024  # poison on each side of a staged buffer
POISON = 0xFF
_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value

# Mappings kept for reuse (by size): a fresh mapping costs a page fault per 4 KiB on first touch,
# more than the copy itself; launches repeat with the same shapes.
_POOL_BYTES = 64 << 20  # at most this much kept mapped
_pool: dict[int, list[int]] = {}
_pool_count = 0  # bytes
_pool_lock = threading.Lock()


@dataclass
class Staged:
    """One argument's staged copy. ``base``/``size``: the data; ``lo``/``hi``: its guard zones."""

    array: np.ndarray  # the caller's array
    arg: int  # its index among the kernel's arguments
    region: int  # mmap'ed address
    total: int
    base: int
    size: int
    lo: int
    hi: int
    copy_back: bool

    def view(self) -> np.ndarray:
        """All bytes between the two PROT_NONE pages, as uint8."""
        n = self.hi - self.lo
        return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(self.lo))

    def damage(self) -> tuple[int, int] | None:
        """(first, last) changed byte offsets relative to the data's start, or None."""
        zone = self.view()
        front = GUARD_BYTES
        changed = np.flatnonzero(zone[:front] != POISON)
        after = np.flatnonzero(zone[front + self.size :] != POISON)
        offsets = [*(changed - front)[:1], *(changed - front)[-1:]]
        offsets += [*(after + self.size)[:1], *(after + self.size)[-1:]]
        if not offsets:
            return None
        return min(offsets), max(offsets)

    def finish(self) -> None:
        """Copy the data back into the caller's array (if it may have changed) and unmap."""
        if self.copy_back and self.size:
            ctypes.memmove(self.array.ctypes.data, self.base, self.size)
        release(self)


def stage(array: np.ndarray, arg: int, copy_back: bool) -> Staged:
    """A guarded copy of ``array`` (C-contiguous) whose data is page-aligned."""
    size = int(array.nbytes)
    data_span = (size + GUARD_BYTES + _PAGE - 1) // _PAGE * _PAGE
    total = _PAGE + GUARD_BYTES + data_span + _PAGE
    addr = _take(total)
    lo = addr + _PAGE
    hi = addr + total - _PAGE
    base = lo + GUARD_BYTES
    s = Staged(array, arg, addr, total, base, size, lo, hi, copy_back)
    zone = s.view()
    zone[:GUARD_BYTES] = POISON
    zone[GUARD_BYTES + size :] = POISON
    if size:
        ctypes.memmove(base, array.ctypes.data, size)
    return s


def _take(total: int) -> int:
    global _pool_count
    with _pool_lock:
        free = _pool.get(total)
        if free:
            _pool_count -= total
            return free.pop()
    addr = _libc.mmap(
        None, total, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    if addr in (None, _MAP_FAILED):
        raise InternalError(
            "internal.emulator", f"could not map {total} bytes for a guarded kernel argument"
        )
    _libc.mprotect(addr, _PAGE, 0)  # PROT_NONE
    _libc.mprotect(addr + total - _PAGE, _PAGE, 0)
    return addr


def release(s: Staged) -> None:
    """Return the mapping to the pool (or unmap it when the pool is full)."""
    global _pool_count
    if not s.region:
        return
    with _pool_lock:
        if _pool_count + s.total <= _POOL_BYTES:
            _pool.setdefault(s.total, []).append(s.region)
            _pool_count += s.total
            s.region = 0
            return
    _libc.munmap(s.region, s.total)
    s.region = 0


def owner_of(staged: list[Staged], address: int) -> Staged | None:
    """The staged argument whose mapping (guard pages included) holds ``address``."""
    for s in staged:
        if s.region <= address < s.region + s.total:
            return s
    return None
