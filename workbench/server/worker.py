"""One worker thread in front of the engine, fed by a bounded queue.

The engine is not thread-safe, so every engine call (loading, warm-up, generations) happens on the
worker thread. A request becomes a `Job`: the HTTP side submits it and reads its messages from an
asyncio queue; the worker runs the generation and hands each message to the event loop with
``call_soon_threadsafe``. Messages are ``("start", Generation)``, ``("token", TokenEvent)``, then
``("done", GenerationResult)`` or ``("error", WorkbenchError)``.

Admission: one job runs, at most ``max_queue`` wait; beyond that `submit` raises a recoverable
``server.queue_full`` (the HTTP layer answers 503 with Retry-After). A cancelled job (client gone,
timeout) leaves the queue at once, or, when running, stops after the token or prefill chunk in
progress (`Generation.cancel`, called from whichever thread cancels); the generation then ends and
its KV cache goes with it. The job's deadline also goes to the generation, which checks it between
prefill chunks.

Tracing: a job carries the trace context it was made in (the request's span) and a ``queue`` span
from `submit` until the worker takes it; the worker runs the job in that context, so the
generation's span is a child of the request's.

`retry_after_s` estimates when a refused client should come back: the jobs ahead of it times the
recent mean job duration.

`drain` refuses new jobs and lets the queued and running ones finish; `stop` cancels what is left
and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from workbench.errors import InternalError, RecoverableError, WorkbenchError
from workbench.observe import tracing
from workbench.observe.profiler import Profiler

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0  # what a 503 tells clients to wait at least (loading, queue full, draining)
MAX_RETRY_AFTER_S = 300.0  # the most a queue-full 503 tells clients to wait
DURATION_SMOOTHING = 0.2  # weight of the newest job in the running mean of job durations

StartFn = Callable[[Any], Any]  # engine -> Generation
Message = tuple[str, Any]


class Job:
    """One request's generation. Created on the event loop; run on the worker thread."""

    def __init__(
        self,
        start: StartFn,
        *,
        loop: asyncio.AbstractEventLoop,
        request_id: str,
        deadline: float | None = None,
    ) -> None:
        self.start = start
        self.loop = loop
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() after which the worker cancels it
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.cancel_reason: str | None = None  # "disconnect", "timeout", "shutdown"
        self.submitted = time.monotonic()
        self.generation: Any | None = None  # set by the worker once the generation exists
        self.started: float | None = None  # time.monotonic() it joined the batch
        self.trace_context = tracing.current_context()  # the request's span, for the worker
        self._queue_span = tracing.start_span(
            "queue", attributes={"workbench.request_id": request_id}
        )
        self._cancelled = threading.Event()
        self._on_cancel: Callable[[Job], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: str) -> None:
        """Thread-safe; the first reason given sticks."""
        if self._cancelled.is_set():
            return
        self.cancel_reason = reason
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)
        gen = self.generation
        if gen is not None:  # stops a prefill between chunks, a decode after its token
            gen.cancel()

    def dequeued(self) -> None:
        """The job left the queue (taken by the worker, cancelled, or refused)."""
        span, self._queue_span = self._queue_span, None
        if span is not None:
            span.end()

    def post(self, kind: str, value: Any) -> None:
        """From the worker thread: hand a message to the request's event loop."""
        # RuntimeError: the loop has closed; the server is gone and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.messages.put_nowait, (kind, value))


class Worker:
    """Loads the engine, warms it up, then runs jobs one at a time."""

    def __init__(
        self,
        engine: Any | Callable[[], Any],
        *,
        max_queue: int,
        warmup: bool = True,
        max_batch: int = 1,
    ) -> None:
        if max_queue < 0:
            raise InternalError("internal.bad_queue", f"max_queue must be >= 0, got {max_queue}")
        if max_batch < 1:
            raise InternalError("internal.bad_batch", f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._batch: list[Job] = []  # jobs in the engine's continuous batch
        self._factory: Callable[[], Any] = engine if callable(engine) else (lambda: engine)
        self.max_queue = max_queue
        self.warmup = warmup
        self.engine: Any | None = None
        self.load_error: WorkbenchError | None = None
        self._ready = threading.Event()
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._mean_job_s: float | None = None  # running mean of finished jobs' durations
        self._thread = threading.Thread(target=self._main, name="workbench-worker", daemon=True)

    # -- state -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """The model is loaded and warm, and new jobs are accepted."""
        return self._ready.is_set() and not self._draining

    @property
    def loaded(self) -> bool:
        return self._ready.is_set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._batch) if self._batch else (0 if self._running is None else 1)

    def batching(self) -> bool:
        """Whether jobs run together through the engine's continuous batch: more than one
        allowed, and an engine whose batch runs on its backend (the NumPy one)."""
        e = self.engine
        return (
            self.max_batch > 1
            and hasattr(e, "submit")
            and getattr(getattr(e, "transformer", None), "backend", None) is not None
            and e.transformer.backend.name == "numpy"
        )

    def retry_after_s(self) -> float:
        """How long a refused client should wait: the jobs ahead times the mean job time."""
        with self._cond:
            ahead = len(self._pending) + self.running
            mean = self._mean_job_s
        if mean is None:
            return RETRY_AFTER_S
        return min(MAX_RETRY_AFTER_S, max(RETRY_AFTER_S, ahead * mean / self.max_batch))

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and self._running is None and not self._batch

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise a recoverable error (draining, not ready, queue full)."""
        with self._cond:
            if self._draining or self._stopping:
                raise RecoverableError(
                    "server.draining",
                    "the server is shutting down; retry on another instance",
                    retry_after_s=RETRY_AFTER_S,
                )
            if self.load_error is not None:
                raise self.load_error
            if not self._ready.is_set():
                raise RecoverableError(
                    "server.not_ready",
                    "the model is still loading; retry shortly",
                    retry_after_s=RETRY_AFTER_S,
                )
            # max_batch jobs run and max_queue wait; counting the running ones also covers the
            # moment the worker is between jobs (running 0, one more waiting).
            slots = self.max_batch if self.batching() else 1
            full = len(self._pending) + self.running > self.max_queue + slots - 1
            if not full:
                job._on_cancel = self._dequeue
                self._pending.append(job)
                self._publish()
                self._cond.notify_all()
                return
        job.dequeued()
        raise RecoverableError(
            "server.queue_full",
            f"the server is busy ({self.max_queue} requests waiting); retry shortly",
            retry_after_s=self.retry_after_s(),
            max_queue=self.max_queue,
        )

    def drain(self) -> None:
        """Refuse new jobs; queued and running ones go on."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every job left, end the thread and wait for it (up to ``timeout``)."""
        with self._cond:
            self._draining = self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            running = [self._running, *self._batch]
            self._publish()
            self._cond.notify_all()
        for job in left:
            job.dequeued()
            job.post("error", shutdown_error())
        for job in running:
            if job is not None:
                job.cancel("shutdown")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    # -- the thread ------------------------------------------------------------------------
    def _dequeue(self, job: Job) -> None:
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self._publish()
                job.dequeued()
                job.post("error", _cancelled_error(job))

    def _publish(self) -> None:
        """Queue and running gauges on the engine's metrics (called under the lock)."""
        metrics = getattr(self.engine, "metrics", None)
        if metrics is not None:
            metrics.set_queue_length(len(self._pending))
            metrics.set_running(self.running)

    def _main(self) -> None:
        if not self._load():
            return
        if self.batching():
            self._main_batched()
            return
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._running = job
                self._publish()
            job.dequeued()
            t0 = time.monotonic()
            completed = False
            try:
                # Every log record carries the request id and trace; the spans nest under it.
                with Profiler.request(job.request_id), tracing.attached(job.trace_context):
                    completed = self._run(job)
            finally:
                took = time.monotonic() - t0
                with self._cond:
                    self._running = None
                    if completed:  # a cancelled job's time says nothing of a whole one
                        m = self._mean_job_s
                        a = DURATION_SMOOTHING
                        self._mean_job_s = took if m is None else (1 - a) * m + a * took
                    self._publish()
                    self._cond.notify_all()

    def _main_batched(self) -> None:
        """Jobs join the engine's continuous batch as slots free up; each pass steps the
        batch once and hands every job the tokens it produced."""
        engine = self.engine
        assert engine is not None
        view = _Submitter(engine)
        while True:
            with self._cond:
                while not self._pending and not self._batch and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._batch:
                    return
                new = []
                while self._pending and len(self._batch) + len(new) < self.max_batch:
                    new.append(self._pending.popleft())
                    new[-1].dequeued()
                self._batch.extend(new)
                self._publish()
            for job in new:
                if not self._begin(job, view):
                    self._finish(job, completed=False)
            try:
                engine.step()
            except Exception:  # a bug in the step itself: every job in it gets the error
                log.exception("batched step failed")
                for job in list(self._batch):
                    job.post("error", InternalError("internal.generation_failed", "step"))
                    self._finish(job, completed=False)
                continue
            for job in list(self._batch):
                self._forward(job, engine)

    def _begin(self, job: Job, view: Any) -> bool:
        """Submit ``job``'s generation to the batch; False when it ended already."""
        if job.cancelled:
            return False
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job.cancel("timeout")
            job.post("error", _cancelled_error(job))
            return False
        try:
            with Profiler.request(job.request_id), tracing.attached(job.trace_context):
                gen = job.start(view)
        except WorkbenchError as e:
            job.post("error", e)
            return False
        except Exception as e:
            log.exception("generation failed")
            job.post("error", InternalError("internal.generation_failed", f"{type(e).__name__}"))
            return False
        gen.deadline = job.deadline
        gen.queued_s = time.monotonic() - job.submitted
        job.generation = gen
        job.started = time.monotonic()
        if job.cancelled:
            gen.cancel()
        job.post("start", gen)
        return True

    def _forward(self, job: Job, engine: Any) -> None:
        """Hand ``job`` the events its generation has ready; finish it when it has ended."""
        gen = job.generation
        assert gen is not None
        try:
            events = engine.batcher.take(gen)
        except WorkbenchError as e:
            job.post("error", e)
            self._finish(job, completed=False)
            return
        for event in events:
            job.post("token", event)
        if not gen.cancelled and (
            job.cancelled or (job.deadline is not None and time.monotonic() >= job.deadline)
        ):
            if not job.cancelled:
                job.cancel("timeout")
            gen.cancel()
        if not events and gen.result is not None:
            job.post("done", gen.result)
            self._finish(job, completed=gen.result.finish_reason != "cancelled")

    def _finish(self, job: Job, *, completed: bool) -> None:
        with self._cond:
            if job in self._batch:
                self._batch.remove(job)
            if completed and job.started is not None:
                took = time.monotonic() - job.started
                m, a = self._mean_job_s, DURATION_SMOOTHING
                self._mean_job_s = took if m is None else (1 - a) * m + a * took
            self._publish()
            self._cond.notify_all()

    def _load(self) -> bool:
        t0 = time.perf_counter()
        try:
            engine = self._factory()
            if self.warmup:  # compile, allocate and page in the weights before the first user
                engine.warm_up()
        except WorkbenchError as e:
            log.error("model load failed: %s", e.message, extra={"code": e.code})
            self.load_error = e
            return False
        except Exception as e:
            log.exception("model load failed")
            self.load_error = InternalError(
                "internal.load_failed", f"loading the model failed: {e}"
            )
            return False
        with self._cond:
            self.engine = engine
            self._publish()
        self._ready.set()
        log.info(
            "model ready",
            extra={"model": engine.model.name, "load_s": round(time.perf_counter() - t0, 3)},
        )
        return True

    def _run(self, job: Job) -> bool:
        """Run ``job``; True when its generation ran to its end (not cancelled, no error)."""
        if job.cancelled:
            return False
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job.cancel("timeout")  # waited in the queue past its deadline; _dequeue is a no-op now
            job.post("error", _cancelled_error(job))
            return False
        try:
            gen = job.start(self.engine)
            gen.deadline = job.deadline  # checked between prefill chunks
            gen.queued_s = time.monotonic() - job.submitted
            job.generation = gen
            if job.cancelled:  # cancelled while the generation was being set up
                gen.cancel()
            job.post("start", gen)
            for event in gen:
                job.post("token", event)
                if not gen.cancelled and (
                    job.cancelled or (job.deadline is not None and time.monotonic() >= job.deadline)
                ):
                    if not job.cancelled:
                        job.cancel("timeout")
                    gen.cancel()
            job.post("done", gen.result)
            return gen.result is not None and gen.result.finish_reason != "cancelled"
        except WorkbenchError as e:
            job.post("error", e)
        except Exception as e:  # a bug: log it here, tell the client nothing of it
            log.exception("generation failed")
            job.post("error", InternalError("internal.generation_failed", f"{type(e).__name__}"))
        return False


class _Submitter:
    """The engine as a job's start function sees it, with generations going into the batch."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, prompt: Any, config: Any = None, *, request_id: str | None = None) -> Any:
        return self.engine.submit(prompt, config, request_id=request_id)

    def chat(self, messages: Any, config: Any = None, *, request_id: str | None = None) -> Any:
        return self.engine.submit_chat(messages, config, request_id=request_id)


def shutdown_error(*, started: bool = False) -> RecoverableError:
    """The answer to a request the server stopped because it is shutting down."""
    when = "before the request finished" if started else "before the request ran"
    return RecoverableError(
        "server.draining",
        f"the server shut down {when}; retry on another instance",
        retry_after_s=RETRY_AFTER_S,
    )


def timeout_error(request_timeout_s: float | None = None) -> RecoverableError:
    return RecoverableError(
        "server.timeout",
        "the request took longer than the server's request timeout"
        + (f" ({request_timeout_s:g} s)" if request_timeout_s else ""),
        retry_after_s=RETRY_AFTER_S,
    )


def _cancelled_error(job: Job) -> RecoverableError:
    if job.cancel_reason == "timeout":
        return timeout_error()
    return RecoverableError("server.cancelled", f"the request was cancelled ({job.cancel_reason})")
