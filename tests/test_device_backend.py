"""The engine on the device backend (HIP kernels, run by the CPU emulator) against NumPy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.synth import TinyConfig, write_tiny_llama
from workbench.backends.device import DeviceBackend
from workbench.engine.generate import Engine, GenerationConfig
from workbench.gguf.quants import SUPPORTED_TYPES
from workbench.kernels import ops_kernels as ops
from workbench.kernels import quant_kernels as qk
from workbench.runtime import faults
from workbench.runtime.faults import FaultInjector


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "F16"])
def test_emulator_logits_match_numpy(tiny_models, kind, rng):
    path = tiny_models[kind]
    tokens = rng.integers(3, 200, size=9)
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


@pytest.mark.parametrize("kind", ["Q8_0", "F32"])
def test_fused_decode_launches_at_most_8_kernels_per_layer(tiny_models, kind):
    """The profiler's records of a decoded token, each carrying the kernels its operation
    launched: a layer (from its Q/K/V launch to its down projection, the first layer's RMSNorm
    included) runs at most 8 kernels (7 after the first), the token 7 * layers + 4 in all."""
    dev = Engine(tiny_models[kind], backend="emulator")
    n_layers = dev.transformer.spec.n_layers
    dev.generate("the cat", GenerationConfig(max_tokens=3, temperature=0), request_id="d").run()
    recs = [r for r in dev.profiler.records(request_id="d") if r.phase == "decode"]
    tokens = [i for i, r in enumerate(recs) if r.name.startswith("get_rows_")]
    assert len(tokens) >= 1
    for t0, t1 in zip(tokens, [*tokens[1:], len(recs)], strict=True):
        token = recs[t0:t1]
        ropes = [i for i, r in enumerate(token) if r.name == "rope_kv"]
        assert len(ropes) == n_layers, [r.name for r in token]
        # layer i: from its Q/K/V product (just before rope_kv) to the record before the next's
        starts = [1] + [i - 1 for i in ropes[1:]]  # layer 0 from its norm (after get_rows)
        ends = [i - 1 for i in ropes[1:]] + [len(token) - 2]  # then the logits and the pick
        per_layer = [sum(r.launches for r in token[a:b]) for a, b in zip(starts, ends, strict=True)]
        assert max(per_layer) <= 8 and per_layer[1:] == [7] * (n_layers - 1), per_layer
        assert sum(r.launches for r in token) == 7 * n_layers + 4, [r.name for r in token]


def test_fused_decode_with_mixed_weight_types(tmp_path, rng):
    """Q/K/V or gate/up of different types fall back to one product per matrix (and SwiGLU and
    quantize launches): decode logits stay within KL 0.01 of the NumPy backend's."""
    mixed = (("attn_v", Q.Q8_0), ("ffn_up", Q.Q5_0), ("attn_output", Q.F16))
    path = write_tiny_llama(
        tmp_path / "mixed.gguf", TinyConfig(qtype=Q.Q4_1, overrides=mixed), seed=3
    )
    tokens = rng.integers(3, 200, size=6)
    ref = Engine(path, backend="numpy").transformer
    dev = Engine(path, backend="emulator").transformer
    ca, cb = ref.new_cache(), dev.new_cache()
    ref.prefill(tokens[:3], ca)
    dev.prefill(tokens[:3], cb)
    for t in tokens[3:]:
        assert _kl(ref.decode_one_token(int(t), ca), dev.decode_one_token(int(t), cb)) < 0.01


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


def test_every_module_is_built_at_start_with_progress():
    """Compile errors and the compile retry act when the backend starts, never inside a forward
    pass: all nine modules (five operation sources, four quantized operations) are built in
    the constructor, each announced to the progress callback, a transient fault retried."""
    seen: list[tuple[int, int, str]] = []
    with faults.injecting(FaultInjector.from_spec("compile:once")) as injector:
        be = DeviceBackend("emulator", progress=lambda *a: seen.append(a))
    assert injector.injected("compile") == 1  # failed once, retried, built
    sources = [*ops.SOURCES, *(qk.SOURCES[op] for op in qk.OPERATIONS)]
    assert seen == [(i, 9, src) for i, src in enumerate(sources)] + [(9, 9, "")]
    assert set(be._ops) == set(ops.SOURCES)


def test_a_lost_device_context_is_fatal_for_the_device(tiny_model):
    """A kernel that traps (WB_ASSERT) or faults kills the device context: that error is not
    retried, the breaker opens at once, the request finishes on the CPU and no later request
    touches the device."""
    cfg = GenerationConfig(max_tokens=6, temperature=0)
    expected = Engine(tiny_model, backend="numpy").generate("the cat", cfg).run().token_ids
    engine = Engine(tiny_model, backend="emulator")
    backend = engine.transformer.backend.backend
    real, calls = backend.rmsnorm, []
    runtime_error = type("CUDARuntimeError", (RuntimeError,), {})

    def trapped(*args):
        calls.append(1)
        if len(calls) >= 3:  # mid-prefill: the device dies
            raise runtime_error("hipErrorIllegalInstruction: an illegal instruction")
        return real(*args)

    engine.transformer.backend.rmsnorm = engine.transformer.backend._wrap("rmsnorm", trapped)
    assert engine.generate("the cat", cfg).run().token_ids == expected
    assert len(calls) == 3  # no retry of the trapped launch
    assert engine.breaker is not None and engine.breaker.state == "open"
    assert engine.state()["backend"] == "numpy"
    (rec,) = engine.error_log.query(code="device.context_lost")
    assert rec.operation == "forward"
    assert engine.retry_stats.snapshot().get("launch", {}).get("retries", 0) == 0
    engine.breaker.reset()  # even a closed breaker does not bring a dead device back
    assert engine.generate("an", cfg).run().token_ids
    assert len(calls) == 3


# --- the CuPy backend on a real GPU (make test-gpu) ---------------------------------------------
# These are the only tests that count as evidence that the CuPy path works: they need a GPU and
# skip without one, saying why. (tests/test_targets.py drives cupy_target through a test double:
# that checks our wrapper logic, not CuPy or a GPU.)


def gpu_unusable_reason() -> str | None:
    """Why the CuPy backend cannot run here, or None when a GPU is usable."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (make test-gpu installs the right build)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no runtime library
        return f"CuPy finds no usable GPU: {type(e).__name__}: {e}"
    return None if count > 0 else "CuPy sees no GPU"


class KernelTarget:
    """Arrays and kernel modules of one target: "cupy" (the GPU) or "emulator"."""

    def __init__(self, name: str, cache_dir: str) -> None:
        from workbench.kernels import ops_kernels as ops
        from workbench.kernels import quant_kernels as qk

        self.name = name
        if name == "cupy":
            from workbench.kernels.cupy_target import import_cupy, warp_size

            self.xp = import_cupy()
            self.warp_size = warp_size(self.xp)
            self.quant = qk.cupy_loader()
            self._load = lambda src: ops.load_module(src, "cupy")
        else:
            self.xp, self.warp_size = np, 64
            self.quant = qk.emulator_loader(64, cache_dir)
            self._load = lambda src: ops.load_module(src, warp_size=64, cache_dir=cache_dir)
        self._modules: dict[str, object] = {}

    def ops(self, source: str):
        if source not in self._modules:
            self._modules[source] = self._load(source)
        return self._modules[source]

    def put(self, a: np.ndarray):
        return self.xp.array(a)  # a copy on both targets: kernels that work in place

    def get(self, a) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> KernelTarget:
    reason = gpu_unusable_reason()
    if reason is not None:
        if os.environ.get("WORKBENCH_REQUIRE_GPU") == "1":  # make test-gpu: a skip proves nothing
            pytest.fail(reason)
        pytest.skip(reason)
    return KernelTarget("cupy", str(tmp_path_factory.mktemp("gpu")))


@pytest.fixture
def seeded():
    seed = int(np.random.SeedSequence().entropy % 2**63)
    return np.random.default_rng(seed), f"seed={seed}"


def check_quant_kernels(t: KernelTarget, rng: np.random.Generator, seed: str, qtype) -> None:
    """dequant and get_rows bit-identical to gguf; matvec within the float32 bound of W @ x (the
    float types) or W @ x8 (x rounded to Q8_1: the integer path), matmul of W @ x."""
    from tests.test_kernels_quant import (
        _blocks,
        _cols_for,
        _dot_tolerance,
        assert_matvec_within_bound,
    )
    from workbench.kernels import quant_kernels as qk

    for rows, cols in ((1, _cols_for(qtype)[0]), (33, _cols_for(qtype)[-1])):
        raw = _blocks(rng, qtype, rows, cols)
        w = qk.dequant_reference(raw, qtype)
        what = f"{seed} {qtype.name} {rows}x{cols} on {t.name}"
        out = t.put(np.full((rows, cols), np.nan, np.float32))
        qk.launch_dequant(t.quant, qtype, t.put(raw), out)
        assert np.array_equal(t.get(out).view(np.uint32), w.view(np.uint32)), f"dequant {what}"
        ids = rng.integers(0, rows, 5).astype(np.int32)
        out = t.put(np.full((5, cols), np.nan, np.float32))
        qk.launch_get_rows(t.quant, qtype, t.put(ids), t.put(raw), out)
        got, ref = t.get(out), qk.get_rows_reference(ids, raw, qtype)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), f"get_rows {what}"
        x = rng.standard_normal(cols).astype(np.float32)
        out = t.put(np.full(rows, np.nan, np.float32))
        qk.launch_matvec(t.quant, qtype, t.put(raw), t.put(x), out, t.warp_size)
        assert_matvec_within_bound(t.get(out), raw, x, qtype, f"matvec {what}")
        x = rng.standard_normal((17, cols)).astype(np.float32)
        out = t.put(np.full((17, rows), np.nan, np.float32))
        qk.launch_matmul(t.quant, qtype, t.put(x), t.put(raw), out)
        tol = _dot_tolerance(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)).T, cols)
        err = np.abs(t.get(out) - qk.matmul_reference(x, raw, qtype))
        assert np.all(err <= tol), f"matmul {what}: max err {err.max()}"


def check_ops_kernels(t: KernelTarget, rng: np.random.Generator, seed: str) -> None:
    """Every operation kernel against its NumPy reference (tolerances of test_kernels_ops)."""
    from workbench.kernels import ops_kernels as ops

    def randn(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x, w = randn(17, 1000, scale=3.0), randn(1000)
    got = t.get(ops.rmsnorm(t.ops("rmsnorm.hip"), t.put(x), t.put(w), 1e-5))
    np.testing.assert_allclose(got, ops.rmsnorm_reference(x, w, 1e-5), 1e-5, 1e-6, err_msg=seed)
    for mode in ("norm", "neox"):
        x = randn(5, 3, 64)
        xd = t.put(x)
        ops.rope(t.ops("rope.hip"), xd, 7, mode=mode, rope_dim=48, base=10000.0)
        ref = ops.rope_reference(x, 7, mode=mode, rope_dim=48, base=10000.0)
        np.testing.assert_allclose(t.get(xd), ref, 0, 2e-6, err_msg=f"{seed} rope_{mode}")
    q, k, v = randn(9, 6, 64), randn(2, 40, 64), randn(2, 40, 64)
    m = t.ops("attention.hip")
    got = t.get(ops.attention(m, t.put(q), t.put(k), t.put(v), 20))
    ref = ops.attention_reference(q, k, v, 20)
    np.testing.assert_allclose(got, ref, 1e-5, 3e-6, err_msg=f"{seed} attention_prefill")
    got = t.get(ops.attention(m, t.put(q[:1]), t.put(k), t.put(v), 39))
    ref = ops.attention_reference(q[:1], k, v, 39)
    np.testing.assert_allclose(got, ref, 1e-5, 3e-6, err_msg=f"{seed} attention_decode")
    m = t.ops("elementwise.hip")
    a, b = randn(1537), randn(1537)
    np.testing.assert_allclose(
        t.get(ops.swiglu(m, t.put(a), t.put(b))), ops.swiglu_reference(a, b), 1e-6, 1e-7
    )
    np.testing.assert_array_equal(t.get(ops.add(m, t.put(a), t.put(b))), a + b)
    kn, vn, kc, vc = randn(3, 2, 64), randn(3, 2, 64), randn(2, 40, 64), randn(2, 40, 64)
    kcd, vcd = t.put(kc), t.put(vc)
    ops.kv_append(m, t.put(kn), t.put(vn), kcd, vcd, 11)
    ref_k, ref_v = ops.kv_append_reference(kn, vn, kc, vc, 11)
    np.testing.assert_array_equal(t.get(kcd), ref_k)
    np.testing.assert_array_equal(t.get(vcd), ref_v)
    m = t.ops("sampling.hip")
    logits = randn(3, 49152, scale=4.0)
    got = t.get(ops.argmax(m, t.put(logits)))
    np.testing.assert_array_equal(got, ops.argmax_reference(logits), err_msg=seed)
    got = t.get(ops.softmax(m, t.put(logits), 0.7))
    np.testing.assert_allclose(got, ops.softmax_reference(logits, 0.7), 2e-5, 1e-9)
    for top_k, top_p, min_p, u in ((1, 1.0, 0.0, 0.5), (40, 0.9, 0.05, 0.3), (128, 1.0, 0.0, 0.99)):
        row = logits[0]
        got = int(t.get(ops.sample(m, t.put(row), top_k=top_k, top_p=top_p, min_p=min_p,
                                   temperature=0.8, u=u))[0])  # fmt: skip
        ref = ops.sample_reference(row, top_k=top_k, top_p=top_p, min_p=min_p, temperature=0.8,
                                   u=u)  # fmt: skip
        assert got == ref, f"{seed} sample top_k={top_k} top_p={top_p} u={u}"


@pytest.mark.parametrize("qtype", [pytest.param(q, id=q.name) for q in SUPPORTED_TYPES])
def test_the_gpu_checks_hold_on_the_emulator(shared_emu_cache, seeded, qtype):
    """The checks below run only where a GPU is; on the emulator too, so that a check which no
    longer matches its kernels fails here rather than first on a lent GPU (the first GPU run
    compared the integer matvec's W @ x8 with W @ x under the float32 bound)."""
    t = KernelTarget("emulator", shared_emu_cache)
    check_quant_kernels(t, *seeded, qtype)
    if qtype == Q.Q8_0:  # once
        check_ops_kernels(t, *seeded)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [pytest.param(q, id=q.name) for q in SUPPORTED_TYPES])
def test_gpu_quant_kernels_match_their_references(gpu, seeded, qtype):
    check_quant_kernels(gpu, *seeded, qtype)


@pytest.mark.gpu
def test_gpu_operation_kernels_match_their_references(gpu, seeded):
    check_ops_kernels(gpu, *seeded)


@pytest.mark.gpu
def test_gpu_backend_builds_every_module_at_start(gpu, tmp_path):
    from workbench.backends.device import DeviceBackend
    from workbench.kernels import cupy_target

    seen: list[tuple[int, int, str]] = []
    be = DeviceBackend("cupy", progress=lambda *a: seen.append(a))
    props = gpu.xp.cuda.runtime.getDeviceProperties(gpu.xp.cuda.Device().id)
    assert be.warp_size == props["warpSize"]
    total = seen[-1][1]
    assert [s[0] for s in seen] == list(range(total + 1)) and total == 9
    # The code objects are on disk: a new process (here: an emptied in-process cache) loads
    # them instead of compiling.
    cupy_target.clear_cache()
    entries = sorted(cupy_target.default_cache_dir().glob("*.bin"))
    if entries:  # this CuPy offers the compiler entry points our disk cache needs
        before = {p: p.stat().st_mtime_ns for p in entries}
        DeviceBackend("cupy")
        assert {p: p.stat().st_mtime_ns for p in entries} == before


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "F16"])
def test_gpu_greedy_tokens_equal_numpy(gpu, tiny_models, kind):
    cfg = GenerationConfig(max_tokens=12, temperature=0)
    a = Engine(tiny_models[kind], backend="numpy").generate("the cat", cfg).run()
    b = Engine(tiny_models[kind], backend="cupy").generate("the cat", cfg).run()
    assert a.token_ids == b.token_ids and a.text == b.text


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_smollm2_greedy_tokens_equal_numpy(gpu):
    from workbench import store
    from workbench.engine.loader import load

    try:
        path = store.resolve("smollm2", store.default_home())
    except Exception as e:
        if getattr(e, "code", "") == "model.download_failed":
            pytest.skip(f"cannot download the model: {e}")
        raise
    model = load(path)
    cfg = GenerationConfig(max_tokens=32, temperature=0)
    prompt = [{"role": "user", "content": "Explain in two sentences what a GPU kernel is."}]
    a = Engine(model, backend="numpy").chat(prompt, cfg).run()
    dev = Engine(model, backend="cupy")
    b = dev.chat(prompt, cfg).run()
    assert a.token_ids == b.token_ids
    assert not dev.fallback_active  # every token came from the GPU
