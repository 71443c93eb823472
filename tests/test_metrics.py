"""Metrics: one name table, documented, parseable, accepted by promtool, fed by the profiler."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests import tools
from workbench.errors import UserError
from workbench.observe.metrics import BREAKER_STATES, METRICS, PREFIX, Metrics
from workbench.observe.profiler import Profiler

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def _exercise(m: Metrics) -> None:
    m.request_started("smollm2", "emulator")
    m.request_completed("smollm2", "emulator", duration_s=1.5)
    m.request_failed("smollm2", "cupy", "backend")
    m.request_cancelled("smollm2", "numpy")
    m.tokens("smollm2", "emulator", prompt=12, generated=7)
    m.observe_ttft(0.3, model="smollm2", backend="emulator")
    m.observe_tpot(0.02, model="smollm2", backend="emulator")
    m.set_queue_length(3)
    m.set_running(1)
    m.kernel_launch("matvec_q8_0", "emulator", 0.004)
    m.retry("launch", "retry")
    m.retry("launch", "recovered")
    m.fallback("cupy", "numpy")
    m.breaker_state("cupy", "half-open")
    m.kv_cache("smollm2", used_tokens=19, capacity_tokens=2048, nbytes=1 << 20)
    m.batch_step(
        "smollm2", size=3, running=3, waiting=2, pages_used=10, pages_total=64,
        new_hit_tokens=32, new_preemptions=1,
    )  # fmt: skip


def test_names_are_prefixed_and_conventional() -> None:
    for key, d in METRICS.items():
        assert d.name.startswith(PREFIX), d.name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", d.name)
        assert d.name.endswith("_total") == (d.kind == "counter"), d.name
        if d.kind == "histogram":  # named by the unit observed
            assert d.name.endswith(("_seconds", "_sequences")), d.name
        assert key in d.name


def test_docs_list_every_metric_with_its_type() -> None:
    text = DOCS.read_text()
    for d in METRICS.values():
        row = next((line for line in text.splitlines() if f"`{d.name}`" in line), None)
        assert row is not None, f"docs/metrics.md does not list {d.name}"
        assert d.kind in row, f"docs/metrics.md gives {d.name} a different type"
        for label in d.labels:
            assert label in row, f"docs/metrics.md misses label {label} of {d.name}"


def test_exposition_parses_with_the_values_recorded() -> None:
    m = Metrics()
    _exercise(m)
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    for d in METRICS.values():
        assert d.name.removesuffix("_total") in families, d.name

    samples = [s for fam in families.values() for s in fam.samples]

    def sample(name: str, **labels: str) -> float:
        return next(s.value for s in samples if s.name == name and s.labels == labels)

    mb = {"model": "smollm2", "backend": "emulator"}
    assert sample("workbench_generated_tokens_total", **mb) == 7
    assert sample("workbench_prompt_tokens_total", **mb) == 12
    assert sample("workbench_requests_failed_total", model="smollm2", backend="cupy",
                  category="backend") == 1  # fmt: skip
    assert sample("workbench_breaker_state", backend="cupy") == BREAKER_STATES["half_open"] == 1
    assert sample("workbench_retries_total", operation="launch", outcome="recovered") == 1
    assert sample("workbench_fallbacks_total", from_backend="cupy", to_backend="numpy") == 1
    assert sample("workbench_time_to_first_token_seconds_count", **mb) == 1
    assert sample("workbench_request_duration_seconds_sum", **mb) == 1.5
    assert sample("workbench_requests_queued") == 3
    assert sample("workbench_kv_cache_used_tokens", model="smollm2") == 19


def test_own_registry_not_the_global_one() -> None:
    a, b = Metrics(), Metrics()  # a second instance would clash on a shared registry
    a.request_started("m", "numpy")
    assert b.value("workbench_requests_started_total", model="m", backend="numpy") is None
    assert REGISTRY.get_sample_value("workbench_requests_started_total", {}) is None


@pytest.mark.tool("promtool")
def test_promtool_accepts_the_exposition() -> None:
    promtool = tools.require("promtool")
    m = Metrics()
    _exercise(m)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=m.exposition(), capture_output=True, timeout=30
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_profiler_records_feed_the_kernel_histogram_until_disconnected() -> None:
    m, prof = Metrics(), Profiler()
    disconnect = m.connect(prof)
    for _ in range(3):
        prof.record("rmsnorm", backend="emulator", duration_s=0.001)
    labels = {"kernel": "rmsnorm", "backend": "emulator"}
    name = "workbench_kernel_launch_duration_seconds"
    assert m.value(f"{name}_count", **labels) == 3
    assert m.value(f"{name}_sum", **labels) == pytest.approx(0.003)
    disconnect()
    prof.record("rmsnorm", backend="emulator", duration_s=0.001)
    assert m.value(f"{name}_count", **labels) == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.retry("launch", "maybe"),
        lambda m: m.breaker_state("cupy", "ajar"),
        lambda m: m.breaker_state("cupy", 3),
        lambda m: m.request_failed("x", "numpy", "oops"),
        lambda m: m.tokens("x", "numpy", prompt=-1),
        lambda m: m.observe_ttft(-0.1, model="x", backend="numpy"),
        lambda m: m.set_queue_length(-1),
        lambda m: m.kv_cache("x", used_tokens=5, capacity_tokens=4),
    ],
)
def test_bad_input_is_a_user_error(call) -> None:
    with pytest.raises(UserError):
        call(Metrics())
