"""llama.cpp side of benchmarks/compare_llamacpp_batch.py: batched greedy decoding.

Runs in an environment with llama-cpp-python (a reference, never a dependency of the workbench).
Reads one JSON request on stdin, writes one JSON reply on stdout:

{"model", "threads", "prompts": [[ids...], ...], "gen_tokens", "runs", "extra_bufts"} ->
{"decode_s": [...], "prefill_s": [...], "tokens": [[ids...], ...]}: all prompts as sequences
0..n-1 of one context (``n_seq_max = n``); the prompts prefilled in one llama_batch, then every
decode step one llama_batch holding one token of every sequence (greedy, no end-of-generation
stop, so every run does the same work). One warm-up run first; the KV memory is cleared between
runs. ``tokens`` are the last run's generated ids per sequence.
"""

import ctypes
import json
import sys
import time

import llama_cpp.llama_cpp as ll
import numpy as np


@ll.llama_log_callback
def _quiet(level, text, user_data):
    """llama.cpp's log lines are dropped: stdout carries the JSON reply."""


def main() -> None:
    req = json.load(sys.stdin)
    ll.llama_log_set(_quiet, ctypes.c_void_p(0))
    prompts = req["prompts"]
    n_seq = len(prompts)
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    if not req.get("extra_bufts", True):
        mparams.use_extra_bufts = False  # AMX buffer types die with SIGILL in some VMs
    model = ll.llama_model_load_from_file(req["model"].encode(), mparams)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    cparams = ll.llama_context_default_params()
    total = sum(len(p) for p in prompts)
    cparams.n_ctx = max(512, n_seq * (max(len(p) for p in prompts) + req["gen_tokens"] + 16))
    cparams.n_batch = max(total, n_seq)
    cparams.n_ubatch = max(total, n_seq)
    cparams.n_seq_max = n_seq
    cparams.n_threads = req["threads"]
    cparams.n_threads_batch = req["threads"]
    ctx = ll.llama_init_from_model(model, cparams)
    batch = ll.llama_batch_init(max(total, n_seq), 0, n_seq)

    def fill(entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        batch.n_tokens = len(entries)
        for k, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[k] = tok
            batch.pos[k] = pos
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = logits

    def argmax(k: int) -> int:
        ptr = ll.llama_get_logits_ith(ctx, k)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    prefill_s, decode_s = [], []
    out: list[list[int]] = []
    for run in range(req["runs"] + 1):
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        entries = []
        last = []
        for s, ids in enumerate(prompts):
            for p, t in enumerate(ids):
                entries.append((t, p, s, p == len(ids) - 1))
            last.append(len(entries) - 1)
        t0 = time.perf_counter()
        fill(entries)
        if ll.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        nxt = [argmax(k) for k in last]
        t1 = time.perf_counter()
        out = [[t] for t in nxt]
        pos = [len(p) for p in prompts]
        for _ in range(req["gen_tokens"] - 1):
            fill([(nxt[s], pos[s], s, True) for s in range(n_seq)])
            if ll.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a decode step")
            nxt = [argmax(s) for s in range(n_seq)]
            for s in range(n_seq):
                out[s].append(nxt[s])
                pos[s] += 1
        t2 = time.perf_counter()
        if run:  # run 0 is the warm-up
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    json.dump({"prefill_s": prefill_s, "decode_s": decode_s, "tokens": out}, sys.stdout)


if __name__ == "__main__":
    main()
