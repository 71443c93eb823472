"""Running the app under uvicorn: read timeouts, the connection cap, logs, and the SIGTERM drain.

uvicorn's own settings do what they can: ``timeout_keep_alive`` closes idle kept-alive
connections, ``limit_concurrency`` is the connection cap and ``h11_max_incomplete_event_size``
bounds a request head. `EdgeProtocol` (uvicorn's h11 protocol, subclassed) adds what uvicorn
lacks: a deadline for the request head (a client dripping header bytes is cut off with a 408),
and answers past the connection cap and for unparsable requests as problem+json with a request id
that is logged, where uvicorn would send ``text/plain``. The body deadline is ASGI middleware
(`workbench.server.edge`).

The drain (`DrainingServer`): the first SIGTERM or SIGINT makes /v1 refuse new requests with 503
``server.draining`` while the listener stays open (so new connections get that 503, not a TCP
refusal), and lets queued and running requests finish for up to ``drain_grace_s``. When they
have finished or the grace is over, the worker stops first (what is still queued gets 503
``server.draining``, a running stream ends with an SSE error event, a running plain request with
a 503), the answers go out, and only then does uvicorn close the listener and the connections. A
second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from workbench.server.problems import ServerSettings, new_request_id, raw_problem

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's default, stated)
FLUSH_S = 5.0  # after the drain, how long answers in flight get to reach their clients
FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "py.warnings")


class EdgeProtocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and problem+json refusals."""

    header_timeout_s = 10.0  # set per server by `uvicorn_config`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The cap is enforced below (to answer in problem+json), not by uvicorn's plain 503.
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            # EdgeMiddleware answers this connection's request 503 server.overloaded.
            self.app_state = {**self.app_state, "overloaded": True}
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._start_head_timer()
        super().data_received(data)
        if not self._between_requests():
            self._stop_head_timer()  # the head arrived; the body deadline is the app's

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._between_requests():
            return
        rid = new_request_id()
        log.info(
            "request head not received within %g s: closing the connection",
            self.header_timeout_s,
            extra={"request_id": rid},
        )
        detail = f"the request head did not arrive within {self.header_timeout_s:g} s"
        self.transport.write(raw_problem(408, "server.header_timeout", detail, rid))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        rid = new_request_id()
        log.info("unparsable HTTP request: %s", msg, extra={"request_id": rid})
        detail = "the request is not valid HTTP/1.1 (or its head is larger than 16 KiB)"
        self.transport.write(raw_problem(400, "server.bad_http", detail, rid))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described in the module docstring."""

    def __init__(self, config: uvicorn.Config, state: Any, grace_s: float) -> None:
        super().__init__(config)
        self.state = state  # workbench.server.app.ServerState
        self.grace_s = grace_s
        self.drain_requested = False
        self._drain_since: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.drain_requested and not self.should_exit:
            self._captured_signals.append(sig)
            self.drain_requested = True  # acted on by on_tick, outside the signal handler
            return
        super().handle_exit(sig, frame)

    def request_drain(self) -> None:
        """What the first SIGTERM does (for embedding and tests)."""
        self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if should_exit or not self.drain_requested:
            return should_exit
        worker = self.state.worker
        if self._drain_since is None:
            self._drain_since = time.monotonic()
            worker.drain()
            log.info("draining: new requests get 503", extra={"grace_s": self.grace_s})
        over = time.monotonic() - self._drain_since >= self.grace_s
        if not worker.idle() and not over:
            return False
        if not worker.idle():
            log.warning(
                "drain grace over: cancelling what is left",
                extra={"running": worker.running, "queued": worker.queued},
            )
        await asyncio.to_thread(worker.stop)  # queued get 503, the running one ends with an error
        deadline = time.monotonic() + FLUSH_S
        while self._answers_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return True

    def _answers_in_flight(self) -> bool:
        return any(
            c.cycle is not None and not c.cycle.response_complete
            for c in self.server_state.connections
            if isinstance(c, H11Protocol)
        )


def uvicorn_config(app: Any, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration for ``settings`` (``overrides``: host, port, ... for tests)."""
    protocol = type(
        "ConfiguredEdgeProtocol", (EdgeProtocol,), {"header_timeout_s": settings.header_timeout_s}
    )
    kwargs: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # EdgeMiddleware logs one line per request, with its id
        http=protocol,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=FLUSH_S,
        lifespan="on",
    )
    kwargs.update(overrides)
    return uvicorn.Config(app, **kwargs)


class _NoColour(logging.Filter):
    """Drops uvicorn's ``color_message`` extra (the message again, with terminal escapes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def capture_foreign_logs() -> None:
    """Send uvicorn's records and Python warnings through the ``workbench`` logger's handlers,
    so they share its format (one JSON object a line with WORKBENCH_LOG_FORMAT=json)."""
    ours = logging.getLogger("workbench")
    logging.captureWarnings(True)
    for name in FOREIGN_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        for h in ours.handlers:
            lg.addHandler(h)
        if not any(isinstance(f, _NoColour) for f in lg.filters):
            lg.addFilter(_NoColour())
        lg.setLevel(ours.level)
        lg.propagate = False


def serve(app: Any, settings: ServerSettings) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM, draining as the module docstring says;
    then return normally (exit status 0)."""
    capture_foreign_logs()
    server = DrainingServer(uvicorn_config(app, settings), app.state.server, settings.drain_grace_s)
    # uvicorn re-raises the signal it caught once it has shut down; with SIGTERM's default
    # action that would kill the process with status 143 after a clean drain. A no-op handler
    # makes the re-raise harmless, so a drained shutdown exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
