"""glibc's malloc thresholds (`workbench.backends.heap`): a buffer freed and allocated again
comes back without page faults, unless the user set the thresholds themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from workbench.backends import heap

# In a fresh interpreter: import the backends, then free an 8 MiB buffer and allocate it again;
# print the page faults the second allocation took.
_REALLOCATE = textwrap.dedent(
    """
    import resource
    import workbench.backends
    import numpy as np

    a = np.ones(1 << 21, np.float32)  # (2M,): 8 MiB, touched
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(1 << 21, np.float32)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)
# Faults an 8 MiB buffer from the kernel takes at the least: 4 KiB pages, up to 8 mapped a fault
# (a kernel may map a few at once: this project's VM took about 510)
_FRESH = (8 << 20) // 4096 // 8


def _faults_of_reallocation(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in heap.USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", _REALLOCATE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"MALLOC_TRIM_THRESHOLD_": "1"}, True),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, True),
        ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"}, False),
        ({"PATH": "/bin"}, False),
    ],
)
def test_user_has_set_reads_the_users_malloc_variables(environ, expected):
    assert heap.user_has_set(environ) is expected


def test_a_freed_buffer_comes_back_without_page_faults():
    if not heap._glibc():
        assert heap.keep_freed_memory() is False  # other C libraries are left alone
        return
    assert heap.keep_freed_memory() is True
    faults = _faults_of_reallocation()
    assert faults < _FRESH // 8, f"{faults} page faults reallocating a freed 8 MiB buffer"


def test_the_users_thresholds_stand():
    if not heap._glibc():
        return  # nothing is set there (the test above)
    # glibc's own fixed 128 KiB threshold, set by the user: an 8 MiB buffer is mmapped afresh
    faults = _faults_of_reallocation(MALLOC_MMAP_THRESHOLD_="131072")
    assert faults >= _FRESH, f"only {faults} page faults: the user's threshold was overridden"
