"""`workbench bench kernels` on the emulator: timing by budget, cost-model rates, JSON shape."""

from __future__ import annotations

import json

import pytest

from workbench.cli import main
from workbench.engine import kernel_bench as kb
from workbench.errors import UserError
from workbench.kernels.registry import all_kernels, get


def test_bench_two_small_kernels_on_the_emulator() -> None:
    results = kb.bench_kernels(
        ["add", "swiglu"],  # one source: one emulator compile
        shapes=[],
        backend="emulator",
        warmup_ms=1,
        rep_ms=5,
    )
    assert [r.kernel for r in results] == ["add", "swiglu"]
    for r in results:
        spec = get(r.kernel)
        assert r.shape == dict(spec.shapes[0])
        assert r.backend == "emulator" and "not GPU" in r.timing and not r.l2_flush
        assert r.reps >= 1 and r.warmup_reps >= 1
        assert 0 < r.min_ms <= r.p50_ms <= r.p95_ms <= r.p99_ms
        cost = spec.cost(**r.shape)
        assert (r.bytes, r.flops) == (cost.bytes, cost.flops)
        assert r.gb_s == pytest.approx(cost.bytes / (r.p50_ms / 1e3) / 1e9)
        assert r.intensity == pytest.approx(cost.flops / cost.bytes)
        assert r.roof_fraction is None and r.peak_gb_s is None  # no roof for the emulator


def test_shape_override_and_quantized_inputs() -> None:
    (r,) = kb.bench_kernels(
        ["matvec_q8_0"], shapes=[{"rows": 64, "cols": 64}], backend="emulator",
        warmup_ms=0, rep_ms=1,
    )  # fmt: skip
    assert r.shape == {"rows": 64, "cols": 64}
    assert r.bytes == get("matvec_q8_0").cost(rows=64, cols=64).bytes


def test_every_kernel_has_an_input_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The factories cover the registry: a new kernel without one fails here, not in the CLI.
    (Inputs are built at each representative shape; nothing is compiled or launched.)"""
    target = kb._Target("emulator", 64)
    monkeypatch.setattr(target, "ops_module", lambda source: object())
    for spec in all_kernels().values():
        shape = kb.resolve_shape(spec, None)
        assert callable(kb._factory(spec, target, shape)), spec.name


def test_cli_json_is_a_list_of_objects(capsys) -> None:
    rc = main(["bench", "kernels", "--kernel", "add", "--kernel", "swiglu", "--shape",
               "count=256", "--backend", "emulator", "--warmup-ms", "1", "--rep-ms", "3",
               "--json"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["kernel"] for o in out] == ["add", "swiglu"]
    for o in out:
        assert o["shape"] == {"count": 256}
        for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "gb_s", "gflop_s", "intensity"):
            assert isinstance(o[key], float)
        assert o["roof_fraction"] is None and o["device"] == "CPU emulator"


def test_cli_table_labels_emulator_timings(capsys) -> None:
    rc = main(["bench", "kernels", "--kernel", "add", "--backend", "emulator",
               "--warmup-ms", "0", "--rep-ms", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "not GPU timings" in out and "no L2 flush" in out and "roofline: n/a" in out
    assert out.splitlines()[-1].split()[0] == "add"


def test_roofline_position_from_the_device_table() -> None:
    peak = kb.device_peak("AMD Instinct MI300X")
    assert peak is not None and peak.name == "MI300X"
    assert kb.device_peak("NVIDIA H100 PCIe").name == "H100 PCIe"  # type: ignore[union-attr]
    assert kb.device_peak("NVIDIA H100 80GB HBM3").name == "H100"  # type: ignore[union-attr]
    assert kb.device_peak("Radeon 780M") is None

    class FakeGpu:
        backend, device, gpu, warp_size = "cupy", "AMD Instinct MI300X", True, 64
        timing = "device events"

    spec = get("add")  # 12 bytes and 1 flop per element: memory-bound
    shape = {"count": 1 << 20}
    cost = spec.cost(**shape)
    seconds = cost.bytes / 2650e9  # half of MI300X's 5300 GB/s
    r = kb._timing(spec, FakeGpu(), shape, [seconds] * 3, 1)  # type: ignore[arg-type]
    assert r.bound == "memory" and r.roof_fraction == pytest.approx(0.5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: kb.parse_shape("rows=abc"),
        lambda: kb.parse_shape("rows"),
        lambda: kb.parse_shape("rows=0"),
        lambda: kb.parse_shape(""),
        lambda: kb.resolve_shape(get("add"), {"rows": 4}),
        lambda: kb.bench_kernels(["no_such_kernel"], backend="emulator"),
        lambda: kb.bench_kernels(["add"], backend="emulator", rep_ms=0),
        lambda: kb.bench_kernels(["add"], backend="tpu"),
        lambda: kb.bench_kernels(["add"], backend="emulator", warp_size=48),
        lambda: kb.bench_kernels(["matvec_q4_k"], shapes=[{"cols": 100}], backend="emulator"),
    ],
)
def test_bad_input_is_a_user_error(call) -> None:
    with pytest.raises(UserError):
        call()
