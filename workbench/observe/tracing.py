"""OpenTelemetry traces: HTTP requests, queueing, prefill and decode, launches, breaker events.

Off until the edge asks: `configure_from_env` (the CLI calls it once) exports over OTLP/HTTP
(protobuf) when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
set, and does nothing otherwise; `configure` takes any SDK exporter; `recorder` keeps finished
spans in memory (the notebook's timeline, ``workbench bench generate --trace``). While off,
`start_span` returns OpenTelemetry's invalid span and `generation` a shared do-nothing handle:
instrumented code pays an attribute read and a call.

What the instrumented code calls:

- `generation` starts one generation's span (named ``{gen_ai.operation.name}
  {gen_ai.request.model}`` with OpenTelemetry's GenAI attributes) and returns its
  `GenerationTrace`, which opens and closes the children ``batch_queue`` (a submitted
  generation's wait for a slot in the continuous batch), ``prefill``, ``decode`` (and,
  when asked for, one ``decode_step`` per token) and makes the innermost one current around the
  work, so that kernel launches recorded by a connected profiler (`connect`) become events of
  the step they ran in.
- `start_span` / `attached` / `current_context` for the server's spans and its worker thread;
  `event` adds an event to the current span (breaker transitions, fallbacks).
- `inject_context` / `attach_context` carry the current trace across a process boundary (a Ray
  task, a subprocess) as a plain dict of W3C ``traceparent`` / ``tracestate`` headers.
- `current_trace_id` for log records and error answers (also set by an incoming ``traceparent``
  when tracing is off, so logs correlate with the caller's trace).

Prompt and completion text is never recorded unless ``content`` is on
(``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``, OpenTelemetry's GenAI switch).
A foundation module: it knows nothing of the engine; callers pass plain values.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from workbench.errors import UserError
from workbench.observe.profiler import LaunchRecord, Profiler

SERVICE_NAME = "rocm-workbench"
SCOPE = "workbench"  # the instrumentation scope's name
PROVIDER = "rocm-workbench"  # gen_ai.provider.name
ENV_STEPS = "WORKBENCH_TRACE_STEPS"  # "1": one span per decode step
ENV_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
PROTOCOL = "http/protobuf"
_TRUE = ("1", "true", "yes", "on")
_NULL = contextlib.nullcontext()  # reusable: what `attached` and `current` give while off
# A generation's children, outermost first. batch_queue: waiting in the continuous batch for a
# slot and KV pages (the server's own queue is the request's "queue" span).
PHASES = ("batch_queue", "prefill", "decode", "decode_step")


@dataclass
class _State:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None
    steps: bool = False
    content: bool = False


_state = _State()
_lock = threading.Lock()
_connected: weakref.WeakSet[Profiler] = weakref.WeakSet()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


# -- setup (the edge calls these) -----------------------------------------------------------------


def configure(
    exporter: Any | None = None,
    *,
    service_name: str = SERVICE_NAME,
    batch: bool = True,
    steps: bool = False,
    content: bool = False,
) -> TracerProvider:
    """Trace from now on, replacing an earlier configuration (its spans are flushed first).

    ``exporter``: an OpenTelemetry SDK span exporter (None: spans go only to recorders added
    later). ``batch``: export from a background thread (`BatchSpanProcessor`), or at each span's
    end. ``steps``: one ``decode_step`` span per generated token. ``content``: record prompt and
    completion text (``gen_ai.input.messages`` / ``gen_ai.output.messages``)."""
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    provider = TracerProvider(
        resource=Resource.create({SERVICE_KEY: service_name}),
        shutdown_on_exit=False,  # `shutdown` is registered once, below, for every provider
    )
    if exporter is not None:
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
    with _lock:
        _state.provider = provider
        _state.tracer = provider.get_tracer(SCOPE)
        _state.steps, _state.content = steps, content
    return provider


atexit.register(lambda: shutdown())  # the last spans leave when the process ends


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Export over OTLP/HTTP when the standard variables ask for it; True when it does.

    Reads ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (``/v1/traces`` appended), ``OTEL_SERVICE_NAME``, ``OTEL_SDK_DISABLED``,
    ``OTEL_TRACES_EXPORTER`` (``none`` turns export off), the protocol variables (only
    ``http/protobuf`` is supported), ``WORKBENCH_TRACE_STEPS`` and
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``. Headers, timeout, compression and
    certificates are read by the exporter itself (``OTEL_EXPORTER_OTLP_HEADERS``, ...)."""
    env = os.environ if environ is None else environ
    base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
    exporter_name = (env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if _truthy(env.get("OTEL_SDK_DISABLED")) or exporter_name == "none" or not (base or endpoint):
        return False
    if exporter_name != "otlp":
        raise UserError(
            "user.bad_otel_setting",
            f"OTEL_TRACES_EXPORTER={exporter_name!r}: only 'otlp' (or 'none') is supported",
        )
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or PROTOCOL
    ).strip()
    if protocol != PROTOCOL:
        raise UserError(
            "user.bad_otel_setting",
            f"OTLP protocol {protocol!r} is not supported: traces go over {PROTOCOL} "
            "(a collector's port 4318); unset OTEL_EXPORTER_OTLP_PROTOCOL",
        )
    if not endpoint:
        endpoint = base.rstrip("/") + "/v1/traces"
    url = urlparse(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise UserError(
            "user.bad_otel_setting",
            f"OTLP endpoint {endpoint!r} is not an http(s) URL (e.g. http://localhost:4318)",
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    configure(
        OTLPSpanExporter(endpoint=endpoint),
        service_name=(env.get("OTEL_SERVICE_NAME") or "").strip() or SERVICE_NAME,
        steps=_truthy(env.get(ENV_STEPS)),
        content=_truthy(env.get(ENV_CONTENT)),
    )
    return True


def shutdown() -> None:
    """Flush and stop tracing (spans become no-ops again)."""
    with _lock:
        provider = _state.provider
        _state.provider = _state.tracer = None
    if provider is not None:
        provider.shutdown()


def flush(timeout_s: float = 10.0) -> bool:
    """Export every finished span now; False when the exporters did not finish in time."""
    provider = _state.provider
    return True if provider is None else provider.force_flush(int(timeout_s * 1000))


def enabled() -> bool:
    return _state.tracer is not None


class SpanRecorder(SpanProcessor):
    """Keeps the most recent ``capacity`` finished spans in memory."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._spans: deque[ReadableSpan] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.closed = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.closed:
            return
        with self._lock:
            self._spans.append(span)

    def spans(self, trace_id: str | None = None) -> list[ReadableSpan]:
        """Finished spans, oldest first; only those of ``trace_id`` (32 hex digits) if given."""
        with self._lock:
            spans = list(self._spans)
        if trace_id is None:
            return spans
        return [s for s in spans if s.context is not None and _hex(s.context.trace_id) == trace_id]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()


def recorder(capacity: int = 10_000) -> SpanRecorder:
    """A new in-memory recorder of every span from now on (tracing starts, exporting nothing,
    when it was off). Call `remove_recorder` when done with it."""
    if _state.provider is None:
        configure()
    rec = SpanRecorder(capacity)
    assert _state.provider is not None
    _state.provider.add_span_processor(rec)
    return rec


def provider() -> TracerProvider | None:
    """The tracer provider spans go to now (None while tracing is off)."""
    return _state.provider


def timeline(spans: list[ReadableSpan]) -> list[dict[str, Any]]:
    """Rows for a timeline of finished spans, in start order: name, start_ms and duration_ms
    from the earliest start, depth (0 for a span whose parent is not among them), events."""
    if not spans:
        return []
    ids = {s.context.span_id: s for s in spans if s.context is not None}
    t0 = min(s.start_time or 0 for s in spans)

    def depth(s: ReadableSpan) -> int:
        d = 0
        while s.parent is not None and s.parent.span_id in ids and d < len(spans):
            s, d = ids[s.parent.span_id], d + 1
        return d

    rows = [
        {
            "name": s.name,
            "start_ms": ((s.start_time or 0) - t0) / 1e6,
            "duration_ms": ((s.end_time or s.start_time or 0) - (s.start_time or 0)) / 1e6,
            "depth": depth(s),
            "events": len(s.events),
        }
        for s in spans
    ]
    rows.sort(key=lambda r: (r["start_ms"], r["depth"]))
    return rows


def remove_recorder(rec: SpanRecorder) -> None:
    """Stop feeding ``rec`` (the SDK cannot remove a processor: ``rec`` drops what it gets)."""
    rec.closed = True
    rec.clear()


def connect(profiler: Profiler) -> None:
    """Kernel launches recorded by ``profiler`` become events of the current span (once per
    profiler, however many engines share it)."""
    with _lock:
        if profiler in _connected:
            return
        _connected.add(profiler)
    profiler.add_listener(_launch_event)


def _launch_event(rec: LaunchRecord) -> None:
    if _state.tracer is None:
        return
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attrs: dict[str, Any] = {
        "workbench.launch.backend": rec.backend,
        "workbench.launch.duration_s": rec.duration_s,
    }
    if rec.grid is not None:
        attrs["workbench.launch.grid"] = list(rec.grid)
    if rec.block is not None:
        attrs["workbench.launch.block"] = list(rec.block)
    if rec.bytes is not None:
        attrs["workbench.launch.bytes"] = rec.bytes
    if rec.flops is not None:
        attrs["workbench.launch.flops"] = rec.flops
    started = time.time_ns() - int((time.perf_counter() - rec.start_s) * 1e9)
    span.add_event(rec.name, attrs, timestamp=started)


# -- spans and context ----------------------------------------------------------------------------


def start_span(
    name: str,
    *,
    parent: otel_context.Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """A started span (child of ``parent``, default the current context); end it yourself.
    While tracing is off: the invalid span, whose methods do nothing."""
    tracer = _state.tracer
    if tracer is None:
        return INVALID_SPAN
    return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def end_span(span: Span, *, error: BaseException | None = None) -> None:
    """End ``span``, marking it failed with ``error`` when one is given."""
    if not span.is_recording():
        return
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attribute("error.type", getattr(error, "code", type(error).__name__))
    span.end()


def event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """An event on the current span (nothing when no span records)."""
    if _state.tracer is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


def current_context() -> otel_context.Context:
    return otel_context.get_current()


def with_span(span: Span, parent: otel_context.Context | None = None) -> otel_context.Context:
    """``parent`` (default: current) with ``span`` as its current span."""
    return trace.set_span_in_context(span, parent)


@contextlib.contextmanager
def _attach(ctx: otel_context.Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def attached(ctx: otel_context.Context | None) -> contextlib.AbstractContextManager[None]:
    """Make ``ctx`` current inside (on another thread than the one that captured it)."""
    return _NULL if ctx is None else _attach(ctx)


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The context a request's ``traceparent`` / ``tracestate`` headers carry (lower-case keys)."""
    return propagate.extract(headers)


def inject_context() -> dict[str, str]:
    """The current trace as W3C headers (``{"traceparent": ...}``; {} outside any trace), to
    send with work that runs elsewhere (a Ray task) and open there with `attach_context`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def attach_context(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Inside, spans started are children of the span that `inject_context` captured."""
    if not carrier:
        yield
        return
    with _attach(propagate.extract(carrier)):
        yield


def _hex(trace_id: int) -> str:
    return trace.format_trace_id(trace_id)


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), None outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return _hex(ctx.trace_id) if ctx.is_valid else None


def current_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current span, (None, None) outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return _hex(ctx.trace_id), trace.format_span_id(ctx.span_id)


# -- one generation -------------------------------------------------------------------------------


class GenerationTrace:
    """One generation's span and its ``batch_queue`` / ``prefill`` / ``decode`` /
    ``decode_step`` children. Not thread-safe: the thread that runs the generation drives it."""

    on = True

    def __init__(self, span: Span, tracer: trace.Tracer, *, steps: bool, content: bool) -> None:
        self.span = span
        self._tracer = tracer
        self._steps = steps
        self._content = content
        self._open: dict[str, Span] = {}
        self._ctx = trace.set_span_in_context(span)

    @property
    def trace_id(self) -> str | None:
        ctx = self.span.get_span_context()
        return _hex(ctx.trace_id) if ctx.is_valid else None

    def begin(self, phase: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Open a child span (``decode_step``: a child of ``decode``, only when steps are on)."""
        if phase in self._open:
            return
        parent = self._ctx
        if phase == "decode_step":
            decode = self._open.get("decode")
            if not self._steps or decode is None:
                return
            parent = trace.set_span_in_context(decode)
        self._open[phase] = self._tracer.start_span(phase, context=parent, attributes=attributes)

    def end(self, phase: str, attributes: Mapping[str, Any] | None = None) -> None:
        span = self._open.pop(phase, None)
        if span is not None:
            if attributes:
                span.set_attributes(attributes)
            span.end()

    def is_open(self, phase: str) -> bool:
        return phase in self._open

    def drawn(self, index: int) -> None:
        """Token ``index`` was drawn: its step span ends; the first one ends the prefill and
        begins the decode."""
        self.end("decode_step")
        if index == 0:
            self.end("prefill")
            self.begin("decode")

    def current(self) -> contextlib.AbstractContextManager[Any]:
        """The innermost open span (else the generation's) current inside."""
        for phase in reversed(PHASES):
            span = self._open.get(phase)
            if span is not None:
                return trace.use_span(span)
        return trace.use_span(self.span)

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        self.span.add_event(name, attributes)

    def finish(
        self,
        result: Any = None,
        *,
        reason: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End every open child and the generation's span. ``result``: the engine's
        GenerationResult (finish_reason, token_ids, text) when there is one."""
        if not self.span.is_recording():
            return
        out = 0 if result is None else len(result.token_ids)
        reason = reason or ("error" if error is not None else None)
        reason = reason or (result.finish_reason if result is not None else "cancelled")
        if "decode" in self._open:
            self._open["decode"].set_attribute("gen_ai.usage.output_tokens", out)
        for phase in reversed(PHASES):
            self.end(phase)
        attrs: dict[str, Any] = {
            "gen_ai.usage.output_tokens": out,
            "gen_ai.response.finish_reasons": [reason],
        }
        if self._content and result is not None:
            attrs["gen_ai.output.messages"] = json.dumps(
                [_message("assistant", result.text, reason)], ensure_ascii=False
            )
        self.span.set_attributes(attrs)
        end_span(self.span, error=error)


class _NoTrace(GenerationTrace):
    """What `generation` returns while tracing is off: every method does nothing."""

    on = False

    def __init__(self) -> None:
        self.span = INVALID_SPAN

    @property
    def trace_id(self) -> str | None:
        return None

    def begin(self, phase: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def end(self, phase: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def is_open(self, phase: str) -> bool:
        return False

    def drawn(self, index: int) -> None:
        pass

    def current(self) -> contextlib.AbstractContextManager[Any]:
        return _NULL

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def finish(
        self, result: Any = None, *, reason: str | None = None, error: BaseException | None = None
    ) -> None:
        pass


NO_TRACE: GenerationTrace = _NoTrace()


def _message(role: str, text: str, finish: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": role, "parts": [{"type": "text", "content": text}]}
    if finish is not None:
        msg["finish_reason"] = finish
    return msg


def _is_chat(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and isinstance(prompt[0], Mapping)
    )


def generation(
    model: str,
    config: Any,
    *,
    request_id: str,
    prompt_tokens: int,
    prompt: Any = None,
    parent: otel_context.Context | None = None,
) -> GenerationTrace:
    """Start the span of one generation (a child of ``parent``, default the current context).

    ``config``: anything with the GenerationConfig fields (max_tokens, temperature, top_p,
    top_k, seed, stop). ``prompt``: the text, token ids or chat messages; messages make the
    operation ``chat``, anything else ``text_completion``. Its text is recorded only when
    content capture is on."""
    tracer = _state.tracer
    if tracer is None:
        return NO_TRACE
    operation = "chat" if _is_chat(prompt) else "text_completion"
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.response.id": request_id,
        "gen_ai.request.max_tokens": config.max_tokens,
        "gen_ai.request.temperature": float(config.temperature),
        "gen_ai.request.top_p": float(config.top_p),
        "gen_ai.request.top_k": float(config.top_k),
        "gen_ai.usage.input_tokens": prompt_tokens,
        "workbench.request_id": request_id,
    }
    if config.seed is not None:
        attrs["gen_ai.request.seed"] = int(config.seed)
    if config.stop:
        attrs["gen_ai.request.stop_sequences"] = list(config.stop)
    if _state.content and prompt is not None:
        if isinstance(prompt, str):
            messages = [_message("user", prompt)]
        elif operation == "chat":
            messages = [_message(m.get("role", "user"), m.get("content", "")) for m in prompt]
        else:  # token ids: no text to show
            messages = []
        if messages:
            attrs["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
    span = tracer.start_span(f"{operation} {model}", context=parent, attributes=attrs)
    return GenerationTrace(span, tracer, steps=_state.steps, content=_state.content)
