"""Run a list of jobs in a local process pool or on Ray, and get the outcomes back in order.

What sweeps (`workbench.engine.sweep`) and batch evaluation (`workbench.engine.batch_eval`)
share: a job function ``fn(item) -> dict`` applied to every item, on ``workers`` processes here
(one: in this process) or as Ray tasks (`ray_init` connects to a cluster, or starts a local one
when no address is given). A job that raises is retried (``retries`` more attempts: Ray's own task
retries there, a resubmission here) and, when every attempt failed, comes back as an `Outcome`
with its error: nothing is dropped. Outcomes are yielded in the items' order as soon as each one
and all before it are done; ``progress(done, total)`` counts finished jobs in any order.

Ray is an optional extra (``pip install 'rocm-workbench[ray]'``) and is imported only here, when
asked for. Task functions take ``trace_carrier``, the caller's trace context
(`tracing.inject_context`): each job then runs in a ``workbench.job`` span, a child of the
caller's span, in whatever process runs it (a worker sets tracing up from its own environment).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from workbench.errors import UserError, WorkbenchError
from workbench.observe import tracing

DEFAULT_RETRIES = 1  # a failed job runs once more before it is reported as failed
RAY_EXTRA_HINT = "pip install 'rocm-workbench[ray]'"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Outcome:
    """One job's result: ``value`` (what the job returned) or ``error`` (``code: message`` of its
    last attempt), and how many attempts it took (on Ray: how many were allowed, when failed)."""

    index: int
    value: Any = None
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


def describe(e: BaseException) -> str:
    """One line for a failed job: the workbench error code and message, else the exception."""
    if isinstance(e, WorkbenchError):
        return f"{e.code}: {e.message}"
    return f"{type(e).__name__}: {e}"


def check_workers(workers: int) -> int:
    if not isinstance(workers, int) or workers < 1:
        raise UserError("user.bad_workers", f"workers must be an integer >= 1, not {workers!r}")
    return workers


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "user.ray_missing", f"Ray is not installed: {RAY_EXTRA_HINT} (or pip install ray)"
        ) from None
    return ray


def ray_init(address: str | None = None, **kwargs: Any) -> Any:
    """The ``ray`` module, connected: to the running session if there is one, else to the cluster
    at ``address`` ("auto": the one this machine belongs to), else to a new local cluster (what
    ``ray.init()`` does without an address). ``kwargs`` go to ``ray.init``."""
    ray = import_ray()
    trace_env = {k: v for k, v in os.environ.items() if k.startswith(("OTEL_", "WORKBENCH_TRACE"))}
    if trace_env and "runtime_env" not in kwargs:  # tasks on other nodes trace as this one does
        kwargs["runtime_env"] = {"env_vars": trace_env}
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, **kwargs)
        except ConnectionError as e:
            raise UserError(
                "user.ray_unreachable", f"cannot reach a Ray cluster at {address!r}: {e}"
            ) from None
    return ray


def call_job(fn: Callable[[Any], Any], item: Any, trace_carrier: dict | None = None) -> Any:
    """Run one job (in a pool worker or a Ray task). With ``trace_carrier`` (the caller's trace
    context) the job runs in a ``workbench.job`` span that continues the caller's trace; the
    item's ``trace_attributes()``, when it has one, names what the job is (never prompt text)."""
    if not trace_carrier:
        return fn(item)
    here = not tracing.enabled() and tracing.configure_from_env()  # a fresh worker process
    attributes = {"workbench.job.function": getattr(fn, "__name__", "job")}
    if hasattr(item, "trace_attributes"):
        attributes.update(item.trace_attributes())
    with tracing.attach_context(trace_carrier):
        span = tracing.start_span("workbench.job", attributes=attributes)
        try:
            with tracing.attached(tracing.with_span(span)):
                value = fn(item)
        except BaseException as e:
            tracing.end_span(span, error=e)
            raise
        finally:
            tracing.end_span(span)  # (no-op when the error already ended it)
            if here:
                tracing.flush()  # the worker may be gone before its batch processor's next export
    return value


def _attempt(fn: Callable[[Any], Any], item: Any, trace_carrier: dict | None) -> tuple[bool, Any]:
    """A pool worker's attempt: (True, value) or (False, the error as one line). Errors travel as
    text, not as exceptions: some cannot be pickled back."""
    try:
        return True, call_job(fn, item, trace_carrier)
    except Exception as e:
        return False, describe(e)


@contextmanager
def traced_run(name: str, attributes: dict[str, Any], carrier: dict | None) -> Iterator[dict]:
    """A span ``name`` for a whole run (under ``carrier``'s trace when given, else the current
    one); yields the carrier its jobs continue (`call_job`): {} while tracing is off."""
    with tracing.attach_context(carrier):
        span = tracing.start_span(name, attributes=attributes)
        with tracing.attached(tracing.with_span(span)):
            job_carrier = tracing.inject_context()
    try:
        yield job_carrier
    except BaseException as e:
        tracing.end_span(span, error=e)
        raise
    finally:
        tracing.end_span(span)


def run_jobs(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 1,
    ray: bool = False,
    ray_address: str | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: Progress | None = None,
    trace_carrier: dict | None = None,
) -> Iterator[Outcome]:
    """Apply ``fn`` (a module-level function: workers import it) to each of ``items``; yield one
    `Outcome` per item, in order. ``ray``: as Ray tasks (``workers`` is then Ray's to decide);
    else ``workers`` processes (1: in this process)."""
    check_workers(workers)
    if retries < 0:
        raise UserError("user.bad_retries", f"retries must be >= 0, not {retries}")
    if ray:
        yield from _run_ray(fn, items, ray_address, retries, progress, trace_carrier)
    elif workers == 1 or len(items) <= 1:
        yield from _run_here(fn, items, retries, progress, trace_carrier)
    else:
        yield from _run_pool(fn, items, workers, retries, progress, trace_carrier)


def _run_here(fn, items, retries, progress, carrier) -> Iterator[Outcome]:
    for i, item in enumerate(items):
        attempt = 0
        ok, value = False, None
        while not ok and attempt <= retries:
            attempt += 1
            ok, value = _attempt(fn, item, carrier)
        out = Outcome(i, value, None, attempt) if ok else Outcome(i, None, value, attempt)
        if progress is not None:
            progress(i + 1, len(items))
        yield out


def pool_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes (spawn): a fork would copy this process's threads' locks (numba's,
    tqdm's) in whatever state they were."""
    return multiprocessing.get_context("spawn")


def _run_pool(fn, items, workers, retries, progress, carrier) -> Iterator[Outcome]:
    """A worker process that dies (killed, out of memory) breaks the whole pool: every job in it
    then fails alike. Those jobs run again, each alone in a fresh pool, so that a death with one
    job in flight is that job's failed attempt, and one with several costs none of them one."""
    n = len(items)
    done: dict[int, Outcome] = {}
    attempts = [0] * n
    pending = list(range(n))  # not yet submitted, in order
    suspects: set[int] = set()  # in flight when a pool broke: run alone
    next_out = finished_count = 0
    pool = ProcessPoolExecutor(min(workers, n), mp_context=pool_context())
    running: dict[Future, int] = {}

    def finish(i: int, ok: bool, value: Any) -> None:
        nonlocal finished_count
        done[i] = Outcome(i, value if ok else None, None if ok else value, attempts[i])
        finished_count += 1
        if progress is not None:
            progress(finished_count, n)

    try:
        while next_out < n:
            while pending and len(running) < 2 * workers:  # a little queued per worker
                alone = pending[0] in suspects or any(j in suspects for j in running.values())
                if alone and running:
                    break
                i = pending.pop(0)
                attempts[i] += 1
                running[pool.submit(_attempt, fn, items[i], carrier)] = i
                if alone:
                    break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = [f for f in finished if isinstance(f.exception(), BrokenProcessPool)]
            for fut in finished:
                if fut in broken:
                    continue
                i = running.pop(fut)
                ok, value = fut.result()
                if not ok and attempts[i] <= retries:
                    pending.insert(0, i)
                else:
                    finish(i, ok, value)
            if broken:
                lost = list(running.values())  # the broken ones and any still queued
                running = {}
                pool.shutdown(cancel_futures=True)  # a broken pool takes no more work
                pool = ProcessPoolExecutor(min(workers, n), mp_context=pool_context())
                if len(lost) == 1 and lost[0] in suspects:
                    (i,) = lost
                    if attempts[i] > retries:
                        finish(i, False, "the worker process died while running this job")
                        lost = []
                else:
                    for i in lost:
                        attempts[i] -= 1  # not this job's fault, as far as anyone knows
                    suspects.update(lost)
                pending = sorted({*pending, *lost})
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
    finally:
        pool.shutdown(cancel_futures=True)


def _remote_call(fn: Callable[[Any], Any], item: Any, trace_carrier: dict | None) -> Any:
    return call_job(fn, item, trace_carrier)


def _run_ray(fn, items, address, retries, progress, carrier) -> Iterator[Outcome]:
    ray = ray_init(address)
    task = ray.remote(max_retries=retries, retry_exceptions=True)(_remote_call)
    refs = [task.remote(fn, item, carrier) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    done: dict[int, Outcome] = {}
    remaining = list(refs)
    next_out = 0
    while next_out < len(refs):
        ready, remaining = ray.wait(remaining, num_returns=1)
        for ref in ready:
            i = index[ref]
            try:
                done[i] = Outcome(i, ray.get(ref))
            except Exception as e:  # RayTaskError wraps the task's last exception
                cause = getattr(e, "cause", None) or e
                done[i] = Outcome(i, None, describe(cause), retries + 1)
            if progress is not None:
                progress(len(refs) - len(remaining), len(refs))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


def cpu_count() -> int:
    """CPUs this process may use (the default number of local workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
