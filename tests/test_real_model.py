"""SmolLM2-135M-Instruct (the real Q4_1 GGUF) end to end, against HF transformers' float32 run.

The expected values were recorded by tests/data/record_hf_reference.py (reference (a) of issue 2):
transformers dequantizes the same GGUF to float32. Our engine computes on the quantized blocks in
float32, so logits agree to rounding, and greedy tokens exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import tools
from workbench import store

pytestmark = pytest.mark.slow

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2_hf_reference.json").read_text())


@pytest.fixture(scope="module")
def engine():
    from workbench.engine.generate import Engine
    from workbench.engine.loader import load

    home = store.default_home()
    try:
        path = store.resolve("smollm2", home)
    except Exception as e:  # no index reachable: the real model cannot be had here
        if getattr(e, "code", "") != "model.download_failed":
            raise
        failure = f"cannot download the model smollm2: {e}"
    else:
        return Engine(load(path), backend="numpy")
    tools.unavailable(failure)  # outside the except: the report shows the reason alone


@pytest.mark.parametrize("case", REFERENCE, ids=[r["prompt"][:24] for r in REFERENCE])
def test_chat_prompt_tokens_and_logits_match_transformers(engine, case):
    ids = engine.format_chat([{"role": "user", "content": case["prompt"]}])
    assert ids == case["ids"], "chat template + tokenizer must give HF's ids"
    logits = engine.transformer.prefill(np.array(ids), engine.transformer.new_cache(len(ids)))
    top = np.array(case["top_ids"])
    ref = np.array(case["top_logits"])
    assert np.argsort(-logits)[:5].tolist() == top[:5].tolist()
    # docs/accuracy.md measures about 1e-6; 1e-5 leaves room for BLAS summation order
    assert np.abs(logits[top] - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("case", REFERENCE, ids=[r["prompt"][:24] for r in REFERENCE])
def test_greedy_32_tokens_match_transformers(engine, case):
    tf = engine.transformer
    cache = tf.new_cache(len(case["ids"]) + 32)
    logits = tf.prefill(np.array(case["ids"]), cache)
    out = []
    for _ in range(32):
        out.append(int(np.argmax(logits)))
        logits = tf.decode_one_token(out[-1], cache)
    assert out == case["greedy"]


def test_generate_end_to_end_stops_at_end_of_turn(engine):
    from workbench.engine.generate import GenerationConfig

    case = REFERENCE[0]
    gen = engine.chat(
        [{"role": "user", "content": case["prompt"]}],
        GenerationConfig(max_tokens=32, temperature=0),
    )
    text = "".join(e.text for e in gen)
    assert gen.result.finish_reason == "stop"  # <|im_end|> is an end-of-generation token
    eog = case["greedy"].index(2)
    assert gen.result.token_ids == case["greedy"][:eog]
    assert text == gen.result.text == "The capital of France is Paris."


def test_one_decode_position_on_the_emulator_matches_numpy(engine):
    """The HIP kernels (run by the CPU emulator) on the real model: one decode step. The
    quantized matvecs round x to Q8_1 (as llama.cpp's) and the cache is fp16: the bar is the
    issue's, KL to the float path under 0.01 (measured about 2e-3 to 4e-3), and the same argmax."""
    from workbench.backends.device import DeviceBackend
    from workbench.engine.model import Transformer

    tf = engine.transformer
    ids = np.array(REFERENCE[0]["ids"])
    cache = tf.new_cache(len(ids) + 1)
    tf.prefill(ids, cache)
    dev = Transformer(engine.model.gguf, DeviceBackend("emulator"))
    dev_cache = dev.new_cache(len(ids) + 1)
    dev_cache.k[:], dev_cache.v[:], dev_cache.length = cache.k, cache.v, cache.length
    token = REFERENCE[0]["greedy"][0]
    ref = tf.decode_one_token(token, cache)
    got = dev.decode_one_token(token, dev_cache)
    lp = ref.astype(np.float64) - np.logaddexp.reduce(ref.astype(np.float64))
    lq = got.astype(np.float64) - np.logaddexp.reduce(got.astype(np.float64))
    kl = float(np.sum(np.exp(lp) * (lp - lq)))
    assert kl < 0.01, kl
    assert int(np.argmax(got)) == int(np.argmax(ref))
