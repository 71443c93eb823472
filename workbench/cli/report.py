"""`workbench report`: run the reproducible-report notebook and write it as one HTML page."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="an HTML report: environment fingerprint, a generation, kernel timings, roofline",
        description="Run notebooks/05-reproducible-report.ipynb with papermill (--model, "
        "--backend and each --param go to its `parameters` cell) and export the executed "
        "notebook to HTML with nbconvert, without the code cells; the page is titled with the "
        "model and backend, lists the parameter values, and opens offline. The notebook "
        "ships with the package (or comes from the source checkout); --notebook runs another. "
        "Needs the `lab` extra (papermill, nbconvert, ipykernel, matplotlib).",
    )
    p.add_argument("--output", "-o", default="report.html", help="HTML file (default report.html)")
    p.add_argument("--model", "-m", help="GGUF file or known model name (default: smollm2)")
    p.add_argument(
        "--backend",
        choices=("auto", "numpy", "emulator", "cupy"),
        help="the engine's backend; a numpy engine's kernels are timed on the emulator",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other notebook parameter, VALUE read as JSON when it is JSON "
        "(e.g. rep_ms=100, kernels='[\"rmsnorm\"]', records=runs.jsonl); repeatable",
    )
    p.add_argument("--with-code", action="store_true", help="keep the code cells in the HTML")
    p.add_argument("--executed", metavar="PATH", help="also keep the executed notebook here")
    p.add_argument("--notebook", metavar="PATH", help="another parameterised notebook to run")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.report import build_report, parse_param

    params = dict(parse_param(p) for p in args.param)
    if args.model:
        params["model"] = args.model
    if args.backend:
        params["backend"] = args.backend
    out = build_report(
        args.output,
        parameters=params,
        notebook=args.notebook,
        executed=args.executed,
        include_input=args.with_code,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
