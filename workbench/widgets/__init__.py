"""Notebook views over the engine and its runtime: ipywidgets panels and the ``%%hip`` magic.

Each panel is an ``ipywidgets.VBox`` whose state lives in traitlets on the panel itself
(``panel.output_text``, ``panel.results``, ...) and whose buttons call public methods
(``panel.generate()``, ``panel.run()``, ...), so tests and scripts drive them without a browser.
The panels hold no logic of their own: they call the engine, the kernel benchmark, the retry
statistics, the fault injector and the error log. Imports are lazy: ``import workbench.widgets``
does not import ipywidgets or matplotlib until a panel is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationPanel": "workbench.widgets.generation",
    "KernelTimingPanel": "workbench.widgets.kernel_timing",
    "MemoryView": "workbench.widgets.memory_view",
    "SweepView": "workbench.widgets.sweep_view",
    "RetryStatsPanel": "workbench.widgets.retry_stats",
    "ErrorInspector": "workbench.widgets.errors",
    "ServingPanel": "workbench.widgets.serving",
    "Dashboard": "workbench.widgets.dashboard",
    "load_ipython_extension": "workbench.widgets.magic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")
