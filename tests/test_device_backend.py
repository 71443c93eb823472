"""The engine on the device backend (HIP kernels, run by the CPU emulator) against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.engine.generate import Engine, GenerationConfig

pytest.importorskip("workbench.kernels.emulator")


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "F16"])
def test_emulator_logits_match_numpy(tiny_models, kind):
    path = tiny_models[kind]
    tokens = np.random.default_rng().integers(3, 200, size=9)
    ref = Engine(path, backend="numpy").transformer
    dev = Engine(path, backend="emulator").transformer
    dev.backend.kv_dtype = np.dtype(np.float32)  # the kernels' arithmetic, not fp16 storage
    a = ref.forward(tokens, ref.new_cache(), all_logits=True)  # prefill: matmul kernels
    b = dev.forward(tokens, dev.new_cache(), all_logits=True)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    ca, cb = ref.new_cache(), dev.new_cache()
    ref.prefill(tokens[:5], ca)
    dev.prefill(tokens[:5], cb)
    for t in tokens[5:]:  # decode: matvec and single-query attention kernels
        x, y = ref.decode_one_token(int(t), ca), dev.decode_one_token(int(t), cb)
        if kind == "F16":
            assert np.abs(x - y).max() / np.abs(x).max() < 1e-4
        else:  # quantized matvecs round x to 8 bits per token (Q8_1, as ggml): the bar
            assert _kl(x, y) < 0.01 and np.abs(x - y).max() / np.abs(x).max() < 0.05


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in float64."""
    lp = p_logits.astype(np.float64) - np.logaddexp.reduce(p_logits.astype(np.float64))
    lq = q_logits.astype(np.float64) - np.logaddexp.reduce(q_logits.astype(np.float64))
    return float(np.sum(np.exp(lp) * (lp - lq)))


def test_fp16_kv_cache_is_the_default_and_stays_close(tiny_model):
    """The device backend stores K/V as fp16 unless told otherwise; logits stay within KL 0.01."""
    tokens = np.random.default_rng().integers(3, 200, size=7)
    ref = Engine(tiny_model, backend="numpy").transformer
    dev = Engine(tiny_model, backend="emulator").transformer
    ca, cb = ref.new_cache(), dev.new_cache()
    assert cb.k.dtype == np.float16 and ca.k.dtype == np.float32
    a = ref.forward(tokens[:5], ca, all_logits=True)
    b = dev.forward(tokens[:5], cb, all_logits=True)
    assert all(_kl(x, y) < 0.01 for x, y in zip(a, b, strict=True))
    for t in tokens[5:]:
        assert _kl(ref.decode_one_token(int(t), ca), dev.decode_one_token(int(t), cb)) < 0.01


def test_emulator_generates_the_numpy_greedy_tokens(tiny_model):
    cfg = GenerationConfig(max_tokens=10, temperature=0)
    a = Engine(tiny_model, backend="numpy").generate("the cat", cfg).run()
    b = Engine(tiny_model, backend="emulator").generate("the cat", cfg).run()
    assert a.token_ids == b.token_ids and a.text == b.text


def test_device_sampling_draws_what_the_host_sampler_draws(tiny_model):
    """On a device the token is drawn by the sampling kernels with the host sampler's uniform
    number, so a seed gives the same text on every backend; only the id leaves the device."""
    cfg = GenerationConfig(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=5)
    a = Engine(tiny_model, backend="numpy").generate("the cat", cfg).run()
    dev = Engine(tiny_model, backend="emulator")
    b = dev.generate("the cat", cfg, request_id="s").run()
    assert a.token_ids == b.token_ids
    names = {r.name for r in dev.profiler.records(request_id="s")}
    assert "sample_top_k_top_p" in names


def test_logprobs_and_penalty_sample_on_the_host(tiny_model):
    cfg = GenerationConfig(max_tokens=4, temperature=0, logprobs=2, repeat_penalty=1.3)
    a = Engine(tiny_model, backend="numpy").generate("an", cfg).run()
    b = Engine(tiny_model, backend="emulator").generate("an", cfg).run()
    assert a.token_ids == b.token_ids
    assert all(len(top) == 2 for _, top in b.logprobs)
