"""`workbench bench ...`: benchmarks that print or write JSON (speed targets are checked here)."""

from __future__ import annotations

import argparse
import json
import sys

from workbench.cli.generate import add_model_args, make_engine


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON output with --json)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    g = bsub.add_parser(
        "generate",
        help="prefill and decode speed of a model",
        description="Measure prefill tok/s on a fixed-length prompt and decode tok/s over a fixed "
        "number of greedy steps (median of --runs, after one warm-up run), the achieved weight "
        "bandwidth (model bytes x decode tok/s) and peak resident memory.",
    )
    add_model_args(g)
    g.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    g.add_argument("--gen-tokens", type=int, default=128, help="decode steps (default 128)")
    g.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--output", "-o", help="also write the JSON object to this file")
    g.set_defaults(func=cmd_bench_generate)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from workbench.engine.bench import bench_generate

    engine = make_engine(args)
    r = bench_generate(
        engine, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, runs=args.runs
    )
    obj = r.to_dict()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(obj, f, indent=2)
    if args.json:
        json.dump(obj, sys.stdout)
        print()
    else:
        print(
            f"{r.model} on {r.backend}, {r.threads} threads: prefill {r.prefill_tok_s:.1f} tok/s "
            f"({r.prompt_tokens} tokens), decode {r.decode_tok_s:.1f} tok/s ({r.gen_tokens} "
            f"tokens, {r.decode_gb_s:.1f} GB/s of weights), peak RSS {r.peak_rss_mb:.0f} MB"
        )
    return 0
