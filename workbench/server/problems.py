"""The server's settings, and every answer it gives that is not a success: RFC 7807 problems.

A problem body holds the RFC 7807 fields (``type``, ``title``, ``status``, ``detail``,
``instance``), the request id, the trace id (when the request is traced) and the workbench error
code, and beside them OpenAI's ``error``
object (``message``, ``type``, ``param``, ``code``), which the official OpenAI clients read: so
``openai.BadRequestError`` says what was wrong, not only "Error code: 400".

Errors map by category: user -> 400 (404 unknown model, 413 body too large, 401 no key), model ->
422, recoverable/backend -> 503 with Retry-After, internal -> 500 with no internals in the body.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from workbench.errors import UserError, WorkbenchError
from workbench.observe.tracing import current_trace_id
from workbench.server import schemas
from workbench.server.audit import DEFAULT_MAX_BYTES
from workbench.server.worker import RETRY_AFTER_S

PROBLEM_TYPE = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

# Status per error code where the category's default does not fit.
STATUS_BY_CODE = {
    "user.unknown_model": 404,
    "server.not_found": 404,
    "server.method_not_allowed": 405,
    "server.unauthorized": 401,
    "server.body_too_large": 413,
    "server.body_timeout": 408,
    "server.header_timeout": 408,
    "server.untrusted_host": 421,
    "user.prompt_too_long": 400,
}
STATUS_BY_CATEGORY = {
    "user": 400,
    "model": 422,
    "recoverable": 503,
    "backend": 503,
    "internal": 500,
}
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# OpenAI's error ``type`` per status (what its clients and SDK users match on).
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    421: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server reads; the CLI builds it once from flags and the environment."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 8  # requests waiting beyond the running ones
    # Requests generated together (continuous batching, NumPy backend). One at a time unless
    # asked: `workbench serve --max-batch` asks for MAX_BATCH by default.
    max_batch: int = 1
    request_timeout_s: float = 300.0  # submit to last token, queue wait included
    max_body_bytes: int = 1 << 20
    drain_grace_s: float = 30.0  # how long SIGTERM lets in-flight requests finish
    audit_db: Path | None = None  # None: no audit log
    audit_retention_days: float = 30.0
    audit_max_bytes: int = DEFAULT_MAX_BYTES
    warmup: bool = True
    model_aliases: tuple[str, ...] = field(default_factory=tuple)  # names accepted for the model
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # a request's whole body must arrive within this
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 64  # open connections; past it a request gets 503 server.overloaded
    # Host header values accepted (None: loopback names only when there is no API key, any
    # host with one; "*" accepts any). Guards a key-less loopback server from DNS rebinding.
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        checks = (
            (self.max_queue >= 0, f"max queue must be >= 0, got {self.max_queue}"),
            (self.max_batch >= 1, f"max batch must be >= 1, got {self.max_batch}"),
            (self.request_timeout_s > 0, "request timeout must be > 0 seconds"),
            (self.max_body_bytes > 0, "max body size must be > 0 bytes"),
            (self.drain_grace_s >= 0, "drain grace must be >= 0 seconds"),
            (0 < self.port < 65536, f"port must be in 1..65535, got {self.port}"),
            (self.header_timeout_s > 0, "header timeout must be > 0 seconds"),
            (self.body_timeout_s > 0, "body timeout must be > 0 seconds"),
            (self.keep_alive_s > 0, "keep-alive timeout must be > 0 seconds"),
            (self.max_connections >= 1, f"max connections must be >= 1: {self.max_connections}"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError("user.bad_server_setting", message)
        if self.api_key is not None and not self.api_key:
            raise UserError("user.bad_server_setting", "the API key must not be empty")

    def host_allowed(self, host: str) -> bool:
        """Whether a request's Host header (port stripped, lower case) may be served."""
        allowed = self.allowed_hosts
        if allowed is None:
            if self.api_key is not None:
                return True
            allowed = LOOPBACK_HOSTS
        return "*" in allowed or host in allowed


def status_of(error: WorkbenchError) -> int:
    return STATUS_BY_CODE.get(error.code, STATUS_BY_CATEGORY[error.category])


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def sane_request_id(sent: str) -> str:
    """The client's X-Request-ID when it is short and plain, otherwise a new id."""
    return sent if _SANE_ID.match(sent) else new_request_id()


def problem_body(
    status: int,
    detail: str,
    *,
    request_id: str,
    instance: str,
    code: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    body = schemas.Problem(
        type=f"urn:workbench:error:{code}" if code else "about:blank",
        title=TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=instance,
        request_id=request_id,
        trace_id=current_trace_id(),
        code=code,
        errors=errors,
        error=schemas.OpenAIError(
            message=detail,
            type=OPENAI_TYPES.get(status, "server_error"),
            param=param,
            code=code,
        ),
    )
    return body.model_dump(exclude_none=True)


def problem_response(
    status: int,
    detail: str,
    *,
    request_id: str,
    instance: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
    param: str | None = None,
) -> JSONResponse:
    body = problem_body(
        status,
        detail,
        request_id=request_id,
        instance=instance,
        code=code,
        errors=errors,
        param=param,
    )
    return JSONResponse(
        body,
        status_code=status,
        media_type=PROBLEM_TYPE,
        headers={REQUEST_ID_HEADER: request_id, **(headers or {})},
    )


def error_response(
    error: WorkbenchError,
    *,
    request_id: str,
    instance: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    status = status_of(error)
    headers = dict(headers or {})
    if status == 503:
        wait = error.context.get("retry_after_s") or RETRY_AFTER_S
        headers["Retry-After"] = str(max(1, math.ceil(float(wait))))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    # Internal errors say nothing of their internals; the request id finds them in the logs.
    detail = (
        f"internal error; quote request id {request_id} when reporting it"
        if status == 500
        else error.message
    )
    return problem_response(
        status, detail, request_id=request_id, instance=instance, code=error.code, headers=headers
    )


def raw_problem(status: int, code: str, detail: str, request_id: str) -> bytes:
    """A whole HTTP/1.1 response with a problem body and ``Connection: close``, for answers given
    below the ASGI app (a connection that never sent its headers)."""
    body = json.dumps(
        problem_body(status, detail, request_id=request_id, instance="*", code=code)
    ).encode()
    head = (
        f"HTTP/1.1 {status} {TITLES.get(status, 'Error')}\r\n"
        f"content-type: {PROBLEM_TYPE}\r\ncontent-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body
