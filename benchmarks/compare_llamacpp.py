"""Compare the workbench's NumPy engine with llama.cpp on the same GGUF: accuracy and speed.

    python benchmarks/compare_llamacpp.py --llama-python /path/to/venv-with-llama-cpp/bin/python \
        [--model smollm2] [--threads 2] [--runs 3] [--json out.json]

Accuracy: for each chat-formatted prompt of tests/data/smollm2_hf_reference.json, the
next-token distributions of both engines: KL(llama.cpp || ours) and the top-5 overlap; also how
far llama.cpp's batched and token-by-token logits differ from each other (it quantizes
activations to 8 bits, so it is not exact even against itself).
Speed: prefill of the same 128-token prompt and 128 greedy decode steps, same thread count,
both engines in this one run, alternating run by run (each warmed up), --runs times; the ratios
are reported per run and as the minimum, with this machine's limits measured once at the end
and the prefill's rate paired with its products' timed back to back (`prefill_gemm_fraction_paired`,
docs/performance.md "Method").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# isort: off
import workbench  # noqa: F401  (first: it sets OpenBLAS's spin time, read as NumPy loads)
import numpy as np
# isort: on

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
# llama.cpp gets the environment this script was started with: importing workbench.backends sets
# OMP_WAIT_POLICY for numba's OpenMP pool, and llama.cpp's own OpenMP pool must keep its default.
LLAMA_ENV = dict(os.environ)


def ask_llamacpp(python: str, request: dict) -> dict:
    r = subprocess.run(
        [python, str(WORKER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
        env=LLAMA_ENV,
    )
    return json.loads(r.stdout)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--llama-python", required=True, help="python of an env with llama-cpp-python")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--llama-no-extra-bufts",
        action="store_true",
        help="load llama.cpp without its extra CPU buffer types (AMX, repacking): for VMs whose "
        "CPU reports AMX but kills the guest's AMX instructions (SIGILL)",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from workbench import store
    from workbench.engine import limits
    from workbench.engine.bench import (
        bench_generate,
        bench_prompt,
        layer_shapes,
        measure_paired_gemm_fraction,
        prefill_flops,
    )
    from workbench.engine.generate import Engine

    path = str(store.resolve(args.model, store.default_home()))
    engine = Engine(path, backend="numpy", threads=args.threads)
    # As `workbench bench generate` does: kernels loaded before the weights are read, so the
    # peak resident memory reported is the one the CLI reports (docs/performance.md, "Memory").
    engine.warm_up()
    tf = engine.transformer

    cases = json.loads((ROOT / "tests/data/smollm2_hf_reference.json").read_text())
    prompts = [c["ids"] for c in cases]
    ref = ask_llamacpp(
        args.llama_python,
        {
            "op": "logits",
            "model": path,
            "threads": args.threads,
            "prompts": prompts,
            "extra_bufts": not args.llama_no_extra_bufts,
        },
    )
    accuracy = []
    for ids, theirs in zip(prompts, ref["logits"]):
        ours = tf.prefill(np.array(ids), tf.new_cache(len(ids)))
        lp, lq = log_softmax(np.array(theirs)), log_softmax(ours)
        kl = float(np.sum(np.exp(lp) * (lp - lq)))
        top_theirs = set(np.argsort(-lp)[:5].tolist())
        top_ours = set(np.argsort(-lq)[:5].tolist())
        accuracy.append(
            {"prompt_tokens": len(ids), "kl": kl, "top5_overlap": len(top_theirs & top_ours)}
        )
    self_diff = float(np.abs(np.array(ref["stepwise_first"]) - np.array(ref["logits"][0])).max())

    prompt = bench_prompt(engine.tokenizer, 128).tolist()
    # Alternate: one llama.cpp run, then one of ours, --runs times (each side warms up before its
    # timed run), so that a change in the machine's load hits both engines alike; the bars are
    # per-run ratios.
    runs = []
    for _ in range(args.runs):
        theirs = ask_llamacpp(
            args.llama_python,
            {"op": "bench", "model": path, "threads": args.threads, "prompt": prompt,
             "gen_tokens": 128, "runs": 1, "extra_bufts": not args.llama_no_extra_bufts},
        )  # fmt: skip
        ours = bench_generate(engine, prompt_tokens=128, gen_tokens=128, runs=1,
                              measure_limits=False)  # fmt: skip
        lp, ld = 128 / theirs["prefill_s"][0], 128 / theirs["decode_s"][0]
        runs.append({
            "ours": {"prefill_tok_s": ours.prefill_tok_s, "decode_tok_s": ours.decode_tok_s},
            "llamacpp": {"prefill_tok_s": lp, "decode_tok_s": ld},
            "prefill_ratio": ours.prefill_tok_s / lp,
            "decode_ratio": ours.decode_tok_s / ld,
            "peak_rss_mb": ours.peak_rss_mb,
            "kernels_compiled": ours.kernels_compiled,
        })  # fmt: skip
    machine = limits.measure(layer_shapes(engine), 128, engine.backend.threads)
    med = {k: statistics.median(r["ours"][k] for r in runs) for k in runs[0]["ours"]}
    model_bytes = sum(t.nbytes for t in engine.model.gguf.tensors.values())
    result = {
        "model": path,
        "threads": args.threads,
        "accuracy": accuracy,
        "llamacpp_batched_vs_stepwise_max_abs_logit_diff": self_diff,
        "speed": {
            "runs": runs,
            "min_prefill_ratio": min(r["prefill_ratio"] for r in runs),
            "min_decode_ratio": min(r["decode_ratio"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            # numba compiled a kernel in this process: the peak includes the compiler's memory
            "kernels_compiled": any(r["kernels_compiled"] for r in runs),
            "read_gb_s": machine.read_gb_s,
            "gemm_gflops": machine.gemm_gflops,
            "decode_bandwidth_fraction": model_bytes * med["decode_tok_s"] / 1e9
            / machine.read_gb_s,
            "prefill_gemm_fraction": prefill_flops(engine, 128) * med["prefill_tok_s"] / 128
            / 1e9 / machine.gemm_gflops,
            "prefill_gemm_fraction_paired": measure_paired_gemm_fraction(
                engine, np.asarray(prompt)),
        },
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
