"""Regenerate docs/cli.md from the CLI's own parser: `python docs/gen_cli_md.py`.

tests/test_cli.py fails when a command or flag is missing from docs/cli.md; run this after
changing the CLI. Prose beyond --help goes in SEE_ALSO.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

from workbench.cli import build_parser
from workbench.errors import EXIT_CODES

MEANING = {
    "user": "bad input: fix the command line or the prompt",
    "model": "the model file is unusable (missing, not GGUF, truncated, unsupported)",
    "recoverable": "a transient failure (download, device memory): trying again may work",
    "backend": "a backend cannot run (no GPU, compiler missing)",
    "internal": "a bug in the workbench: please report it",
}
SEE_ALSO = {
    "workbench bench kernels": "See [profiling.md](profiling.md) for the method and the output.",
    "workbench serve": "See [http-api.md](http-api.md) for the endpoints and "
    "[deployment.md](deployment.md) for running it as a service.",
}


def walk(parser: argparse.ArgumentParser, prefix: str = "workbench") -> Iterator:
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{prefix} {name}")


def render() -> str:
    out = [
        "# `workbench` command reference",
        "",
        "Every command prints `--help`. Settings read from the environment: `WORKBENCH_HOME` (the",
        "cache: models, compiled emulator kernels; default the platform cache directory),",
        "`WORKBENCH_LOG_LEVEL`/`_FORMAT`/`_FILE`, `WORKBENCH_FAULTS` (see resilience.md).",
        "",
        "## Exit status",
        "",
        "Errors print one line on stderr, `error [code]: message`, and exit with the status of",
        "their category (`--debug` shows the traceback instead):",
        "",
        "| status | category | meaning |",
        "|---|---|---|",
        "| 0 | | success |",
        *(f"| {code} | `{c}` | {MEANING[c]} |" for c, code in EXIT_CODES.items()),
        "| 130 | | interrupted (Ctrl-C) |",
        "",
    ]
    for name, parser in walk(build_parser()):
        parser.prog = name
        out += [f"## `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
        if name in SEE_ALSO:
            out += [SEE_ALSO[name], ""]
    return "\n".join(out)


if __name__ == "__main__":
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal: fix it for the docs
    (Path(__file__).parent / "cli.md").write_text(render())
