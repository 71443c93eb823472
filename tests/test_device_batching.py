"""The device backend (HIP kernels on the CPU emulator) in the engine's continuous batch: the
decode rows of a step go through the batched matvec and the paged attention, and a sequence's
greedy tokens are the same batched as alone."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_batching import prompts, run_all
from workbench.engine.generate import Engine, GenerationConfig
from workbench.kernels import paged_kernels as pk
from workbench.kernels import quant_kernels as qk

GREEDY = GenerationConfig(temperature=0.0, max_tokens=8)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "F16"])
def test_device_batched_greedy_tokens_equal_alone(tiny_models, kind, rng, seed, monkeypatch):
    engine = Engine(tiny_models[kind], backend="emulator", max_batch=4)
    assert engine.batcher.pool.k.dtype == np.float16  # the device backend's KV type
    calls = {"rows": [], "paged": []}
    batch, paged = qk.launch_matvec_batch, pk.paged_attention

    def spy_batch(loader, qtype, raw, x, out):
        calls["rows"].append(x.shape[0])
        return batch(loader, qtype, raw, x, out)

    def spy_paged(module, q, k, v, tables, lens, **kw):
        calls["paged"].append(len(lens))
        return paged(module, q, k, v, tables, lens, **kw)

    monkeypatch.setattr(qk, "launch_matvec_batch", spy_batch)
    monkeypatch.setattr(pk, "paged_attention", spy_paged)
    ps = prompts(rng, engine, 4, lo=3, hi=30)
    solo = [run_all([engine.submit(p, GREEDY)])[0].token_ids for p in ps]
    assert calls["rows"] == [], "a batch of one decodes with the one-row matvec"
    assert calls["paged"] and set(calls["paged"]) == {1}
    calls["paged"].clear()
    results = run_all([engine.submit(p, GREEDY) for p in ps])
    for i, r in enumerate(results):
        assert r.token_ids == solo[i], f"prompt {i} (len {len(ps[i])}), seed {seed}"
    assert max(calls["rows"]) == 4 and max(calls["paged"]) == 4, calls
    assert engine.batcher.pool.used == 0
