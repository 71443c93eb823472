"""The FastAPI application: OpenAI-compatible endpoints, health/ready/metrics, problem+json errors.

`create_app(engine_or_factory, settings)` builds the app. The engine is loaded and warmed up on
the worker thread (`workbench.server.worker`), so the app answers /health at once and /ready turns
200 when the model can serve. Every engine call happens on that one thread.

One pure-ASGI middleware (`EdgeMiddleware`) is the edge of every request: it assigns the request
id (a sane client ``X-Request-ID`` is kept) and echoes it on every response, enforces the body
limit (413), the API key (401) and draining (503), logs one line per request (no text), writes the
audit row for /v1 requests, and turns anything that escaped the handlers into a 500 problem.

Errors map by category: user -> 400 (404 unknown model, 413 body too large, 401 no key), model ->
422, recoverable/backend -> 503 with Retry-After, internal -> 500 with no internals in the body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workbench.errors import InternalError, RecoverableError, UserError, WorkbenchError
from workbench.server import schemas
from workbench.server.audit import AuditLog, AuditRecord
from workbench.server.worker import RETRY_AFTER_S, Job, Worker, timeout_error

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
OPEN_PATHS = ("/health", "/ready")  # never behind the API key
AUDITED_PREFIX = "/v1/"
PRUNE_INTERVAL_S = 3600.0

# Status per error code where the category's default does not fit.
STATUS_BY_CODE = {
    "user.unknown_model": 404,
    "server.not_found": 404,
    "server.method_not_allowed": 405,
    "server.unauthorized": 401,
    "server.body_too_large": 413,
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
    413: "Content Too Large",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server reads; the CLI builds it once from flags and the environment."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 8  # requests waiting beyond the one running
    request_timeout_s: float = 300.0  # submit to last token, queue wait included
    max_body_bytes: int = 1 << 20
    drain_grace_s: float = 30.0  # how long SIGTERM lets in-flight requests finish
    audit_db: Path | None = None  # None: no audit log
    audit_retention_days: float = 30.0
    warmup: bool = True
    model_aliases: tuple[str, ...] = field(default_factory=tuple)  # names accepted for the model

    def __post_init__(self) -> None:
        checks = (
            (self.max_queue >= 0, f"max queue must be >= 0, got {self.max_queue}"),
            (self.request_timeout_s > 0, "request timeout must be > 0 seconds"),
            (self.max_body_bytes > 0, "max body size must be > 0 bytes"),
            (self.drain_grace_s >= 0, "drain grace must be >= 0 seconds"),
            (0 < self.port < 65536, f"port must be in 1..65535, got {self.port}"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError("user.bad_server_setting", message)
        if self.api_key is not None and not self.api_key:
            raise UserError("user.bad_server_setting", "the API key must not be empty")


# -- problems -------------------------------------------------------------------------------


def status_of(error: WorkbenchError) -> int:
    return STATUS_BY_CODE.get(error.code, STATUS_BY_CATEGORY[error.category])


def problem_response(
    status: int,
    detail: str,
    *,
    request_id: str,
    instance: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = schemas.Problem(
        type=f"urn:workbench:error:{code}" if code else "about:blank",
        title=TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=instance,
        request_id=request_id,
        code=code,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_TYPE,
        headers={REQUEST_ID_HEADER: request_id, **(headers or {})},
    )


def error_response(error: WorkbenchError, *, request_id: str, instance: str) -> JSONResponse:
    status = status_of(error)
    headers = {}
    if status == 503:
        wait = error.context.get("retry_after_s", RETRY_AFTER_S)
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


def _request_id(scope: Scope) -> str:
    return scope.get("state", {}).get("request_id") or new_request_id()


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def _audit(scope: Scope) -> dict[str, Any]:
    return scope.setdefault("state", {}).setdefault("audit", {})


# -- the edge middleware ----------------------------------------------------------------------


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, settings: ServerSettings, server: ServerState) -> None:
        self.app = app
        self.settings = settings
        self.server = server
        key = settings.api_key
        self._key = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, ts = time.perf_counter(), time.time()
        headers = dict(scope.get("headers") or [])
        sent = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = sent if _SANE_ID.match(sent) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
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
            refusal = self._refuse(path, headers)
            if refusal is None:
                receive, refusal = await self._buffer_body(headers, receive)
            if refusal is not None:
                _audit(scope)["error_code"] = refusal.code
                await error_response(refusal, request_id=rid, instance=path)(
                    scope, receive, send_with_id
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid, "path": path})
            _audit(scope)["error_code"] = "internal.unhandled"
            if not status["code"]:
                err = InternalError("internal.unhandled", "unhandled error")
                await error_response(err, request_id=rid, instance=path)(
                    scope, receive, send_with_id
                )
        finally:
            duration = time.perf_counter() - t0
            audit = _audit(scope)
            final_status = audit.pop("status", None) or status["code"] or 500
            log.info(
                "%s %s %d",
                scope["method"],
                path,
                final_status,
                extra={"request_id": rid, "duration_s": round(duration, 4)},
            )
            if self.server.audit is not None and path.startswith(AUDITED_PREFIX):
                self.server.write_audit(
                    AuditRecord(
                        request_id=rid,
                        ts=ts,
                        endpoint=f"{scope['method']} {path}",
                        duration_s=duration,
                        status=final_status,
                        **audit,
                    )
                )

    def _refuse(self, path: str, headers: dict[bytes, bytes]) -> WorkbenchError | None:
        if self._key is not None and path not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
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
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> UserError:
        return UserError(
            "server.body_too_large",
            f"the request body is larger than {self.settings.max_body_bytes} bytes",
        )

    async def _buffer_body(
        self, headers: dict[bytes, bytes], receive: Receive
    ) -> tuple[Receive, WorkbenchError | None]:
        """Read the whole body up to the limit (chunked bodies have no length to check first),
        then replay it; after it, ``receive`` goes to the client (for http.disconnect)."""
        if b"content-length" not in headers and b"transfer-encoding" not in headers:
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
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

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                data, body = body[0], None
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay, None


# -- app state --------------------------------------------------------------------------------


class ServerState:
    def __init__(self, worker: Worker, settings: ServerSettings, audit: AuditLog | None) -> None:
        self.worker = worker
        self.settings = settings
        self.audit = audit
        self.started = time.time()

    def write_audit(self, rec: AuditRecord) -> None:
        assert self.audit is not None
        try:
            self.audit.record(rec)
        except Exception:  # the audit log must not take requests down with it
            log.exception("audit write failed", extra={"request_id": rec.request_id})

    def engine(self) -> Any:
        """The loaded engine, or the error that says why there is none."""
        w = self.worker
        if w.load_error is not None:
            raise w.load_error
        if w.engine is None or not w.loaded:
            raise RecoverableError(
                "server.not_ready",
                "the model is still loading; retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        return w.engine

    def model_names(self, engine: Any) -> list[str]:
        names = [engine.model.name]
        for alias in (*self.settings.model_aliases, Path(engine.model.path).stem):
            if alias and alias not in names:
                names.append(alias)
        return names

    def check_model(self, engine: Any, name: str) -> None:
        names = self.model_names(engine)
        if name not in names:
            raise UserError(
                "user.unknown_model",
                f"model {name!r} is not served here (available: {', '.join(names)})",
            )


# -- the app ----------------------------------------------------------------------------------


def create_app(engine: Any | Callable[[], Any], settings: ServerSettings | None = None) -> FastAPI:
    """``engine``: an Engine, or a function that makes one (called on the worker thread)."""
    settings = settings or ServerSettings()
    worker = Worker(engine, max_queue=settings.max_queue, warmup=settings.warmup)
    audit = (
        AuditLog(settings.audit_db, retention_days=settings.audit_retention_days)
        if settings.audit_db is not None
        else None
    )
    server = ServerState(worker, settings, audit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        pruner = asyncio.create_task(_prune_forever(server)) if audit is not None else None
        try:
            yield
        finally:
            if pruner is not None:
                pruner.cancel()
            await asyncio.to_thread(worker.stop)
            if audit is not None:
                audit.close()

    app = FastAPI(
        title="rocm-workbench",
        summary="OpenAI-compatible API over the workbench engine",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = server
    app.add_middleware(EdgeMiddleware, settings=settings, server=server)
    _add_error_handlers(app)
    _add_routes(app, server)
    return app


async def _prune_forever(server: ServerState) -> None:
    assert server.audit is not None
    while True:
        try:
            removed = await asyncio.to_thread(server.audit.prune)
            if removed:
                log.info("audit log pruned", extra={"rows": removed})
        except Exception:
            log.exception("audit prune failed")
        await asyncio.sleep(PRUNE_INTERVAL_S)


def _add_error_handlers(app: FastAPI) -> None:
    async def on_workbench_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, WorkbenchError)
        _audit(request.scope)["error_code"] = exc.code
        if status_of(exc) >= 500 and not exc.code.startswith("server."):  # not flow control
            log.warning("request failed: %s", exc.code, extra={"category": exc.category})
        return error_response(exc, request_id=_request_id(request.scope), instance=request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # Never echo "input": it may hold the prompt.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        malformed = any(e["type"] == "json_invalid" for e in errors)
        code = "user.malformed_json" if malformed else "user.invalid_request"
        _audit(request.scope)["error_code"] = code
        detail = (
            "the request body is not valid JSON"
            if malformed
            else "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        )
        return problem_response(
            400 if malformed else 422,
            detail,
            request_id=_request_id(request.scope),
            instance=request.url.path,
            code=code,
            errors=errors,
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "server.not_found", 405: "server.method_not_allowed"}.get(
            exc.status_code, "server.http_error"
        )
        _audit(request.scope)["error_code"] = code
        return problem_response(
            exc.status_code,
            str(exc.detail),
            request_id=_request_id(request.scope),
            instance=request.url.path,
            code=code,
            headers=dict(exc.headers or {}),
        )

    app.add_exception_handler(WorkbenchError, on_workbench_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


# -- routes -----------------------------------------------------------------------------------


def _add_routes(app: FastAPI, server: ServerState) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        w = server.worker
        engine_state = None
        if w.loaded and w.engine is not None:
            try:
                engine_state = w.engine.state()
            except Exception:
                log.exception("engine state failed")
        status = (
            "failed"
            if w.load_error
            else "draining"
            if w.draining
            else "ok"
            if w.loaded
            else "loading"
        )
        return {
            "status": status,
            "ready": w.ready,
            "uptime_s": round(time.time() - server.started, 3),
            "requests": {"running": w.running, "queued": w.queued, "max_queue": w.max_queue},
            "engine": engine_state,
            "error": w.load_error.code if w.load_error else None,
        }

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        w = server.worker
        if w.draining:
            raise RecoverableError(
                "server.draining", "the server is shutting down", retry_after_s=RETRY_AFTER_S
            )
        if w.load_error is not None:
            raise RecoverableError(
                "server.load_failed",
                f"the model failed to load ({w.load_error.code}): {w.load_error.message}",
                retry_after_s=60,
            )
        server.engine()  # raises not_ready while loading
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CollectorRegistry, generate_latest

        from workbench.observe.metrics import CONTENT_TYPE

        engine = server.worker.engine if server.worker.loaded else None
        body = engine.metrics.exposition() if engine else generate_latest(CollectorRegistry())
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> schemas.ModelList:
        engine = server.engine()
        created = int(server.started)
        return schemas.ModelList(
            data=[
                schemas.ModelCard(id=name, created=created) for name in server.model_names(engine)
            ]
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        messages = body.conversation()
        return await _complete(
            server,
            request,
            body,
            lambda engine, config, rid: engine.chat(messages, config, request_id=rid),
            chat=True,
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        return await _complete(
            server,
            request,
            body,
            lambda engine, config, rid: engine.generate(prompt, config, request_id=rid),
            chat=False,
        )


def _config(engine: Any, body: schemas.ChatCompletionRequest | schemas.CompletionRequest) -> Any:
    from workbench.engine.generate import GenerationConfig

    ctx = engine.spec.context_length
    limit = body.token_limit()
    if limit is not None and limit >= ctx:
        raise UserError(
            "user.max_tokens_too_large",
            f"max_tokens is {limit}; the model's context holds {ctx} tokens, prompt included",
            max_tokens=limit,
            context=ctx,
        )
    return GenerationConfig(
        max_tokens=limit if limit is not None else ctx,  # the engine stops at the context's end
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
    )


async def _complete(
    server: ServerState,
    request: Request,
    body: schemas.ChatCompletionRequest | schemas.CompletionRequest,
    start: Callable[[Any, Any, str], Any],
    *,
    chat: bool,
) -> Response:
    rid = _request_id(request.scope)
    audit = _audit(request.scope)
    engine = server.engine()
    audit.update(model=engine.model.name, backend=engine.state()["backend"])
    server.check_model(engine, body.model)
    config = _config(engine, body)
    settings = server.settings
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + settings.request_timeout_s
    job = Job(lambda eng: start(eng, config, rid), loop=loop, request_id=rid, deadline=deadline)
    server.worker.submit(job)
    call = _Call(job, deadline, settings.request_timeout_s, audit)
    created = int(time.time())
    model = body.model

    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        kind, value = await call.next()  # "start" or an error before any token
        if body.stream:
            watcher.cancel()  # the streaming response watches for the disconnect itself
            stream = _sse_chat if chat else _sse_completion
            return StreamingResponse(
                stream(call, rid, model, created, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text = []
        while kind != "done":
            kind, value = await call.next()
            if kind == "token":
                text.append(value.text)
        result = value
        if job.cancel_reason == "timeout":
            raise timeout_error(settings.request_timeout_s)
        if job.cancel_reason == "disconnect":
            audit["status"] = 499  # nginx's "client closed request": nobody got an answer
        usage = schemas.Usage.of(len(result.prompt_token_ids), len(result.token_ids))
        if chat:
            payload: Any = schemas.ChatCompletion(
                id=f"chatcmpl-{rid}",
                created=created,
                model=model,
                choices=[
                    schemas.ChatChoice(
                        message=schemas.AssistantMessage(content=result.text),
                        finish_reason=result.finish_reason,
                    )
                ],
                usage=usage,
            )
        else:
            payload = schemas.Completion(
                id=f"cmpl-{rid}",
                created=created,
                model=model,
                choices=[
                    schemas.CompletionChoice(text=result.text, finish_reason=result.finish_reason)
                ],
                usage=usage,
            )
        return JSONResponse(payload.model_dump(exclude_none=True))
    except asyncio.CancelledError:
        job.cancel("disconnect")
        raise
    finally:
        watcher.cancel()
        if not body.stream:
            job.cancel("finished")  # no-op when it ended; frees a queued or running job otherwise


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (the body has been read; the next message on
    the connection is http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel("disconnect")
            return


class _Call:
    """Reads a job's messages with the request deadline and keeps the audit counts."""

    def __init__(self, job: Job, deadline: float, timeout_s: float, audit: dict[str, Any]) -> None:
        self.job = job
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.audit = audit
        self.tokens = 0

    async def next(self) -> tuple[str, Any]:
        try:
            kind, value = await asyncio.wait_for(
                self.job.messages.get(), max(0.0, self.deadline - time.monotonic())
            )
        except asyncio.TimeoutError:
            self.job.cancel("timeout")
            self.audit["finish_reason"] = "timeout"
            raise timeout_error(self.timeout_s) from None
        if kind == "start":
            self.audit["prompt_tokens"] = len(value.prompt_token_ids)
        elif kind == "token" and value.id >= 0:
            self.tokens += 1
            self.audit["completion_tokens"] = self.tokens
        elif kind == "done":
            self.audit["completion_tokens"] = len(value.token_ids)
            self.audit["finish_reason"] = (
                "timeout" if self.job.cancel_reason == "timeout" else value.finish_reason
            )
        elif kind == "error":
            raise value
        return kind, value


def _sse(obj: Any) -> str:
    data = (
        obj.model_dump_json(exclude_none=True)
        if hasattr(obj, "model_dump_json")
        else json.dumps(obj)
    )
    return f"data: {data}\n\n"


async def _sse_events(call: _Call) -> AsyncIterator[tuple[str, Any]]:
    """A job's token and done messages for a stream; an error ends the stream with an error
    event (the status line went out with the first byte)."""
    finished = False
    try:
        while True:
            try:
                kind, value = await call.next()
            except WorkbenchError as e:
                call.audit["error_code"] = e.code
                yield "error", e
                finished = True
                return
            yield kind, value
            if kind == "done":
                finished = True
                return
    finally:
        if not finished:  # the client went away mid-stream
            call.job.cancel("disconnect")
            call.audit["status"] = 499
            call.audit.setdefault("finish_reason", "cancelled")


def _sse_error(e: WorkbenchError, rid: str) -> str:
    status = status_of(e)
    message = "internal error" if status == 500 else e.message
    return _sse(
        {"error": {"message": message, "type": e.category, "code": e.code, "request_id": rid}}
    )


async def _sse_chat(
    call: _Call, rid: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: schemas.ChatDelta, finish: str | None = None) -> schemas.ChatCompletionChunk:
        return schemas.ChatCompletionChunk(
            id=f"chatcmpl-{rid}",
            created=created,
            model=model,
            choices=[schemas.ChatChunkChoice(delta=delta, finish_reason=finish)],
        )

    yield _sse(chunk(schemas.ChatDelta(role="assistant", content="")))
    async for kind, value in _sse_events(call):
        if kind == "token" and value.text:
            yield _sse(chunk(schemas.ChatDelta(content=value.text)))
        elif kind == "done":
            yield _sse(chunk(schemas.ChatDelta(), value.finish_reason))
            if include_usage:
                usage = schemas.Usage.of(len(value.prompt_token_ids), len(value.token_ids))
                yield _sse(
                    schemas.ChatCompletionChunk(
                        id=f"chatcmpl-{rid}", created=created, model=model, choices=[], usage=usage
                    )
                )
            yield "data: [DONE]\n\n"
        elif kind == "error":
            yield _sse_error(value, rid)


async def _sse_completion(
    call: _Call, rid: str, model: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> schemas.Completion:
        return schemas.Completion(
            id=f"cmpl-{rid}",
            created=created,
            model=model,
            choices=[schemas.CompletionChoice(text=text, finish_reason=finish)],
        )

    async for kind, value in _sse_events(call):
        if kind == "token" and value.text:
            yield _sse(chunk(value.text))
        elif kind == "done":
            yield _sse(chunk("", value.finish_reason))
            if include_usage:
                usage = schemas.Usage.of(len(value.prompt_token_ids), len(value.token_ids))
                yield _sse(
                    schemas.Completion(
                        id=f"cmpl-{rid}", created=created, model=model, choices=[], usage=usage
                    )
                )
            yield "data: [DONE]\n\n"
        elif kind == "error":
            yield _sse_error(value, rid)


# -- running it -------------------------------------------------------------------------------


def serve(app: FastAPI, settings: ServerSettings) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM. SIGTERM drains: new /v1 requests get 503,
    in-flight ones finish for up to ``settings.drain_grace_s``, then the process returns
    normally (exit status 0)."""
    import signal

    import uvicorn

    server_state: ServerState = app.state.server

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server_state.worker.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.drain_grace_s,
        lifespan="on",
    )
    # uvicorn re-raises the signal it caught once it has shut down; with SIGTERM's default
    # action that would kill the process with status 143 after a clean drain. A no-op handler
    # makes the re-raise harmless, so a drained shutdown exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        DrainingServer(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
