"""llama.cpp side of benchmarks/compare_llamacpp.py; runs in an environment with llama-cpp-python.

Reads one JSON request on stdin, writes one JSON reply on stdout. Only llama_cpp and numpy are
imported, so it can live in a separate virtual environment (llama.cpp is a reference, not a
dependency of the workbench).

Requests: {"op": "logits", "model", "threads", "prompts": [[ids...], ...]} -> last-position
logits of each prompt, evaluated in one batch and, for the first prompt, token by token too;
{"op": "bench", "model", "threads", "prompt": [ids], "gen_tokens", "runs"} -> prefill and decode
times of greedy generation (median-ready lists), after one warm-up run.
"""

import json
import sys
import time

import llama_cpp.llama_cpp as lowlevel
import numpy as np
from llama_cpp import Llama


def last_logits(llm: Llama) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def main() -> None:
    req = json.load(sys.stdin)
    if not req.get("extra_bufts", True):
        # ggml's extra CPU buffer types include AMX; a VM whose CPU reports AMX without letting
        # the guest use it dies with SIGILL at the first eval. Llama() takes no such argument.
        default = lowlevel.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lowlevel.llama_model_default_params = params  # what Llama() calls
    llm = Llama(
        req["model"], n_ctx=2048, n_batch=512, n_threads=req["threads"],
        n_threads_batch=req["threads"], verbose=False,
    )  # fmt: skip
    if req["op"] == "logits":
        out = []
        for ids in req["prompts"]:
            llm.reset()
            llm.eval(ids)
            out.append(last_logits(llm).tolist())
        llm.reset()
        for t in req["prompts"][0]:
            llm.eval([t])
        stepwise = last_logits(llm).tolist()
        json.dump({"logits": out, "stepwise_first": stepwise}, sys.stdout)
    elif req["op"] == "bench":
        prefill, decode = [], []
        for run in range(req["runs"] + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(req["prompt"])
            t1 = time.perf_counter()
            for _ in range(req["gen_tokens"]):
                llm.eval([int(np.argmax(last_logits(llm)))])
            t2 = time.perf_counter()
            if run:  # run 0 is the warm-up
                prefill.append(t1 - t0)
                decode.append(t2 - t1)
        json.dump({"prefill_s": prefill, "decode_s": decode}, sys.stdout)


if __name__ == "__main__":
    main()
