"""Observability: the per-launch profiler, Prometheus metrics, logging setup and tracing.

A foundation layer: it imports only workbench.errors, the standard library, prometheus-client and
OpenTelemetry (pandas lazily, for DataFrames); tracing lives in `workbench.observe.tracing`.
The engine and backends import it; it knows nothing of them.
"""

from workbench.observe.logs import configure, configure_from_env, redact, request_context
from workbench.observe.metrics import METRICS, MetricDef, Metrics
from workbench.observe.profiler import LaunchRecord, Profiler, current_phase, current_request_id

__all__ = [
    "METRICS",
    "LaunchRecord",
    "MetricDef",
    "Metrics",
    "Profiler",
    "configure",
    "configure_from_env",
    "current_phase",
    "current_request_id",
    "redact",
    "request_context",
]
