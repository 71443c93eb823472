"""Many long requests under a small KV budget: all complete, memory stays bounded (issue 13).

    python benchmarks/serve_memory.py [--model smollm2] [--threads 2] [--clients 16] \
        [--prompt-tokens 1500] [--gen-tokens 500] [--fits 4] [--check 3] [--json out.json]

``--clients`` requests of ``--prompt-tokens`` distinct prompt tokens each are submitted at once
(by default 16 contexts of 2,000 tokens: 1,500 of prompt, 500 generated)
to one engine (`Engine.submit`, the server's batch) whose KV budget holds ``--fits`` of them at
full length (their prompt plus generated tokens). The batch admits what fits and preempts the
newest sequence when a running one needs a page and none is free; a preempted sequence gives
its pages back and is recomputed later. Reported: whether every request completed (by length
or an end-of-generation token), how many preemptions the batch counted (the
``workbench_preemptions_total`` metric) and which requests they hit, the peak pages in use
against the pool, and the peak resident memory while the requests run against
the budget plus the model file plus the resident memory before the first request (the fixed
overhead: interpreter, libraries, compiled kernels). The peak is reset (Linux
``/proc/self/clear_refs``) once the engine has warmed up: compiling the kernels on a cold numba
cache peaks well above what serving needs (779 MB against 650 on SmolLM2) and is reported apart,
as ``warm_up_peak_rss_mb``. ``--check N`` reruns N prompts alone (a
batch of one, nothing to preempt), the preempted ones first, and compares the greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import workbench  # noqa: F401  (first: it sets OpenBLAS's spin time, read as NumPy loads)


def rss_mb() -> float:
    """The resident memory now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Start the peak resident memory (VmHWM) again from now; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The peak resident memory since the last `reset_peak` (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--gen-tokens", type=int, default=500)
    ap.add_argument("--fits", type=int, default=4, help="full-length sequences the budget holds")
    ap.add_argument("--check", type=int, default=3, help="prompts rerun alone and compared")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np

    from workbench import store
    from workbench.engine.generate import Engine, GenerationConfig
    from workbench.engine.pages import PAGE_SIZE, bytes_per_position

    path = store.resolve(args.model, store.default_home())
    probe = Engine(str(path), backend="numpy", threads=args.threads)
    spec = probe.spec
    length = args.prompt_tokens + args.gen_tokens
    pages_each = -(-length // PAGE_SIZE)
    budget_mb = args.fits * pages_each * PAGE_SIZE * bytes_per_position(spec) / 2**20
    del probe
    engine = Engine(
        str(path), backend="numpy", threads=args.threads, max_batch=args.clients,
        kv_cache_mb=budget_mb,
    )  # fmt: skip
    engine.warm_up()
    engine.profiler.enabled = False
    rng = np.random.default_rng(0)
    vocab = spec.vocab_size
    prompts = [
        rng.integers(100, vocab - 100, args.prompt_tokens).tolist() for _ in range(args.clients)
    ]
    config = GenerationConfig(max_tokens=args.gen_tokens, temperature=0)
    base_mb = rss_mb()
    warm_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset = reset_peak()
    t0 = time.perf_counter()
    gens = [engine.submit(p, config) for p in prompts]
    index = {id(g): i for i, g in enumerate(gens)}
    preempted: list[int] = []  # request of each preemption, in order
    scheduler = engine.batcher.scheduler
    preempt = scheduler.preempt

    def counted(seq: object) -> None:
        preempted.append(index.get(id(seq.gen), -1))  # type: ignore[attr-defined]
        preempt(seq)

    scheduler.preempt = counted
    peak_pages, steps = 0, 0
    while engine.step():
        steps += 1
        peak_pages = max(peak_pages, engine.batcher.pool.used)
        if steps % 50 == 0:
            done = sum(g.result is not None for g in gens)
            print(
                f"step {steps}: {done}/{len(gens)} done, {engine.batcher.state()}", file=sys.stderr
            )
    wall = time.perf_counter() - t0
    state = engine.batcher.state()
    serving_peak_mb = (
        peak_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    complete = [g.result is not None and g.result.finish_reason in ("length", "stop") for g in gens]
    # The preempted requests first (recomputed from their tokens), then the oldest, each on a
    # fresh engine (so nothing comes from this batch's prefix cache).
    order = list(dict.fromkeys([i for i in preempted if i >= 0] + list(range(len(prompts)))))
    same = {}
    for i in order[: args.check]:
        fresh = Engine(str(path), backend="numpy", threads=args.threads, max_batch=1)
        alone = fresh.submit(prompts[i], config)
        while fresh.step():
            pass
        same[i] = alone.result.token_ids == gens[i].result.token_ids
    model_mb = os.path.getsize(path) / 2**20
    out = {
        "model": str(path),
        "clients": args.clients,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "kv_budget_mb": budget_mb,
        "pages_total": state["pages_total"],
        "peak_pages_used": peak_pages,
        "preemptions": state["preemptions"],
        "preempted_requests": preempted,
        "all_complete": all(complete),
        "alone_equal": same,  # request -> greedy tokens equal to the request run alone
        "steps": steps,
        "wall_s": wall,
        "rss_before_mb": base_mb,
        "model_mb": model_mb,
        "peak_rss_mb": serving_peak_mb,  # while the requests ran (the whole process's if not reset)
        "peak_reset": reset,
        "warm_up_peak_rss_mb": warm_peak_mb,  # before the requests: loading and compiling
        "bound_mb": budget_mb + model_mb + base_mb,
        "under_bound": serving_peak_mb < budget_mb + model_mb + base_mb,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
