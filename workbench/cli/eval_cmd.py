"""`workbench eval`: batch generation over a JSONL file of prompts (workbench.engine.batch_eval)."""

from __future__ import annotations

import argparse
import sys

from workbench.cli.generate import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="batch generation: a JSONL file of prompts in, a JSONL file of completions out",
        description="Generate a completion for every prompt of PROMPTS (JSON lines: "
        '{"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]}, optional "id" and '
        '"max_tokens") and write one JSON line per prompt to OUTPUT, in input order, with the '
        "text, token ids, finish reason and the prompt's timings. Greedy unless --temperature "
        "is given (a prompt's seed is then --seed plus its position). Workers load the model "
        "once each: in this process (--workers 1), in a process pool, or as Ray actors (--ray). "
        "Rerunning with the same OUTPUT resumes: prompts already there are not generated "
        "again (rows with an error are). A progress bar goes to stderr. See docs/scaling.md.",
    )
    p.add_argument("prompts", metavar="PROMPTS", help="a JSONL file of prompts")
    p.add_argument("--output", "-o", required=True, help="the JSONL file of results (appended)")
    add_model_args(p, backend=False)
    p.add_argument(
        "--backend",
        default="numpy",
        choices=("numpy", "emulator", "cupy"),
        help="each worker's engine backend (default numpy)",
    )
    p.add_argument("--threads", "-t", type=int, help="CPU threads per worker (default: shared)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="workers, each with the model loaded (default 1: in this process)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the workers as Ray actors on the cluster at ADDRESS ('auto': the one this "
        "machine joined), or on a new local cluster without one (needs rocm-workbench[ray])",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=128, help="per prompt (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    g.add_argument("--seed", type=int, default=0, help="base seed when sampling (default 0)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.cli.progress import count_progress
    from workbench.engine.batch_eval import SamplingSpec, read_prompts, run_eval
    from workbench.engine.generate import GenerationConfig

    sampling = SamplingSpec(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    GenerationConfig(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p,
    )  # fmt: skip  # validates the sampling flags before any worker starts
    items = read_prompts(args.prompts)
    with count_progress("eval", unit="prompt") as progress:
        summary = run_eval(
            items,
            args.output,
            args.model,
            backend=args.backend,
            threads=args.threads,
            sampling=sampling,
            workers=args.workers,
            ray=args.ray is not None,
            ray_address=args.ray or None,
            progress=progress,
        )
    print(
        f"{summary.output}: {summary.total} prompts, {summary.skipped} already done, "
        f"{summary.generated} generated, {summary.failed} failed",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0
