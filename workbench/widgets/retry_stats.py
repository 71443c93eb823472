"""`RetryStatsPanel`: retries per operation, backoff delays, breaker states, fault injection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.errors import WorkbenchError
from workbench.runtime.faults import SITES, FaultInjector
from workbench.runtime.retry import DELAY_BUCKETS_S
from workbench.widgets._common import (
    WIDE,
    Debounce,
    chart_layout,
    esc,
    figure_png,
    new_figure,
    table,
)

COUNTER_COLUMNS = ["operation", "calls", "attempts", "retries", "recovered", "exhausted", "failed"]


def delay_histogram(snapshot: dict[str, dict[str, Any]]) -> Any:
    """A Figure: backoff delays per bucket of `DELAY_BUCKETS_S`, one bar series per operation."""
    import numpy as np

    fig = new_figure(6.0, 3.0)
    ax = fig.add_subplot()
    labels = [f"<={b * 1e3:g} ms" if b != float("inf") else "more" for b in DELAY_BUCKETS_S]
    x = np.arange(len(labels))
    ops = [op for op, s in snapshot.items() if s["retries"]]
    width = 0.8 / max(1, len(ops))
    for i, op in enumerate(ops):
        counts = [snapshot[op]["delay_histogram"][b] for b in DELAY_BUCKETS_S]
        ax.bar(x + i * width, counts, width, label=op)
    ax.set_xticks(x + 0.4 - width / 2, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("retries")
    ax.set_title("backoff delay before each retry" if ops else "no retries yet", fontsize=9)
    if ops:
        ax.legend(fontsize=8)
    return fig


class RetryStatsPanel(w.VBox):
    """Live retry counters, the delay histogram and breaker states, with fault-injection controls.

    The sources come from ``engine`` (``retry_stats``, ``breaker``, ``faults``, ``state()``) or are
    given directly. `refresh` re-reads them (listeners call it, debounced, as retries and breaker
    transitions happen); `apply_faults` sets ``fault_site`` to ``fault_rate`` on the injector
    (a new injector with the same modes when ``fault_seed`` changed); `clear_faults` turns every
    site off.
    """

    counters = t.Dict()  # RetryStats.snapshot() without the raw delays
    breakers = t.List()  # CircuitBreaker.snapshot() of each breaker
    engine_state = t.Dict()  # engine.state() when the engine has it
    fault_site = t.Unicode(SITES[0])
    fault_rate = t.Unicode("0.1")  # a rate in [0, 1], "once", "always" or "never"
    fault_seed = t.Int(0)
    faults_spec = t.Unicode("")  # the injector's active modes, e.g. "launch:0.1"
    injected = t.Dict()  # faults injected so far, per site
    error = t.Unicode("")

    def __init__(
        self,
        engine: Any = None,
        *,
        retry_stats: Any = None,
        breakers: Sequence[Any] = (),
        faults: FaultInjector | None = None,
        **kwargs: Any,
    ) -> None:
        self.engine = engine
        self._stats = (
            retry_stats if retry_stats is not None else getattr(engine, "retry_stats", None)
        )
        engine_breaker = getattr(engine, "breaker", None)
        self._breakers = [*([engine_breaker] if engine_breaker is not None else []), *breakers]
        self._own_faults = faults
        injector = self.faults
        if injector is not None:
            self.fault_seed = injector.seed
        self._debounce = Debounce(self.refresh)
        if self._stats is not None:
            self._stats.add_listener(self._debounce.trigger)
        for b in self._breakers:
            b.add_listener(self._debounce.trigger)

        self._site_w = w.Dropdown(options=SITES, description="site", style=WIDE)
        self._rate_w = w.Combobox(
            options=["0.01", "0.1", "0.5", "once", "always", "never"],
            description="rate",
            style=WIDE,
        )
        self._seed_w = w.IntText(description="seed", style=WIDE)
        for name, widget in (("fault_site", self._site_w), ("fault_rate", self._rate_w),
                             ("fault_seed", self._seed_w)):  # fmt: skip
            widget.value = getattr(self, name)
            w.link((self, name), (widget, "value"))
        self._apply_b = w.Button(description="Apply", button_style="warning", icon="bolt")
        self._clear_b = w.Button(description="All faults off", icon="ban")
        self._refresh_b = w.Button(description="Refresh", icon="refresh")
        self._reset_b = w.Button(description="Reset breakers", icon="undo")
        self._apply_b.on_click(lambda _: self.apply_faults())
        self._clear_b.on_click(lambda _: self.clear_faults())
        self._refresh_b.on_click(lambda _: self.refresh())
        self._reset_b.on_click(lambda _: self.reset_breakers())
        self._faults_w = w.HTML()
        self._counters_w = w.HTML()
        self._hist_w = w.Image(format="png", layout=chart_layout())
        self._breakers_w = w.HTML()
        super().__init__(
            [
                w.HTML("<b>Fault injection</b>"),
                w.HBox([self._site_w, self._rate_w, self._seed_w]),
                w.HBox([self._apply_b, self._clear_b]),
                self._faults_w,
                w.HTML("<b>Retries per operation</b>"),
                w.HBox([self._refresh_b, self._reset_b]),
                self._counters_w,
                self._hist_w,
                w.HTML("<b>Circuit breakers</b>"),
                self._breakers_w,
            ],
            **kwargs,
        )
        self.refresh()

    @property
    def faults(self) -> FaultInjector | None:
        """The injector the controls act on: the one given, else the engine's (None when the
        engine follows the process-wide one; `apply_faults` then gives it its own)."""
        if self._own_faults is not None:
            return self._own_faults
        return getattr(self.engine, "faults", None)

    # -- callbacks --------------------------------------------------------------------------
    def apply_faults(self) -> bool:
        """Set ``fault_site`` to ``fault_rate`` (seeded by ``fault_seed``); False on bad input
        (``error`` says why)."""
        self.error = ""
        try:
            injector = self.faults
            if injector is None or injector.seed != self.fault_seed:
                fresh = FaultInjector(seed=self.fault_seed)
                for site, mode in (injector.modes() if injector is not None else {}).items():
                    fresh.set(site, mode)
                injector = self._install(fresh)
            injector.set(self.fault_site, self.fault_rate)
        except WorkbenchError as e:
            self.error = f"{e.code}: {e.message}"
            return False
        finally:
            self.refresh()
        return True

    def clear_faults(self) -> None:
        injector = self.faults
        if injector is not None:
            for site in SITES:
                injector.set(site, "never")
        self.refresh()

    def reset_breakers(self) -> None:
        for b in self._breakers:
            b.reset()
        self.refresh()

    def refresh(self) -> None:
        """Re-read counters, breakers, faults and the engine's state into the traits and view."""
        snap = self._stats.snapshot() if self._stats is not None else {}
        self.counters = {
            op: {k: v for k, v in s.items() if k != "delays"} for op, s in snap.items()
        }
        self.breakers = [b.snapshot() for b in self._breakers]
        state = getattr(self.engine, "state", None)
        self.engine_state = state() if callable(state) else {}
        injector = self.faults
        self.faults_spec = injector.spec() if injector is not None else ""
        self.injected = {k: v for k, v in injector.counts().items() if v} if injector else {}
        self._render(snap)

    def close(self) -> None:
        """Detach the listeners and close the widgets."""
        debounce = getattr(self, "_debounce", None)  # close() also runs from __del__
        if debounce is not None:
            debounce.cancel()
            if self._stats is not None:
                self._stats.remove_listener(debounce.trigger)
            for b in self._breakers:
                b.remove_listener(debounce.trigger)
            self._debounce = None
        super().close()

    # -- internals ------------------------------------------------------------------------------
    def _install(self, injector: FaultInjector) -> FaultInjector:
        if self._own_faults is not None or self.engine is None:
            self._own_faults = injector
        elif callable(getattr(self.engine, "set_faults", None)):
            self.engine.set_faults(injector)  # reaches the engine's launchers too
        else:
            self.engine.faults = injector
        return injector

    def _render(self, snap: dict[str, dict[str, Any]]) -> None:
        spec = self.faults_spec or "none"
        injected = ", ".join(f"{k}: {v}" for k, v in self.injected.items()) or "none yet"
        text = f"active faults: <code>{esc(spec)}</code> &middot; injected: {esc(injected)}"
        if self.error:
            text += f"<div style='color:#b00'>{esc(self.error)}</div>"
        self._faults_w.value = text
        rows = [{"operation": op, **s} for op, s in self.counters.items()]
        self._counters_w.value = table(rows, COUNTER_COLUMNS, empty="no retried calls yet")
        self._hist_w.value = figure_png(delay_histogram(snap))
        breaker_rows = self.breakers
        html = table(
            breaker_rows,
            ["name", "state", "consecutive_failures", "failure_threshold", "opened",
             "retry_after_s"],
            empty="no circuit breaker (the backend has none)",
        )  # fmt: skip
        st = self.engine_state
        if st:
            fallback = " (fallback active)" if st.get("fallback_active") else ""
            html = (
                f"<div>backend <b>{esc(st.get('backend', '?'))}</b>"
                f" (requested {esc(st.get('requested_backend', '?'))}){esc(fallback)}</div>" + html
            )
        self._breakers_w.value = html
