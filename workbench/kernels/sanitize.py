"""Run registered kernels under the emulator's tools: the library side of
``workbench kernels sanitize`` and of the test that keeps our own kernels clean.

Each kernel runs once per warp size on small example inputs that still reach its edges (rows
that are not multiples of the block, partial tiles, a KV window shorter than the cache), so that
the tools see every branch of the bounds logic in seconds rather than minutes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from workbench.errors import UserError
from workbench.gguf.quants import block_layout
from workbench.kernels import fused_kernels as fk
from workbench.kernels import ops_kernels as ops
from workbench.kernels import paged_kernels as pk
from workbench.kernels import quant_kernels as qk
from workbench.kernels.instrument import TOOLS, KernelReport, check_tools
from workbench.kernels.registry import KernelSpec, all_kernels, kernels_dir

WARPS = (32, 64)

# Small example shapes per operation (the registry's shapes are benchmark-sized).
QUANT_SHAPES = {
    "dequant": {"rows": 3, "cols": 512},
    "get_rows": {"n": 2, "rows": 5, "cols": 512},
    "matvec": {"rows": 5, "cols": 512},
    "matmul": {"n": 3, "rows": 5, "cols": 512},
    "matvec_batch": {"n": 3, "rows": 5, "cols": 768},  # a full tile and a partial one
}


def sanitize_registered(
    names: Sequence[str] = (),
    tools: Sequence[str] = TOOLS,
    warps: Sequence[int] = WARPS,
    *,
    counters: bool = False,
    target: str = "gfx90a",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
    arch: str | None = None,
) -> list[KernelReport]:
    """One `KernelReport` per (kernel, warp size) for the registered kernels ``names`` (all when
    empty), in registry order. ``progress(name, warp)`` is called before each run. ``arch``
    (e.g. ``"gfx90a"``) emulates that GPU's branches (matmul's MFMA body: warp 64 only)."""
    tools = check_tools(tools)
    registry = all_kernels()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UserError(
            "user.unknown_kernel",
            f"no kernel named {', '.join(map(repr, unknown))} (known: {', '.join(registry)})",
        )
    specs = [registry[n] for n in names] if names else list(registry.values())
    loader = functools.cache(
        lambda path, options, exprs, warp: _module(
            path, options, exprs, warp, tools, counters, target, cache_dir, arch
        )
    )
    reports: list[KernelReport] = []
    for warp in warps:
        for spec in specs:
            if progress is not None:
                progress(spec.name, warp)
            reports.append(_run(spec, warp, loader, np.random.default_rng(seed)))
    return reports


def _module(
    path: str,
    options: tuple[str, ...],
    exprs: tuple[str, ...],
    warp: int,
    tools: tuple[str, ...],
    counters: bool,
    target: str,
    cache_dir: str | Path | None,
    arch: str | None = None,
) -> Any:
    from workbench.kernels.emulator import EmulatorModule

    return EmulatorModule(
        path=path,
        options=options,
        name_expressions=exprs or None,
        warp_size=warp,
        tools=tools,
        counters=counters,
        target=target,
        cache_dir=cache_dir,
        arch=arch,
    )


def _run(spec: KernelSpec, warp: int, loader: Callable[..., Any], rng: np.random.Generator):
    if spec.source in qk.SOURCES.values():
        op, _, tname = spec.symbol.partition("<")
        path, options, exprs = qk.module_args(op)
        module = loader(path, options, exprs, warp)
        _quant_example(spec, op, tname, module, warp, rng)
    else:
        module = loader(str(kernels_dir() / spec.source), (f"-I{kernels_dir()}",), (), warp)
        _ops_example(spec, module, rng)
    kernel = module.get_function(spec.symbol)
    report = kernel.last_report
    kernel.last_report = None  # the next example must not find this one
    if report is None:
        raise UserError("user.unknown_kernel", f"the example for {spec.name} did not launch it")
    return report


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, rows: int, cols: int):
    elements, nbytes = block_layout(qtype)
    return rng.integers(0, 256, (rows, cols // elements * nbytes), np.uint8)  # any bytes do


def _quant_example(
    spec: KernelSpec,
    op: str,
    tname: str,
    module: Any,
    warp: int,
    rng: np.random.Generator,
) -> None:
    load = lambda *_: module  # noqa: E731 - a loader that always returns this module
    if op == "rmsnorm_q8_1":
        x = _randn(rng, 96)
        fk.launch_rmsnorm_q8_1(load, x, _randn(rng, 96), 1e-5, np.empty(96, np.float32),
                               fk.q8_1_buffer(x, 96))  # fmt: skip
        return
    qtype = GGMLQuantizationType[tname.rstrip(">").removeprefix("WB_")]
    if op == "matvec_fused":
        _fused_example(load, qtype, rng)
        return
    s = QUANT_SHAPES[op]
    rows, cols = s["rows"], s["cols"]
    if op == "dequant":
        qk.launch_dequant(
            load, qtype, _blocks(rng, qtype, rows, cols), np.empty((rows, cols), np.float32)
        )
    elif op == "get_rows":
        ids = rng.integers(0, rows, s["n"], dtype=np.int32)
        out = np.empty((s["n"], cols), np.float32)
        qk.launch_get_rows(load, qtype, ids, _blocks(rng, qtype, rows, cols), out)
    elif op == "matvec":
        raw, x = _blocks(rng, qtype, rows, cols), _randn(rng, cols)
        qk.launch_matvec(load, qtype, raw, x, np.empty(rows, np.float32), warp)
    elif op == "matvec_batch":
        raw, x = _blocks(rng, qtype, rows, cols), _randn(rng, s["n"], cols)
        qk.launch_matvec_batch(load, qtype, raw, x, np.empty((s["n"], rows), np.float32))
    else:
        x, raw = _randn(rng, s["n"], cols), _blocks(rng, qtype, rows, cols)
        qk.launch_matmul(load, qtype, x, raw, np.empty((s["n"], rows), np.float32))


def _fused_example(load: Any, qtype: GGMLQuantizationType, rng: np.random.Generator) -> None:
    """Every mode once, ragged: Q/K/V of 21, 5 and 5 rows; gate/up of 32 rows (4 blocks, then
    the quantize tail); a residual add of 32 rows with the norm tail."""
    cols = 512
    x = _randn(rng, cols)
    xq = fk.q8_1_buffer(x, cols)
    xq[:] = qk.quantize_q8_1_reference(x)
    mats = [_blocks(rng, qtype, r, cols) for r in (21, 5, 5)]
    fk.launch_matvec_fused(load, qtype, mats, x, xq, [np.empty(r, np.float32) for r in (21, 5, 5)])
    gate, up = _blocks(rng, qtype, 32, cols), _blocks(rng, qtype, 32, cols)
    y, counter = np.empty(32, np.float32), np.zeros(1, np.uint32)
    tq = fk.q8_1_buffer(x, 32)
    fk.launch_matvec_fused(load, qtype, [gate, up], x, xq, [y], mode="swiglu", tail="quant",
                           tail_q=tq, counter=counter)  # fmt: skip
    fk.launch_matvec_fused(
        load, qtype, [gate], x, xq, [_randn(rng, 32)], mode="add", tail="norm",
        tail_w=_randn(rng, 32), eps=1e-5, tail_h=np.empty(32, np.float32), tail_q=tq,
        counter=counter,
    )  # fmt: skip


def _ops_example(spec: KernelSpec, m: Any, rng: np.random.Generator) -> None:
    name = spec.name
    if name == "rmsnorm":
        ops.rmsnorm(m, _randn(rng, 3, 300), _randn(rng, 300), 1e-5)
    elif name in ("rope_norm", "rope_neox"):
        x = _randn(rng, 2, 3, 16)
        ops.rope(m, x, 5, mode=name.removeprefix("rope_"), rope_dim=12, base=10000.0)
    elif name in ("attention_prefill", "attention_decode", "kv_append"):
        kv = (2, 40, 16)  # (kv_heads, ctx, head_dim)
        kc, vc = _randn(rng, *kv), _randn(rng, *kv)
        if name == "kv_append":
            ops.kv_append(m, _randn(rng, 3, 2, 16), _randn(rng, 3, 2, 16), kc, vc, 4)
        elif name == "attention_decode":
            ops.attention(m, _randn(rng, 1, 4, 16), kc, vc, 6)
        else:
            ops.attention_prefill(m, _randn(rng, 5, 4, 16), kc, vc, 3)
    elif name == "attention_decode_paged":  # ragged: one key, a page and a bit, pages shuffled
        pool = (7, 4, 2, 16)  # (pages, page_size, kv_heads, head_dim)
        tables = [[5], [2, 0, 6], [3, 1]]
        pk.paged_attention(m, _randn(rng, 3, 4, 16), _randn(rng, *pool), _randn(rng, *pool),
                           tables, [1, 9, 8])  # fmt: skip
    elif name == "rope_kv":
        kc, vc = np.zeros((2, 40, 16), np.float16), np.zeros((2, 40, 16), np.float16)
        table = ops.rope_table(40, 12, 10000.0)
        ops.rope_kv(m, _randn(rng, 4, 16), _randn(rng, 2, 16), _randn(rng, 2, 16), kc, vc, 7,
                    mode="neox", rope_dim=12, table=table)  # fmt: skip
    elif name in ("swiglu", "add"):
        fn = ops.swiglu if name == "swiglu" else ops.add
        fn(m, _randn(rng, 1000), _randn(rng, 1000))
    elif name == "argmax":
        ops.argmax(m, _randn(rng, 2, 3000))
    elif name == "softmax":
        ops.softmax(m, _randn(rng, 2, 3000))
    elif name == "sample_top_k_top_p":
        ops.sample(m, _randn(rng, 3000), top_k=5, top_p=0.9, temperature=0.8, u=0.5)
    else:
        raise UserError("user.unknown_kernel", f"no sanitizer example for kernel {name!r}")
