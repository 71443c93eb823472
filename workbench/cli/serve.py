"""`workbench serve`: the engine behind an OpenAI-compatible HTTP API (see docs/http-api.md)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from workbench.cli.generate import add_model_args
from workbench.engine.defaults import MAX_BATCH

API_KEY_ENV = "WORKBENCH_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")

log = logging.getLogger(__name__)


def add_audit_db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--audit-db",
        type=Path,
        metavar="PATH",
        help="the audit log's SQLite file (default: audit.sqlite3 under WORKBENCH_HOME)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /ready and /metrics. Up to --max-batch generations run together (continuous "
        "batching over a paged KV cache with prefix caching, on the numpy backend; other "
        "backends run one at a time); up to --max-queue more wait, beyond that requests get "
        "503 with Retry-After. SIGTERM drains: new requests get "
        "503, in-flight ones finish (up to --drain-grace seconds), then the server exits 0. "
        "Environment: WORKBENCH_HOME, WORKBENCH_API_KEY, WORKBENCH_LOG_LEVEL, "
        "WORKBENCH_LOG_FORMAT, WORKBENCH_LOG_FILE, WORKBENCH_FAULTS, WORKBENCH_FAULTS_SEED; "
        "OpenTelemetry traces go over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set (OTEL_SERVICE_NAME, WORKBENCH_TRACE_STEPS, "
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: see docs/scaling.md).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    add_model_args(p)
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health and /ready "
        f"(default: ${API_KEY_ENV}; none: no key required)",
    )
    p.add_argument(
        "--max-queue", type=int, default=8, help="requests waiting beyond the running ones (8)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        metavar="N",
        help=f"requests generated together, each step advancing all of them (numpy backend; "
        f"default: {MAX_BATCH}; 1: one at a time)",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=float,
        metavar="MIB",
        help="memory budget of the paged KV cache the batch shares; requests wait for pages "
        "and the newest is preempted when they run out (default: room for --max-batch "
        "sequences of 2048 tokens, at most 512)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="per-request limit, queue wait included; past it the generation is cancelled and "
        "the client gets 503 (default: 300)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="larger request bodies get 413 (default: 1048576)",
    )
    p.add_argument(
        "--drain-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long queued and running requests may finish while new ones get "
        "503; then what is left is answered 503 and the server exits (default: 30)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a request's headers must arrive within this, or the connection gets 408 and is "
        "closed (default: 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a request's whole body must arrive within this, or 408 (default: 30)",
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="close a kept-alive connection idle this long (default: 5)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="open connections; a request on one past it gets 503 server.overloaded (64)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a Host header name to answer (repeat for more; '*' for any). Default: loopback "
        "names only when there is no API key (DNS-rebinding guard), any name with a key",
    )
    add_audit_db_arg(p)
    p.add_argument(
        "--audit-retention-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="audit rows older than this are pruned at startup and hourly (default: 30)",
    )
    p.add_argument(
        "--audit-max-mb",
        type=float,
        default=64.0,
        metavar="MB",
        help="cap on the audit log's size; past it the oldest rows go (default: 64)",
    )
    p.add_argument("--no-audit", action="store_true", help="keep no audit log")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from workbench import store
    from workbench.observe.logs import configure_from_env
    from workbench.runtime.faults import FaultInjector
    from workbench.server import ServerSettings, create_app, serve
    from workbench.server.audit import default_path

    configure_from_env()
    faults = FaultInjector.from_env(os.environ)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    audit_db = None if args.no_audit else (args.audit_db or default_path(store.default_home()))
    aliases = (args.model,) if args.model and not Path(args.model).suffix else ()
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        drain_grace_s=args.drain_grace,
        audit_db=audit_db,
        audit_retention_days=args.audit_retention_days,
        audit_max_bytes=int(args.audit_max_mb * (1 << 20)),
        model_aliases=aliases,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
        allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
    )
    if args.host not in LOOPBACK and api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach it can use it", args.host
        )
        if settings.allowed_hosts is None:
            log.warning(
                "without an API key only loopback Host names are answered; "
                "pass --allowed-host NAME for the names clients use"
            )

    def make_engine() -> Any:
        from workbench.engine.generate import Engine
        from workbench.engine.loader import load

        return Engine(
            load(args.model),
            backend=args.backend,
            threads=args.threads,
            faults=faults if faults.enabled else None,
            max_batch=args.max_batch,
            kv_cache_mb=args.kv_cache_mb,
        )

    serve(create_app(make_engine, settings), settings)
    return 0
