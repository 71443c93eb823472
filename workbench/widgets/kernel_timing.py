"""`KernelTimingPanel`: benchmark registry kernels, tabulate, chart, place them on a roofline.

The timing is `workbench.engine.kernel_bench.bench_kernels` (do_bench-style warm-up and
repetitions, cost-model rates, the device's peaks); this module only presents it. The plotting
functions (`timings_frame`, `bar_chart`, `roofline_plot`, `compare_runs`) are public so that
reports and notebooks draw the same pictures without a panel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.engine import kernel_bench as kb
from workbench.errors import WorkbenchError
from workbench.kernels.registry import all_kernels
from workbench.kernels.registry import get as get_kernel
from workbench.widgets import memory_view, sweep_view
from workbench.widgets._common import (
    WIDE,
    BackgroundRun,
    chart_layout,
    error_html,
    esc,
    figure_png,
    new_figure,
    show_progress,
)

TABLE_COLUMNS = [
    "kernel", "backend", "shape", "reps", "p50_ms", "p95_ms", "gb_s", "gflop_s", "intensity",
    "roof_fraction", "bound",
]  # fmt: skip


def shape_text(shape: Mapping[str, int]) -> str:
    """{"rows": 576, "cols": 1536} -> "rows=576,cols=1536" (`kernel_bench.parse_shape` reads it)."""
    return ",".join(f"{k}={v}" for k, v in shape.items())


def timings_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A pandas DataFrame of `KernelTiming.to_dict` rows: the table columns, shape as text."""
    import pandas as pd

    data = [{**r, "shape": shape_text(r["shape"])} for r in rows]
    return pd.DataFrame(data, columns=TABLE_COLUMNS)


def bar_chart(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """A Figure: p50 time per kernel (bars) with the p95 as an error bar above it."""
    fig = new_figure(6.0, 0.5 + 0.45 * max(1, len(rows)))
    ax = fig.add_subplot()
    labels = [f"{r['kernel']} [{shape_text(r['shape'])}]" for r in rows]
    p50 = [r["p50_ms"] for r in rows]
    upper = [r["p95_ms"] - r["p50_ms"] for r in rows]
    ax.barh(labels, p50, xerr=[[0] * len(rows), upper], color="#d0403a", capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("time per launch, ms (bar: p50, whisker: p95)")
    if title or rows:
        ax.set_title(title or _timing_note(rows), fontsize=9)
    return fig


def roofline_plot(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """A Figure: each kernel at (arithmetic intensity, achieved GFLOP/s) on log axes, under the
    device's memory and compute roofs when the device is in kernel_bench's peak table. The CPU
    emulator has no roof: the points are drawn alone and the title says so."""
    import numpy as np

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    pts = [r for r in rows if r.get("intensity")]
    peaks = {(r["peak_gb_s"], r["peak_gflop_s"]) for r in pts if r.get("peak_gb_s")}
    xs = [r["intensity"] for r in pts]
    lo = min([*xs, 0.01]) / 4
    hi = max([*xs, 100.0]) * 4
    for gb_s, gflop_s in sorted(peaks):
        x = np.geomspace(lo, hi, 200)
        ax.plot(x, np.minimum(gflop_s, x * gb_s), color="#444", lw=1.5)
        ax.annotate(f"{gb_s:g} GB/s", (lo * 1.5, lo * 1.5 * gb_s), fontsize=8, color="#444")
        ax.axhline(gflop_s, color="#444", lw=0.5, ls=":")
        ax.annotate(f"{gflop_s:g} GFLOP/s", (hi / 20, gflop_s * 1.1), fontsize=8, color="#444")
    for r in pts:
        y = max(r["gflop_s"], 1e-6)
        ax.scatter([r["intensity"]], [y], zorder=3)
        ax.annotate(r["kernel"], (r["intensity"], y), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity, FLOP/byte")
    ax.set_ylabel("achieved GFLOP/s (at p50)")
    if title:
        ax.set_title(title)
    elif pts and not peaks:
        device = pts[0].get("device", "")
        ax.set_title(f"{device}: no roof (no peak figures for it), points only", fontsize=9)
    elif pts:
        ax.set_title(f"roofline of {pts[0].get('device', '')}", fontsize=9)
    return fig


def compare_runs(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Kernels (at the same shape) in both runs: p50 of each and the speedup of b over a."""
    index = {(r["kernel"], shape_text(r["shape"])): r for r in a}
    out = []
    for r in b:
        key = (r["kernel"], shape_text(r["shape"]))
        if key in index:
            pa, pb = index[key]["p50_ms"], r["p50_ms"]
            out.append({
                "kernel": key[0], "shape": key[1], "p50_ms_a": pa, "p50_ms_b": pb,
                "speedup": pa / pb if pb > 0 else None,
            })  # fmt: skip
    return out


def html_table(frame: Any) -> str:
    """A DataFrame as an HTML table: 4 significant digits, "-" for a missing value."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object:  # na_rep does not reach a None there
            frame[col] = frame[col].where(frame[col].notna(), "-")
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def _timing_note(rows: Sequence[Mapping[str, Any]]) -> str:
    return f"{rows[0]['device']}: {rows[0]['timing']}" if rows else ""


def available_backends() -> tuple[str, ...]:
    """The emulator always; CuPy when a GPU is usable."""
    from workbench.engine.generate import gpu_available

    return ("emulator", "cupy") if gpu_available() else ("emulator",)


REPRESENTATIVE = "(representative)"


def common_presets(names: Sequence[str]) -> list[str]:
    """Shapes (as ``shape_text``) that every kernel of ``names`` accepts: the representative
    shapes of each, kept when each other kernel takes the same keys (one kernel: all of its
    shapes; rmsnorm and swiglu, which take different keys: none)."""
    specs = []
    for name in names:
        try:
            specs.append(get_kernel(name))
        except WorkbenchError:
            return []
    out: list[str] = []
    for spec in specs:
        for shape in spec.shapes:
            text = shape_text(shape)
            if text in out:
                continue
            try:
                for other in specs:
                    kb.resolve_shape(other, shape)
            except WorkbenchError:
                continue
            out.append(text)
    return out


class KernelTimingPanel(BackgroundRun, w.VBox):
    """Pick kernels, a shape and a backend; `run` benchmarks them (on a background thread;
    `wait` joins it) into ``results`` (a list of `KernelTiming.to_dict` rows) and appends the
    run to ``history``; `compare` sets ``comparison`` from two runs of the history.

    ``shape`` is ``"k=v,..."`` overriding the kernels' representative shapes ("" keeps each
    kernel's own); ``presets`` are the shapes every selected kernel accepts (`common_presets`).
    ``progress`` is ``[done, total]`` of the running benchmark and ``progress_label`` the kernel
    being timed.

    The results are drawn in views, the tabs of ``views`` ("Timings": the table, the bar chart
    and the roofline one under the other; "Compare"; "Engine profile"; "Memory counters";
    "Sweep", the `SweepView` ``sweep``); `add_view` adds one.
    """

    kernels = t.List(t.Unicode(), default_value=["rmsnorm"])
    shape = t.Unicode("")
    presets = t.List(t.Unicode())
    backend = t.Unicode("emulator")
    warmup_ms = t.Float(10.0)
    rep_ms = t.Float(50.0)
    warp_size = t.Int(64)  # the emulator's

    running = t.Bool(False)
    progress = t.List(t.Int(), default_value=[0, 0])
    progress_label = t.Unicode("")
    results = t.List()  # the latest run's rows
    history = t.List()  # [{"run": n, "label": str, "results": rows}]
    compare_a = t.Int(-1)
    compare_b = t.Int(-1)
    comparison = t.List()
    comparison_label = t.Unicode("")
    error = t.Unicode("")
    profile = t.List()  # the engine's own launches: Profiler.summary() rows

    def __init__(self, engine: Any = None, **kwargs: Any) -> None:
        self.engine = engine
        backends = available_backends()
        self.backend = backends[-1]
        names = sorted(all_kernels())
        self._kernels_w = w.SelectMultiple(
            options=names, rows=8, description="kernels", style=WIDE,
            layout=w.Layout(width="auto", min_width="18em"),
        )  # fmt: skip
        self._preset_w = w.Dropdown(options=[], description="preset", style=WIDE)
        self._shape_w = w.Text(
            description="shape", placeholder="k=v,... (empty: representative)", style=WIDE
        )
        self._backend_w = w.ToggleButtons(options=backends, description="backend", style=WIDE)
        self._warmup_w = w.FloatText(description="warm-up (ms)", style=WIDE)
        self._rep_w = w.FloatText(description="repetitions (ms)", style=WIDE)
        self._kernels_w.value = tuple(self.kernels)
        w.link((self, "shape"), (self._shape_w, "value"))
        w.link((self, "backend"), (self._backend_w, "value"))
        w.link((self, "warmup_ms"), (self._warmup_w, "value"))
        w.link((self, "rep_ms"), (self._rep_w, "value"))
        self._kernels_w.observe(lambda c: setattr(self, "kernels", list(c["new"])), names="value")
        self._preset_w.observe(self._pick_preset, names="value")
        self._run_b = w.Button(description="Run", button_style="primary", icon="play")
        self._run_b.on_click(lambda _: self.run())
        wide_picker = w.Layout(width="auto", min_width="24em", flex="1 1 auto")
        self._a_w = w.Dropdown(description="run A", style=WIDE, layout=wide_picker)
        self._b_w = w.Dropdown(description="run B", style=WIDE, layout=wide_picker)
        for name, picker in (("compare_a", self._a_w), ("compare_b", self._b_w)):
            picker.observe(
                lambda c, name=name: c["new"] is not None and setattr(self, name, c["new"]),
                names="value",
            )
        self._compare_b = w.Button(description="Compare", icon="columns")
        self._compare_b.on_click(lambda _: self.compare())
        self._profile_b = w.Button(description="Refresh", icon="refresh")
        self._profile_b.on_click(lambda _: self.refresh_profile())
        self._progress_w = w.IntProgress(min=0, max=1, layout=w.Layout(display="none"))
        self._status_w = w.HTML()
        self._table_w = w.HTML("<i>no run yet: pick kernels and press Run</i>")
        self._bars_w, self._roof_w = (
            w.Image(format="png", layout=chart_layout(display="none")) for _ in range(2)
        )  # shown from the first run on: an empty Image is a broken-image icon
        self._compare_w = w.HTML("<i>two runs are needed to compare</i>")
        self._profile_w = w.HTML()
        self.views = w.Tab()
        self.add_view("Timings", w.VBox([self._table_w, self._bars_w, self._roof_w]))
        self.add_view(
            "Compare", w.VBox([w.HBox([self._a_w, self._b_w, self._compare_b]), self._compare_w])
        )
        self.add_view("Engine profile", w.VBox([self._profile_b, self._profile_w]))
        self.observe(self._update_presets, names="kernels")
        self.observe(self._show_status, names=["running", "error", "progress", "progress_label"])
        self.observe(self._show_results, names="results")
        self.observe(self._show_history, names="history")
        self.observe(self._show_comparison, names="comparison")
        self.observe(self._show_profile, names="profile")
        self.observe(lambda c: setattr(self._kernels_w, "value", tuple(c["new"])), names="kernels")
        super().__init__(
            [
                w.HBox(
                    [
                        self._kernels_w,
                        w.VBox(
                            [
                                self._preset_w,
                                self._shape_w,
                                self._backend_w,
                                self._warmup_w,
                                self._rep_w,
                                self._run_b,
                            ]
                        ),
                    ]
                ),
                w.HBox([self._progress_w, self._status_w]),
                self.views,
            ],
            **kwargs,
        )
        self._update_presets()
        self._show_status()
        self._show_profile()
        self.memory = memory_view.attach(self)  # the same kernel's memory counters, as a tab
        self.sweep = sweep_view.attach(self)  # a grid of kernel jobs, locally or on Ray

    def add_view(self, title: str, widget: w.Widget) -> None:
        """Add a tab to ``views`` (a view of the runs that another module draws)."""
        self.views.children = [*self.views.children, widget]
        self.views.set_title(len(self.views.children) - 1, title)

    # -- callbacks --------------------------------------------------------------------------
    def run(self) -> bool:
        """Benchmark the selected kernels on a background thread; False when one is running or
        the selection is empty."""
        if self.running:
            return False
        if not self.kernels:
            self.error = "select at least one kernel"
            return False
        self.error = ""
        self.running = True
        args = (list(self.kernels), self.shape, self.backend, self.warmup_ms, self.rep_ms)
        self._start(self._bench, args, "workbench-kernel-timing")
        return True

    def compare(self, a: int | None = None, b: int | None = None) -> list[dict]:
        """Compare runs ``a`` and ``b`` (indices into ``history``; default: the pickers, else
        the last two runs) into ``comparison``."""
        a = self.compare_a if a is None else a
        b = self.compare_b if b is None else b
        if len(self.history) < 2:
            self.error = "compare needs two runs"
            return []
        if a < 0 or b < 0:
            a, b = len(self.history) - 2, len(self.history) - 1
        self.comparison_label = f"{self.history[a]['label']} (A) vs {self.history[b]['label']} (B)"
        self.comparison = compare_runs(self.history[a]["results"], self.history[b]["results"])
        self._show_comparison()
        return self.comparison

    def refresh_profile(self) -> list[dict]:
        """The engine profiler's per-kernel summary (what generation actually launched)."""
        profiler = getattr(self.engine, "profiler", None)
        self.profile = profiler.summary() if profiler is not None else []
        return self.profile

    def results_frame(self, run: int | None = None) -> Any:
        """The table of the latest run (or ``history[run]``) as a DataFrame."""
        return timings_frame(self._rows(run))

    def bar_figure(self, run: int | None = None) -> Any:
        return bar_chart(self._rows(run))

    def roofline_figure(self, run: int | None = None) -> Any:
        return roofline_plot(self._rows(run))

    # -- work -----------------------------------------------------------------------------------
    def _rows(self, run: int | None) -> list[dict]:
        return self.results if run is None else self.history[run]["results"]

    def _bench(self, names: list[str], shape: str, backend: str, warm: float, rep: float) -> None:
        shapes = [kb.parse_shape(shape)] if shape.strip() else []
        timings = kb.bench_kernels(
            names, shapes=shapes, backend=backend, warmup_ms=warm, rep_ms=rep,
            warp_size=self.warp_size, progress=self._on_progress,
        )  # fmt: skip
        rows = [r.to_dict() for r in timings]
        label = f"#{len(self.history)} {backend}: {', '.join(names)}"
        if shape.strip():
            label += f" [{shape.strip()}]"
        self.history = [*self.history, {"run": len(self.history), "label": label,
                                        "results": rows}]  # fmt: skip
        self.results = rows

    def _on_progress(self, done: int, total: int, label: str) -> None:
        self.progress_label = label
        self.progress = [done, total]

    # -- view -----------------------------------------------------------------------------------
    def _update_presets(self, _: Any = None) -> None:
        self.presets = common_presets(self.kernels)
        self._preset_w.options = [REPRESENTATIVE, *self.presets]
        self._preset_w.value = REPRESENTATIVE
        self._preset_w.tooltip = (
            "shapes every selected kernel takes"
            if self.presets or len(self.kernels) < 2
            else "the selected kernels take different shape keys: each runs at its own shape"
        )

    def _pick_preset(self, change: Any) -> None:
        value = change["new"]
        if value is None:
            return
        self.shape = "" if value == REPRESENTATIVE else value

    def _show_status(self, _: Any = None) -> None:
        self._run_b.disabled = self.running
        done, total = self.progress
        show_progress(self._progress_w, self.progress if self.running else None)
        text = ""
        if self.running:
            text = (
                f"timing {esc(self.progress_label)} ({done + 1}/{total})" if total else "starting"
            )
        self._status_w.value = text + error_html(self.error)

    def _show_results(self, _: Any = None) -> None:
        rows = self.results
        if not rows:
            return
        frame = timings_frame(rows)
        note = f"<div><i>{esc(_timing_note(rows))}</i></div>"
        self._table_w.value = html_table(frame) + note
        self._bars_w.value = figure_png(bar_chart(rows))
        self._roof_w.value = figure_png(roofline_plot(rows))
        self._bars_w.layout.display = self._roof_w.layout.display = None

    def _show_history(self, _: Any = None) -> None:
        options = [(h["label"], i) for i, h in enumerate(self.history)]
        self._a_w.options = options
        self._b_w.options = options
        if options:  # the last two runs (the only one, twice: a picker never shows blank)
            self.compare_a, self.compare_b = max(len(options) - 2, 0), len(options) - 1
            self._a_w.value, self._b_w.value = self.compare_a, self.compare_b

    def _show_comparison(self, _: Any = None) -> None:
        import pandas as pd

        cols = ["kernel", "shape", "p50_ms_a", "p50_ms_b", "speedup"]
        frame = pd.DataFrame(self.comparison, columns=cols)
        self._compare_w.value = f"<b>{esc(self.comparison_label)}</b>" + (
            html_table(frame)
            if self.comparison
            else "<div><i>no kernel at the same shape in both runs</i></div>"
        )

    def _show_profile(self, _: Any = None) -> None:
        import pandas as pd

        cols = ["name", "backend", "count", "total_s", "p50_s", "p95_s", "gb_s", "gflop_s"]
        self._profile_w.value = (
            html_table(pd.DataFrame(self.profile, columns=cols))
            if self.profile
            else "<i>the engine's profiler has no launches yet</i>"
        )
