"""The notebook panels without a browser: build each over a tiny model, drive its callbacks,
assert on its traits and data."""

from __future__ import annotations

import time

import pytest

from workbench.engine.generate import Engine, GenerationConfig
from workbench.errors import BackendError
from workbench.runtime.errorlog import ErrorLog
from workbench.runtime.retry import RetryStats
from workbench.widgets import (
    Dashboard,
    ErrorInspector,
    GenerationPanel,
    KernelTimingPanel,
    RetryStatsPanel,
    ServingPanel,
)
from workbench.widgets.kernel_timing import shape_text


@pytest.fixture
def engine(tiny_model):
    return Engine(tiny_model, backend="numpy")


def test_generate_streams_text_and_timings(engine):
    panel = GenerationPanel(engine)
    panel.prompt, panel.max_tokens, panel.temperature = "the cat sat", 12, 0.0
    assert panel.generate()
    panel.wait(30)
    assert not panel.running and panel.error == ""
    expected = engine.generate("the cat sat", GenerationConfig(max_tokens=12, temperature=0)).run()
    assert panel.output_text == expected.text
    assert panel.tokens == len(expected.token_ids) > 1
    assert panel.finish_reason == expected.finish_reason
    assert panel.ttft_ms is not None and panel.ttft_ms > 0
    assert panel.tok_s > 0
    assert panel._output_w.value == panel.output_text  # the view follows the trait
    assert "tok/s" in panel._stats_w.value


def _stop_once_tokens_flow(panel: GenerationPanel) -> None:
    """Stop a running panel after its first token: a stop during the prefill would end it with
    no token at all (also right, but not what these tests look at)."""
    deadline = time.monotonic() + 60
    while panel.tokens == 0 and panel.running and time.monotonic() < deadline:
        time.sleep(0.01)
    panel.stop()


def test_stop_cancels_a_running_generation(engine):
    panel = GenerationPanel(engine)
    panel.prompt, panel.max_tokens, panel.seed = "once upon", 100_000, 1
    assert panel.generate()
    assert panel.running and not panel.generate()  # one at a time
    _stop_once_tokens_flow(panel)
    panel.wait(30)
    assert panel.finish_reason == "cancelled"
    assert 0 < panel.tokens < 100_000


def test_a_cancelled_chat_reply_stays_out_of_the_history(engine):
    panel = GenerationPanel(engine)
    panel.mode, panel.prompt, panel.max_tokens, panel.seed = "chat", "hello", 100_000, 2
    assert panel.generate()
    _stop_once_tokens_flow(panel)
    panel.wait(30)
    assert panel.finish_reason == "cancelled" and panel.output_text  # shown, marked
    assert "finish: cancelled" in panel._stats_w.value
    assert panel.history == []  # the fragment is not sent back as the assistant's turn


def test_control_labels_are_never_cut_short(engine):
    """ipywidgets cuts descriptions to a fixed width ("temperat..."); every panel's controls
    use their natural width."""
    from ipywidgets.widgets.widget_description import DescriptionWidget

    panels = [GenerationPanel(engine), KernelTimingPanel(), RetryStatsPanel(engine),
              ErrorInspector(engine)]  # fmt: skip
    seen = 0
    for panel in panels:
        stack = [panel]
        while stack:
            widget = stack.pop()
            stack.extend(getattr(widget, "children", ()))
            if isinstance(widget, DescriptionWidget) and widget.description:
                seen += 1
                width = widget.style.description_width
                assert width == "initial", f"{widget.description!r}: description width {width!r}"
    assert seen >= 15


def test_chat_mode_keeps_history_and_bad_settings_show_an_error(engine):
    panel = GenerationPanel(engine)
    panel.mode, panel.prompt, panel.max_tokens, panel.seed = "chat", "hello", 4, 3
    assert panel.generate()
    panel.wait(30)
    assert [m["role"] for m in panel.history] == ["user", "assistant"]
    assert panel.history[1]["content"] == panel.output_text
    panel.top_p = 2.0  # invalid: refused before any thread starts
    assert not panel.generate()
    assert "top_p" in panel.error and not panel.running
    panel.clear_history()
    assert panel.history == []


def test_kernel_timing_runs_on_the_emulator_and_compares_runs():
    panel = KernelTimingPanel()
    panel.kernels = ["add", "swiglu"]
    assert panel.presets and all("count=" in p for p in panel.presets)
    panel.backend, panel.warmup_ms, panel.rep_ms = "emulator", 1.0, 3.0
    assert panel.run()
    panel.wait(60)
    assert panel.error == ""
    assert [r["kernel"] for r in panel.results] == ["add", "swiglu"]
    for r in panel.results:
        assert r["backend"] == "emulator" and 0 < r["p50_ms"] <= r["p95_ms"]
        assert r["gb_s"] > 0 and r["roof_fraction"] is None
    frame = panel.results_frame()
    assert list(frame["kernel"]) == ["add", "swiglu"] and "p95_ms" in frame.columns
    assert "<table" in panel._table_w.value
    assert panel._bars_w.value[:4] == b"\x89PNG" and panel._roof_w.value[:4] == b"\x89PNG"
    roof = panel.roofline_figure()
    assert "no roof" in roof.axes[0].get_title() and not roof.axes[0].lines

    panel.kernels, panel.shape = ["add"], "count=2048"
    assert panel.run()
    panel.wait(60)
    assert panel.results[0]["shape"] == {"count": 2048}
    assert len(panel.history) == 2
    assert panel.compare() == []  # no kernel at the same shape in both runs
    panel.shape = ""
    panel.run()
    panel.wait(60)
    (row,) = panel.compare(0, 2)
    assert row["kernel"] == "add" and row["speedup"] == pytest.approx(
        row["p50_ms_a"] / row["p50_ms_b"]
    )


def test_kernel_timing_offers_only_presets_every_selected_kernel_takes():
    from workbench.engine import kernel_bench as kb

    panel = KernelTimingPanel(kernels=["rmsnorm", "swiglu"])  # different shape keys
    assert panel.presets == [] and panel._preset_w.options == ("(representative)",)
    panel.kernels = ["rmsnorm"]
    assert panel.presets == ["n=1,dim=576", "n=512,dim=576"]
    panel.kernels = ["add", "swiglu"]
    assert panel.presets and all(p.startswith("count=") for p in panel.presets)
    # Each preset runs: pick the smallest for both kernels, with a budget below one launch.
    smallest = min(panel.presets, key=lambda p: int(p.split("=")[1]))
    panel._preset_w.value = smallest
    assert panel.shape == smallest
    panel.backend, panel.warmup_ms, panel.rep_ms = "emulator", 0.0, 1e-6
    seen = []
    panel.observe(lambda c: seen.append(list(c["new"])), names="progress")
    assert panel.run()
    panel.wait(60)
    assert panel.error == ""
    assert [shape_text(r["shape"]) for r in panel.results] == [smallest, smallest]
    # However small the budget, the percentiles come from several repetitions.
    assert all(r["reps"] >= kb.MIN_REPS for r in panel.results)
    assert seen[0] == [0, 2] and seen[-1] == [2, 2]
    assert panel._progress_w.layout.display == "none" and "timing" not in panel._status_w.value


def test_kernel_timing_shows_no_image_before_the_first_run_and_no_none_in_tables():
    panel = KernelTimingPanel(kernels=["add"])
    assert panel._bars_w.layout.display == "none" and panel._roof_w.layout.display == "none"
    assert "no run yet" in panel._table_w.value
    panel.backend, panel.warmup_ms, panel.rep_ms = "emulator", 0.0, 1.0
    panel.run()
    panel.wait(60)
    assert panel._bars_w.layout.display is None and panel._roof_w.layout.display is None
    assert "None" not in panel._table_w.value  # roof_fraction and bound: "-" on the emulator
    titles = [panel.views.get_title(i) for i in range(len(panel.views.children))]
    assert titles == ["Timings", "Compare", "Engine profile", "Memory counters", "Sweep"]
    extra = __import__("ipywidgets").HTML("x")
    panel.add_view("Extra", extra)
    assert panel.views.children[-1] is extra and panel.views.get_title(5) == "Extra"


def test_kernel_timing_reports_a_bad_shape():
    panel = KernelTimingPanel()
    panel.kernels, panel.shape, panel.backend = ["add"], "rows=4", "emulator"
    panel.run()
    panel.wait(60)
    assert panel.error.startswith("user.bad_shape") and panel.results == []


def test_roofline_draws_the_device_roofs():
    from workbench.widgets.kernel_timing import roofline_plot

    row = {"kernel": "k", "shape": {"n": 1}, "intensity": 0.5, "gflop_s": 100.0,
           "peak_gb_s": 3350.0, "peak_gflop_s": 67000.0, "device": "H100"}  # fmt: skip
    ax = roofline_plot([row]).axes[0]
    (roof,) = [ln for ln in ax.lines if len(ln.get_xdata()) > 2]
    x, y = roof.get_xdata(), roof.get_ydata()
    assert y.max() == pytest.approx(67000.0)
    assert y[0] == pytest.approx(x[0] * 3350.0)  # the memory roof below the ridge


def test_fault_controls_configure_the_engine_and_counters_follow(tiny_model):
    engine = Engine(tiny_model, backend="emulator")
    panel = RetryStatsPanel(engine)
    assert panel.breakers and panel.breakers[0]["state"] == "closed"
    panel.fault_site, panel.fault_rate, panel.fault_seed = "launch", "0.2", 11
    assert panel.apply_faults(), panel.error
    assert engine.faults is not None and engine.faults.seed == 11
    assert engine.faults.modes() == {"launch": 0.2}
    assert panel.faults_spec == "launch:0.2"
    engine.generate("the cat", GenerationConfig(max_tokens=3, seed=1)).run()
    panel.refresh()
    injected = panel.injected["launch"]
    assert injected == engine.faults.injected("launch") > 0
    counts = panel.counters
    assert sum(c["attempts"] - c["calls"] for c in counts.values()) > 0  # retries happened
    assert panel._hist_w.value[:4] == b"\x89PNG"
    panel.fault_rate = "lots"
    assert not panel.apply_faults() and "user.bad_faults" in panel.error
    panel.clear_faults()
    assert engine.faults.modes() == {} and panel.faults_spec == ""
    panel.close()


def test_retry_panel_without_engine_uses_given_sources():
    stats = RetryStats()
    panel = RetryStatsPanel(retry_stats=stats)
    stats.record("pull", attempts=3, outcome="recovered", delays=[0.002, 0.02])
    panel.refresh()
    assert panel.counters["pull"]["recovered"] == 1 and panel.counters["pull"]["attempts"] == 3
    hist = panel.counters["pull"]["delay_histogram"]
    assert hist[0.005] == 1 and hist[0.025] == 1
    panel.fault_site, panel.fault_rate = "alloc", "once"
    assert panel.apply_faults() and panel.faults.modes() == {"alloc": "once"}


def _compile_error() -> BackendError:
    from workbench.kernels.emulator import EmulatorModule

    try:
        EmulatorModule('#include "wb.h"\nWB_KERNEL void f(float* x) {\n  x[0] = y;\n}\n')
    except BackendError as e:
        return e
    raise AssertionError("the broken kernel compiled")


def test_error_inspector_filters_and_shows_a_compile_error_beside_its_lines():
    log = ErrorLog()
    panel = ErrorInspector(log)
    assert panel.error_count == 0 and panel.selected == -1
    log.record(_compile_error(), operation="compile")
    from workbench.errors import UserError

    log.record(UserError("user.empty_prompt", "the prompt is empty"))
    panel.refresh()
    assert panel.error_count == 2
    assert panel.codes == ["backend.compile_failed", "user.empty_prompt"]
    assert panel.records[0]["code"] == "user.empty_prompt"  # newest first
    panel.category = "backend"
    assert [r["code"] for r in panel.records] == ["backend.compile_failed"]
    panel.select(0)
    assert "backend.compile_failed" in panel.detail
    assert "'y' was not declared" in panel.compiler_log
    assert any(":3: x[0] = y;" in line for line in panel.source_lines)
    assert "x[0] = y;" in panel._lines_w.value and panel._compile_box.layout.display is None
    panel.category, panel.code = "", "user.empty_prompt"
    assert len(panel.records) == 1 and panel.compiler_log == ""
    assert panel._compile_box.layout.display == "none"
    panel.close()


def test_dashboard_puts_five_panels_over_one_engine(engine):
    dash = Dashboard(engine)
    assert len(dash.tabs.children) == 5
    assert dash.serving.engine is engine
    assert dash.generation.engine is dash.retry_stats.engine is engine
    assert dash.errors.error_log is engine.error_log
    assert "tiny" in dash._header.value
    dash.generation.prompt, dash.generation.max_tokens = "hi", 2
    dash.generation.generate()
    dash.generation.wait(30)
    assert dash.generation.tokens >= 1
    dash.close()


def test_error_list_entries_of_one_code_are_told_apart():
    from workbench.errors import RecoverableError

    log = ErrorLog()
    panel = ErrorInspector(log)
    for attempt in (1, 2):
        log.record(
            RecoverableError("device.launch_failed", "injected fault"),
            operation="launch", kernel="rmsnorm", request_id="req-7", attempts=attempt,
        )  # fmt: skip
    panel.refresh()
    labels = [label for label, _ in panel._list_w.options]
    assert len(set(labels)) == 2, labels
    assert all("req req-7" in label and "rmsnorm" in label for label in labels)
    assert any("attempt 2" in label for label in labels)
    panel.close()


def test_status_line_reports_steps_and_bytes_and_clears():
    from workbench.widgets.progress import status_line

    with status_line("timing kernels") as status:
        status.steps(0, 2, "rmsnorm [n=1,dim=576]")
        assert status.text == "rmsnorm [n=1,dim=576] (1/2)"
        status.steps(2, 2, "")
        assert status.text == "done"
        status.bytes(3 * 1024 * 1024, 12 * 1024 * 1024)
        assert status.text == "3.0 of 12.0 MB"
    assert status.text == ""


def _until(predicate, what: str, deadline_s: float = 120.0) -> None:
    import time

    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.tool("clang")
def test_memory_view_follows_the_timing_panel_and_shows_the_counters():
    from workbench.kernels.instrument import TARGETS
    from workbench.widgets.memory_view import MemoryView

    panel = KernelTimingPanel()
    view = panel.memory
    assert isinstance(view, MemoryView) and view in panel.views.children
    panel.kernels, panel.shape = ["add"], "count=4096"
    assert (view.kernel, view.shape) == ("add", "count=4096")
    view.target = "sm_90"
    assert view.run()
    _until(lambda: not view.running, "the memory view")
    assert view.error == ""
    counted = [r for r in view.rows if r["access"]]
    assert {r["access"] for r in counted} == {"global load", "global store"}
    assert all(r["efficiency"] == "100.0%" and r["lanes"] == "32.0" for r in counted)
    totals = dict(view.totals)
    assert totals["global bytes moved"] == str(3 * 4096 * 4)
    assert view.floor["target"] == "sm_90" and view.floor["memory_s"] == pytest.approx(
        3 * 4096 * 4 / (TARGETS["sm_90"].peak_gb_s * 1e9)
    )
    assert "out[i] = a[i] + b[i];" in view._table_w.value
    assert "a floor, not a prediction" in view._totals_w.value

    view.shape = "rows=3"
    view.run()
    _until(lambda: not view.running, "the memory view")
    assert view.error.startswith("user.bad_shape")


def test_generation_panel_shows_the_last_trace(engine):
    from workbench.observe import tracing

    panel = GenerationPanel(engine)
    panel.prompt, panel.max_tokens, panel.temperature = "the cat sat", 6, 0.0
    panel.show_trace = True
    try:
        assert panel.generate()
        panel.wait(30)
        assert panel.error == ""
        rows = panel.trace_spans
        names = [r["name"] for r in rows]
        assert names[0] == f"text_completion {engine.model.name}"  # the root, first to start
        assert {"prefill", "decode"} <= set(names)
        depth = {r["name"]: r["depth"] for r in rows}
        assert depth["prefill"] == depth["decode"] == 1 and depth[names[0]] == 0
        prefill = next(r for r in rows if r["name"] == "prefill")
        decode = next(r for r in rows if r["name"] == "decode")
        assert prefill["start_ms"] + prefill["duration_ms"] <= decode["start_ms"] + 1e-6
        assert "prefill" in panel._trace_w.value and "decode" in panel._trace_w.value
        first = list(rows)
        assert panel.generate()  # the next generation replaces the timeline
        panel.wait(30)
        assert panel.trace_spans and panel.trace_spans != first
        panel.show_trace = False
        assert panel._trace_w.value == ""
    finally:
        tracing.shutdown()


def test_sweep_view_runs_a_sweep_from_the_timing_panel_and_plots_it():
    from workbench.widgets.sweep_view import SweepView, sweep_chart

    panel = KernelTimingPanel()
    view = panel.sweep
    assert isinstance(view, SweepView) and view in panel.views.children
    panel.kernels = ["add", "swiglu"]  # the spec follows the picked kernels
    assert view.spec.startswith("kernel=add,swiglu;warp=32,64;kind=time")
    view.spec, view.workers = "kernel=add,swiglu;warp=32,64;kind=time;rep_ms=1", 1
    assert view.run()
    _until(lambda: not view.running, "the sweep")
    assert view.error == ""
    assert [(r["kernel"], r["warp"], r["status"]) for r in view.rows] == [
        ("add", 32, "ok"), ("add", 64, "ok"), ("swiglu", 32, "ok"), ("swiglu", 64, "ok")
    ]  # fmt: skip
    assert "4 jobs, 0 failed" in view._table_w.value
    assert view._chart_w.value[:4] == b"\x89PNG"
    ax = sweep_chart(view.rows).axes[0]
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["add", "swiglu"]
    assert len(ax.patches) == 4  # a bar per kernel and warp width

    view.spec = "kernel=add;warp=48"
    view.run()
    _until(lambda: not view.running, "the sweep")
    assert "warps are 32 and/or 64" in view.error


def test_serving_view_shows_the_batch_metrics_the_server_exports(tiny_model):
    """Running/waiting sequences, KV page use, prefix hits and preemptions as /metrics has them:
    a step of three sequences, then a prompt that shares a cached prefix."""
    engine = Engine(tiny_model, backend="numpy", max_batch=2)
    panel = ServingPanel(engine)
    assert not panel.has_data and "no batch step yet" in panel._figures_w.value
    prefix = [5 + i % 50 for i in range(40)]  # two full pages and a bit
    cfg = GenerationConfig(temperature=0.0, max_tokens=3)
    gens = [engine.submit([*prefix, 7, 8], cfg), engine.submit([9, 10, 11], cfg)]
    gens.append(engine.submit([12, 13], cfg))  # beyond max_batch: waits
    engine.batcher.step()
    panel.refresh()
    state = engine.batcher.state()
    assert panel.has_data and panel.steps == 1
    assert (panel.running, panel.waiting) == (state["running"], state["waiting"]) == (2, 1)
    assert panel.pages_used == state["pages_used"] < panel.pages_total == state["pages_total"]
    assert panel.pages_used >= 3 and panel._pages_w.value == panel.pages_used
    for g in gens:
        g.run()
    engine.submit([*prefix, 20], cfg).run()  # its first two pages come from the prefix cache
    panel.refresh()
    assert panel.prefix_hit_tokens == engine.batcher.state()["prefix_hit_tokens"] >= 32
    assert panel.running == panel.waiting == 0 and panel.preemptions == 0
    assert panel.mean_batch > 1.0
    assert "prefix-cache hit tokens" in panel._figures_w.value
    assert f"{panel.pages_used} / {panel.pages_total}" in panel._figures_w.value
    panel.close()


def test_background_run_shows_what_the_work_raised():
    """The panels' background runs: the work's error lands in ``error`` (a `WorkbenchError` by
    its code) and ``running`` turns False, whether the work fails or not."""
    import traitlets as t

    from workbench.widgets._common import BackgroundRun, error_html

    class Panel(BackgroundRun, t.HasTraits):
        running = t.Bool(False)
        error = t.Unicode("")

    def fail(exc: Exception) -> None:
        raise exc

    panel = Panel()
    panel.wait()  # nothing started: nothing to join
    for args, error in (
        (
            (BackendError("backend.lost", "the device went away"),),
            "backend.lost: the device went away",
        ),
        ((RuntimeError("<boom>"),), "RuntimeError: <boom>"),
    ):
        panel.running, panel.error = True, ""
        panel._start(fail, args, "test-background-run")
        panel.wait(30)
        assert not panel.running and panel.error == error
    assert error_html(panel.error) == "<div style='color:#b00'>RuntimeError: &lt;boom&gt;</div>"
    assert error_html("") == ""
    done = []
    panel.running, panel.error = True, ""
    panel._start(done.append, (7,), "test-background-run")
    panel.wait(30)
    assert done == [7] and not panel.running and panel.error == ""
