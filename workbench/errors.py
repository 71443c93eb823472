"""The error taxonomy: every error the library raises is a `WorkbenchError`.

This module sits below every layer (the GGUF reader already raises model errors), so it imports
nothing from the package. Each error has a category, a stable code, a message a person can act on,
and context (operation, kernel, shapes, backend, request id, ...).

Categories decide what callers do:
- ``user``: the caller asked for something invalid (bad argument, prompt too long). Fix the input.
- ``model``: the model file is unusable (bad magic, truncated, unsupported architecture).
- ``recoverable``: a transient fault (device out of memory, launch timeout). Retrying may work.
- ``backend``: a backend cannot run at all (no GPU, compiler missing). Fall back or reconfigure.
- ``internal``: a bug in the workbench. Report it.
"""

from __future__ import annotations

from typing import Any, ClassVar

CATEGORIES = ("user", "model", "recoverable", "backend", "internal")

# CLI exit status per category (0 is success, 1 is left to Python's own crashes, 2 to argparse).
EXIT_CODES = {"user": 2, "model": 3, "recoverable": 4, "backend": 5, "internal": 70}


class WorkbenchError(Exception):
    """Base class. ``code`` is stable (tests, logs and the HTTP API rely on it)."""

    category: ClassVar[str] = "internal"

    def __init__(self, code: str, message: str, **context: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.category]

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "code": self.code,
            "message": self.message,
            "context": {k: _plain(v) for k, v in self.context.items()},
        }


class UserError(WorkbenchError, ValueError):
    category = "user"


class ModelError(WorkbenchError):
    category = "model"


class RecoverableError(WorkbenchError):
    category = "recoverable"


class BackendError(WorkbenchError):
    category = "backend"


class InternalError(WorkbenchError):
    category = "internal"


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)
