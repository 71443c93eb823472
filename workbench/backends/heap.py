"""Keeping freed memory in the process: glibc's malloc thresholds for the CPU engine.

A prompt's pass allocates and frees the same buffers every time: the products' outputs, the
threads' copies of their inputs, the KV cache (megabytes each). glibc serves an allocation of
128 KiB or more with a fresh ``mmap`` at first, raises that threshold as such blocks are freed,
and gives the top of its heap back to the kernel once more than twice the threshold is free.
Between two requests the decode's allocations and frees move both, and the next prompt's
buffers came from the kernel again, page by page: about 1,270 page faults a 128-token prefill
on SmolLM2. What that costs depends on the host: 89-110 ms against 75-77 in one hour on this
project's VM, nothing measurable in another, and 3-10% with a pause before each request
(docs/performance.md, "Page faults between requests").

Fixed thresholds stop both: blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come
from the heap, and up to 16 MiB of free memory at its top stays there for the next request.
Setting only one of them is worse than neither, because a fixed value switches off glibc's
adjustment of both: with the trim threshold alone, every block of 128 KiB or more was mmapped
and faulted in (17,300 faults a prefill). Peak resident memory of a ``bench generate`` run
went from 305 to 307 MB; a process that has freed memory keeps up to 16 MiB of it per malloc
arena instead of returning it. 36 generations on one thread (as the server's worker runs
them): peak 305 against 303 MB, 299 against 279-284 left resident at the end; three threads
calling one engine at once: peak 323-340 against 309-315 MB.

glibc reads ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``GLIBC_TUNABLES`` when
a process starts; where the user set any of them, their values stand and nothing is changed
here. Other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MMAP_THRESHOLD = 32 << 20  # bytes: blocks below this come from the heap
TRIM_THRESHOLD = 16 << 20  # bytes of free memory at the heap's top kept for the next request

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Variables through which a user sets glibc's malloc thresholds themselves
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def user_has_set(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` sets glibc's malloc thresholds (`USER_SETTINGS`; for
    ``GLIBC_TUNABLES``, only its ``glibc.malloc`` entries count)."""
    for name in USER_SETTINGS:
        value = environ.get(name)
        if value is None:
            continue
        if name != "GLIBC_TUNABLES" or "glibc.malloc." in value:
            return True
    return False


def _glibc() -> bool:
    """Whether this process runs on glibc (its confstr names it; others have no such name)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to `MMAP_THRESHOLD` and `TRIM_THRESHOLD` for this
    process (see the module's text). Returns whether both were set: False on a C library other
    than glibc, or where the user's environment sets them (`user_has_set`)."""
    if not _glibc():
        return False
    if user_has_set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: glibc's adjustment stops as soon as either is set.
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
