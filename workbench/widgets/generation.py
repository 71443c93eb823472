"""`GenerationPanel`: prompt or chat, sampler controls, streamed output, TTFT and tok/s, and
(``show_trace``) the last generation's spans as a timeline."""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets as w
import traitlets as t

from workbench.engine.generate import GenerationConfig
from workbench.errors import WorkbenchError
from workbench.observe import tracing
from workbench.widgets._common import WIDE, esc

MODES = ("prompt", "chat")


class GenerationPanel(w.VBox):
    """Generate from a prompt (mode "prompt") or continue a chat (mode "chat") with ``engine``.

    `generate` starts the generation on a background thread (the notebook stays responsive) and
    streams into ``output_text``; ``ttft_ms`` and ``tok_s`` (decode rate) update as tokens arrive;
    `stop` cancels after the token in progress; `wait` joins the thread. In chat mode a finished
    reply is appended to ``history`` with the user's message (a cancelled one is not).

    ``show_trace``: record each generation's OpenTelemetry spans in memory (tracing starts,
    exporting nothing, if it was off) and show the last one's as a timeline: ``trace_spans``
    holds its rows (`workbench.observe.tracing.timeline`).
    """

    mode = t.Unicode("prompt")
    prompt = t.Unicode("")
    system_prompt = t.Unicode("")
    history = t.List()  # chat messages so far: [{"role": ..., "content": ...}]
    temperature = t.Float(GenerationConfig.temperature)
    top_k = t.Int(GenerationConfig.top_k)
    top_p = t.Float(GenerationConfig.top_p)
    min_p = t.Float(GenerationConfig.min_p)
    repeat_penalty = t.Float(GenerationConfig.repeat_penalty)
    max_tokens = t.Int(128)
    seed = t.Int(-1)  # -1: a fresh seed each time

    output_text = t.Unicode("")
    running = t.Bool(False)
    tokens = t.Int(0)  # generated so far
    ttft_ms = t.Float(None, allow_none=True)
    tok_s = t.Float(0.0)  # decode rate: tokens after the first over the time since it
    finish_reason = t.Unicode("")
    error = t.Unicode("")  # the last error's message ("" when none)
    show_trace = t.Bool(False)
    trace_spans = t.List()  # the last generation's spans: name, start_ms, duration_ms, depth

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        self.engine = engine
        self._thread: threading.Thread | None = None
        self._generation: Any = None
        self._lock = threading.Lock()
        self._recorder: tracing.SpanRecorder | None = None
        self._recorder_of: Any = None  # the tracer provider the recorder is attached to

        self._mode_w = w.ToggleButtons(options=MODES, description="mode", style=WIDE)
        self._prompt_w = w.Textarea(placeholder="prompt", layout=w.Layout(width="auto"))
        self._system_w = w.Text(
            description="system",
            placeholder="system prompt (chat mode)",
            style=WIDE,
            layout=w.Layout(width="auto"),  # the row, less its margins (100% overflows)
        )
        sliders = [
            (
                "temperature",
                w.FloatSlider(min=0.0, max=2.0, step=0.05, description="temperature", style=WIDE),
            ),
            ("top_k", w.IntSlider(min=0, max=200, description="top_k", style=WIDE)),
            ("top_p", w.FloatSlider(min=0.0, max=1.0, step=0.01, description="top_p", style=WIDE)),
            ("min_p", w.FloatSlider(min=0.0, max=1.0, step=0.01, description="min_p", style=WIDE)),
            (
                "repeat_penalty",
                w.FloatSlider(
                    min=1.0, max=2.0, step=0.05, description="repeat_penalty", style=WIDE
                ),
            ),
            (
                "max_tokens",
                w.BoundedIntText(min=1, max=1_000_000, description="max_tokens", style=WIDE),
            ),
            ("seed", w.IntText(description="seed (-1: random)", style=WIDE)),
        ]
        for name, widget in [("mode", self._mode_w), ("prompt", self._prompt_w),
                             ("system_prompt", self._system_w), *sliders]:  # fmt: skip
            widget.value = getattr(self, name)
            w.link((self, name), (widget, "value"))
        self._generate_b = w.Button(description="Generate", button_style="primary", icon="play")
        self._stop_b = w.Button(description="Stop", icon="stop", disabled=True)
        self._clear_b = w.Button(description="Clear chat", icon="trash")
        self._generate_b.on_click(lambda _: self.generate())
        self._stop_b.on_click(lambda _: self.stop())
        self._clear_b.on_click(lambda _: self.clear_history())
        self._output_w = w.Textarea(
            disabled=True, layout=w.Layout(width="auto", height="12em"), placeholder="output"
        )
        self._stats_w = w.HTML()
        self._trace_w = w.HTML()
        self._history_w = w.HTML()
        self.observe(self._show, names=["output_text", "running", "tokens", "ttft_ms", "tok_s",
                                       "finish_reason", "error", "history", "trace_spans",
                                       "show_trace"])  # fmt: skip
        controls = w.GridBox(
            [widget for _, widget in sliders],
            layout=w.Layout(grid_template_columns="repeat(2, 50%)"),
        )
        super().__init__(
            [
                self._mode_w,
                self._system_w,
                self._history_w,
                self._prompt_w,
                controls,
                w.HBox([self._generate_b, self._stop_b, self._clear_b]),
                self._output_w,
                self._stats_w,
                self._trace_w,
            ],
            **kwargs,
        )
        self._show()

    # -- callbacks --------------------------------------------------------------------------
    def config(self) -> GenerationConfig:
        """The sampler settings as a GenerationConfig (raises UserError for bad values)."""
        return GenerationConfig(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=None if self.seed < 0 else self.seed,
        )

    def messages(self) -> list[dict[str, str]]:
        """The conversation chat mode sends: system prompt, history, then the prompt."""
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*sys, *self.history, {"role": "user", "content": self.prompt}]

    def generate(self) -> bool:
        """Start generating on a background thread; False (and nothing started) when a
        generation is already running or the request is refused (``error`` says why)."""
        with self._lock:
            if self.running:
                return False
            self.error = ""
            self.output_text = ""
            self.tokens = 0
            self.ttft_ms = None
            self.tok_s = 0.0
            self.finish_reason = ""
            self.trace_spans = []
            if self.show_trace:
                self._record()
            try:
                if self.mode not in MODES:
                    raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
                config = self.config()
                messages = self.messages() if self.mode == "chat" else None
                if messages is not None:
                    gen = self.engine.chat(messages, config)
                else:
                    gen = self.engine.generate(self.prompt, config)
            except (WorkbenchError, ValueError) as e:
                self.error = _message(e)
                return False
            self._generation = gen
            self.running = True
            self._thread = threading.Thread(
                target=self._consume, args=(gen, messages), name="workbench-generate", daemon=True
            )
            self._thread.start()
            return True

    def stop(self) -> None:
        """Cancel the running generation after the token in progress."""
        gen = self._generation
        if gen is not None and self.running:
            gen.cancel()

    def wait(self, timeout: float | None = None) -> None:
        """Join the generation thread (tests, scripts)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def clear_history(self) -> None:
        self.history = []

    def _record(self) -> None:
        """A recorder on the tracer provider in use now (a new one if tracing was reset)."""
        provider = tracing.provider()
        if self._recorder is None or provider is None or provider is not self._recorder_of:
            if self._recorder is not None:
                tracing.remove_recorder(self._recorder)
            self._recorder = tracing.recorder(capacity=2_000)
            self._recorder_of = tracing.provider()

    # -- the generation thread ----------------------------------------------------------------
    def _consume(self, gen: Any, messages: list[dict[str, str]] | None) -> None:
        text = ""
        try:
            for ev in gen:
                text += ev.text
                self.output_text = text
                self.tokens = ev.index + (1 if ev.id >= 0 else 0)
                if ev.index == 0 and self.ttft_ms is None:
                    self.ttft_ms = ev.elapsed_s * 1e3
                if ev.index > 0 and self.ttft_ms is not None:
                    since_first = ev.elapsed_s - self.ttft_ms / 1e3
                    if since_first > 0:
                        self.tok_s = ev.index / since_first
            result = gen.result
            if result is not None:
                timings = result.timings
                self.tokens = timings.generated_tokens
                if timings.generated_tokens:
                    self.ttft_ms = timings.ttft_s * 1e3
                self.tok_s = timings.decode_tok_s
                self.output_text = result.text
                self.finish_reason = result.finish_reason
                # A cancelled reply is a fragment: the conversation goes on without it (the
                # output box still shows it, marked "finish: cancelled").
                if messages is not None and result.finish_reason != "cancelled":
                    self.history = [
                        *self.history,
                        {"role": "user", "content": messages[-1]["content"]},
                        {"role": "assistant", "content": result.text},
                    ]
        except Exception as e:  # shown in the panel; the engine has logged what it handles
            self.error = _message(e)
            self.finish_reason = "error"
        finally:
            trace_id = getattr(getattr(gen, "trace", None), "trace_id", None)
            if self._recorder is not None and trace_id is not None:
                self.trace_spans = tracing.timeline(self._recorder.spans(trace_id))
            self.running = False

    # -- view -----------------------------------------------------------------------------------
    def _show(self, _: Any = None) -> None:
        self._output_w.value = self.output_text
        self._generate_b.disabled = self.running
        self._stop_b.disabled = not self.running
        ttft = "-" if self.ttft_ms is None else f"{self.ttft_ms:.1f} ms"
        parts = [
            f"TTFT <b>{ttft}</b>",
            f"<b>{self.tok_s:.1f}</b> tok/s",
            f"{self.tokens} tokens",
        ]
        if self.running:
            parts.append("generating...")
        elif self.finish_reason:
            parts.append(f"finish: {esc(self.finish_reason)}")
        stats = " &middot; ".join(parts)
        if self.error:
            stats += f"<div style='color:#b00'>{esc(self.error)}</div>"
        self._stats_w.value = stats
        self._trace_w.value = timeline_html(self.trace_spans) if self.show_trace else ""
        self._history_w.value = "".join(
            f"<div><b>{esc(m['role'])}:</b> {esc(m['content'])}</div>" for m in self.history
        )


def timeline_html(rows: list[dict[str, Any]]) -> str:
    """A span timeline: one row per span, indented by depth, a bar placed on a shared scale."""
    if not rows:
        return ""
    total = max(r["start_ms"] + r["duration_ms"] for r in rows) or 1.0
    lines = []
    for r in rows:
        left = 100 * r["start_ms"] / total
        width = max(0.3, 100 * r["duration_ms"] / total)
        events = f", {r['events']} events" if r["events"] else ""
        lines.append(
            "<div style='display:flex;align-items:center;font:12px monospace'>"
            f"<div style='width:16em;padding-left:{r['depth']}em;white-space:nowrap;"
            f"overflow:hidden'>{esc(r['name'])}</div>"
            "<div style='flex:1;position:relative;height:1em;background:#f4f4f4'>"
            f"<div title='{r['duration_ms']:.2f} ms{events}' style='position:absolute;"
            f"left:{left:.2f}%;width:{width:.2f}%;height:100%;background:#4a7fb5'></div></div>"
            f"<div style='width:7em;text-align:right'>{r['duration_ms']:.1f} ms</div></div>"
        )
    return "<div><b>trace</b> (last generation)</div>" + "".join(lines)


def _message(e: BaseException) -> str:
    if isinstance(e, WorkbenchError):
        return f"{e.code}: {e.message}"
    return f"{type(e).__name__}: {e}"
