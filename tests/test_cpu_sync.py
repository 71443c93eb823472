"""The spin-then-sleep barrier and the compiled clock of `cpu_sync` (used by the fused decode)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from numba import njit

from workbench.backends import cpu_sync

DEADLINE_S = 120.0  # a hung barrier fails the test instead of hanging the run


@njit(nogil=True)
def _rounds(tid, n, state, spins, slots, seen, rounds):
    """Each round: write this thread's slot, meet, read every slot, meet again."""
    for r in range(rounds):
        slots[tid] = r + 1
        cpu_sync.barrier_wait(state, n, spins)
        for j in range(n):
            seen[tid, r, j] = slots[j]
        cpu_sync.barrier_wait(state, n, spins)


def _run_team(n: int, fn, args: tuple) -> None:
    threads = [threading.Thread(target=fn, args=(tid, *args), daemon=True) for tid in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(DEADLINE_S)
    assert not any(th.is_alive() for th in threads), "a thread is still waiting at the barrier"


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("spins", [0, 50, cpu_sync.SPINS], ids=lambda s: f"spins{s}")
def test_every_thread_sees_every_write_made_before_the_barrier(n, spins, rng, seed):
    rounds = int(rng.integers(50, 400))
    state = cpu_sync.new_barrier()
    slots = np.zeros(n, np.int64)  # (threads,)
    seen = np.zeros((n, rounds, n), np.int64)  # (thread, round, slot read)
    _run_team(n, _rounds, (n, state, spins, slots, seen, rounds))
    want = np.broadcast_to(np.arange(1, rounds + 1)[None, :, None], seen.shape)
    assert np.array_equal(seen, want), f"seed={seed}"


@njit(nogil=True)
def _meet(state, n, spins):
    cpu_sync.barrier_wait(state, n, spins)


def test_a_sleeping_waiter_is_woken_and_the_budget_adapts():
    """With no spinning the early thread must sleep (futex) and still be released; a wait that
    slept halves the spin budget, one that a spin caught doubles it back towards the maximum."""
    state = cpu_sync.new_barrier()
    assert state[cpu_sync._BUDGET] == cpu_sync.SPINS
    early = threading.Thread(target=_meet, args=(state, 2, 0), daemon=True)
    early.start()
    time.sleep(0.05)  # let it reach the barrier and sleep (correct either way)
    _meet(state, 2, 0)
    early.join(DEADLINE_S)
    assert not early.is_alive()
    # spins=0 gives a budget of 0 polls: the thread that waited slept, so the budget fell to the
    # floor (unless the other arrived between its two reads of the generation: then it is kept).
    assert state[cpu_sync._BUDGET] in (cpu_sync._MIN_SPINS, cpu_sync.SPINS)
    state[cpu_sync._BUDGET] = 100
    _meet(state, 1, 10**9)  # a team of one never waits and leaves the budget alone
    assert state[cpu_sync._BUDGET] == 100


def test_a_team_of_one_passes_at_once():
    state = cpu_sync.new_barrier()
    for _ in range(3):
        _meet(state, 1, cpu_sync.SPINS)
    assert state[cpu_sync._COUNT] == 0 and state[cpu_sync._BUDGET] == cpu_sync.SPINS


@njit(nogil=True)
def _clock_pair():
    return cpu_sync.monotonic(), cpu_sync.monotonic()


def test_the_compiled_clock_is_the_monotonic_clock():
    before = time.monotonic()
    a, b = _clock_pair()
    after = time.monotonic()
    assert before <= a <= b <= after


@njit(nogil=True)
def _take(tid, counters, slot, units, taken):
    """Claim units of shared loop ``slot`` until none are left, marking each one taken."""
    c = cpu_sync.claim(counters, slot)
    while c < units:
        taken[c, tid] += 1
        c = cpu_sync.claim(counters, slot)


@pytest.mark.parametrize("n", [2, 3])
def test_claim_hands_every_unit_to_exactly_one_thread(n, rng, seed):
    units = int(rng.integers(1_000, 50_000))
    counters = cpu_sync.new_counters(2)
    taken = np.zeros((units, n), np.int64)  # (unit, thread)
    _run_team(n, _take, (counters, 1, units, taken))
    assert np.array_equal(taken.sum(axis=1), np.ones(units)), f"seed={seed}"
    assert counters[0] == 0, "another loop's counter moved"
