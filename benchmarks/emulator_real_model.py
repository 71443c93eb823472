"""The real model through the device backend on the CPU emulator, against the NumPy backend.

    python benchmarks/emulator_real_model.py [--model smollm2] [--tokens 8] [--warp 64]
        [--arch gfx90a] [--llama-python /path/to/venv/bin/python] [--json out.json]

Issue 11's accuracy bar, measured: the device backend's kernels (Q8_1 integer-dot matvecs, fused
decode, flash-decoding over an fp16 KV cache, the MFMA prefill matmul with ``--arch gfx90a``)
run the real model's chat prompt on the emulator, and the NumPy backend (float32, the
reference) runs the same ids. Greedy decoding on the device backend; the NumPy backend is fed
the device's tokens (teacher forcing), so every step's logits are compared on one history:
KL(softmax(numpy) || softmax(device)) per step (the prompt's last position included), and
whether each step's greedy token agrees, with the reference's margin between its two best
logits. With ``--llama-python`` (an environment with llama-cpp-python, a reference and never a
dependency), llama.cpp evaluates the same histories, so a step where the device backend's pick
differs from the float reference's can be compared with llama.cpp's own (its matvecs also round
activations to 8 bits). Slow by nature (every kernel emulated: about a minute
per decoded token of SmolLM2 on 2 cores), hence a benchmark and not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
PROMPT = [{"role": "user", "content": "Explain in two sentences what a GPU kernel is."}]


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in float64."""
    lp = p_logits.astype(np.float64) - np.logaddexp.reduce(p_logits.astype(np.float64))
    lq = q_logits.astype(np.float64) - np.logaddexp.reduce(q_logits.astype(np.float64))
    return float(np.sum(np.exp(lp) * (lp - lq)))


def margin(logits: np.ndarray) -> float:
    """The gap between the two largest logits."""
    top = np.sort(logits.astype(np.float64))[-2:]
    return float(top[1] - top[0])


def llamacpp_logits(python: str, model: str, histories: list[list[int]]) -> list[np.ndarray]:
    """llama.cpp's last-position logits of each history (`llamacpp_worker.py`, op "logits")."""
    # no extra CPU buffer types: AMX in a VM that does not allow it (see compare_llamacpp.py)
    request = {"op": "logits", "model": model, "threads": 2, "prompts": histories,
               "extra_bufts": False}  # fmt: skip
    r = subprocess.run(
        [python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return [np.asarray(x, np.float32) for x in json.loads(r.stdout)["logits"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="known model name or .gguf path")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens to decode (default 8)")
    ap.add_argument("--warp", type=int, choices=(32, 64), default=64, help="emulated warp width")
    ap.add_argument("--arch", default="gfx90a", help="emulated AMD target ('' for none)")
    ap.add_argument("--llama-python", help="python of an environment with llama-cpp-python")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error("--tokens must be at least 1")

    from tqdm import tqdm

    from workbench import store
    from workbench.backends.device import DeviceBackend
    from workbench.engine.generate import Engine
    from workbench.engine.loader import load
    from workbench.engine.model import Transformer

    model = load(args.model)
    path = str(store.resolve(args.model, store.default_home()))
    ref = Engine(model, backend="numpy")
    backend = DeviceBackend("emulator", warp_size=args.warp, arch=args.arch or None)
    ids = ref.format_chat(PROMPT)
    rt, dt = ref.transformer, Transformer(model.gguf, backend)
    ca, cb = rt.new_cache(), dt.new_cache()
    t0 = time.perf_counter()
    a, b = rt.prefill(ids, ca), dt.prefill(ids, cb)  # the last position's logits
    kls, agree, out = [kl(a, b)], [int(np.argmax(a)) == int(np.argmax(b))], []
    refs = [a]  # the reference's logits at every step
    for _ in tqdm(range(args.tokens), desc="decode (emulated)", unit="tok"):
        tok = int(np.argmax(b))  # the device backend's greedy pick drives both
        out.append(tok)
        a, b = rt.decode_one_token(tok, ca), dt.decode_one_token(tok, cb)
        kls.append(kl(a, b))
        agree.append(int(np.argmax(a)) == int(np.argmax(b)))
        refs.append(a)
    result = {
        "model": args.model,
        "prompt_tokens": len(ids),
        "warp_size": args.warp,
        "arch": args.arch or None,
        "kv_dtype": str(np.dtype(backend.kv_dtype)),
        "tokens": out,
        "text": ref.tokenizer.decode(out),
        "kl_per_step": kls,
        "kl_max": max(kls),
        "kl_mean": float(np.mean(kls)),
        "greedy_agree": agree,
        "all_agree": all(agree),
        "reference_margin": [margin(r) for r in refs],
        "seconds": time.perf_counter() - t0,
    }
    if args.llama_python:
        histories = [ids + out[:k] for k in range(len(refs))]
        llama = llamacpp_logits(args.llama_python, path, histories)
        result["llamacpp_kl_per_step"] = [kl(r, x) for r, x in zip(refs, llama, strict=True)]
        result["llamacpp_agree"] = [
            int(np.argmax(r)) == int(np.argmax(x)) for r, x in zip(refs, llama, strict=True)
        ]
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("per_step")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
