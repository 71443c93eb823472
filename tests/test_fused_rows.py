"""The fused batched decode step (`fused_rows`) against the runner's per-operation path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.synth import TinyConfig, write_tiny_llama
from tests.test_quant_cpu import assert_bits_equal
from workbench.backends.fused_rows import FusedRowsDecoder
from workbench.backends.numpy_backend import NumpyBackend
from workbench.engine import runner
from workbench.engine.model import Transformer
from workbench.engine.pages import PAGE_SIZE, PagePool
from workbench.gguf.quants import SUPPORTED_TYPES
from workbench.gguf.reader import read_gguf

# K-quant rows are whole 256-value blocks: every width of the model is a multiple of 256.
WIDE = TinyConfig(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=128)
# Types whose row kernels LLVM compiles alike in the fused loop and in `quant_batch`'s (see
# `quant_batch`'s docstring): there the two paths agree bit for bit.
EXACT = {Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F32, Q.F16, Q.BF16}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("threads", [1, 2, 3], ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_a_decode_step_matches_the_per_operation_runner(
    qtype: Q, threads: int, tmp_path: Path, seed: int, rng: np.random.Generator
) -> None:
    """Several sequences of random lengths, prefilled in pages, then one decode step through the
    fused step and through the per-operation runner: the same logits and the same keys and
    values written; and each row alone is bit for bit the row in the batch."""
    cfg = TinyConfig(**(WIDE.__dict__ | {"qtype": qtype}))
    path = write_tiny_llama(tmp_path / "tiny.gguf", cfg, seed=seed % 2**32)
    model = read_gguf(path)
    tf = Transformer(model, NumpyBackend(threads=min(threads, 2)))
    tf.decode_rows = FusedRowsDecoder.build(tf, threads).step
    pool = PagePool(model.spec, 4)
    slices = []
    for _ in range(int(rng.integers(1, 10))):
        length = int(rng.integers(2, 40))  # positions already computed
        pages = [pool.allocate() for _ in range(length // PAGE_SIZE + 1)]
        runner.forward(tf, pool, [(pages, 0, rng.integers(0, 200, length).tolist())])
        slices.append((pages, length, [int(rng.integers(0, 200))]))
    k0, v0 = pool.k.copy(), pool.v.copy()
    got = runner.forward(tf, pool, slices)  # the fused step: every slice is one decode row
    k_got, v_got = pool.k.copy(), pool.v.copy()

    fused, tf.decode_rows = tf.decode_rows, None
    pool.k[:], pool.v[:] = k0, v0
    want = runner.forward(tf, pool, slices)
    what = f"{qtype.name}, {len(slices)} rows, seed={seed}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if qtype in EXACT:
            assert_bits_equal(g, w, f"row {i}, {what}")
        else:
            assert rel_err(g, w) < 1e-5, f"row {i}, {what}"
    if qtype in EXACT:
        assert np.array_equal(k_got, pool.k) and np.array_equal(v_got, pool.v), what
    else:
        assert rel_err(k_got, pool.k) < 1e-5 and rel_err(v_got, pool.v) < 1e-5, what

    tf.decode_rows = fused
    j = int(rng.integers(len(slices)))
    pool.k[:], pool.v[:] = k0, v0
    alone = runner.forward(tf, pool, [slices[j]])[0]
    assert_bits_equal(alone, got[j], f"row {j} alone vs in the batch, {what}")


def test_the_runner_records_each_layer_of_a_fused_step(tmp_path: Path, seed: int) -> None:
    """With the profiler on, a fused step is timed per layer (``decode_layer`` with its rows)
    and for the output (``decode_head``), instead of per operation."""
    from workbench.engine.generate import Engine, GenerationConfig

    path = write_tiny_llama(tmp_path / "tiny.gguf", WIDE, seed=seed % 2**32)
    engine = Engine(str(path), backend="numpy", threads=2)
    config = GenerationConfig(max_tokens=4, temperature=0)
    gens = [engine.submit([1 + i, 2, 3], config) for i in range(3)]
    engine.profiler.clear()
    while engine.step():
        pass
    assert all(g.result is not None and len(g.result.token_ids) == 4 for g in gens)
    layers = engine.profiler.records(name="decode_layer")
    assert layers and {r.shapes["rows"] for r in layers} >= {3}
    assert {r.shapes["layer"] for r in layers} == set(range(model_layers(path)))
    assert engine.profiler.records(name="decode_head")
    # Steps of decode rows only take the fused step; one that holds a prompt chunk does not.
    paged = engine.profiler.records(name="attention_decode_paged")
    assert all(r.phase == "prefill" for r in paged)


def model_layers(path: Path) -> int:
    return read_gguf(path).spec.n_layers
