"""A spin-then-sleep barrier, and a clock, for numba code that several OS threads run at once.

Why not numba's parallel regions. A decode token of a 30-layer model needs about 120 points
where the threads must meet (after each group of matrix rows). As numba parallel regions with
passive OpenMP workers each costs a futex wake-up, 25-30 us on this project's shared 2-core
machine: 3-4 ms of an 8-30 ms token. Spinning OpenMP workers meet faster but spin for up to
300,000 polls after every region, starving BLAS and other processes. Here a fixed team of threads
runs the whole token in one call each (`fused_decode`) and meets at this barrier: it spins for a
bounded, adaptive number of polls (a meeting costs well under a microsecond when both threads
run), then sleeps on a futex (Linux; elsewhere it yields its core at every poll) until the last
thread arrives and wakes it, so a thread whose partner was descheduled does not hold a core the
partner needs. (Yielding instead of sleeping cost up to 100 us per meeting on the loaded machine.)

`monotonic()` reads the monotonic clock inside compiled code, so that a team's call can time
its own phases instead of being split into one call per phase.

The barrier state is a small int32 array shared by the team (`new_barrier`). Memory order is
sequentially consistent: everything a thread wrote before the barrier is visible to every thread
after it.
"""

from __future__ import annotations

import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_I32, _I64 = ir.IntType(32), ir.IntType(64)
_MACHINE = platform.machine().lower()
_X86 = _MACHINE in ("x86_64", "amd64", "i686", "x86")
# The futex system call's number (Linux only; 0: sleep by yielding instead).
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(_MACHINE, 0)
if not sys.platform.startswith("linux"):
    _SYS_FUTEX = 0
_FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE = 0 | 128, 1 | 128
_CLOCK_MONOTONIC = 6 if sys.platform == "darwin" else 1

# Barrier array layout (int32 slots): the arrival count, the generation, the number of sleepers
# and the current spin budget, each on its own 64-byte cache line.
_COUNT, _GEN, _SLEEPERS, _BUDGET, _SLOTS = 0, 16, 32, 48, 64
# Polls before a waiting thread goes to sleep: about 30 us of ``pause`` here (about 15 ns a poll),
# longer than the usual imbalance between threads that share work out in small pieces, while a
# futex sleep and wake-up costs tens of microseconds on a VM. 2-thread decode of SmolLM2, quiet
# machine, the budget alternated in one process (16-token blocks): median 5.32 / 5.63 ms a token
# at 200 polls (the budget then fell to 16-32 after sleeps), 5.02-5.33 at 1000-20000; with two
# busy loops taking both cores, 11.1 ms at 200 and 11.3 at 2000, the budget halving after sleeps
# either way. (When the decode still alternated with numba's parallel regions, under load, 2000
# polls had cost a third of the speed: those regions are gone from the decode.)
SPINS = 2000
# The spin budget adapts between these: halved after a wait that had to sleep (the partner was
# descheduled: spinning only burns a core someone else could use), doubled after one that a
# spin caught.
_MIN_SPINS = 16


def new_barrier() -> np.ndarray:
    """The state of one barrier: (64,) int32, the spin budget starting at `SPINS`."""
    state = np.zeros(_SLOTS, np.int32)
    state[_BUDGET] = SPINS
    return state


def _slot(context, builder, sig, args):
    arr = context.make_array(sig.args[0])(context, builder, args[0])
    return builder.gep(arr.data, [args[1]])


@intrinsic
def _atomic_add(typingctx, arr, i, v):
    """arr[i] += v atomically (int32 array); returns the old value."""

    def codegen(context, builder, sig, args):
        val = context.cast(builder, args[2], sig.args[2], types.int32)
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), val, "seq_cst")

    return types.int32(arr, i, v), codegen


@intrinsic
def _atomic_load(typingctx, arr, i):
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "seq_cst", 4)

    return types.int32(arr, i), codegen


@intrinsic
def _atomic_store(typingctx, arr, i, v):
    def codegen(context, builder, sig, args):
        val = context.cast(builder, args[2], sig.args[2], types.int32)
        builder.store_atomic(val, _slot(context, builder, sig, args), "seq_cst", 4)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def _pause(typingctx):
    """The CPU's spin-wait hint (x86 ``pause``); nothing elsewhere."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = builder.module.globals.get("llvm.x86.sse2.pause") or ir.Function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


def _libc(builder, name, ret, params, var_arg=False):
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ret, params, var_arg=var_arg), name)
    return fn


@intrinsic
def _futex(typingctx, arr, i, op, val):
    """futex(&arr[i], op, val) for an int32 array: FUTEX_WAIT (sleep while arr[i] == val) or
    FUTEX_WAKE (wake up to val sleepers). Only where ``_SYS_FUTEX`` is set."""

    def codegen(context, builder, sig, args):
        fn = _libc(builder, "syscall", _I64, [_I64], var_arg=True)
        addr = builder.ptrtoint(_slot(context, builder, sig, args), _I64)
        opv = context.cast(builder, args[2], sig.args[2], types.int32)
        v = context.cast(builder, args[3], sig.args[3], types.int32)
        null = ir.Constant(_I64, 0)
        builder.call(fn, [ir.Constant(_I64, _SYS_FUTEX), addr, opv, v, null, null, null])
        return context.get_dummy_value()

    return types.none(arr, i, op, val), codegen


@intrinsic
def _sched_yield(typingctx):
    """libc's ``sched_yield()``: let another runnable thread have this core."""

    def codegen(context, builder, sig, args):
        builder.call(_libc(builder, "sched_yield", _I32, []), [])
        return context.get_dummy_value()

    return types.none(), codegen


@njit(cache=True, nogil=True)
def barrier_wait(state: np.ndarray, n: int, spins: int) -> None:
    """Block until ``n`` threads have called this on ``state`` (a `new_barrier`); reusable."""
    if n <= 1:
        return
    gen = _atomic_load(state, _GEN)
    if _atomic_add(state, _COUNT, 1) == n - 1:
        # The last to arrive resets the count, then releases the others.
        _atomic_store(state, _COUNT, 0)
        _atomic_add(state, _GEN, 1)
        if _SYS_FUTEX != 0 and _atomic_load(state, _SLEEPERS) > 0:
            _futex(state, _GEN, _FUTEX_WAKE_PRIVATE, n)
        return
    budget = min(_atomic_load(state, _BUDGET), spins)
    polls = 0
    slept = False
    while _atomic_load(state, _GEN) == gen:
        if polls < budget:
            _pause()
            polls += 1
        elif _SYS_FUTEX != 0:
            # Announce the sleep, then sleep only while the generation is still ``gen`` (the
            # kernel checks that atomically): a release in between is never missed.
            slept = True
            _atomic_add(state, _SLEEPERS, 1)
            _futex(state, _GEN, _FUTEX_WAIT_PRIVATE, gen)
            _atomic_add(state, _SLEEPERS, -1)
        else:
            slept = True
            _sched_yield()
    if slept:
        _atomic_store(state, _BUDGET, max(budget // 2, _MIN_SPINS))
    elif budget < spins:
        _atomic_store(state, _BUDGET, min(2 * budget, spins))


# Work counters (`new_counters`, `claim`): one per shared loop, each on its own cache line.
_COUNTER_STRIDE = 16


def new_counters(n: int) -> np.ndarray:
    """n work counters at zero: (n * 16,) int32, counter i at element 16 i."""
    return np.zeros(n * _COUNTER_STRIDE, np.int32)


@njit(cache=True, nogil=True, inline="always")
def claim(counters: np.ndarray, i: int) -> int:
    """The next unit of shared loop i (0, 1, 2, ... across all threads that call this): each
    unit goes to exactly one caller, whichever asks first."""
    return _atomic_add(counters, i * _COUNTER_STRIDE, 1)


@njit(cache=True, nogil=True, inline="always")
def claim_in_part(counters: np.ndarray, slot: int, part: int, nt: int, units: int) -> int:
    """The next unit of shared loop ``slot`` from ``part`` (of nt parts) of its 0..units-1, or -1.

    Each thread works through its own part (tid) first, front to back, then helps with the
    others': the owner's reads stay one ascending stream (as the hardware prefetcher likes), and
    a thread the VM or the memory slows down is helped instead of holding the others at the
    next barrier. One counter per part (`claim`), mostly touched by its owner only: counters
    holds ``slot * nt + part`` for every part."""
    first, end = units * part // nt, units * (part + 1) // nt
    c = first + claim(counters, slot * nt + part)
    return c if c < end else -1


@intrinsic
def monotonic(typingctx):
    """Seconds on the monotonic clock (``clock_gettime``), as ``time.monotonic()``."""

    def codegen(context, builder, sig, args):
        ts = builder.alloca(ir.ArrayType(_I64, 2))  # struct timespec {tv_sec, tv_nsec}
        fn = _libc(builder, "clock_gettime", _I32, [_I32, ts.type])
        builder.call(fn, [ir.Constant(_I32, _CLOCK_MONOTONIC), ts])
        zero = ir.Constant(_I32, 0)
        sec = builder.load(builder.gep(ts, [zero, zero]))
        nsec = builder.load(builder.gep(ts, [zero, ir.Constant(_I32, 1)]))
        f64 = ir.DoubleType()
        return builder.fadd(
            builder.sitofp(sec, f64),
            builder.fmul(builder.sitofp(nsec, f64), ir.Constant(f64, 1e-9)),
        )

    return types.float64(), codegen
