"""Registry entries, NumPy references, cost models and launch wrappers for the GGUF block kernels.

Four operations over every type in `SUPPORTED_TYPES`, one source each (``kernels/*.hip``, all
decoding through ``kernels/quant.h``), instantiated per type through name expressions:

=========  ================================  ====================================================
operation  symbol                            what
=========  ================================  ====================================================
dequant    ``dequant<WB_Q4_1>``              raw (rows, row_bytes) -> (rows, cols) float32
get_rows   ``get_rows<WB_Q4_1>``             ids (n,), raw table -> (n, cols) float32
matvec     ``matvec<WB_Q4_1>``               raw (rows, row_bytes), x (cols,) -> y (rows,);
                                             quantized types first quantize x to Q8_1
                                             (``quantize_q8_1``, in matvec.hip) and dot
                                             integer codes
matmul     ``matmul<WB_Q4_1>``               x (n, cols), raw W (rows, row_bytes) -> (n, rows);
                                             FP16 matrix cores (MFMA) on `MFMA_ARCHS`
=========  ================================  ====================================================

and in matvec.hip's module, ``matvec_batch<WB_Q4_1>`` (registry ``matvec_batch_q4_1``): x (n, cols),
n <= `MAX_BATCH`, raw W -> (n, rows), each weight block read once for all n rows, and row b
bit-identical to matvec of x[b] alone (``quantize_q8_1_rows`` quantizes the rows first).

Registry names are ``<operation>_<type>``, e.g. ``matvec_q4_1``. dequant and get_rows are
bit-identical to ``gguf.quants.dequantize``; matvec and matmul accumulate in float32 (see the
sources for the order) and their references are float64. The quantized types' matvec computes
W @ x8, x8 being x rounded to Q8_1 (`quantize_q8_1_reference`, bit-identical to the kernel), so its
reference is `matvec_q8_reference`; `matvec_reference` (float x) is the model's exact product.
On `MFMA_ARCHS` matmul rounds x and W to fp16 (fp32 accumulation): `matmul_fp16_reference`.

The launch wrappers (`launch_dequant`, ...) work with NumPy arrays and an `EmulatorModule` as well
as with CuPy arrays and a ``cupy.RawModule``: both take ``kernel(grid, block, args,
shared_mem=...)``. They get modules from a `ModuleLoader`, a callable ``(path, options,
name_expressions) -> module`` that should cache; `emulator_loader` and `cupy_loader` make one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from workbench.errors import UserError
from workbench.gguf.quants import SUPPORTED_TYPES, block_layout, row_bytes
from workbench.kernels.registry import Cost, KernelSpec, Launch, kernels_dir, register

Q = GGMLQuantizationType

__all__ = [
    "OPERATIONS",
    "ModuleLoader",
    "cupy_loader",
    "emulator_loader",
    "gguf_defines",
    "has_mfma",
    "kernel_name",
    "launch_dequant",
    "launch_get_rows",
    "launch_matmul",
    "launch_matvec",
    "launch_matvec_batch",
    "matmul_fp16_reference",
    "matvec_q8_reference",
    "module_args",
    "quantize_q8_1_reference",
    "symbol",
]

OPERATIONS = ("dequant", "get_rows", "matvec", "matmul")
SOURCES = {op: f"{op}.hip" for op in OPERATIONS}
FUSED = ("matvec_fused", "rmsnorm_q8_1", "quantize_q8_1")  # symbols of matvec.hip's module

# Launch constants; they must match the sources.
ELEMENTWISE_THREADS = 256  # dequant, get_rows: threads per block along a row
MATVEC_THREADS, MATVEC_ROWS_PER_BLOCK = 256, 16  # matvec.hip's WB_MV_THREADS, WB_MV_ROWS
Q8_1_QK = 32  # elements per Q8_1 block (quant.h's WB_Q8_1_QK)
QUANTIZE_THREADS = 256  # quantize_q8_1: 8 lanes per Q8_1 block
MM_TM, MM_TN, MM_THREADS = 32, 64, 256  # matmul.hip's WB_MM_TM, WB_MM_TN, WB_MM_THREADS
# The AMD targets whose matmul runs on matrix cores (wb.h's WB_HAS_MFMA: LLVM's mai-insts).
MFMA_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")
MAX_BATCH = 32  # matvec_batch: rows of x per launch (matvec.hip's WB_MB_MAX)

# A module: ``get_function(name)`` returns a kernel callable as ``(grid, block, args,
# shared_mem=0)``. A loader builds (and caches) a module from (path, options, name expressions).
ModuleLoader = Callable[[str, tuple[str, ...], tuple[str, ...]], Any]


def symbol(op: str, qtype: GGMLQuantizationType) -> str:
    """The name expression of ``op`` for ``qtype``, e.g. ``matvec<WB_Q4_1>``."""
    return f"{op}<WB_{qtype.name}>"


def kernel_name(op: str, qtype: GGMLQuantizationType) -> str:
    """The registry key, e.g. ``matvec_q4_1``."""
    return f"{op}_{qtype.name.lower()}"


@functools.cache
def gguf_defines() -> dict[str, int]:
    """``WB_GGUF_QK_<T>`` / ``WB_GGUF_BYTES_<T>`` from gguf's table: quant.h static_asserts its
    block structs against them, so the C layouts cannot drift from ``GGML_QUANT_SIZES``."""
    out: dict[str, int] = {}
    for q in SUPPORTED_TYPES:
        elements, nbytes = block_layout(q)
        out[f"WB_GGUF_QK_{q.name}"] = elements
        out[f"WB_GGUF_BYTES_{q.name}"] = nbytes
    return out


# Operations whose source is another operation's (one module holds both).
SHARED_SOURCE = {"matvec_batch": "matvec"}


@functools.cache  # every launch asks: building the tuple took ~110 us (a 576x576 matvec ~5)
def module_args(op: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(source path, options, name expressions for all types): one module per source, so an
    operation of `SHARED_SOURCE` gets the module of the operation it shares a source with (and
    the fused decode kernels of `FUSED`, in `fused_kernels`, matvec's)."""
    op = "matvec" if op in FUSED else SHARED_SOURCE.get(op, op)
    if op not in OPERATIONS:
        raise UserError("user.unknown_kernel", f"no quantized operation {op!r} ({OPERATIONS})")
    options = (*(f"-D{k}={v}" for k, v in gguf_defines().items()), f"-I{kernels_dir()}")
    ops = (op, *(o for o, base in SHARED_SOURCE.items() if base == op))
    if op == "matvec":  # matvec.hip also holds the decode step's fused products
        ops += ("matvec_fused",)
    names = tuple(symbol(o, q) for o in ops for q in SUPPORTED_TYPES)
    return str(kernels_dir() / SOURCES[op]), options, names


def has_mfma(arch: str | None) -> bool:
    """True when ``arch`` (``gfx90a``, or None for none) runs matmul on FP16 matrix cores."""
    return arch in MFMA_ARCHS


def emulator_loader(
    warp_size: int, cache_dir: str | Path | None = None, arch: str | None = None
) -> ModuleLoader:
    """A caching loader of `EmulatorModule`s running warps of ``warp_size`` (32 or 64).
    ``arch`` (e.g. ``"gfx90a"``) emulates that target's branches: matmul's MFMA path, which
    needs ``warp_size=64``."""
    from workbench.kernels.emulator import EmulatorModule

    @functools.cache
    def load(path: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
        return EmulatorModule(
            path=path,
            options=options,
            name_expressions=names,
            warp_size=warp_size,
            cache_dir=cache_dir,
            arch=arch,
        )

    return load


def cupy_loader() -> ModuleLoader:
    """A caching loader of GPU modules (hiprtc on ROCm, NVRTC on CUDA; see `cupy_target`)."""
    from workbench.kernels.cupy_target import import_cupy, load_module

    import_cupy()  # backend.unavailable now, not at the first launch

    @functools.cache
    def load(path: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
        return load_module(Path(path), options=options, name_expressions=names)

    return load


# --- launch geometry ----------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequant_launch(*, rows: int, cols: int, **_: Any) -> Launch:
    return Launch((rows, _cdiv(cols, ELEMENTWISE_THREADS), 1), (ELEMENTWISE_THREADS, 1, 1))


def get_rows_launch(*, n: int, cols: int, **_: Any) -> Launch:
    return Launch((n, _cdiv(cols, ELEMENTWISE_THREADS), 1), (ELEMENTWISE_THREADS, 1, 1))


def matvec_launch(*, rows: int, **_: Any) -> Launch:
    """MATVEC_ROWS_PER_BLOCK rows per block at any warp width (a row's lanes never span warps)."""
    return Launch((_cdiv(rows, MATVEC_ROWS_PER_BLOCK), 1, 1), (MATVEC_THREADS, 1, 1))


def quantize_launch(*, cols: int, **_: Any) -> Launch:
    return Launch((_cdiv(cols // Q8_1_QK * 8, QUANTIZE_THREADS), 1, 1), (QUANTIZE_THREADS, 1, 1))


def quantize_rows_launch(*, n: int, cols: int, **_: Any) -> Launch:
    return Launch((_cdiv(cols // Q8_1_QK * 8, QUANTIZE_THREADS), n, 1), (QUANTIZE_THREADS, 1, 1))


def is_integer_path(qtype: GGMLQuantizationType) -> bool:
    """True where matvec dots Q8_1 codes (every quantized type); False for F32/F16/BF16."""
    return qtype not in (Q.F32, Q.F16, Q.BF16)


def matmul_launch(*, n: int, rows: int, **_: Any) -> Launch:
    return Launch((_cdiv(rows, MM_TN), _cdiv(n, MM_TM), 1), (MM_THREADS, 1, 1))


# --- NumPy references ---------------------------------------------------------------------------


def dequant_reference(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """raw (rows, row_bytes) uint8 -> (rows, cols) float32, gguf's own dequantization."""
    return np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32)


def get_rows_reference(
    ids: np.ndarray, table: np.ndarray, qtype: GGMLQuantizationType
) -> np.ndarray:
    """ids (n,), table (table_rows, row_bytes) -> (n, cols) float32."""
    return dequant_reference(table[np.asarray(ids, dtype=np.int64)], qtype)


def matvec_reference(raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """raw (rows, row_bytes), x (cols,) -> W @ x (rows,) in float64 from the float32 weights."""
    return dequant_reference(raw, qtype).astype(np.float64) @ x.astype(np.float64)


def quantize_q8_1_reference(x: np.ndarray) -> np.ndarray:
    """x (cols,) float32 -> xq (cols + cols // 8,) uint8: quantize_q8_1's output, bit for bit
    (codes, then (fp16 d, fp16 s) per 32 elements; see kernels/quant.h)."""
    xb = np.asarray(x, np.float32).reshape(-1, Q8_1_QK)  # (blocks, 32)
    amax = np.abs(xb).max(axis=1)  # (blocks,)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (xb / d[:, None]).astype(np.float32)
    q = np.where(amax[:, None] == 0, 0, np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)))
    q = q.astype(np.int32)  # round half away from zero, as roundf
    s = (d * q.sum(axis=1).astype(np.float32)).astype(np.float32)
    ds = np.stack([d.astype(np.float16), s.astype(np.float16)], axis=1)  # (blocks, 2)
    codes = q.astype(np.int8).reshape(-1).view(np.uint8)  # (cols,)
    return np.concatenate([codes, ds.reshape(-1).view(np.uint8)])


def _q8_1_fields(xq: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (cols,) int8, d (blocks,) float64, s (blocks,) float64) of a Q8_1 buffer."""
    ds = xq[cols:].view(np.float16).reshape(-1, 2).astype(np.float64)
    return xq[:cols].view(np.int8), ds[:, 0], ds[:, 1]


def matvec_q8_reference(raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What the integer path computes, exactly (float64): W @ x8 with x8 = x rounded to Q8_1;
    Q4_1/Q5_1 take each block's sum of x8 from the fp16 s field (as the kernel and ggml do)."""
    cols = x.shape[0]
    q, d, s = _q8_1_fields(quantize_q8_1_reference(x), cols)
    x8 = q.reshape(-1, Q8_1_QK).astype(np.float64) * d[:, None]  # (blocks, 32)
    w = dequant_reference(raw, qtype).astype(np.float64)  # (rows, cols)
    y = w @ x8.reshape(-1)
    if qtype in (Q.Q4_1, Q.Q5_1):  # m * (s - exact sum): m is the fp16 at byte 2 of each block
        nbytes = block_layout(qtype)[1]
        m = raw.reshape(raw.shape[0], -1, nbytes)[:, :, 2:4].copy().view(np.float16)[..., 0]
        y += m.astype(np.float64) @ (s - x8.sum(axis=1))
    return y


def matvec_batch_reference(
    raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType
) -> np.ndarray:
    """raw (rows, row_bytes), x (n, cols) -> (n, rows) float64: each row of x as the single-row
    matvec's reference (`matvec_q8_reference` for the quantized types)."""
    one = matvec_q8_reference if is_integer_path(qtype) else matvec_reference
    return np.stack([one(raw, row, qtype) for row in np.asarray(x, np.float32)])


def matmul_reference(x: np.ndarray, raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """x (n, cols), raw (rows, row_bytes) -> x @ W.T (n, rows) in float64."""
    return x.astype(np.float64) @ dequant_reference(raw, qtype).astype(np.float64).T


def matmul_fp16_reference(
    x: np.ndarray, raw: np.ndarray, qtype: GGMLQuantizationType
) -> np.ndarray:
    """What the MFMA path computes, up to fp32 accumulation: x and the dequantized W rounded to
    fp16, their product in float64 (n, rows)."""
    w16 = dequant_reference(raw, qtype).astype(np.float16).astype(np.float64)
    return x.astype(np.float16).astype(np.float64) @ w16.T


# --- cost models (global memory traffic at its minimum; FLOPs of the arithmetic) ----------------


def _cost_fn(op: str, qtype: GGMLQuantizationType) -> Callable[..., Cost]:
    def cost(*, rows: int, cols: int, n: int = 1, **_: Any) -> Cost:
        w = row_bytes(qtype, cols)
        if op == "dequant":  # blocks in, floats out; a multiply (and an add) per element
            return Cost(bytes=rows * w + rows * cols * 4, flops=rows * cols)
        if op == "get_rows":  # ids, n rows of blocks in, floats out
            return Cost(bytes=n * 4 + n * w + n * cols * 4, flops=n * cols)
        if op == "matvec":  # every block once, x, y
            return Cost(bytes=rows * w + cols * 4 + rows * 4, flops=2 * rows * cols)
        if op == "matvec_batch":  # every block once for all n rows of x
            return Cost(bytes=rows * w + n * cols * 4 + n * rows * 4, flops=2 * n * rows * cols)
        return Cost(bytes=rows * w + n * cols * 4 + n * rows * 4, flops=2 * n * rows * cols)

    return cost


# --- representative shapes: SmolLM2-135M (hidden 576, FFN 1536, KV 192, vocab 49152) ----------

_SMOLLM2_MATRICES = ((576, 576), (1536, 576), (576, 1536), (192, 576))
_VOCAB = 49152


def _shapes(op: str, qtype: GGMLQuantizationType) -> tuple[Mapping[str, int], ...]:
    qk = block_layout(qtype)[0]
    mats = [(r, c) for r, c in _SMOLLM2_MATRICES if c % qk == 0]  # K-quants need cols % 256 == 0
    if qtype == Q.Q8_0:
        mats.append((_VOCAB, 576))  # the tied embedding / output matrix
    if op == "get_rows":
        return tuple({"n": n, "rows": _VOCAB, "cols": 576} for n in (1, 64) if 576 % qk == 0)
    if op == "matmul":
        return tuple({"n": 64, "rows": r, "cols": c} for r, c in mats)
    if op == "matvec_batch":
        return tuple({"n": 8, "rows": r, "cols": c} for r, c in mats)
    return tuple({"rows": r, "cols": c} for r, c in mats)


_DESCRIPTIONS = {
    "dequant": "GGUF {t} blocks -> float32, bit-identical to gguf.quants.dequantize",
    "get_rows": "embedding lookup from a {t} table, bit-identical to gguf's dequantize",
    "matvec": "y = W @ x on {t} blocks: x as Q8_1, 16-byte staged loads, integer dot products",
    "matmul": "y = x @ W.T, {t} tiles dequantized into shared memory, float32 accumulation",
    "matvec_batch": "Y = X @ W.T for 2-32 decode rows on {t} blocks, each block read once, "
    "each row bit-identical to matvec",
}
_LAUNCHES = {
    "dequant": dequant_launch,
    "get_rows": get_rows_launch,
    "matvec": matvec_launch,
    "matmul": matmul_launch,
    "matvec_batch": matvec_launch,
}
_REFERENCES = {
    "dequant": dequant_reference,
    "get_rows": get_rows_reference,
    "matvec": matvec_reference,
    "matmul": matmul_reference,
    "matvec_batch": matvec_batch_reference,
}


def _reference(op: str, qtype: GGMLQuantizationType) -> Callable[..., np.ndarray]:
    if op == "matvec" and is_integer_path(qtype):
        return matvec_q8_reference
    return _REFERENCES[op]


def _register_all() -> None:
    for op in (*OPERATIONS, *SHARED_SOURCE):
        for q in SUPPORTED_TYPES:
            register(
                KernelSpec(
                    name=kernel_name(op, q),
                    source=SOURCES[SHARED_SOURCE.get(op, op)],
                    symbol=symbol(op, q),
                    launch=_LAUNCHES[op],
                    reference=functools.partial(_reference(op, q), qtype=q),
                    cost=_cost_fn(op, q),
                    description=_DESCRIPTIONS[op].format(t=q.name),
                    defines=gguf_defines(),
                    shapes=_shapes(op, q),
                )
            )


_register_all()


# --- launch wrappers ----------------------------------------------------------------------------


def _check(name: str, a: Any, dtype: Any, shape: tuple[int, ...]) -> None:
    if a.dtype != np.dtype(dtype) or tuple(a.shape) != shape or not a.flags.c_contiguous:
        raise UserError(
            "kernel.bad_argument",
            f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, "
            f"not {a.dtype} {tuple(a.shape)}",
        )


def _cols(qtype: GGMLQuantizationType, raw: Any) -> int:
    if qtype not in SUPPORTED_TYPES:
        raise UserError("kernel.bad_argument", f"no kernels for tensor type {qtype.name}")
    if raw.ndim != 2:
        raise UserError("kernel.bad_argument", f"raw blocks must be 2-D, not {raw.shape}")
    elements, nbytes = block_layout(qtype)
    if raw.shape[1] % nbytes:
        raise UserError(
            "kernel.bad_argument",
            f"{qtype.name} rows are whole {nbytes}-byte blocks; {raw.shape[1]} bytes is not",
        )
    return raw.shape[1] // nbytes * elements


def _kernel(loader: ModuleLoader, op: str, qtype: GGMLQuantizationType) -> Any:
    return loader(*module_args(op)).get_function(symbol(op, qtype))


def _run(kernel: Any, launch: Launch, args: tuple[Any, ...]) -> None:
    if all(g > 0 for g in launch.grid):  # an empty output: nothing to launch
        kernel(launch.grid, launch.block, args, shared_mem=launch.shared_mem)


def launch_dequant(loader: ModuleLoader, qtype: GGMLQuantizationType, raw: Any, out: Any) -> Any:
    """raw (rows, row_bytes) uint8 -> out (rows, cols) float32. Returns ``out``."""
    cols = _cols(qtype, raw)
    rows = raw.shape[0]
    _check("raw", raw, np.uint8, (rows, raw.shape[1]))
    _check("out", out, np.float32, (rows, cols))
    args = (raw, out, np.int32(rows), np.int32(cols), np.int32(raw.shape[1]))
    _run(_kernel(loader, "dequant", qtype), dequant_launch(rows=rows, cols=cols), args)
    return out


def launch_get_rows(
    loader: ModuleLoader, qtype: GGMLQuantizationType, ids: Any, table: Any, out: Any
) -> Any:
    """ids (n,) int32, table (table_rows, row_bytes) uint8 -> out (n, cols) float32."""
    cols = _cols(qtype, table)
    n = ids.shape[0]
    _check("ids", ids, np.int32, (n,))
    _check("table", table, np.uint8, tuple(table.shape))
    _check("out", out, np.float32, (n, cols))
    args = (ids, table, out, np.int32(n), np.int32(cols), np.int32(table.shape[1]),
            np.int32(table.shape[0]))  # fmt: skip
    _run(_kernel(loader, "get_rows", qtype), get_rows_launch(n=n, cols=cols), args)
    return out


def launch_matvec(
    loader: ModuleLoader,
    qtype: GGMLQuantizationType,
    raw: Any,
    x: Any,
    out: Any,
    warp_size: int,
) -> Any:
    """raw (rows, row_bytes) uint8, x (cols,) float32 -> out (rows,) float32 = W @ x.

    Quantized types: x is first quantized to Q8_1 (one ``quantize_q8_1`` launch), and ``out`` is
    W @ x8 (`matvec_q8_reference`). ``warp_size`` is the device's (64 on CDNA, 32 on RDNA and
    NVIDIA); the launch geometry does not depend on it."""
    del warp_size  # kept for callers: the geometry is the same at every warp width
    cols = _cols(qtype, raw)
    rows = raw.shape[0]
    _check("raw", raw, np.uint8, tuple(raw.shape))
    _check("x", x, np.float32, (cols,))
    _check("out", out, np.float32, (rows,))
    xq = x  # the float types never read it
    if is_integer_path(qtype) and cols:
        xq = _aligned_bytes(x, cols + cols // 8)  # (cols + cols / 8,) Q8_1
        module = loader(*module_args("matvec"))
        _run(module.get_function("quantize_q8_1"), quantize_launch(cols=cols),
             (x, xq, np.int32(cols)))  # fmt: skip
    args = (raw, x, xq, out, np.int32(rows), np.int32(cols), np.int32(raw.shape[1]))
    _run(_kernel(loader, "matvec", qtype), matvec_launch(rows=rows), args)
    return out


def _aligned_bytes(like: Any, n: int) -> Any:
    """An (n,) uint8 buffer in ``like``'s array library, 16-byte aligned (the kernels read it
    with 16-byte loads; CuPy allocations are 256-aligned, NumPy's only usually 16)."""
    if isinstance(like, np.ndarray):
        buf = np.empty(n + 16, np.uint8)
        start = -buf.ctypes.data % 16
        return buf[start : start + n]
    import cupy

    return cupy.empty(n, cupy.uint8)


def launch_matmul(
    loader: ModuleLoader, qtype: GGMLQuantizationType, x: Any, raw: Any, out: Any
) -> Any:
    """x (n, cols) float32, raw (rows, row_bytes) uint8 -> out (n, rows) float32 = x @ W.T."""
    cols = _cols(qtype, raw)
    rows = raw.shape[0]
    n = x.shape[0]
    _check("x", x, np.float32, (n, cols))
    _check("raw", raw, np.uint8, tuple(raw.shape))
    _check("out", out, np.float32, (n, rows))
    args = (x, raw, out, np.int32(n), np.int32(rows), np.int32(cols), np.int32(raw.shape[1]))
    _run(_kernel(loader, "matmul", qtype), matmul_launch(n=n, rows=rows), args)
    return out


def launch_matvec_batch(
    loader: ModuleLoader, qtype: GGMLQuantizationType, raw: Any, x: Any, out: Any
) -> Any:
    """raw (rows, row_bytes) uint8, x (n, cols) float32 -> out (n, rows) float32 = x @ W.T, row b
    bit-identical to `launch_matvec` of x[b]. Any n: launches of up to `MAX_BATCH` rows, each
    reading the weights once."""
    cols = _cols(qtype, raw)
    rows, n = raw.shape[0], x.shape[0]
    _check("raw", raw, np.uint8, tuple(raw.shape))
    _check("x", x, np.float32, (n, cols))
    _check("out", out, np.float32, (n, rows))
    module = loader(*module_args("matvec"))
    stride = _cdiv(cols + cols // 8, 16) * 16  # Q8_1 row, padded: every row 16-aligned
    for b0 in range(0, n, MAX_BATCH):
        xb, ob = x[b0 : b0 + MAX_BATCH], out[b0 : b0 + MAX_BATCH]  # contiguous row ranges
        nb = xb.shape[0]
        xq = xb  # the float types never read it
        if is_integer_path(qtype) and cols:
            xq = _aligned_bytes(x, nb * stride).reshape(nb, stride)  # (nb, stride) Q8_1 rows
            _run(module.get_function("quantize_q8_1_rows"), quantize_rows_launch(n=nb, cols=cols),
                 (xb, xq, np.int32(cols), np.int32(stride)))  # fmt: skip
        args = (raw, xb, xq, ob, np.int32(nb), np.int32(rows), np.int32(cols),
                np.int32(raw.shape[1]), np.int32(stride))  # fmt: skip
        _run(_kernel(loader, "matvec_batch", qtype), matvec_launch(rows=rows), args)
    return out
