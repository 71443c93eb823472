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
    a = ref.forward(tokens, ref.new_cache(), all_logits=True)  # prefill: matmul kernels
    b = dev.forward(tokens, dev.new_cache(), all_logits=True)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    ca, cb = ref.new_cache(), dev.new_cache()
    ref.prefill(tokens[:5], ca)
    dev.prefill(tokens[:5], cb)
    for t in tokens[5:]:  # decode: matvec and single-query attention kernels
        x, y = ref.decode_one_token(int(t), ca), dev.decode_one_token(int(t), cb)
        assert np.abs(x - y).max() / np.abs(x).max() < 1e-4


def test_emulator_generates_the_numpy_greedy_tokens(tiny_model):
    cfg = GenerationConfig(max_tokens=10, temperature=0)
    a = Engine(tiny_model, backend="numpy").generate("the cat", cfg).run()
    b = Engine(tiny_model, backend="emulator").generate("the cat", cfg).run()
    assert a.token_ids == b.token_ids and a.text == b.text
