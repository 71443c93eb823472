"""The edge of every request: one pure-ASGI middleware in front of the FastAPI app.

`EdgeMiddleware` assigns the request id (a sane client ``X-Request-ID`` is kept), echoes it on
every response and sets it as the logging context, so every log record about the request carries
it, whichever module writes it. Before the app runs it refuses, as problem+json:

- a Host header that is not allowed (421; a key-less server answers loopback names only, which
  stops DNS rebinding from a web page),
- a connection past the connection cap (503 ``server.overloaded``, marked by the protocol),
- a missing or wrong API key (401; the ``Bearer`` scheme is matched case-insensitively),
- a /v1 request while draining (503),
- a body over the limit (413) or one that does not arrive within the body timeout (408); the
  body is buffered here, so a slow or oversized body is dropped as soon as it is refused.

Each request is a server span (OpenTelemetry, when tracing is on), a child of the client's W3C
``traceparent`` when it sent one; everything the request does is traced inside it. With tracing
off, a client's ``traceparent`` still sets the trace id that log records and problems carry.

After the app it logs one line per request (the route template, or the escaped path when no route
matched: a client cannot forge log lines through the path) and writes the audit row.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workbench.errors import InternalError, RecoverableError, UserError, WorkbenchError
from workbench.observe import tracing
from workbench.observe.profiler import Profiler
from workbench.server.audit import AuditRecord, escape
from workbench.server.problems import (
    REQUEST_ID_HEADER,
    ServerSettings,
    error_response,
    sane_request_id,
)
from workbench.server.worker import RETRY_AFTER_S

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready")  # never behind the API key nor the Host check
AUDITED_PREFIX = "/v1/"
UNKNOWN_ROUTE = "*"  # the endpoint logged and audited for a path no route matches
MAX_METHOD = 16
MAX_LOGGED_PATH = 200  # characters of an unmatched path that reach the log


def request_id_of(scope: Scope) -> str:
    return scope["state"]["request_id"]


def audit_fields(scope: Scope) -> dict[str, Any]:
    return scope.setdefault("state", {}).setdefault("audit", {})


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, settings: ServerSettings, server: Any) -> None:
        self.app = app
        self.settings = settings
        self.server = server  # workbench.server.app.ServerState
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, ts = time.perf_counter(), time.time()
        headers = dict(scope.get("headers") or [])
        sent = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = sane_request_id(sent)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        span, ctx = _server_span(scope, headers)
        state["span"] = span
        with Profiler.request(rid), tracing.attached(ctx):
            await self._handle(scope, receive, send, headers, rid, t0, ts)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        rid: str,
        t0: float,
        ts: float,
    ) -> None:
        path: str = scope["path"]
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                hdrs = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                hdrs.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": hdrs}
            await send(message)

        try:
            refusal = self._refuse(scope, path, headers)
            if refusal is None:
                receive, refusal = await self._buffer_body(headers, receive)
            if refusal is not None:
                audit_fields(scope)["error_code"] = refusal.code
                close = refusal.code in ("server.overloaded", "server.body_timeout")
                await error_response(
                    refusal,
                    request_id=rid,
                    instance=path,
                    headers={"Connection": "close"} if close else None,
                )(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid})
            audit_fields(scope)["error_code"] = "internal.unhandled"
            if not status["code"]:
                err = InternalError("internal.unhandled", "unhandled error")
                await error_response(err, request_id=rid, instance=path)(
                    scope, receive, send_with_id
                )
        finally:
            self._finish(scope, rid, t0, ts, status["code"])

    def _finish(self, scope: Scope, rid: str, t0: float, ts: float, sent: int) -> None:
        duration = time.perf_counter() - t0
        audit = audit_fields(scope)
        final_status = audit.pop("status", None) or sent or 500
        method = escape(scope["method"], MAX_METHOD)
        endpoint = self.endpoint(scope)
        log.log(
            logging.ERROR if final_status == 500 else logging.INFO,
            "%s %s %d",
            method,
            endpoint if endpoint != UNKNOWN_ROUTE else escape(scope["path"], MAX_LOGGED_PATH),
            final_status,
            extra={"request_id": rid, "duration_s": round(duration, 4)},
        )
        code = audit.get("error_code")
        _end_server_span(scope, endpoint, final_status, code)
        api = scope["path"].startswith(AUDITED_PREFIX)
        if api and final_status == 503 and code:
            self.server.count_rejection(code)
        if self.server.audit is not None and api:
            self.server.write_audit(
                AuditRecord(
                    request_id=rid,
                    ts=ts,
                    endpoint=f"{method} {endpoint}",
                    duration_s=duration,
                    status=final_status,
                    **audit,
                )
            )

    def endpoint(self, scope: Scope) -> str:
        """The route template that served the request, its path when it is a known route that
        the edge refused before routing, or `UNKNOWN_ROUTE`."""
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        return scope["path"] if scope["path"] in self.server.known_paths else UNKNOWN_ROUTE

    def _refuse(
        self, scope: Scope, path: str, headers: dict[bytes, bytes]
    ) -> WorkbenchError | None:
        s = self.settings
        if path not in OPEN_PATHS:
            host = headers.get(b"host", b"").decode("latin-1").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not s.host_allowed(name):
                return UserError(
                    "server.untrusted_host",
                    "this server does not answer to that Host name "
                    "(see --allowed-host in docs/deployment.md)",
                )
        if scope["state"].get("overloaded"):
            return RecoverableError(
                "server.overloaded",
                f"the server has too many connections open ({s.max_connections}); retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        if self._key is not None and path not in OPEN_PATHS and not self._authorized(headers):
            return UserError(
                "server.unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
            )
        if path.startswith(AUDITED_PREFIX) and self.server.worker.draining:
            return RecoverableError(
                "server.draining",
                "the server is shutting down; retry on another instance",
                retry_after_s=RETRY_AFTER_S,
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
            return self._too_large()
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self._key is not None
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        # Compare the token even when the scheme is wrong: the time taken says nothing.
        ok = hmac.compare_digest(token.strip(), self._key)
        return ok and scheme.lower() == b"bearer"

    def _too_large(self) -> UserError:
        return UserError(
            "server.body_too_large",
            f"the request body is larger than {self.settings.max_body_bytes} bytes",
        )

    async def _buffer_body(
        self, headers: dict[bytes, bytes], receive: Receive
    ) -> tuple[Receive, WorkbenchError | None]:
        """Read the whole body, up to the size limit and within the body timeout (chunked
        bodies have no length to check first), then replay it; after it, ``receive`` goes to
        the client (for http.disconnect)."""
        if b"content-length" not in headers and b"transfer-encoding" not in headers:
            return receive, None
        timeout_s = self.settings.body_timeout_s
        deadline = time.monotonic() + timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return receive, RecoverableError(
                    "server.body_timeout",
                    f"the request body did not arrive within {timeout_s:g} s",
                )
            if message["type"] != "http.request":
                return receive, None  # the client left before sending the body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return receive, self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: list[bytes] | None = [b"".join(chunks)]
        chunks.clear()

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                data, body = body[0], None
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay, None


def _server_span(scope: Scope, headers: dict[bytes, bytes]) -> tuple[Any, Any]:
    """(the request's server span, the context to run it in); (None, None) when there is
    nothing to trace: tracing off and no ``traceparent`` from the client."""
    carrier = {
        k: headers[k.encode()].decode("latin-1")
        for k in ("traceparent", "tracestate")
        if k.encode() in headers
    }
    if not tracing.enabled():
        return None, (tracing.extract(carrier) if carrier else None)
    parent = tracing.extract(carrier)
    method = escape(scope["method"], MAX_METHOD)
    span = tracing.start_span(
        method,  # renamed "METHOD /route" once routing has found the route
        parent=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": escape(scope["path"], MAX_LOGGED_PATH),
        },
    )
    return span, tracing.with_span(span, parent)


def _end_server_span(scope: Scope, endpoint: str, status: int, code: str | None) -> None:
    span = scope["state"].get("span")
    if span is None:
        return
    if endpoint != UNKNOWN_ROUTE:
        span.update_name(f"{span.name} {endpoint}")
        span.set_attribute("http.route", endpoint)
    span.set_attribute("http.response.status_code", status)
    if code is not None:
        span.set_attribute("workbench.error_code", code)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, code or str(status)))
    span.end()
