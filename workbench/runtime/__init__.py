"""Resilience primitives: retry policy and statistics, circuit breaker, fault injection, error
classification and the error log.

A foundation layer: it imports only `workbench.errors` and the standard library (pandas lazily,
for DataFrame export). The engine, backends and kernels import it; it knows nothing of them.
See docs/resilience.md.
"""

from workbench.runtime.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Transition
from workbench.runtime.classify import classify
from workbench.runtime.errorlog import ErrorLog, ErrorRecord, default_log
from workbench.runtime.faults import SITE_ERRORS, SITES, FaultInjector, maybe_fail
from workbench.runtime.retry import RetryPolicy, RetryStats, default_stats

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "SITES",
    "SITE_ERRORS",
    "CircuitBreaker",
    "ErrorLog",
    "ErrorRecord",
    "FaultInjector",
    "RetryPolicy",
    "RetryStats",
    "Transition",
    "classify",
    "default_log",
    "default_stats",
    "maybe_fail",
]
