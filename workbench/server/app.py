"""The FastAPI application: OpenAI-compatible endpoints, health/ready/metrics, problem+json errors.

`create_app(engine_or_factory, settings)` builds the app. The engine is loaded and warmed up on
the worker thread (`workbench.server.worker`), so the app answers /health at once and /ready turns
200 when the model can serve. Every engine call happens on that one thread.

`workbench.server.edge.EdgeMiddleware` is the edge of every request (request id, refusals, the
log line and the audit row); `workbench.server.problems` shapes every error answer;
`workbench.server.serving` runs the app under uvicorn (timeouts, connection cap, drain).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.errors import RecoverableError, UserError, WorkbenchError
from workbench.observe import tracing
from workbench.server import schemas
from workbench.server.audit import AuditLog, AuditRecord
from workbench.server.edge import EdgeMiddleware, audit_fields, request_id_of
from workbench.server.problems import (
    ServerSettings,
    error_response,
    problem_response,
    status_of,
)
from workbench.server.worker import RETRY_AFTER_S, Job, Worker, shutdown_error, timeout_error

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0

# -- app state --------------------------------------------------------------------------------


class ServerState:
    def __init__(self, worker: Worker, settings: ServerSettings, audit: AuditLog | None) -> None:
        self.worker = worker
        self.settings = settings
        self.audit = audit
        self.started = time.time()
        self.known_paths: frozenset[str] = frozenset()  # the app's routes, set by create_app

    def count_rejection(self, code: str) -> None:
        """A 503 answered without running (queue full, draining, loading, overloaded...)."""
        w = self.worker
        if w.loaded and w.engine is not None:
            w.engine.metrics.request_rejected(code)

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
    worker = Worker(
        engine,
        max_queue=settings.max_queue,
        warmup=settings.warmup,
        max_batch=settings.max_batch,
    )
    audit = (
        AuditLog(
            settings.audit_db,
            retention_days=settings.audit_retention_days,
            max_bytes=settings.audit_max_bytes,
        )
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
            await asyncio.to_thread(tracing.flush, 5.0)  # the last requests' spans leave now
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
    server.known_paths = frozenset(getattr(r, "path", "") for r in app.routes)
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


MALFORMED_JSON = (
    "the request body is not valid JSON (UTF-8, nested at most as deep as Python's parser allows)"
)


def _param(errors: list[dict[str, Any]]) -> str | None:
    """The request field the validation errors are about ("messages.0.content"): the common
    prefix of their locations without "body" (a union reports one error per member, each with
    the member's type name appended)."""
    locs = [[str(p) for p in e["loc"][1:]] for e in errors]
    prefix: list[str] = []
    for parts in zip(*locs):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix) or None


def _add_error_handlers(app: FastAPI) -> None:
    async def on_workbench_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, WorkbenchError)
        audit_fields(request.scope)["error_code"] = exc.code
        if status_of(exc) >= 500 and not exc.code.startswith("server."):  # not flow control
            log.warning("request failed: %s", exc.code, extra={"category": exc.category})
        return error_response(
            exc, request_id=request_id_of(request.scope), instance=request.url.path
        )

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # Never echo "input": it may hold the prompt.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        malformed = any(e["type"] == "json_invalid" for e in errors)
        code = "user.malformed_json" if malformed else "user.invalid_request"
        audit_fields(request.scope)["error_code"] = code
        detail = (
            MALFORMED_JSON
            if malformed
            else "; ".join(f"{_param([e]) or 'body'}: {e['msg']}" for e in errors)
        )
        return problem_response(
            400,  # OpenAI's status for a bad request body (not FastAPI's 422)
            detail,
            request_id=request_id_of(request.scope),
            instance=request.url.path,
            code=code,
            errors=errors,
            param=None if malformed else _param(errors),
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        # FastAPI answers 400 when the body does not parse past the JSON syntax check: too
        # deeply nested (RecursionError) or not UTF-8. To a client both are malformed JSON.
        code = {
            400: "user.malformed_json",
            404: "server.not_found",
            405: "server.method_not_allowed",
        }.get(exc.status_code, "server.http_error")
        audit_fields(request.scope)["error_code"] = code
        return problem_response(
            exc.status_code,
            MALFORMED_JSON if exc.status_code == 400 else str(exc.detail),
            request_id=request_id_of(request.scope),
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
            "requests": {
                "running": w.running,
                "queued": w.queued,
                "max_queue": w.max_queue,
                "max_batch": w.max_batch,
            },
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
    rid = request_id_of(request.scope)
    audit = audit_fields(request.scope)
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
            reason = self.job.cancel_reason
            # The deadline is checked in three places (here, by the worker, by the generation
            # between prefill chunks); whichever sees it first, the answer is the timeout.
            timed_out = reason == "timeout" or (
                reason is None
                and value.finish_reason == "cancelled"
                and time.monotonic() >= self.deadline
            )
            self.audit["finish_reason"] = "timeout" if timed_out else value.finish_reason
            if reason == "shutdown":  # the drain grace ran out: the answer is cut, say so
                raise shutdown_error(started=True)
            if timed_out:
                raise timeout_error(self.timeout_s)
        elif kind == "error":
            if self.job.cancel_reason == "disconnect":
                self.audit["status"] = 499  # the client left while queued: nobody got an answer
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
    error = {"message": message, "type": e.category, "code": e.code, "request_id": rid}
    trace_id = tracing.current_trace_id()
    if trace_id is not None:
        error["trace_id"] = trace_id
    return _sse({"error": error})


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
