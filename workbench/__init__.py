"""rocm-workbench: a research workbench for LLM inference kernels on AMD GPUs.

The public entry points are imported lazily so that `import workbench` stays cheap (the CLI's
`--help` must not pay for numba or the tokenizer).
"""

from __future__ import annotations

import logging
import os
from typing import Any

__version__ = "0.1.0"

# OpenBLAS's worker threads spin after each call for 2**28 cycles (about 0.1 s) before they
# sleep: after a prefill they took the cores from the decode that follows, whose first ten or so
# tokens ran at half speed (18-50 ms against 10). 2**20 cycles (about 0.4 ms) still bridges the
# gaps between one prefill's matrix products (prefill 240-270 ms either way on SmolLM2) and the
# decode starts at full speed. OpenBLAS reads this when it loads, with NumPy: it takes effect
# when workbench is imported before NumPy (the CLI, the server; a notebook's first import). A
# value set by the user wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

# A library does not print: records go nowhere until an application configures logging
# (workbench.observe.logs.configure, which the CLI and server call).
logging.getLogger("workbench").addHandler(logging.NullHandler())

_EXPORTS = {
    "load": "workbench.engine.loader",
    "Model": "workbench.engine.loader",
    "Engine": "workbench.engine.generate",
    "GenerationConfig": "workbench.engine.generate",
    "WorkbenchError": "workbench.errors",
    "sweep": "workbench.engine.sweep",
    "SweepGrid": "workbench.engine.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext workbench``: registers the ``%%hip`` cell magic (`workbench.widgets.magic`)."""
    from workbench.widgets.magic import load_ipython_extension as load

    load(ipython)
