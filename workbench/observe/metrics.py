"""Prometheus metrics on the engine's own registry (never prometheus-client's global one).

`METRICS` is the one place metric names, types, labels and help texts are defined; `Metrics`
builds them on a fresh ``CollectorRegistry`` and offers one small method per event. docs/metrics.md
lists every entry (a test keeps the two in step). Label sets are small and bounded: model and
backend names, kernel names from the registry, retry operations and outcomes, error categories.

Breaker state is a gauge per backend: 0 closed, 1 half-open, 2 open (`BREAKER_STATES`).

`Metrics.connect(profiler)` feeds every profiler record into the kernel launch histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from workbench.errors import CATEGORIES, UserError

PREFIX = "workbench_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Gauge values of workbench_breaker_state.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
RETRY_OUTCOMES = ("retry", "recovered", "exhausted")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Kernel launches: microseconds on a GPU up to seconds on the CPU emulator.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_KERNEL_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.1, 1, 10)


@dataclass(frozen=True)
class MetricDef:
    name: str  # full exposition name (counters end in _total)
    kind: str  # "counter", "gauge", "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None


_MB = ("model", "backend")

METRICS: Mapping[str, MetricDef] = {
    m.name.removeprefix(PREFIX).removesuffix("_total"): m
    for m in (
        MetricDef(
            "workbench_requests_started_total", "counter", _MB, "Generation requests started."
        ),
        MetricDef(
            "workbench_requests_completed_total", "counter", _MB,
            "Generation requests that finished (stop, length or end of generation).",
        ),
        MetricDef(
            "workbench_requests_failed_total", "counter", (*_MB, "category"),
            "Generation requests ended by an error, by error category.",
        ),
        MetricDef(
            "workbench_requests_cancelled_total", "counter", _MB,
            "Generation requests cancelled by the client.",
        ),
        MetricDef("workbench_prompt_tokens_total", "counter", _MB, "Prompt tokens prefilled."),
        MetricDef("workbench_generated_tokens_total", "counter", _MB, "Tokens generated."),
        MetricDef(
            "workbench_time_to_first_token_seconds", "histogram", _MB,
            "Time from request start to its first generated token.", _LATENCY_BUCKETS,
        ),
        MetricDef(
            "workbench_time_per_output_token_seconds", "histogram", _MB,
            "Time between consecutive generated tokens (decode steps).", _TOKEN_BUCKETS,
        ),
        MetricDef(
            "workbench_request_duration_seconds", "histogram", _MB,
            "End-to-end request latency, start to last token.", _LATENCY_BUCKETS,
        ),
        MetricDef(
            "workbench_requests_rejected_total", "counter", ("code",),
            "HTTP requests answered 503 without running, by error code (server.queue_full, "
            "server.draining, server.not_ready, server.overloaded, ...).",
        ),
        MetricDef("workbench_requests_queued", "gauge", (), "Requests waiting to start."),
        MetricDef("workbench_requests_running", "gauge", (), "Requests being generated."),
        MetricDef(
            "workbench_kernel_launch_duration_seconds", "histogram", ("kernel", "backend"),
            "Duration of each kernel launch or backend operation (device events on a GPU, "
            "wall clock on the CPU).", _KERNEL_BUCKETS,
        ),
        MetricDef(
            "workbench_retries_total", "counter", ("operation", "outcome"),
            "Retry events by operation; outcome retry (an attempt failed and is retried), "
            "recovered (a retried operation succeeded), exhausted (attempts ran out).",
        ),
        MetricDef(
            "workbench_fallbacks_total", "counter", ("from_backend", "to_backend"),
            "Switches of a generation from one backend to another.",
        ),
        MetricDef(
            "workbench_breaker_state", "gauge", ("backend",),
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
        ),
        MetricDef(
            "workbench_kv_cache_used_tokens", "gauge", ("model",),
            "Positions of the KV cache holding tokens.",
        ),
        MetricDef(
            "workbench_kv_cache_capacity_tokens", "gauge", ("model",),
            "Positions the KV cache can hold.",
        ),
        MetricDef(
            "workbench_kv_cache_bytes", "gauge", ("model",), "Memory allocated to the KV cache."
        ),
        MetricDef(
            "workbench_batch_running_sequences", "gauge", ("model",),
            "Sequences in the continuous batch (admitted, holding KV pages).",
        ),
        MetricDef(
            "workbench_batch_waiting_sequences", "gauge", ("model",),
            "Sequences submitted to the continuous batch, waiting for admission or pages.",
        ),
        MetricDef(
            "workbench_batch_size_sequences", "histogram", ("model",),
            "Sequences advanced by each step of the continuous batch.", _BATCH_BUCKETS,
        ),
        MetricDef(
            "workbench_kv_pages_used", "gauge", ("model",),
            "Pages of the paged KV cache held by running sequences.",
        ),
        MetricDef(
            "workbench_kv_pages_capacity", "gauge", ("model",), "Pages of the paged KV cache."
        ),
        MetricDef(
            "workbench_prefix_cache_hit_tokens_total", "counter", ("model",),
            "Prompt positions served from the prefix cache instead of computed.",
        ),
        MetricDef(
            "workbench_preemptions_total", "counter", ("model",),
            "Sequences preempted (pages returned, recomputed later) when KV pages ran out.",
        ),
    )
}  # fmt: skip

_KINDS: Mapping[str, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Metrics:
    """The engine's metrics on their own ``CollectorRegistry`` (``self.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._m: dict[str, Any] = {}
        for key, d in METRICS.items():
            kwargs: dict[str, Any] = {"registry": self.registry, "labelnames": d.labels}
            if d.buckets is not None:
                kwargs["buckets"] = d.buckets
            self._m[key] = _KINDS[d.kind](d.name, d.help, **kwargs)

    # -- requests --------------------------------------------------------------------------
    def request_started(self, model: str, backend: str) -> None:
        self._m["requests_started"].labels(model, backend).inc()

    def request_completed(self, model: str, backend: str, *, duration_s: float) -> None:
        """A request finished normally after ``duration_s`` (end-to-end latency)."""
        self._m["requests_completed"].labels(model, backend).inc()
        self._m["request_duration_seconds"].labels(model, backend).observe(
            _seconds(duration_s, "duration_s")
        )

    def request_failed(self, model: str, backend: str, category: str) -> None:
        """``category`` is a workbench.errors category ("user", "backend", ...)."""
        if category not in CATEGORIES:
            raise UserError(
                "user.bad_argument",
                f"category must be one of {', '.join(CATEGORIES)}, not {category!r}",
            )
        self._m["requests_failed"].labels(model, backend, category).inc()

    def request_cancelled(self, model: str, backend: str) -> None:
        self._m["requests_cancelled"].labels(model, backend).inc()

    def request_rejected(self, code: str) -> None:
        """The server refused a request with 503 before it ran (``code``: the error code)."""
        self._m["requests_rejected"].labels(code).inc()

    def tokens(self, model: str, backend: str, *, prompt: int = 0, generated: int = 0) -> None:
        """Add ``prompt`` prefilled and ``generated`` generated tokens."""
        if prompt < 0 or generated < 0:
            raise UserError("user.bad_argument", "token counts must be >= 0")
        if prompt:
            self._m["prompt_tokens"].labels(model, backend).inc(prompt)
        if generated:
            self._m["generated_tokens"].labels(model, backend).inc(generated)

    def observe_ttft(self, seconds: float, *, model: str, backend: str) -> None:
        self._m["time_to_first_token_seconds"].labels(model, backend).observe(
            _seconds(seconds, "seconds")
        )

    def observe_tpot(self, seconds: float, *, model: str, backend: str) -> None:
        """One decode step's time (time per output token)."""
        self._m["time_per_output_token_seconds"].labels(model, backend).observe(
            _seconds(seconds, "seconds")
        )

    def set_queue_length(self, n: int) -> None:
        self._m["requests_queued"].set(_count(n))

    def set_running(self, n: int) -> None:
        self._m["requests_running"].set(_count(n))

    def batch_step(
        self,
        model: str,
        *,
        size: int,
        running: int,
        waiting: int,
        pages_used: int,
        pages_total: int,
        new_hit_tokens: int = 0,
        new_preemptions: int = 0,
    ) -> None:
        """One step of the continuous batch: its size, the queue, KV pages, new hits and
        preemptions since the last step."""
        if size < 0 or new_hit_tokens < 0 or new_preemptions < 0:
            raise UserError("user.bad_argument", "batch sizes and counts must be >= 0")
        self._m["batch_size_sequences"].labels(model).observe(size)
        self._m["batch_running_sequences"].labels(model).set(_count(running))
        self._m["batch_waiting_sequences"].labels(model).set(_count(waiting))
        self._m["kv_pages_used"].labels(model).set(_count(pages_used))
        self._m["kv_pages_capacity"].labels(model).set(_count(pages_total))
        self._m["prefix_cache_hit_tokens"].labels(model).inc(new_hit_tokens)
        self._m["preemptions"].labels(model).inc(new_preemptions)

    # -- kernels and resilience ------------------------------------------------------------
    def kernel_launch(self, kernel: str, backend: str, seconds: float) -> None:
        self._m["kernel_launch_duration_seconds"].labels(kernel, backend).observe(
            _seconds(seconds, "seconds")
        )

    def retry(self, operation: str, outcome: str) -> None:
        """``outcome``: "retry" (a failed attempt will be retried), "recovered", "exhausted"."""
        if outcome not in RETRY_OUTCOMES:
            raise UserError(
                "user.bad_argument",
                f"outcome must be one of {', '.join(RETRY_OUTCOMES)}, not {outcome!r}",
            )
        self._m["retries"].labels(operation, outcome).inc()

    def fallback(self, src: str, dst: str) -> None:
        self._m["fallbacks"].labels(src, dst).inc()

    def breaker_state(self, backend: str, state: str | int) -> None:
        """``state``: "closed"/"half_open"/"open" (or "half-open"), or its value 0/1/2."""
        if isinstance(state, str):
            value = BREAKER_STATES.get(state.replace("-", "_"))
        else:
            value = state if state in BREAKER_STATES.values() else None
        if value is None:
            raise UserError(
                "user.bad_argument",
                f"breaker state must be one of {', '.join(BREAKER_STATES)} or 0..2, not {state!r}",
            )
        self._m["breaker_state"].labels(backend).set(value)

    def kv_cache(
        self, model: str, *, used_tokens: int, capacity_tokens: int, nbytes: int | None = None
    ) -> None:
        if not 0 <= used_tokens <= capacity_tokens:
            raise UserError(
                "user.bad_argument",
                f"KV cache use must be in 0..{capacity_tokens}, got {used_tokens}",
            )
        self._m["kv_cache_used_tokens"].labels(model).set(used_tokens)
        self._m["kv_cache_capacity_tokens"].labels(model).set(capacity_tokens)
        if nbytes is not None:
            self._m["kv_cache_bytes"].labels(model).set(_count(nbytes))

    # -- wiring and output -----------------------------------------------------------------
    def connect(self, profiler: Any) -> Callable[[], None]:
        """Observe every record of ``profiler`` (a workbench.observe.Profiler) in the kernel
        launch histogram. Returns a function that disconnects it."""

        children: dict[tuple[str, str], Any] = {}  # labels() takes a lock and a lookup: once
        hist = self._m["kernel_launch_duration_seconds"]

        def on_record(rec: Any) -> None:
            key = (rec.name, rec.backend)
            child = children.get(key)
            if child is None:
                child = children[key] = hist.labels(*key)
            child.observe(rec.duration_s)

        profiler.add_listener(on_record)
        return lambda: profiler.remove_listener(on_record)

    def exposition(self) -> bytes:
        """The text exposition format (serve it with ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's current value by its exposition name, e.g.
        ``value("workbench_retries_total", operation="launch", outcome="recovered")``."""
        return self.registry.get_sample_value(name, labels)


def _seconds(value: float, what: str) -> float:
    if not value >= 0:
        raise UserError("user.bad_argument", f"{what} must be >= 0, got {value!r}")
    return float(value)


def _count(value: int) -> int:
    if value < 0:
        raise UserError("user.bad_argument", f"a count must be >= 0, got {value!r}")
    return value
