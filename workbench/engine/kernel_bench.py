"""Kernel benchmarks: each registry kernel timed alone, with its cost model and roofline position.

The method is ``triton.testing.do_bench``'s: one launch to compile and warm up, a few to estimate
the time of one, then as many warm-up launches as fit in ``warmup_ms`` and as many timed
repetitions as fit in ``rep_ms``. On a GPU each repetition first overwrites a 256 MB buffer so the
kernel starts with a cold L2 (as it would between layers of a model), and is timed with device
events; the percentiles are over repetitions. On the emulator the timings are the wall clock of
the CPU emulation: useful to compare versions of a kernel on the emulator, not GPU timings, and
there is no cache to flush and no roof to compare against.

Inputs are random, built by one factory per kernel family from the launch wrappers' signatures
(quant_kernels.launch_*, ops_kernels.*): quantized weights are random block bytes (the kernels'
time does not depend on the values; non-finite scales only give non-finite outputs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from workbench.errors import UserError
from workbench.gguf.quants import block_layout
from workbench.kernels import fused_kernels as fk
from workbench.kernels import ops_kernels as ops
from workbench.kernels import paged_kernels as pk
from workbench.kernels import quant_kernels as qk
from workbench.kernels.registry import KernelSpec, all_kernels
from workbench.kernels.registry import get as get_kernel

BACKENDS = ("auto", "emulator", "cupy")
L2_FLUSH_BYTES = 256 * 1024 * 1024
ESTIMATE_RUNS = 5
# Timed repetitions however small the budget: a p50 and a p95 of one sample would be the same
# number twice (``%%hip --bench`` takes the same floor).
MIN_REPS = 3

# Kernels benchmarked without --kernel/--all: one of each family, at the decode shapes.
DEFAULT_KERNELS = (
    "rmsnorm",
    "rope_neox",
    "attention_decode",
    "swiglu",
    "add",
    "argmax",
    "get_rows_q8_0",
    "matvec_q8_0",
    "matvec_q4_k",
    "matmul_q8_0",
)


@dataclass(frozen=True)
class DevicePeak:
    name: str
    gb_s: float  # HBM bandwidth
    gflop_s: float  # FP32 vector (the kernels use no matrix cores)


# Vendor datasheet peaks. MI250X is per GCD: each of its two dies is one device to ROCm.
DEVICE_PEAKS = (
    DevicePeak("MI300X", 5300.0, 81_700.0),
    DevicePeak("MI250X", 1638.4, 23_950.0),
    DevicePeak("H200", 4800.0, 67_000.0),
    DevicePeak("H100 PCIe", 2000.0, 51_000.0),
    DevicePeak("H100", 3350.0, 67_000.0),  # SXM
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The table entry whose name the device's name contains (first match), or None."""
    upper = device_name.upper()
    for peak in DEVICE_PEAKS:
        if peak.name.upper() in upper:
            return peak
    return None


@dataclass(frozen=True)
class KernelTiming:
    kernel: str
    backend: str
    device: str
    timing: str  # how the times were taken
    shape: Mapping[str, int]
    reps: int
    warmup_reps: int
    l2_flush: bool
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    bytes: int
    flops: int
    gb_s: float  # at the median time
    gflop_s: float
    intensity: float | None  # flops / byte (None when the kernel moves no bytes)
    peak_gb_s: float | None
    peak_gflop_s: float | None
    roof_fraction: float | None  # achieved / the roofline at this intensity; None off the table
    bound: str | None  # "memory" or "compute" by the ridge point; None off the table

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = dict(self.shape)
        return d


# --- the runtime a benchmark runs on --------------------------------------------------------------


class _Target:
    """Array module, kernel modules, a clock, and an L2 flush for one backend."""

    def __init__(self, backend: str, warp_size: int) -> None:
        if backend == "auto":
            from workbench.engine.generate import gpu_available

            backend = "cupy" if gpu_available() else "emulator"
        if backend not in BACKENDS:
            raise UserError(
                "user.bad_backend", f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}"
            )
        self.backend = backend
        self._ops: dict[str, Any] = {}
        self._flush_buf: Any = None
        if backend == "cupy":
            from workbench.kernels.cupy_target import import_cupy

            cupy = import_cupy()
            self.xp = cupy
            dev = cupy.cuda.Device()
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            name = props["name"]
            self.device = name.decode() if isinstance(name, bytes) else str(name)
            self.warp_size = int(props["warpSize"])
            self.quant = qk.cupy_loader()
            self.timing = "device events"
        else:
            self.xp = np
            self.device = "CPU emulator"
            self.warp_size = warp_size
            self.quant = qk.emulator_loader(warp_size)
            self.timing = "wall clock of the CPU emulator (not GPU timings)"

    @property
    def gpu(self) -> bool:
        return self.backend == "cupy"

    def ops_module(self, source: str) -> Any:
        if source not in self._ops:
            self._ops[source] = (
                ops.load_module(source, "cupy")
                if self.gpu
                else ops.load_module(source, "emulator", warp_size=self.warp_size)
            )
        return self._ops[source]

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def flush_l2(self) -> None:
        if self._flush_buf is None:
            self._flush_buf = self.xp.empty(L2_FLUSH_BYTES // 4, dtype=self.xp.int32)
        self._flush_buf.fill(0)

    def time_reps(self, fn: Callable[[], Any], reps: int) -> list[float]:
        """Seconds of each of ``reps`` calls of ``fn``."""
        if not self.gpu:
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out
        cuda = self.xp.cuda
        events = [(cuda.Event(), cuda.Event()) for _ in range(reps)]
        for start, end in events:
            self.flush_l2()  # between events: the flush is not timed
            start.record()
            fn()
            end.record()
        self.sync()
        return [cuda.get_elapsed_time(s, e) / 1e3 for s, e in events]


# --- input factories: (target, shape) -> a zero-argument launch -----------------------------------


def _randn(xp: Any, *shape: int) -> Any:
    return xp.asarray(np.random.default_rng().standard_normal(shape, dtype=np.float32))


def _blocks(xp: Any, qtype: GGMLQuantizationType, rows: int, cols: int) -> Any:
    elements, nbytes = block_layout(qtype)
    if cols % elements:
        raise UserError(
            "user.bad_shape", f"{qtype.name} rows hold whole {elements}-element blocks; cols={cols}"
        )
    raw = np.random.default_rng().integers(0, 256, (rows, cols // elements * nbytes), np.uint8)
    return xp.asarray(raw)


def _quant_factory(spec: KernelSpec, t: _Target, s: Mapping[str, int]) -> Callable[[], Any]:
    op, _, tname = spec.symbol.partition("<")
    if op == "rmsnorm_q8_1":
        x, w, h = _randn(t.xp, s["dim"]), _randn(t.xp, s["dim"]), t.xp.empty(s["dim"], np.float32)
        xq = fk.q8_1_buffer(x, s["dim"])
        return lambda: fk.launch_rmsnorm_q8_1(t.quant, x, w, 1e-5, h, xq)
    qtype = GGMLQuantizationType[tname.rstrip(">").removeprefix("WB_")]
    xp, rows, cols = t.xp, s["rows"], s["cols"]
    if op == "matvec_fused":  # one matrix of the split (its rows; the Q8_1 x made once here)
        xh = np.random.default_rng().standard_normal(cols, dtype=np.float32)
        raw, x, out = _blocks(xp, qtype, rows, cols), xp.asarray(xh), xp.empty(rows, np.float32)
        xq = fk.q8_1_buffer(x, cols)
        xq[:] = xp.asarray(qk.quantize_q8_1_reference(xh))
        return lambda: fk.launch_matvec_fused(t.quant, qtype, [raw], x, xq, [out])
    if op == "dequant":
        raw, out = _blocks(xp, qtype, rows, cols), xp.empty((rows, cols), np.float32)
        return lambda: qk.launch_dequant(t.quant, qtype, raw, out)
    if op == "get_rows":
        n = s["n"]
        table = _blocks(xp, qtype, rows, cols)
        ids = xp.asarray(np.random.default_rng().integers(0, rows, n, dtype=np.int32))
        out = xp.empty((n, cols), np.float32)
        return lambda: qk.launch_get_rows(t.quant, qtype, ids, table, out)
    if op == "matvec":
        raw, x, out = _blocks(xp, qtype, rows, cols), _randn(xp, cols), xp.empty(rows, np.float32)
        return lambda: qk.launch_matvec(t.quant, qtype, raw, x, out, t.warp_size)
    if op == "matvec_batch":
        raw, x = _blocks(xp, qtype, rows, cols), _randn(xp, s["n"], cols)
        out = xp.empty((s["n"], rows), np.float32)
        return lambda: qk.launch_matvec_batch(t.quant, qtype, raw, x, out)
    n = s["n"]
    x, raw = _randn(xp, n, cols), _blocks(xp, qtype, rows, cols)
    out = xp.empty((n, rows), np.float32)
    return lambda: qk.launch_matmul(t.quant, qtype, x, raw, out)


def _ops_factory(spec: KernelSpec, t: _Target, s: Mapping[str, int]) -> Callable[[], Any]:
    m, xp, name = t.ops_module(spec.source), t.xp, spec.name
    if name == "rmsnorm":
        x, w = _randn(xp, s["n"], s["dim"]), _randn(xp, s["dim"])
        out = xp.empty_like(x)
        return lambda: ops.rmsnorm(m, x, w, 1e-5, out=out)
    if name in ("rope_norm", "rope_neox"):
        x = _randn(xp, s["n"], s["heads"], s["head_dim"])
        mode = name.removeprefix("rope_")
        return lambda: ops.rope(m, x, 0, mode=mode, rope_dim=s["rope_dim"], base=10000.0)
    if name in ("attention_prefill", "attention_decode", "kv_append"):
        kv = (s["kv_heads"], s["ctx"], s["head_dim"])
        kc, vc = _randn(xp, *kv), _randn(xp, *kv)
        if name == "kv_append":
            k, v = (_randn(xp, s["n"], s["kv_heads"], s["head_dim"]) for _ in range(2))
            return lambda: ops.kv_append(m, k, v, kc, vc, 0)
        if name == "attention_decode":  # one query at position t-1 over t cached keys
            q = _randn(xp, 1, s["heads"], s["head_dim"])
            return lambda: ops.attention(m, q, kc, vc, s["t"] - 1)
        q = _randn(xp, s["n"], s["heads"], s["head_dim"])
        return lambda: ops.attention_prefill(m, q, kc, vc, s.get("start", 0))
    if name == "attention_decode_paged":  # n sequences of ragged lengths, pages shuffled
        n, p = s["n"], s["page_size"]
        lens = pk.ragged_lens(n, s["t"])
        need = [-(-t // p) for t in lens]
        perm = np.random.default_rng().permutation(sum(need)).tolist()
        tables = [perm[sum(need[:i]) : sum(need[: i + 1])] for i in range(n)]
        pool = (sum(need), p, s["kv_heads"], s["head_dim"])
        q, kp, vp = _randn(xp, n, s["heads"], s["head_dim"]), _randn(xp, *pool), _randn(xp, *pool)
        return lambda: pk.paged_attention(m, q, kp, vp, tables, lens)
    if name == "rope_kv":
        q = _randn(xp, s["heads"], s["head_dim"])
        k, v = (_randn(xp, s["kv_heads"], s["head_dim"]) for _ in range(2))
        kc, vc = (xp.zeros((s["kv_heads"], 64, s["head_dim"]), np.float16) for _ in range(2))
        table = xp.asarray(ops.rope_table(64, s["rope_dim"], 10000.0))
        return lambda: ops.rope_kv(
            m, q, k, v, kc, vc, 5, mode="norm", rope_dim=s["rope_dim"], table=table
        )
    if name in ("swiglu", "add"):
        a, b = _randn(xp, s["count"]), _randn(xp, s["count"])
        out = xp.empty_like(a)
        fn = ops.swiglu if name == "swiglu" else ops.add
        return lambda: fn(m, a, b, out=out)
    if name in ("argmax", "softmax"):
        x = _randn(xp, s.get("rows", 1), s["vocab"])
        return (lambda: ops.argmax(m, x)) if name == "argmax" else (lambda: ops.softmax(m, x))
    if name == "sample_top_k_top_p":
        logits = _randn(xp, s["vocab"])
        return lambda: ops.sample(m, logits, top_k=s["top_k"], top_p=0.95, temperature=0.8, u=0.5)
    raise UserError("user.unknown_kernel", f"no benchmark input factory for kernel {name!r}")


def _factory(spec: KernelSpec, t: _Target, shape: Mapping[str, int]) -> Callable[[], Any]:
    if spec.source in qk.SOURCES.values():
        return _quant_factory(spec, t, shape)
    return _ops_factory(spec, t, shape)


# --- benchmarking -------------------------------------------------------------------------------


def parse_shape(text: str) -> dict[str, int]:
    """ "rows=576,cols=1536" -> {"rows": 576, "cols": 1536}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            if not eq or not key.strip():
                raise ValueError
            out[key.strip()] = int(value)
        except ValueError:
            raise UserError(
                "user.bad_shape", f"shape must be k=v,... with integer values, not {text!r}"
            ) from None
        if out[key.strip()] < 1:
            raise UserError("user.bad_shape", f"shape values must be >= 1: {part!r}")
    if not out:
        raise UserError("user.bad_shape", "empty --shape")
    return out


def select_kernels(names: Sequence[str] = (), *, all_: bool = False) -> list[KernelSpec]:
    """The named kernels, every registered kernel with ``all_``, or `DEFAULT_KERNELS`."""
    if all_:
        return list(all_kernels().values())
    return [get_kernel(n) for n in (names or DEFAULT_KERNELS)]


# For quantized kernels registered without a representative shape (get_rows of the K-quants:
# SmolLM2's 576 columns are not whole 256-element blocks): a table with 1536-wide rows.
_QUANT_FALLBACK_SHAPES = {
    "dequant": {"rows": 576, "cols": 1536},
    "get_rows": {"n": 1, "rows": 49152, "cols": 1536},
    "matvec": {"rows": 576, "cols": 1536},
    "matmul": {"n": 64, "rows": 576, "cols": 1536},
    "matvec_batch": {"n": 8, "rows": 576, "cols": 1536},
}


def resolve_shape(spec: KernelSpec, override: Mapping[str, int] | None) -> dict[str, int]:
    """The kernel's first representative shape with ``override``'s keys replaced."""
    if spec.shapes:
        base = dict(spec.shapes[0])
    else:
        base = dict(_QUANT_FALLBACK_SHAPES.get(spec.symbol.partition("<")[0], {}))
    if override:
        unknown = set(override) - set(base)
        if unknown and spec.name.startswith(("matvec_", "dequant_")):
            unknown -= {"n"}  # accepted and ignored: one row vector / no batch
        if unknown:
            raise UserError(
                "user.bad_shape",
                f"{spec.name} takes shape keys {', '.join(sorted(base))}; "
                f"not {', '.join(sorted(unknown))}",
            )
        base.update(override)
    return base


def bench_kernel(
    spec: KernelSpec,
    target: _Target,
    shape: Mapping[str, int],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> KernelTiming:
    fn = _factory(spec, target, shape)
    fn()  # compile, allocate, first touch
    target.sync()
    est = target.time_reps(fn, 1)  # grow the estimate until ESTIMATE_RUNS or the warm-up budget
    while len(est) < ESTIMATE_RUNS and sum(est) * 1e3 < warmup_ms:
        est += target.time_reps(fn, 1)
    per_ms = max(statistics.fmean(est) * 1e3, 1e-6)
    n_warmup = max(0, math.ceil(warmup_ms / per_ms) - len(est))
    for _ in range(n_warmup):
        fn()
    target.sync()
    reps = max(MIN_REPS, int(rep_ms / per_ms))
    times = sorted(target.time_reps(fn, reps))
    return _timing(spec, target, shape, times, len(est) + n_warmup)


def _timing(
    spec: KernelSpec, target: _Target, shape: Mapping[str, int], times: list[float], warm: int
) -> KernelTiming:
    from workbench.observe.profiler import percentile

    cost = spec.cost(**shape, warp_size=target.warp_size)
    p50 = percentile(times, 50)
    gb_s = cost.bytes / p50 / 1e9 if p50 > 0 else 0.0
    gflop_s = cost.flops / p50 / 1e9 if p50 > 0 else 0.0
    intensity = cost.flops / cost.bytes if cost.bytes else None
    peak = device_peak(target.device) if target.gpu else None
    roof = bound = None
    if peak is not None and intensity is not None:
        ridge = peak.gflop_s / peak.gb_s  # flops/byte where the two roofs meet
        attainable = min(peak.gflop_s, intensity * peak.gb_s)  # GFLOP/s
        bound = "memory" if intensity < ridge else "compute"
        roof = gflop_s / attainable if cost.flops else gb_s / peak.gb_s
    elif peak is not None:  # moves no bytes (never for these kernels): compute roof only
        roof, bound = gflop_s / peak.gflop_s, "compute"
    return KernelTiming(
        kernel=spec.name,
        backend=target.backend,
        device=target.device,
        timing=target.timing,
        shape=dict(shape),
        reps=len(times),
        warmup_reps=warm,
        l2_flush=target.gpu,
        mean_ms=statistics.fmean(times) * 1e3,
        p50_ms=p50 * 1e3,
        p95_ms=percentile(times, 95) * 1e3,
        p99_ms=percentile(times, 99) * 1e3,
        min_ms=times[0] * 1e3,
        bytes=cost.bytes,
        flops=cost.flops,
        gb_s=gb_s,
        gflop_s=gflop_s,
        intensity=intensity,
        peak_gb_s=peak.gb_s if peak else None,
        peak_gflop_s=peak.gflop_s if peak else None,
        roof_fraction=roof,
        bound=bound,
    )


def bench_kernels(
    kernels: Sequence[str] = (),
    *,
    all_: bool = False,
    shapes: Sequence[Mapping[str, int]] = (),
    backend: str = "auto",
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    warp_size: int = 64,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[KernelTiming]:
    """Benchmark each selected kernel at each of ``shapes`` (overrides of its representative
    shape; none: the representative shape itself). ``warp_size`` applies to the emulator.
    ``progress(done, total, label)`` is called before each benchmark (label: the kernel and its
    shape) and once more at the end with ``done == total`` (label ""): the caller presents it."""
    if not warmup_ms >= 0 or not rep_ms > 0:
        raise UserError(
            "user.bad_argument", f"warmup_ms must be >= 0 and rep_ms > 0 ({warmup_ms}, {rep_ms})"
        )
    if warp_size not in (32, 64):
        raise UserError("user.bad_argument", f"warp_size must be 32 or 64, not {warp_size}")
    specs = select_kernels(kernels, all_=all_)
    target = _Target(backend, warp_size)
    jobs = [
        (spec, resolve_shape(spec, override)) for spec in specs for override in shapes or (None,)
    ]
    results = []
    for i, (spec, shape) in enumerate(jobs):
        if progress is not None:
            progress(
                i, len(jobs), f"{spec.name} [{','.join(f'{k}={v}' for k, v in shape.items())}]"
            )
        results.append(bench_kernel(spec, target, shape, warmup_ms=warmup_ms, rep_ms=rep_ms))
    if progress is not None:
        progress(len(jobs), len(jobs), "")
    return results
