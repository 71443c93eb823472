"""Compute backends. Importing this package sets two defaults for numba's OpenMP thread pool,
and glibc's malloc thresholds (`heap`).

numba's OpenMP workers spin-wait after every parallel region (libgomp's default: up to about
300,000 polls, several milliseconds) before sleeping. On a machine whose cores are shared with
other processes, or with BLAS's own threads, a worker spinning that long takes the core that the
thread it waits for needs: on this project's shared 2-core machine, 2-thread decode (then made
of parallel regions) fell to 5-7 tok/s against 30-45 tok/s with passive waiting.
``OMP_WAIT_POLICY=PASSIVE`` makes the workers sleep at once.

Sleeping at once has its own cost: every region then wakes a sleeping worker, 40-70 us on this
project's VM, and a prompt's products are about 150 regions (five a layer) with a few tens of
microseconds of serial work between them. ``GOMP_SPINCOUNT=10000`` (libgomp reads it whatever
the policy) lets a worker poll for about 0.15 ms before it sleeps: long enough to bridge those
gaps, short enough that a worker never holds a core for long. A prompt's own GEMM kernel ran at
0.82 of OpenBLAS's rate on two threads without it and at 0.97 with it, a whole 128-token
prefill 5% faster (docs/performance.md, "Waking numba's workers").

Both are read once, when numba first loads its threading layer, so they are set here, before any
backend starts its threads; values set by the user win.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from workbench.backends.heap import keep_freed_memory

keep_freed_memory()
