"""`workbench bench generate`: the figures it reports and the machine limits it divides by."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import replace

import numpy as np
import pytest
from numba import njit

from workbench.backends import quant_cpu
from workbench.cli import main
from workbench.engine import limits
from workbench.engine.bench import (
    PROFILE_REQUEST,
    bench_generate,
    median_interval,
    paired_gemm_fraction,
    phase_profile,
    prefill_flops,
)
from workbench.engine.generate import Engine
from workbench.observe.profiler import Profiler


@pytest.fixture
def small_read_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests read 1 MB, not a buffer larger than the last-level cache."""
    monkeypatch.setattr(limits, "_MIN_READ_BYTES", 1 << 20)
    monkeypatch.setattr(limits, "last_level_cache_bytes", lambda: 0)


def test_prefill_flops_counts_products_attention_and_logits(tiny_model):
    engine = Engine(tiny_model, backend="numpy")
    s = engine.spec
    n = 7
    q, kv, ffn = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, 128  # TinyConfig's ffn_dim
    per_token = s.dim * (2 * q + 2 * kv) + 3 * s.dim * ffn  # q, o, k, v, gate, up, down
    causal = 2 * 2 * q * (1 + 2 + 3 + 4 + 5 + 6 + 7)  # QK^T and PV over the visible positions
    want = s.n_layers * (2 * n * per_token + causal) + 2 * s.vocab_size * s.dim
    assert prefill_flops(engine, n) == want


def test_bench_reports_fractions_of_the_measured_limits(tiny_model, small_read_buffer):
    engine = Engine(tiny_model, backend="numpy", threads=1)
    r = bench_generate(engine, prompt_tokens=8, gen_tokens=4, runs=1)
    assert r.threads == 1 and len(r.prefill_s) == len(r.decode_s) == 1
    assert r.read_gb_s > 0 and r.gemm_gflops > 0
    assert r.decode_bandwidth_fraction == pytest.approx(r.decode_gb_s / r.read_gb_s)
    assert r.prefill_gflops == pytest.approx(r.prefill_flops / r.prefill_s[0] / 1e9)
    assert r.prefill_gemm_fraction == pytest.approx(r.prefill_gflops / r.gemm_gflops)
    assert r.prefill_gemm_fraction_paired > 0


def test_the_paired_fraction_times_each_prefill_back_to_back_with_the_products() -> None:
    """Alternating order after a warm-up pair; each pair's ratio of rates, then the median: a
    load that slows both alike leaves it unchanged."""
    calls, load = [], iter([1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 5.0, 5.0])

    def prefill() -> float:
        calls.append("p")
        return 2.0 * next(load)  # seconds: half the products' rate when both see one load

    def products() -> float:
        calls.append("g")
        return 1.0 * next(load)

    got = paired_gemm_fraction(prefill, 10**9, 10**9, products, pairs=5)
    assert got == pytest.approx(0.5)
    assert "".join(calls) == "pg" + "gppggppggp"  # the warm-up pair, then AB BA AB BA AB


def test_bench_profile_breaks_each_phase_down_by_kernel(tiny_model, small_read_buffer):
    engine = Engine(tiny_model, backend="numpy", threads=1)
    n, gen = 8, 4
    for enabled in (False, True):
        engine.profiler.enabled = enabled
        engine.profiler.clear()
        r = bench_generate(engine, prompt_tokens=n, gen_tokens=gen, runs=2, profile=True)
        assert engine.profiler.enabled == enabled, "the profiler is left as it was"
    assert r.profile_dropped == 0 and set(r.profile) == {"prefill", "decode"}
    records = engine.profiler.records()
    assert {rec.request_id for rec in records} == {records[0].request_id}, "one run's records"
    assert records[0].request_id.startswith(PROFILE_REQUEST)
    # Every product and the attention of exactly one prefill: the flops bench reports
    products = [rec for rec in records if rec.phase == "prefill" and rec.flops is not None]
    work = sum(rec.flops for rec in products if rec.name.startswith(("mat", "attention")))
    assert work == prefill_flops(engine, n)
    assert sum(rec.name == "decode_layer" for rec in records) == gen * engine.spec.n_layers
    for phase, p in r.profile.items():
        names = [k["name"] for k in p["kernels"]]
        assert ("attention_prefill" if phase == "prefill" else "decode_layer") in names
        assert p["other_s"] == pytest.approx(p["wall_s"] - sum(k["total_s"] for k in p["kernels"]))
        for k in p["kernels"]:
            assert k["share"] == pytest.approx(k["total_s"] / p["wall_s"])
            if k["gflop_s"] is not None:
                assert k["gemm_fraction"] == pytest.approx(k["gflop_s"] / r.gemm_gflops)
            if k["gb_s"] is not None:
                assert k["read_fraction"] == pytest.approx(k["gb_s"] / r.read_gb_s)
        assert [k["total_s"] for k in p["kernels"]] == sorted(
            (k["total_s"] for k in p["kernels"]), reverse=True
        )
    matmul = next(k for k in r.profile["prefill"]["kernels"] if k["name"].startswith("matmul"))
    assert matmul["gflop_s"] > 0 and matmul["gb_s"] > 0


def test_phase_profile_leaves_the_fractions_out_where_a_kernel_has_no_figure() -> None:
    """A copy (bytes, no flops) reads as None against the GEMM rate; no cost model at all, as
    None against both limits; the wall time outside the kernels is what is left."""
    prof = Profiler()
    for name, nbytes, flops in (
        ("kv_append", 4 * 10**6, 0),
        ("matmul", 8_000, 10**6),
        ("x", None, None),
    ):
        where = {"phase": "prefill", "request_id": "r"}
        prof.record(name, backend="numpy", duration_s=1e-3, bytes=nbytes, flops=flops, **where)
    p = phase_profile(prof, "prefill", 4e-3, "r", gemm_gflops=2.0, read_gb_s=8.0)
    kernels = {k["name"]: k for k in p["kernels"]}
    copy = kernels["kv_append"]
    assert copy["gflop_s"] is None and copy["gemm_fraction"] is None
    assert copy["read_fraction"] == pytest.approx(4.0 / 8.0)
    assert kernels["matmul"]["gemm_fraction"] == pytest.approx(1.0 / 2.0)
    assert kernels["x"]["gb_s"] is None and kernels["x"]["read_fraction"] is None
    assert p["other_s"] == pytest.approx(1e-3)


def test_bench_without_profile_records_nothing(tiny_model):
    engine = Engine(tiny_model, backend="numpy", threads=1)
    engine.profiler.enabled = True  # as `--profile` leaves it; the timed runs still are not
    r = bench_generate(engine, prompt_tokens=4, gen_tokens=2, runs=1, measure_limits=False)
    assert r.profile is None and r.profile_dropped is None and len(engine.profiler) == 0
    assert engine.profiler.enabled


def test_bench_without_limits_leaves_them_out(tiny_model):
    engine = Engine(tiny_model, backend="numpy", threads=1)
    r = bench_generate(engine, prompt_tokens=4, gen_tokens=2, runs=1, measure_limits=False)
    assert r.read_gb_s is None and r.decode_bandwidth_fraction is None
    assert r.prefill_gflops > 0


def test_bench_trace_times_traced_runs_beside_untraced_ones(tiny_model):
    from workbench.observe import tracing

    engine = Engine(tiny_model, backend="numpy", threads=1)
    r = bench_generate(engine, prompt_tokens=4, gen_tokens=3, runs=2, measure_limits=False)
    assert r.trace_decode_tok_s is None and r.trace_spans is None  # not asked for
    r = bench_generate(
        engine, prompt_tokens=4, gen_tokens=3, runs=2, measure_limits=False, trace=True
    )
    # a warm-up and 2 traced runs, each a generation span with a prefill and a decode child
    assert r.trace_spans == 3 * 3 and not r.trace_steps
    assert r.trace_decode_tok_s > 0 and r.trace_prefill_tok_s > 0
    assert len(r.decode_s) == len(r.trace_decode_s) == len(r.trace_pair_overheads) == 2
    want = [1 - u / t for u, t in zip(r.decode_s, r.trace_decode_s)]
    assert r.trace_pair_overheads == pytest.approx(want)
    assert r.trace_decode_overhead == pytest.approx(statistics.median(want))
    assert r.trace_overhead_interval is None  # 2 pairs are too few for a 95 % interval
    assert -1 < r.trace_step_overhead < 1 and r.trace_step_overhead_interval is None
    assert r.trace_call_us_off is not None and r.trace_call_us_on is not None
    r = bench_generate(
        engine, prompt_tokens=4, gen_tokens=3, runs=1, measure_limits=False, trace_steps=True,
        trace=True,
    )  # fmt: skip
    assert r.trace_spans == 2 * (3 + 3) and r.trace_steps  # and a span per decode step
    assert not tracing.enabled()  # the bench's in-memory tracing ends with it


def test_bench_trace_interleaves_pairs_in_abba_order(tiny_model, monkeypatch):
    """An untraced and a traced generation decode together a token at a time, untraced then
    traced, traced then untraced, ...; the next pair starts the other way (prefills too)."""
    from workbench.observe import tracing

    engine = Engine(tiny_model, backend="numpy", threads=1)
    tf, seen = engine.transformer, {"prefill": [], "decode_one_token": []}

    def spy(name):
        real = getattr(tf, name)

        def call(*args, **kwargs):
            seen[name].append(tracing.current_trace_id() is not None)  # a traced run's span
            return real(*args, **kwargs)

        return call

    for name in seen:
        monkeypatch.setattr(tf, name, spy(name))
    r = bench_generate(
        engine, prompt_tokens=4, gen_tokens=3, runs=2, measure_limits=False, trace=True
    )
    U, T = False, True  # untraced, traced
    assert seen["prefill"] == [U, T, T, U, U, T]  # the warm-up pair, then 2 pairs
    abba, baab = [U, T, T, U, U, T], [T, U, U, T, T, U]
    assert seen["decode_one_token"] == abba + baab + abba
    assert len(r.trace_pair_overheads) == 2


@pytest.mark.parametrize(
    ("n", "want"),
    [(5, None), (6, (1, 6)), (10, (2, 9)), (20, (6, 15))],  # 1-based order statistics
)
def test_median_interval_takes_the_binomial_order_statistics(n, want, rng):
    values = rng.permutation(np.arange(1.0, n + 1))  # the k-th smallest is k
    got = median_interval(list(values))
    assert got == (None if want is None else [float(w) for w in want])
    if want is not None:  # the interval covers the median at 95 % or more, and k is the largest
        k = want[0]
        tail = sum(math.comb(n, j) for j in range(k)) / 2**n
        assert tail <= 0.025 < tail + math.comb(n, k) / 2**n


def test_cli_json_has_the_limit_fields(tiny_model, small_read_buffer, capsys):
    argv = ["bench", "generate", "-m", str(tiny_model), "--prompt-tokens", "6", "--gen-tokens",
            "3", "--runs", "1", "--threads", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    for key in ("decode_gb_s", "decode_bandwidth_fraction", "prefill_gflops",
                "prefill_gemm_fraction", "prefill_gemm_fraction_paired", "read_gb_s",
                "gemm_gflops"):  # fmt: skip
        assert obj[key] > 0, key
    assert obj["profile"] is None


def test_bench_says_when_a_kernel_was_compiled_in_the_process(tiny_model, monkeypatch):
    engine = Engine(tiny_model, backend="numpy")
    prefill = engine.transformer.prefill

    def prefill_compiling(*args, **kwargs):
        @njit  # a fresh dispatcher: its first call compiles
        def one(x):
            return x + 1

        one(1)
        return prefill(*args, **kwargs)

    monkeypatch.setattr(engine.transformer, "prefill", prefill_compiling)
    r = bench_generate(engine, prompt_tokens=4, gen_tokens=2, runs=1, measure_limits=False)
    assert r.kernels_compiled is True


def test_cli_notes_a_peak_that_includes_compiling(tiny_model, monkeypatch, capsys):
    import workbench.engine.bench as bench

    real = bench.bench_generate
    monkeypatch.setattr(
        bench, "bench_generate", lambda *a, **k: replace(real(*a, **k), kernels_compiled=True)
    )
    argv = ["bench", "generate", "-m", str(tiny_model), "--prompt-tokens", "4", "--gen-tokens",
            "2", "--runs", "1", "--threads", "1", "--no-limits"]  # fmt: skip
    assert main(argv) == 0
    assert "kernels were compiled in this run" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernels_compiled"] is True


def test_cli_profile_prints_each_phase_by_kernel(tiny_model, small_read_buffer, capsys):
    argv = ["bench", "generate", "-m", str(tiny_model), "--prompt-tokens", "6", "--gen-tokens",
            "3", "--runs", "1", "--threads", "1", "--profile"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    prefill, decode = out.split("\nprefill: ")[1].split("\ndecode: ")
    assert "ms/token" not in prefill and "ms/token" in decode.splitlines()[0]
    for table, kernel in ((prefill, "matmul_"), (decode, "decode_layer")):
        header, *rows = table.splitlines()[1:]
        assert header.split() == ["kernel", "calls", header.split()[2], "share", "GFLOP/s", "of",
                                  "GEMM", "GB/s", "of", "read"]  # fmt: skip
        assert any(row.split()[0].startswith(kernel) for row in rows), table
        assert rows[-1].split()[0] == "(between"
    assert main([*argv, "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["profile_dropped"] == 0 and obj["profile"]["decode"]["kernels"]


@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_the_bandwidth_probe_reads_every_value_once(n):
    buf = np.arange(1, n + 1, dtype=np.float32)  # exact in float32: every partial sum < 2**24
    for chunks in (1, 3, 8):
        assert limits._stream_sum(buf, chunks) == n * (n + 1) // 2


def test_gemm_rate_times_each_shape_at_the_prompt_length(monkeypatch):
    import numba

    from workbench.backends import quant_gemm

    seen = []  # numba's thread count while the prefill's own kernel is timed
    kernel = quant_gemm.gemm_cols
    monkeypatch.setattr(
        quant_gemm, "gemm_cols", lambda *a: seen.append(numba.get_num_threads()) or kernel(*a)
    )
    before = numba.get_num_threads()
    # 2: also the row-sliced products on a thread each (where numba may run 2)
    for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        gflops, timed = limits.gemm_rate({(48, 32): 2, (16, 32): 1}, n=5, threads=threads, reps=1)
        assert gflops > 0
        assert timed == [(5, 16, 32), (5, 48, 32)]
        if quant_gemm.FUSED_TYPES:  # the prefill's own kernel too (CPUs with AVX-512)
            assert set(seen) == {threads} and len(seen) == 2 * 3, "2 passes of 3 products"
        assert numba.get_num_threads() == before
        seen.clear()


def test_default_threads_are_the_physical_cores():
    cores = quant_cpu.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert quant_cpu.default_threads() == min(cores, quant_cpu.numba.config.NUMBA_NUM_THREADS)
