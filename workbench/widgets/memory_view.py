"""`MemoryView`: the memory counters of one registry kernel, as a GPU target would see them.

The counting is `workbench.engine.kernel_sanitize.profile_kernel` (the instrumented CPU
emulator); this module shows its answer: the kernel's source lines with requests, active lanes,
bytes requested and moved, global efficiency and shared-memory bank conflicts beside them, the
totals, and the time floor on the target. The kernel-timing panel carries one (`attach`), kept
on the kernel and shape picked there.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.kernels.instrument import DEFAULT_TARGET, TARGETS
from workbench.kernels.sanitize_report import SOURCE_COLUMNS, floor_lines, source_rows, totals_rows
from workbench.widgets._common import WIDE, BackgroundRun, error_html, esc, pre, table


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


class MemoryView(BackgroundRun, w.VBox):
    """Pick a kernel, a shape (``"k=v,..."``; "" keeps the representative one) and a target;
    `run` profiles it on a background thread (`wait` joins it) into ``rows`` (the source view:
    `sanitize_report.source_rows`), ``totals`` and ``floor`` (`TimeFloor.to_dict`)."""

    kernel = t.Unicode("rmsnorm")
    shape = t.Unicode("")
    target = t.Unicode(DEFAULT_TARGET)
    context = t.Int(2)  # source lines around each counted line

    running = t.Bool(False)
    rows = t.List()
    totals = t.List()  # [[label, value], ...]
    floor = t.Dict()
    error = t.Unicode("")

    def __init__(self, **kwargs: Any) -> None:
        self._target_w = w.Dropdown(options=list(TARGETS), description="target", style=WIDE)
        w.link((self, "target"), (self._target_w, "value"))
        self._run_b = w.Button(description="Memory counters", icon="search")
        self._run_b.on_click(lambda _: self.run())
        self._status_w = w.HTML()
        self._table_w = w.HTML()
        self._totals_w = w.HTML()
        self.observe(self._show_status, names=["running", "error", "kernel", "shape", "target"])
        self.observe(self._show, names=["rows", "totals", "floor"])
        super().__init__(
            [w.HBox([self._target_w, self._run_b]), self._status_w, self._table_w, self._totals_w],
            **kwargs,
        )
        self._show_status()

    def run(self) -> bool:
        """Profile the kernel on a background thread; False when a run is going already."""
        if self.running:
            return False
        self.error = ""
        self.running = True
        args = (self.kernel, self.shape, self.target, self.context)
        self._start(self._profile, args, "workbench-memory-view")
        return True

    def _profile(self, kernel: str, shape: str, target: str, context: int) -> None:
        from workbench.engine.kernel_bench import parse_shape
        from workbench.engine.kernel_sanitize import profile_kernel
        from workbench.kernels.registry import kernels_dir

        override = parse_shape(shape) if shape.strip() else None
        prof = profile_kernel(kernel, override, target=target)
        self.rows = source_rows(prof.report, _read_lines, context=context, roots=[kernels_dir()])
        self.totals = [list(p) for p in totals_rows(prof.report)]
        self.floor = prof.floor.to_dict()

    def floor_text(self) -> str:
        """The time floor in words (`sanitize_report.floor_lines`), or "" before a run."""
        if not self.floor:
            return ""
        from workbench.kernels.sanitize_report import TimeFloor

        return "\n".join(floor_lines(TimeFloor(**self.floor)))

    def _show_status(self, _: Any = None) -> None:
        self._run_b.disabled = self.running
        what = f"{self.kernel} [{self.shape or 'representative shape'}] for {self.target}"
        text = f"{esc(what)}: {'counting on the CPU emulator...' if self.running else ''}"
        self._status_w.value = text + error_html(self.error)

    def _show(self, _: Any = None) -> None:
        self._table_w.value = table(self.rows, list(SOURCE_COLUMNS), empty="no counters yet")
        totals = [{"total": k, "value": v} for k, v in self.totals]
        self._totals_w.value = table(totals, ["total", "value"], empty="") + pre(self.floor_text())


def attach(panel: Any) -> MemoryView:
    """Add a `MemoryView` to a `KernelTimingPanel` (its *Memory counters* tab), following the
    panel's first kernel and its shape."""
    view = MemoryView()
    if panel.kernels:
        view.kernel = panel.kernels[0]
    view.shape = panel.shape

    def follow(change: Any) -> None:
        if change["name"] == "kernels" and change["new"]:
            view.kernel = change["new"][0]
        elif change["name"] == "shape":
            view.shape = change["new"]

    panel.observe(follow, names=["kernels", "shape"])
    panel.add_view("Memory counters", view)
    return view
