"""The HTTP server: an OpenAI-compatible API over one engine, with health, readiness, metrics,
RFC 7807 errors, a bounded queue and an audit log. See docs/http-api.md and docs/deployment.md.

`create_app` builds the FastAPI app; `serve` runs it under uvicorn with draining on SIGTERM.
"""

from workbench.server.app import create_app
from workbench.server.problems import ServerSettings
from workbench.server.serving import serve

__all__ = ["ServerSettings", "create_app", "serve"]
