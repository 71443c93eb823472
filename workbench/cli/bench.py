"""`workbench bench ...`: benchmarks that print or write JSON (speed targets are checked here)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from workbench.cli.generate import add_model_args, make_engine


def register(sub: argparse._SubParsersAction) -> None:
    from workbench.engine.bench import TRACE_PAIRS

    p = sub.add_parser("bench", help="benchmarks (JSON output with --json)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    g = bsub.add_parser(
        "generate",
        help="prefill and decode speed of a model",
        description="Measure prefill tok/s on a fixed-length prompt and decode tok/s over a fixed "
        "number of greedy steps (median of --runs, after one warm-up run), the achieved weight "
        "bandwidth (model bytes x decode tok/s), prefill GFLOP/s and peak resident memory; then, "
        "in the same run, this machine's streaming read bandwidth and float32 GEMM rate at the "
        "model's shapes, and each phase as a fraction of its limit; and ten more prefills, each "
        "timed back to back with its products on the prefill's own GEMM kernel, for a prefill "
        "fraction that a shared machine's load does not move (see docs/performance.md). "
        "With --trace, pairs of an untraced and a traced run (spans kept in memory) in ABBA order "
        "give the decode throughput lost to tracing (the median over pairs, with a 95% interval), "
        "and the tracing calls are timed alone, disabled and enabled (see docs/scaling.md). "
        "With --profile, one more generation with the profiler on, each phase broken down by "
        "kernel: its time, its share, and its GFLOP/s and GB/s as fractions of the GEMM rate and "
        "the read bandwidth (where the time the fractions above leave goes).",
    )
    add_model_args(g)
    g.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    g.add_argument("--gen-tokens", type=int, default=128, help="decode steps (default 128)")
    g.add_argument(
        "--runs",
        type=int,
        help="timed runs, the median is reported (default 3); with --trace, pairs of an untraced "
        f"and a traced run (default {TRACE_PAIRS})",
    )
    g.add_argument(
        "--no-limits",
        action="store_true",
        help="skip measuring the machine's read bandwidth and GEMM rate (about a second)",
    )
    g.add_argument(
        "--trace",
        action="store_true",
        help="also time runs traced as the engine traces a generation (OpenTelemetry spans, in "
        "memory) and report the decode throughput lost to tracing",
    )
    g.add_argument(
        "--trace-steps",
        action="store_true",
        help="with --trace: one span per decode step (as WORKBENCH_TRACE_STEPS=1 asks)",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--output", "-o", help="also write the JSON object to this file")
    g.set_defaults(func=cmd_bench_generate)
    register_kernels(bsub)
    register_serve(bsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from workbench.engine.bench import bench_generate

    engine = make_engine(args)
    r = bench_generate(
        engine,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        runs=args.runs,
        measure_limits=not args.no_limits,
        trace=args.trace or args.trace_steps,
        trace_steps=args.trace_steps,
        profile=args.profile,
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
        if r.kernels_compiled:
            print(
                "(kernels were compiled in this run: the peak RSS includes the compiler's memory;"
                " run again for the figure with the kernels loaded from the cache)"
            )
        if r.read_gb_s is not None and r.gemm_gflops is not None:
            print(
                f"limits: decode {r.decode_gb_s:.1f} of {r.read_gb_s:.1f} GB/s read bandwidth "
                f"({r.decode_bandwidth_fraction:.0%}), prefill {r.prefill_gflops:.0f} of "
                f"{r.gemm_gflops:.0f} GFLOP/s float32 GEMM ({r.prefill_gemm_fraction:.0%}; "
                f"{r.prefill_gemm_fraction_paired:.0%} of its own kernel's on its products, "
                "timed back to back)"
            )
        if r.trace_decode_overhead is not None:
            print(trace_summary(r))
        if r.profile is not None:
            print(profile_tables(r))
    return 0


def profile_tables(r: Any) -> str:
    """The profiled generation of a `GenerateBench` run, each phase by kernel: its time, its
    share of the phase, and its rates as fractions of the machine's limits."""
    lines = ["profiled run (one more generation with the profiler on; shares are of its time):"]

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for phase, per in (("prefill", 1), ("decode", r.gen_tokens)):
        p = r.profile[phase]
        unit = "ms" if per == 1 else "ms/token"
        lines.append(f"{phase}: {p['wall_s'] * 1e3 / per:.2f} {unit}")
        lines.append(
            f"  {'kernel':24s} {'calls':>6s} {unit:>9s} {'share':>6s} {'GFLOP/s':>8s} "
            f"{'of GEMM':>8s} {'GB/s':>7s} {'of read':>8s}"
        )
        for k in p["kernels"]:
            lines.append(
                f"  {k['name']:24s} {k['count']:6d} {k['total_s'] * 1e3 / per:9.3f} "
                f"{k['share']:6.1%} {cell(k['gflop_s'], '.1f'):>8s} "
                f"{cell(k['gemm_fraction'], '.0%'):>8s} {cell(k['gb_s'], '.1f'):>7s} "
                f"{cell(k['read_fraction'], '.0%'):>8s}"
            )
        other = p["other_s"]
        lines.append(
            f"  {'(between kernels)':24s} {'':6s} {other * 1e3 / per:9.3f} "
            f"{other / p['wall_s']:6.1%}"
        )
    if r.profile_dropped:
        lines.append(
            f"warning: the profiler dropped {r.profile_dropped} records (its capacity): the "
            "earliest kernels are missing from these tables"
        )
    return "\n".join(lines)


def _interval(bounds: list[float] | None) -> str:
    if not bounds:
        return "too few pairs for a 95% interval (6 or more)"
    return f"95% interval {bounds[0]:+.1%} to {bounds[1]:+.1%}"


def trace_summary(r: Any) -> str:
    """Lines on what tracing cost in a `GenerateBench` run with trace on."""
    steps = ", a span per step" if r.trace_steps else ""
    pairs = ", ".join(f"{x:+.1%}" for x in r.trace_pair_overheads)
    token_us = statistics.median(r.decode_s) / r.gen_tokens * 1e6
    return (
        f"traced{steps}: decode {r.trace_decode_tok_s:.1f} tok/s ({r.trace_spans} spans); lost "
        f"to tracing, median of {len(r.trace_pair_overheads)} ABBA pairs: "
        f"{r.trace_decode_overhead:+.1%} of decode throughput "
        f"({_interval(r.trace_overhead_interval)}; pairs: {pairs}), "
        f"{r.trace_step_overhead:+.2%} of a typical step "
        f"({_interval(r.trace_step_overhead_interval)})\n"
        f"tracing calls alone, per token: disabled {r.trace_call_us_off:.2f} us "
        f"({r.trace_call_us_off / token_us:.4%} of a token), enabled {r.trace_call_us_on:.2f} us "
        f"({r.trace_call_us_on / token_us:.4%})"
    )


def register_kernels(bsub: argparse._SubParsersAction) -> None:
    from workbench.engine.kernel_bench import DEFAULT_KERNELS

    k = bsub.add_parser(
        "kernels",
        help="time kernels alone: percentiles, GB/s, GFLOP/s, roofline position",
        description="Benchmark registry kernels as triton.testing.do_bench does: warm-up and "
        "repetitions by time budget, L2 flushed between repetitions on a GPU, percentiles over "
        "repetitions, achieved GB/s and GFLOP/s from the registry cost model and the fraction of "
        "the device's roofline. Emulator timings are the CPU emulation's wall clock, not GPU "
        f"timings. Default kernels: {', '.join(DEFAULT_KERNELS)}.",
    )
    k.add_argument(
        "--kernel", action="append", default=[], metavar="NAME", help="a registry kernel (repeat)"
    )
    k.add_argument("--all", action="store_true", help="every registered kernel")
    k.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="K=V,...",
        help="override the representative shape, e.g. rows=1536,cols=576 (repeat for several)",
    )
    k.add_argument("--backend", choices=("auto", "emulator", "cupy"), default="auto")
    k.add_argument("--warp-size", type=int, default=64, help="emulator warp width (32 or 64)")
    k.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up budget (default 25)")
    k.add_argument("--rep-ms", type=float, default=100.0, help="timed budget (default 100)")
    k.add_argument("--json", action="store_true", help="print a JSON list of objects")
    s = k.add_argument_group(
        "sweeps",
        "--sweep SPEC runs a grid of jobs (kernel x shape x warp x target x kind; kinds: time, "
        "sanitize, profile, compile) and prints one JSON line per job, in the grid's order, "
        "with a progress bar on stderr; a failed job is retried once, then printed with "
        'status "failed" and its error. SPEC is inline, e.g. '
        "'kernel=rmsnorm,add;warp=32,64;kind=time,profile;target=gfx90a,gfx942' "
        "(kernel=all: every kernel; shape=rows:576/cols:1536,...), or a JSON file of the same "
        "keys (docs/scaling.md).",
    )
    s.add_argument("--sweep", metavar="SPEC", help="run a sweep (see above)")
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local worker processes for --sweep (default: one per CPU; 1: in this process)",
    )
    s.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run --sweep as Ray tasks: on the cluster at ADDRESS ('auto': the one this machine "
        "joined), or a new local cluster without one (needs rocm-workbench[ray])",
    )
    s.add_argument("--output", "-o", help="write the JSON lines to this file instead of stdout")
    k.set_defaults(func=cmd_bench_kernels)


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    from workbench.cli.progress import count_progress
    from workbench.engine.sweep import iter_sweep, parse_spec

    grid = parse_spec(args.sweep)
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    failed = 0
    try:
        with count_progress("sweep", unit="job") as progress:
            for row in iter_sweep(
                grid,
                workers=args.workers,
                ray=args.ray is not None,
                ray_address=args.ray or None,
                progress=progress,
            ):
                failed += row["status"] != "ok"
                out.write(json.dumps(row) + "\n")
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f'{failed} job(s) failed (status "failed", with the error)', file=sys.stderr)
    return 1 if failed else 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from workbench.engine.kernel_bench import bench_kernels, parse_shape

    if args.sweep is not None:
        if args.kernel or args.all or args.shape or args.json:
            from workbench.errors import UserError

            raise UserError(
                "user.bad_option",
                "with --sweep, kernels and shapes go in the SPEC (kernel=...;shape=...) and the "
                "output is JSON lines already: drop --kernel, --all, --shape and --json",
            )
        return cmd_bench_sweep(args)
    if args.workers is not None or args.ray is not None or args.output:
        from workbench.errors import UserError

        raise UserError("user.bad_option", "--workers, --ray and --output go with --sweep")

    results = bench_kernels(
        args.kernel,
        all_=args.all,
        shapes=[parse_shape(s) for s in args.shape],
        backend=args.backend,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        warp_size=args.warp_size,
    )
    if args.json:
        json.dump([r.to_dict() for r in results], sys.stdout)
        print()
        return 0
    if not results:
        return 0
    r0 = results[0]
    flush = "L2 flushed between repetitions" if r0.l2_flush else "no L2 flush on the emulator"
    print(f"{r0.device} ({r0.backend}): {r0.timing}; {flush}")
    if r0.peak_gb_s is None:
        print("roofline: n/a (no peak figures for this device)")
    else:
        print(f"roofline: {r0.peak_gb_s:.0f} GB/s, {r0.peak_gflop_s:.0f} GFLOP/s FP32 (datasheet)")
    header = ("kernel", "shape", "reps", "p50 ms", "p95 ms", "p99 ms", "mean ms", "GB/s",
              "GFLOP/s", "flop/B", "roof")  # fmt: skip
    rows = [header]
    for r in results:
        rows.append((
            r.kernel,
            ",".join(f"{k}={v}" for k, v in r.shape.items()),
            str(r.reps),
            f"{r.p50_ms:.4f}", f"{r.p95_ms:.4f}", f"{r.p99_ms:.4f}", f"{r.mean_ms:.4f}",
            f"{r.gb_s:.2f}", f"{r.gflop_s:.2f}",
            "-" if r.intensity is None else f"{r.intensity:.2f}",
            "n/a" if r.roof_fraction is None else f"{r.roof_fraction:.0%} {r.bound}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))  # fmt: skip
    return 0


def register_serve(bsub: argparse._SubParsersAction) -> None:
    s = bsub.add_parser(
        "serve",
        help="aggregate tok/s, TTFT and ITL of concurrent clients against the server",
        description="Run 1, 2, 4, 8 (--clients) concurrent streaming clients against a server "
        "started in this process (or --url, a running one), each sending --requests greedy "
        "completions in turn; report per level the aggregate generated tokens/s, the time to "
        "first token and the inter-token latency (p50, p99). The in-process server runs the "
        "largest level as one continuous batch. Prompts are distinct (no prefix sharing).",
    )
    add_model_args(s)
    s.add_argument(
        "--clients", default="1,2,4,8", metavar="N,N,...", help="concurrency levels (1,2,4,8)"
    )
    s.add_argument("--url", help="benchmark this running server instead (e.g. http://host:8000)")
    s.add_argument("--api-key", help="bearer key for --url (default: $WORKBENCH_API_KEY)")
    s.add_argument(
        "--prompt-tokens", type=int, default=64, help="about this many prompt tokens (64)"
    )
    s.add_argument("--gen-tokens", type=int, default=64, help="max tokens per request (64)")
    s.add_argument("--requests", type=int, default=2, help="requests per client per level (2)")
    s.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="TOKENS",
        help="first send two requests in turn whose prompts share their first TOKENS tokens and "
        "report the second's time to first token over the first's (the prefix cache's gain)",
    )
    s.add_argument(
        "--kv-cache-mb", type=float, metavar="MIB", help="the in-process server's KV budget"
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--output", "-o", help="also write the JSON object to this file")
    s.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import os

    from workbench.errors import UserError
    from workbench.server.bench import ServeLevel, bench_serve

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise UserError("user.bad_clients", f"--clients wants N,N,...: {args.clients!r}") from None
    engine = None
    if args.url is None:
        engine = make_engine(args)
        engine.kv_cache_mb = args.kv_cache_mb

    def progress(level: ServeLevel) -> None:
        if not args.json:
            print(
                f"{level.clients:>3} clients: {level.tok_s:8.1f} tok/s  "
                f"TTFT p50 {level.ttft_p50_s * 1000:7.1f} ms p99 {level.ttft_p99_s * 1000:7.1f} ms"
                f"  ITL p50 {level.itl_p50_s * 1000:6.1f} ms p99 {level.itl_p99_s * 1000:6.1f} ms"
                f"  ({level.tokens} tokens, {level.requests} requests, {level.wall_s:.1f} s)",
                flush=True,
            )

    r = bench_serve(
        engine,
        clients,
        url=args.url,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        requests=args.requests,
        api_key=args.api_key or os.environ.get("WORKBENCH_API_KEY"),
        shared_prefix=args.shared_prefix,
        progress=progress,
    )
    sp = r.shared_prefix
    if sp is not None and not args.json:
        print(
            f"shared prefix of {sp.prefix_tokens} tokens: TTFT {sp.first_ttft_s * 1000:.1f} ms "
            f"then {sp.second_ttft_s * 1000:.1f} ms, ratio {sp.ttft_ratio:.3f}"
            + (
                f" ({sp.second_cached_tokens} of {sp.second_prompt_tokens} prompt tokens cached)"
                if sp.second_cached_tokens is not None
                else ""
            ),
            flush=True,
        )
    obj = r.to_dict()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(obj, f, indent=2)
    if args.json:
        json.dump(obj, sys.stdout)
        print()
    return 0
