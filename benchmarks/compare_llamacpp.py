"""Compare the workbench's NumPy engine with llama.cpp on the same GGUF: accuracy and speed.

    python benchmarks/compare_llamacpp.py --llama-python /path/to/venv-with-llama-cpp/bin/python \
        [--model smollm2] [--threads 2] [--runs 3] [--json out.json]

Accuracy: for each chat-formatted prompt of tests/data/smollm2_hf_reference.json, the
next-token distributions of both engines: KL(llama.cpp || ours) and the top-5 overlap; also how
far llama.cpp's batched and token-by-token logits differ from each other (it quantizes
activations to 8 bits, so it is not exact even against itself).
Speed: prefill of the same 128-token prompt and 128 greedy decode steps, same thread count,
both engines in this one run, alternating, median of --runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"


def ask_llamacpp(python: str, request: dict) -> dict:
    r = subprocess.run(
        [python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True, check=True
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
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from workbench import store
    from workbench.engine.bench import bench_generate, bench_prompt
    from workbench.engine.generate import Engine

    path = str(store.resolve(args.model, store.default_home()))
    engine = Engine(path, backend="numpy", threads=args.threads)
    tf = engine.transformer

    cases = json.loads((ROOT / "tests/data/smollm2_hf_reference.json").read_text())
    prompts = [c["ids"] for c in cases]
    ref = ask_llamacpp(
        args.llama_python,
        {"op": "logits", "model": path, "threads": args.threads, "prompts": prompts},
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
    theirs = ask_llamacpp(
        args.llama_python,
        {"op": "bench", "model": path, "threads": args.threads, "prompt": prompt,
         "gen_tokens": 128, "runs": args.runs},
    )  # fmt: skip
    ours = bench_generate(engine, prompt_tokens=128, gen_tokens=128, runs=args.runs)
    llama_prefill = 128 / statistics.median(theirs["prefill_s"])
    llama_decode = 128 / statistics.median(theirs["decode_s"])
    result = {
        "model": path,
        "threads": args.threads,
        "accuracy": accuracy,
        "llamacpp_batched_vs_stepwise_max_abs_logit_diff": self_diff,
        "speed": {
            "ours": {"prefill_tok_s": ours.prefill_tok_s, "decode_tok_s": ours.decode_tok_s,
                     "peak_rss_mb": ours.peak_rss_mb},
            "llamacpp": {"prefill_tok_s": llama_prefill, "decode_tok_s": llama_decode},
            "prefill_ratio": ours.prefill_tok_s / llama_prefill,
            "decode_ratio": ours.decode_tok_s / llama_decode,
        },
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
