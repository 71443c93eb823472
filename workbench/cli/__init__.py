"""The `workbench` command. Each command group lives in its own module with a `register` function.

The CLI is the edge of the program: it reads settings from the environment, prints, and turns
`WorkbenchError`s into one line on stderr and an exit status by category (`--debug` shows the
traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence

from workbench.errors import WorkbenchError

# Command-group modules, in the order their commands appear in --help.
GROUPS = (
    "generate", "models", "kernels_cmd", "bench", "eval_cmd", "serve", "audit", "report",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Research workbench for LLM inference kernels: generate text from GGUF "
        "models, inspect and benchmark HIP kernels, with or without a GPU.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in GROUPS:
        try:
            module = importlib.import_module(f"workbench.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"workbench.cli.{name}":
                continue  # group not built yet
            raise
        module.register(sub)
    return parser


def configure_from_env(environ: Mapping[str, str]) -> None:
    """Settings read once, here at the edge: logging, tracing (OTLP export when the OTEL_*
    variables ask for it) and process-wide fault injection."""
    from workbench.observe import tracing
    from workbench.observe.logs import configure_from_env as configure_logs
    from workbench.runtime import faults

    configure_logs(environ)
    tracing.configure_from_env(environ)
    if environ.get("WORKBENCH_FAULTS"):
        faults.install(faults.FaultInjector.from_env(environ))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        configure_from_env(os.environ)
        return int(args.func(args) or 0)
    except WorkbenchError as e:
        if args.debug:
            raise
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
