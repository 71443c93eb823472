"""`ServingPanel`: the continuous batch as the server's metrics show it.

It reads the engine's `Metrics` registry, the one ``workbench serve`` exports at ``/metrics``:
running and waiting sequences, KV pages used of the pool's total, prompt positions served from
the prefix cache, preemptions, and the batch steps with their mean size. The figures are those of
the last batch step (the engine publishes them once per step); `refresh` re-reads them.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.widgets._common import esc

# trait -> (exposition name, what the view calls it); one source: workbench.observe.metrics
FIGURES = {
    "running": ("workbench_batch_running_sequences", "running sequences"),
    "waiting": ("workbench_batch_waiting_sequences", "waiting sequences"),
    "pages_used": ("workbench_kv_pages_used", "KV pages used"),
    "pages_total": ("workbench_kv_pages_capacity", "KV pages in the pool"),
    "prefix_hit_tokens": ("workbench_prefix_cache_hit_tokens_total", "prefix-cache hit tokens"),
    "preemptions": ("workbench_preemptions_total", "preemptions"),
    "steps": ("workbench_batch_size_sequences_count", "batch steps"),
}
_BATCH_SUM = "workbench_batch_size_sequences_sum"


class ServingPanel(w.VBox):
    """Live figures of the continuous batch from ``metrics`` (default: ``engine.metrics``) for
    ``model`` (default: ``engine.model.name``). ``has_data`` is False until a batch step ran."""

    running = t.Int(0)
    waiting = t.Int(0)
    pages_used = t.Int(0)
    pages_total = t.Int(0)
    prefix_hit_tokens = t.Int(0)
    preemptions = t.Int(0)
    steps = t.Int(0)
    mean_batch = t.Float(0.0)  # sequences per step, over all steps so far
    has_data = t.Bool(False)

    def __init__(
        self, engine: Any = None, *, metrics: Any = None, model: str | None = None, **kwargs: Any
    ) -> None:
        self.engine = engine
        self._metrics = metrics if metrics is not None else getattr(engine, "metrics", None)
        if model is None and engine is not None:
            model = engine.model.name
        self.model = model or ""
        self._pages_w = w.IntProgress(value=0, min=0, max=1, description="KV pages")
        self._figures_w = w.HTML()
        self._refresh_w = w.Button(description="Refresh", icon="refresh")
        self._refresh_w.on_click(lambda _: self.refresh())
        super().__init__([self._refresh_w, self._pages_w, self._figures_w], **kwargs)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the figures from the metrics registry."""
        values: dict[str, float | None] = {}
        for name, (sample, _) in FIGURES.items():
            values[name] = (
                self._metrics.value(sample, model=self.model) if self._metrics is not None else None
            )
        self.has_data = values["steps"] is not None and values["steps"] > 0
        for name, v in values.items():
            setattr(self, name, int(v or 0))
        total = self._metrics.value(_BATCH_SUM, model=self.model) if self.has_data else None
        self.mean_batch = (total or 0.0) / self.steps if self.steps else 0.0
        self._render()

    def _render(self) -> None:
        self._pages_w.max = max(1, self.pages_total)
        self._pages_w.value = min(self.pages_used, self._pages_w.max)
        if not self.has_data:
            self._figures_w.value = "<i>no batch step yet: submit requests (or serve) first</i>"
            return
        use = 100.0 * self.pages_used / self.pages_total if self.pages_total else 0.0
        rows = [(label, getattr(self, name)) for name, (_, label) in FIGURES.items()]
        rows.insert(4, ("KV page use", f"{self.pages_used} / {self.pages_total} ({use:.0f}%)"))
        rows.append(("mean batch size", f"{self.mean_batch:.2f}"))
        body = "".join(f"<tr><td>{esc(k)}</td><td><b>{esc(v)}</b></td></tr>" for k, v in rows)
        self._figures_w.value = f"<table><tbody>{body}</tbody></table>"
