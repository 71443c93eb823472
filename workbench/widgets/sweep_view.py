"""`SweepView`: run a kernel sweep from the kernel-timing panel and plot it.

The sweep is `workbench.engine.sweep` (a grid of kernel jobs on a process pool or on Ray); this
module only presents its rows: a table, and a chart of each kernel's measure per warp width
(`sweep_chart`: p50 time for timing jobs, bytes moved for profiles, findings for sanitizer runs,
VGPRs or registers for compiles). The kernel-timing panel carries one (`attach`), whose spec
starts from the kernels picked there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.widgets._common import (
    WIDE,
    BackgroundRun,
    chart_layout,
    error_html,
    figure_png,
    new_figure,
    show_progress,
)

# What the chart shows for each kind of job.
MEASURES = {"time": "p50_ms", "profile": "bytes_moved", "sanitize": "findings",
            "compile": "vgprs"}  # fmt: skip
TABLE_COLUMNS = ["kernel", "kind", "shape", "warp", "target", "status", "error", *MEASURES.values()]


def sweep_chart(rows: Sequence[Mapping[str, Any]], kind: str | None = None) -> Any:
    """A Figure: for the rows of ``kind`` (default: the first row's), the kind's measure
    (`MEASURES`) per kernel, one bar per warp width and target; failed jobs are left out."""
    kind = kind or (rows[0]["kind"] if rows else "time")
    measure = MEASURES[kind]
    if kind == "compile":  # NVIDIA reports registers, not VGPRs
        measure = "vgprs" if any(r.get("vgprs") is not None for r in rows) else "registers"
    mine = [r for r in rows if r["kind"] == kind and r["status"] == "ok"
            and r.get(measure) is not None]  # fmt: skip
    kernels = list(dict.fromkeys(r["kernel"] for r in mine))
    series = list(dict.fromkeys((r["warp"], r["target"]) for r in mine))
    fig = new_figure(6.0, 0.6 + 0.35 * max(1, len(kernels)) * max(1, len(series)))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(series))
    for s, (warp, target) in enumerate(series):
        values = {
            r["kernel"]: r[measure] for r in mine if (r["warp"], r["target"]) == (warp, target)
        }
        ys = [k + s * height for k in range(len(kernels))]
        label = " ".join(p for p in (f"warp {warp}" if warp else "", target or "") if p)
        ax.barh(ys, [values.get(k, 0) for k in kernels], height=height, label=label or kind)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(kernels))], kernels)
    ax.invert_yaxis()
    ax.set_xlabel(measure)
    ax.set_title(f"sweep: {kind} jobs ({measure})", fontsize=9)
    if series:
        ax.legend(fontsize=8)
    return fig


class SweepView(BackgroundRun, w.VBox):
    """A sweep SPEC (`workbench.engine.sweep.parse_spec`), ``workers`` and ``ray``; `run` runs it
    on a background thread (`wait` joins it) into ``rows`` (the sweep's rows as dicts, in the
    grid's order); ``progress`` is ``[done, total]``."""

    spec = t.Unicode("kernel=rmsnorm;warp=32,64;kind=time;rep_ms=20")
    workers = t.Int(2)
    ray = t.Bool(False)
    ray_address = t.Unicode("")

    running = t.Bool(False)
    progress = t.List(t.Int(), default_value=[0, 0])
    rows = t.List()
    error = t.Unicode("")

    def __init__(self, **kwargs: Any) -> None:
        self._spec_w = w.Text(description="sweep", style=WIDE, layout=w.Layout(width="40em"))
        self._workers_w = w.BoundedIntText(min=1, max=256, description="workers", style=WIDE)
        self._ray_w = w.Checkbox(description="on Ray", style=WIDE)
        for name, widget in (("spec", self._spec_w), ("workers", self._workers_w),
                             ("ray", self._ray_w)):  # fmt: skip
            w.link((self, name), (widget, "value"))
        self._run_b = w.Button(description="Run sweep", icon="th")
        self._run_b.on_click(lambda _: self.run())
        self._progress_w = w.IntProgress(min=0, max=1, layout=w.Layout(display="none"))
        self._status_w = w.HTML()
        self._table_w = w.HTML("<i>no sweep yet</i>")
        self._chart_w = w.Image(format="png", layout=chart_layout(display="none"))
        self.observe(self._show_status, names=["running", "error", "progress"])
        self.observe(self._show_rows, names="rows")
        super().__init__(
            [
                w.HBox([self._spec_w, self._workers_w, self._ray_w, self._run_b]),
                w.HBox([self._progress_w, self._status_w]),
                self._table_w,
                self._chart_w,
            ],
            **kwargs,
        )
        self._show_status()

    def run(self) -> bool:
        """Start the sweep; False when one is running."""
        if self.running:
            return False
        self.error, self.running, self.progress = "", True, [0, 0]
        args = (self.spec, self.workers, self.ray, self.ray_address or None)
        self._start(self._sweep, args, "workbench-sweep")
        return True

    def _sweep(self, spec: str, workers: int, ray: bool, address: str | None) -> None:
        from workbench.engine.sweep import iter_sweep, parse_spec

        self.rows = list(iter_sweep(parse_spec(spec), workers=workers, ray=ray,
                                    ray_address=address, progress=self._on_progress))  # fmt: skip

    def _on_progress(self, done: int, total: int) -> None:
        self.progress = [done, total]

    def _show_status(self, _: Any = None) -> None:
        self._run_b.disabled = self.running
        done, total = self.progress
        show_progress(self._progress_w, self.progress if self.running else None)
        text = (f"sweeping: {done}/{total} jobs" if total else "starting") if self.running else ""
        self._status_w.value = text + error_html(self.error)

    def _show_rows(self, _: Any = None) -> None:
        import pandas as pd

        from workbench.widgets.kernel_timing import html_table

        if not self.rows:
            return
        failed = sum(r["status"] != "ok" for r in self.rows)
        note = f"<div><i>{len(self.rows)} jobs, {failed} failed</i></div>"
        self._table_w.value = html_table(pd.DataFrame(self.rows, columns=TABLE_COLUMNS)) + note
        self._chart_w.value = figure_png(sweep_chart(self.rows))
        self._chart_w.layout.display = None


def attach(panel: Any) -> SweepView:
    """Add a `SweepView` to a `KernelTimingPanel` (its *Sweep* tab), its spec starting from the
    panel's kernels (and following them until the spec is edited by hand)."""
    view = SweepView()

    def spec_for(kernels: Sequence[str]) -> str:
        return f"kernel={','.join(kernels) or 'rmsnorm'};warp=32,64;kind=time;rep_ms=20"

    view.spec = spec_for(panel.kernels)

    def follow(change: Any) -> None:
        if view.spec == spec_for(change["old"]):
            view.spec = spec_for(change["new"])

    panel.observe(follow, names="kernels")
    panel.add_view("Sweep", view)
    return view
