"""The fused decode path against the per-operation NumPy path, at every weight type."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.synth import TinyConfig, write_tiny_llama
from workbench.backends import fused_decode
from workbench.backends.numpy_backend import NumpyBackend
from workbench.engine.generate import Engine, GenerationConfig
from workbench.engine.model import Transformer
from workbench.gguf.quants import SUPPORTED_TYPES
from workbench.gguf.reader import read_gguf

# K-quant rows are whole 256-value blocks: every width of the model is a multiple of 256.
WIDE = TinyConfig(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=64)
MIXED = (("attn_k", Q.Q8_0), ("attn_v", Q.Q6_K), ("ffn_up", Q.Q4_K), ("ffn_down", Q.Q5_0))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    s = int(os.environ.get("WORKBENCH_TEST_SEED") or secrets.randbits(63))
    print(f"{request.node.name}: seed={s} (replay: WORKBENCH_TEST_SEED={s})")
    return s


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> int:
    """One thread, and teams of 2 and 3 (3 splits the tiny model's 2 KV heads unevenly)."""
    return request.param


def tiny(tmp_path: Path, seed: int, **cfg) -> Path:
    base = WIDE.__dict__ | cfg
    return write_tiny_llama(tmp_path / "tiny.gguf", TinyConfig(**base), seed=seed % 2**32)


def compare(path: Path, seed: int, threads: int, steps: int = 6) -> None:
    """Prefill a random prompt, then greedy-decode on both paths: same logits and tokens."""
    model = read_gguf(path)
    backend_threads = min(threads, 2)  # numba's limit may be 2; the decode team is not bound by it
    fused = Transformer(model, NumpyBackend(threads=backend_threads))
    fused._decode_fused = fused_decode.FusedDecoder.build(fused, threads)
    ref = Transformer(model, NumpyBackend(threads=backend_threads, fused=False))
    assert fused._decode_fused is not None and ref._decode_fused is None
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.spec.vocab_size, size=int(rng.integers(1, 9)))
    cf, cr = fused.new_cache(), ref.new_cache()
    token = int(np.argmax(fused.prefill(prompt, cf)))
    ref.prefill(prompt, cr)
    for i in range(steps):
        got = fused.decode_one_token(token, cf)
        want = ref.decode_one_token(token, cr)
        assert got.shape == want.shape == (model.spec.vocab_size,) and got.dtype == np.float32
        assert rel_err(got, want) < 1e-5, f"step {i}, seed={seed}"
        assert np.argmax(got) == np.argmax(want), f"greedy token differs at step {i}, seed={seed}"
        token = int(np.argmax(want))
    n = cr.length
    assert cf.length == n
    # Rounding differences (SwiGLU's exp, the vectorised block sums) measured as a whole.
    assert rel_err(cf.k[:, :, :n], cr.k[:, :, :n]) < 1e-5, f"seed={seed}"
    assert rel_err(cf.v[:, :, :n], cr.v[:, :, :n]) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_fused_matches_per_operation(qtype, tmp_path, seed, threads):
    compare(tiny(tmp_path, seed, qtype=qtype), seed, threads)


def test_fused_mixed_types_and_untied_output(tmp_path, seed, threads):
    """Matrices of one threaded loop (Q, K, V; gate, up) may each have their own type."""
    path = tiny(tmp_path, seed, qtype=Q.Q4_1, overrides=MIXED, tied=False)
    compare(path, seed, threads)


def test_widened_q4_1_scales_give_the_same_bits(tmp_path, seed, threads):
    """The decode's Q4_1 loop reading the block scales widened ahead of time (`split_scales`)
    computes the same weights and FMAs as the one reading them from the blocks: identical
    logits and caches, with Q4_1 among other types in one loop."""
    model = read_gguf(tiny(tmp_path, seed, qtype=Q.Q4_1, overrides=MIXED, tied=False))
    tfs = [Transformer(model, NumpyBackend(threads=min(threads, 2))) for _ in range(2)]
    split = fused_decode.FusedDecoder.build(tfs[0], threads)
    codes, starts = split.table[:, fused_decode._CODE], split.table[:, fused_decode._SCALES]
    q4_1 = codes == int(Q.Q4_1)
    assert q4_1.any() and (starts[q4_1] >= 0).all() and (starts[~q4_1] == -1).all()
    blocks = split.table[q4_1, fused_decode._ROWS] * split.table[q4_1, fused_decode._ROW_BYTES]
    assert split.scales.size == 2 * int(blocks.sum()) // 20  # d and m of every Q4_1 block
    plain = fused_decode.FusedDecoder(tfs[1], split.blob, split.table.copy(), threads)
    plain.table[:, fused_decode._SCALES] = -1
    plain.scales = np.empty(0, np.float32)
    tfs[0]._decode_fused, tfs[1]._decode_fused = split, plain
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.spec.vocab_size, size=5)
    caches = [tf.new_cache() for tf in tfs]
    token = int(np.argmax(tfs[0].prefill(prompt, caches[0])))
    tfs[1].prefill(prompt, caches[1])
    for i in range(4):
        got, want = (tf.decode_one_token(token, c) for tf, c in zip(tfs, caches))
        assert np.array_equal(got, want), f"step {i}, seed={seed}"
        token = int(np.argmax(got))
    assert np.array_equal(caches[0].k, caches[1].k) and np.array_equal(caches[0].v, caches[1].v)


def test_fused_is_the_default_and_times_each_layer(tiny_model):
    engine = Engine(tiny_model, backend="numpy")
    n_layers = engine.spec.n_layers
    engine.generate([5, 6, 7], GenerationConfig(max_tokens=4, temperature=0)).run()
    layers = [r.shapes["layer"] for r in engine.profiler.records(name="decode_layer")]
    heads = engine.profiler.records(name="decode_head")
    # 4 tokens: the first comes from the prefill, then 3 decode steps of every layer.
    assert layers == list(range(n_layers)) * 3
    assert len(heads) == 3 and all(r.phase == "decode" for r in heads)
    assert all(r.bytes > 0 and r.flops > 0 for r in heads)
    # The per-operation kernels do not run at decode time.
    assert not engine.profiler.records(name="attention_decode")


def test_weights_outside_one_file_map_use_the_per_operation_path(tiny_model):
    tf = Transformer(read_gguf(tiny_model), NumpyBackend())
    lw = tf.layers[0]
    lw.attn_q = type(lw.attn_q)(
        lw.attn_q.name, lw.attn_q.qtype, lw.attn_q.shape, np.array(lw.attn_q.data)
    )
    assert fused_decode.FusedDecoder.build(tf, 1) is None


def test_warm_up_compiles_what_a_real_model_runs(tiny_model):
    """After warm_up, decoding (with and without per-layer timing) compiles nothing new."""
    NumpyBackend().warm_up()
    kernels = (fused_decode._team_step,)
    before = [len(k.signatures) for k in kernels]
    assert all(before)
    engine = Engine(tiny_model, backend="numpy")
    for profiling in (False, True):
        engine.profiler.enabled = profiling
        engine.generate([5, 6], GenerationConfig(max_tokens=3, temperature=0)).run()
    assert [len(k.signatures) for k in kernels] == before


def test_team_runs_every_thread_and_restarts_helpers_that_are_gone():
    """Every tid runs once per call; helpers that no longer run (closed, or absent in a forked
    child) are started again by the next call; a helper's exception reaches the caller."""
    team = fused_decode._Team(3)
    seen: list[int] = []
    lock = threading.Lock()

    def record(tid: int, out: list[int]) -> None:
        with lock:
            out.append(tid)

    team.run(record, (seen,))
    assert sorted(seen) == [0, 1, 2]
    team.close()
    for th in team._threads:
        th.join(60)
    assert not any(th.is_alive() for th in team._threads)
    seen.clear()
    team.run(record, (seen,))
    assert sorted(seen) == [0, 1, 2]

    def fail_in_helper(tid: int) -> None:
        if tid == 2:
            raise ValueError("helper failed")

    with pytest.raises(ValueError, match="helper failed"):
        team.run(fail_in_helper, ())
    team.close()
