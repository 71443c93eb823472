"""`Dashboard`: the five panels as tabs over one engine."""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from workbench.widgets._common import esc
from workbench.widgets.errors import ErrorInspector
from workbench.widgets.generation import GenerationPanel
from workbench.widgets.kernel_timing import KernelTimingPanel
from workbench.widgets.retry_stats import RetryStatsPanel
from workbench.widgets.serving import ServingPanel

TITLES = ("Generate", "Kernel timing", "Retries & faults", "Errors", "Serving")


class Dashboard(w.VBox):
    """Tabs: ``generation``, ``kernel_timing``, ``retry_stats``, ``errors``, ``serving`` (the
    panels)."""

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        self.engine = engine
        self.generation = GenerationPanel(engine)
        self.kernel_timing = KernelTimingPanel(engine)
        self.retry_stats = RetryStatsPanel(engine)
        self.errors = ErrorInspector(engine)
        self.serving = ServingPanel(engine)
        self.tabs = w.Tab(children=self._panels(), titles=TITLES)
        self._header = w.HTML(self._header_html())
        # Refresh the retry, error and serving views when their tab is opened.
        self.tabs.observe(self._on_tab, names="selected_index")
        super().__init__([self._header, self.tabs], **kwargs)

    def _header_html(self) -> str:
        state = getattr(self.engine, "state", None)
        if callable(state):
            s = state()
            model, backend = esc(s.get("model", "?")), esc(s.get("backend", "?"))
            return f"model <b>{model}</b> &middot; backend <b>{backend}</b>"
        return f"backend <b>{esc(type(getattr(self.engine, 'backend', None)).__name__)}</b>"

    def _on_tab(self, change: Any) -> None:
        if change["new"] == 2:
            self.retry_stats.refresh()
        elif change["new"] == 3:
            self.errors.refresh()
        elif change["new"] == 4:
            self.serving.refresh()

    def _panels(self) -> list[Any]:
        return [self.generation, self.kernel_timing, self.retry_stats, self.errors, self.serving]

    def close(self) -> None:
        for panel in self._panels():
            panel.close()
        super().close()
