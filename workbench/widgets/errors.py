"""`ErrorInspector`: the error log, filtered by category and code, one record in detail."""

from __future__ import annotations

import json
import time
from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.errors import CATEGORIES
from workbench.runtime.errorlog import ErrorLog, ErrorRecord
from workbench.widgets._common import WIDE, Debounce, esc, pre

ALL = ""  # the filter value that matches everything


def is_compile_error(record: ErrorRecord) -> bool:
    """A record carrying a compiler log and the source lines it points at."""
    return "log" in record.context and "source_lines" in record.context


def describe(record: ErrorRecord) -> str:
    """The detail view of one record as plain text (the panel shows it as HTML)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.time))
    lines = [f"[{record.category}] {record.code} at {when}", record.message]
    for key in ("operation", "kernel", "request_id", "attempts", "recovered"):
        value = getattr(record, key)
        if value is not None:
            lines.append(f"{key}: {value}")
    ctx = {k: v for k, v in record.context.items() if k not in ("log", "source_lines")}
    if ctx:
        lines.append("context: " + json.dumps(ctx, indent=2, default=str))
    return "\n".join(lines)


class ErrorInspector(w.VBox):
    """The records of an `ErrorLog` (``engine.error_log``, or the log given), newest first.

    ``category`` and ``code`` filter (``""``: all); ``records`` holds the matching records as
    dicts; `select` (i) shows record ``i`` of them in detail: ``detail`` is its text, and for a
    compile error ``compiler_log`` and ``source_lines`` are shown side by side. The log's listener
    keeps the view current (debounced); `refresh` re-reads it now.
    """

    category = t.Unicode(ALL)
    code = t.Unicode(ALL)
    codes = t.List(t.Unicode())  # the codes in the log (for the picker)
    records = t.List()  # matching records, newest first, as ErrorRecord.to_dict()
    error_count = t.Int(0)  # records in the log, unfiltered
    selected = t.Int(-1)
    detail = t.Unicode("")
    traceback = t.Unicode("")
    compiler_log = t.Unicode("")
    source_lines = t.List(t.Unicode())

    def __init__(self, source: Any = None, **kwargs: Any) -> None:
        if isinstance(source, ErrorLog):
            self.error_log = source
        else:
            log = getattr(source, "error_log", None)
            if log is None:
                from workbench.runtime.errorlog import default_log

                log = default_log()
            self.error_log = log
        self._records: list[ErrorRecord] = []
        self._debounce = Debounce(self.refresh)
        self.error_log.add_listener(self._debounce.trigger)

        self._category_w = w.Dropdown(options=[("all", ALL), *[(c, c) for c in CATEGORIES]],
                                      description="category", style=WIDE)  # fmt: skip
        self._code_w = w.Dropdown(options=[("all", ALL)], description="code", style=WIDE)
        w.link((self, "category"), (self._category_w, "value"))
        self._code_w.observe(
            lambda c: c["new"] is not None and setattr(self, "code", c["new"]), names="value"
        )
        self._refresh_b = w.Button(description="Refresh", icon="refresh")
        self._refresh_b.on_click(lambda _: self.refresh())
        self._list_w = w.Select(options=[], rows=10, layout=w.Layout(width="auto"))
        self._list_w.observe(
            lambda c: c["new"] is not None and self.select(c["new"]), names="value"
        )
        self._count_w = w.HTML()
        self._detail_w = w.HTML()
        self._log_w = w.HTML(layout=w.Layout(width="50%"))
        self._lines_w = w.HTML(layout=w.Layout(width="50%"))
        self._compile_box = w.HBox([self._log_w, self._lines_w])
        self._trace_w = w.Accordion(children=[w.HTML()], titles=("traceback",))
        self.observe(lambda _: self.refresh(), names=["category", "code"])
        super().__init__(
            [
                w.HBox([self._category_w, self._code_w, self._refresh_b]),
                self._count_w,
                self._list_w,
                self._detail_w,
                self._compile_box,
                self._trace_w,
            ],
            **kwargs,
        )
        self.refresh()

    # -- callbacks --------------------------------------------------------------------------
    def refresh(self) -> None:
        everything = self.error_log.query()
        self.error_count = len(everything)
        self.codes = sorted({r.code for r in everything})
        self._code_w.options = [("all", ALL), *[(c, c) for c in self.codes]]
        if self.code not in (ALL, *self.codes):
            self.code = ALL
        self._code_w.value = self.code
        self._records = list(
            reversed(self.error_log.query(category=self.category or None, code=self.code or None))
        )
        self.records = [r.to_dict() for r in self._records]
        self._count_w.value = f"{len(self._records)} of {self.error_count} recorded errors" + (
            f" ({self.error_log.dropped} older ones dropped)" if self.error_log.dropped else ""
        )
        self._list_w.options = [(self._label(r), i) for i, r in enumerate(self._records)]
        if self._records:
            self.select(min(max(self.selected, 0), len(self._records) - 1))
        else:
            self.select(-1)

    def select(self, index: int) -> None:
        """Show record ``index`` of ``records`` in detail (-1: none)."""
        if not 0 <= index < len(self._records):
            self.selected = -1
            self.detail = self.traceback = self.compiler_log = ""
            self.source_lines = []
        else:
            rec = self._records[index]
            self.selected = index
            self.detail = describe(rec)
            self.traceback = rec.traceback or ""
            compile_error = is_compile_error(rec)
            self.compiler_log = str(rec.context["log"]) if compile_error else ""
            self.source_lines = (
                [str(s) for s in rec.context["source_lines"]] if compile_error else []
            )
            if self._list_w.value != index:
                self._list_w.value = index
        self._render()

    def close(self) -> None:
        debounce = getattr(self, "_debounce", None)  # close() also runs from __del__
        if debounce is not None:
            debounce.cancel()
            self.error_log.remove_listener(debounce.trigger)
            self._debounce = None
        super().close()

    # -- view -----------------------------------------------------------------------------------
    @staticmethod
    def _label(r: ErrorRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(r.time))
        first = r.message.splitlines()[0] if r.message else ""
        # What tells apart records of one code: the request, the kernel, the attempt.
        where = " ".join(
            f"{label}{value}"
            for label, value in (("req ", r.request_id), ("", r.kernel), ("attempt ", r.attempts))
            if value is not None
        )
        return f"{when} [{r.category}] {r.code}{f' ({where})' if where else ''}: {first[:100]}"

    def _render(self) -> None:
        self._detail_w.value = pre(self.detail) if self.detail else "<i>no error selected</i>"
        if self.compiler_log:
            self._log_w.value = "<b>compiler log</b>" + pre(self.compiler_log)
            self._lines_w.value = "<b>source lines</b>" + pre("\n".join(self.source_lines))
            self._compile_box.layout.display = None
        else:
            self._log_w.value = self._lines_w.value = ""
            self._compile_box.layout.display = "none"
        self._trace_w.children[0].value = pre(self.traceback) if self.traceback else esc("none")
