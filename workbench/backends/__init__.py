"""Compute backends. Importing this package sets one default for numba's OpenMP thread pool.

numba's OpenMP workers spin-wait after every parallel region (libgomp's default: up to about
300,000 polls) before sleeping. On a machine whose cores are shared with other processes, or
with BLAS's own threads during prefill, a spinning worker takes the core that the thread it waits
for needs: on this project's shared 2-core machine, 2-thread decode fell to 5-7 tok/s against
30-45 tok/s with passive waiting, and a parallel region with a short serial gap cost 30-125 us
instead of 5 us. Passive workers sleep at once and are woken per region, which here costs a few
microseconds. ``OMP_WAIT_POLICY`` is read once, when numba first loads its threading layer, so it
is set here, before any backend starts its threads; a value set by the user wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
