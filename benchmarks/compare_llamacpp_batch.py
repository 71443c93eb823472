"""Batched greedy decoding, the workbench's continuous batch against llama.cpp's batch API.

    python benchmarks/compare_llamacpp_batch.py --llama-python /path/to/venv/bin/python \
        [--model smollm2] [--threads 2] [--batch 1,8] [--gen-tokens 32] [--runs 2] [--json out]

For each batch size B, B distinct prompts of --prompt-tokens tokens (the same ids for both
engines) are prefilled, then decoded greedily together: llama.cpp puts one token of every
sequence into one ``llama_batch`` per step (`llamacpp_batch_worker.py`, sequences 0..B-1 of one
context); the workbench submits the B prompts to one engine (`Engine.submit`) and steps its batch.
Aggregate decode tokens/s (tokens after each sequence's first, over the time from the end of the
prompts to the last step) is reported per run, the two engines alternating run by run, with the
same thread count. llama.cpp runs in its own virtual environment: a reference, not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "llamacpp_batch_worker.py"
# llama.cpp gets the environment this script was started with (importing workbench.backends sets
# OMP_WAIT_POLICY for numba's OpenMP pool; llama.cpp's pool keeps its own default).
LLAMA_ENV = dict(os.environ)


def ask_llamacpp(python: str, request: dict) -> dict:
    r = subprocess.run(
        [python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
        check=True, env=LLAMA_ENV,
    )  # fmt: skip
    return json.loads(r.stdout)


def ours_decode_tok_s(engine, prompts: list[list[int]], gen_tokens: int) -> float:
    """Aggregate decode tokens/s of ``prompts`` as one batch on ``engine``."""
    from workbench.engine.generate import GenerationConfig

    cfg = GenerationConfig(temperature=0.0, max_tokens=gen_tokens)
    gens = [engine.submit(p, cfg) for p in prompts]
    s = engine.batcher.scheduler
    while s.waiting or any(q.pending > 1 or not q.out_ids for q in s.running):
        engine.step()  # the prompts, up to every sequence's first token
    first = sum(len(q.out_ids) for q in s.running) + sum(
        len(g.result.token_ids) for g in gens if g.result is not None
    )
    t0 = time.perf_counter()
    while any(g.result is None for g in gens):
        engine.step()
    dt = time.perf_counter() - t0
    total = sum(len(g.result.token_ids) for g in gens)
    return (total - first) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--llama-python", required=True, help="python of an env with llama-cpp-python")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8", help="batch sizes (1,8)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument(
        "--llama-no-extra-bufts", action="store_true",
        help="load llama.cpp without its extra CPU buffer types (AMX dies with SIGILL in some VMs)",
    )  # fmt: skip
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from workbench import store
    from workbench.engine.bench import bench_prompt
    from workbench.engine.generate import Engine

    path = str(store.resolve(args.model, store.default_home()))
    sizes = [int(b) for b in args.batch.split(",")]
    base = bench_prompt(Engine(path, backend="numpy", threads=1).tokenizer, args.prompt_tokens)
    results = []
    for b in sizes:
        # Distinct prompts: each starts with its own token, so no prefix is shared.
        prompts = [[int(base[0]) + 1 + i, *base[1:].tolist()] for i in range(b)]
        engine = Engine(path, backend="numpy", threads=args.threads, max_batch=b)
        engine.warm_up()
        ours_decode_tok_s(engine, [[3, *p] for p in prompts], 4)  # warm-up (compiles, faults in)
        vocab = engine.spec.vocab_size
        for run in range(args.runs):
            # New ids every run (same lengths): our prefix cache must not serve an earlier run.
            ids = [[p[0], *[(t + 7 * run) % (vocab - 3) + 3 for t in p[1:]]] for p in prompts]
            theirs = ask_llamacpp(args.llama_python, {
                "model": path, "threads": args.threads, "prompts": ids,
                "gen_tokens": args.gen_tokens, "runs": 1,
                "extra_bufts": not args.llama_no_extra_bufts,
            })  # fmt: skip
            llama = b * (args.gen_tokens - 1) / theirs["decode_s"][0]
            ours = ours_decode_tok_s(engine, ids, args.gen_tokens)
            row = {"batch": b, "run": run, "ours_decode_tok_s": ours,
                   "llamacpp_decode_tok_s": llama, "ratio": ours / llama}  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for b in sizes:
        rows = [r for r in results if r["batch"] == b]
        summary[b] = {
            "ours_median": statistics.median(r["ours_decode_tok_s"] for r in rows),
            "llamacpp_median": statistics.median(r["llamacpp_decode_tok_s"] for r in rows),
        }
    print(json.dumps({"threads": args.threads, "summary": summary}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
