"""The decode step's fused kernels around the matvec (kernels/matvec.hip): registry entries, NumPy
references composed from the unfused ones, and launch wrappers.

==================  ============================  ================================================
registry name       symbol                        what
==================  ============================  ================================================
``rmsnorm_q8_1``    ``rmsnorm_q8_1``              h = rmsnorm(x) * w and h as Q8_1, one block
``matvec_fused_*``  ``matvec_fused<WB_Q4_1>``     the products of a decode step, by ``mode``:
                                                  ``split`` (Q, K and V in one launch, by block
                                                  ranges), ``swiglu`` (silu(gate x) * (up x)) or
                                                  ``add`` (y += W x, the residual); then a
                                                  ``tail`` run by the last block to finish:
                                                  y -> Q8_1 (``quant``) or RMSNorm then Q8_1
                                                  (``norm``)
==================  ============================  ================================================

A row's dot product is computed exactly as ``matvec`` computes it (same staging, lanes and
order), so ``split`` equals three ``matvec`` launches bit for bit; ``swiglu`` and ``add`` apply
``swiglu``'s and ``add``'s float32 expressions to those sums; the tails equal `rmsnorm_q8_1`. The
references are the unfused ones composed: `quant_kernels.matvec_q8_reference` (or
`matvec_reference` for the float types) in float64, then the elementwise step, then
`quant_kernels.quantize_q8_1_reference`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from workbench.errors import UserError
from workbench.gguf.quants import SUPPORTED_TYPES, row_bytes
from workbench.kernels import quant_kernels as qk
from workbench.kernels.ops_kernels import rmsnorm_reference, swiglu_reference
from workbench.kernels.registry import Cost, KernelSpec, Launch, register

MODES = {"split": 0, "swiglu": 1, "add": 2}
TAILS = {None: 0, "quant": 1, "norm": 2}
ROWS = qk.MATVEC_ROWS_PER_BLOCK  # rows per block of each matrix (swiglu: of gate and of up)

__all__ = [
    "MODES",
    "TAILS",
    "launch_matvec_fused",
    "launch_rmsnorm_q8_1",
    "matvec_fused_launch",
    "matvec_fused_reference",
    "norm_q8_1_reference",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def matvec_fused_launch(*, rows: Sequence[int] | int, mode: str = "split", **_: Any) -> Launch:
    """split/add: ceil(rows_m / 16) blocks per matrix; swiglu: 16 rows of gate and the same 16
    of up per block (one after the other, x's tile staged once for both)."""
    counts = (rows,) if isinstance(rows, int) else tuple(rows)
    if mode == "swiglu":
        counts = counts[:1]  # gate and up have one shape; a block covers rows of both
    blocks = sum(_cdiv(r, ROWS) for r in counts)
    return Launch((blocks, 1, 1), (qk.MATVEC_THREADS, 1, 1))


def rmsnorm_q8_1_launch(**_: Any) -> Launch:
    return Launch((1, 1, 1), (qk.MATVEC_THREADS, 1, 1))


# --- references -----------------------------------------------------------------------------------


def norm_q8_1_reference(
    x: np.ndarray, w: np.ndarray | None, eps: float, *, quant: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """x (cols,) -> (h (cols,) float32, h as Q8_1 or None): rmsnorm_reference then
    quantize_q8_1_reference (w None: h = x, quantized only)."""
    h = np.asarray(x, np.float32) if w is None else rmsnorm_reference(x[None, :], w, eps)[0]
    return h, (qk.quantize_q8_1_reference(h) if quant else None)


def _product(raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qk.is_integer_path(qtype):
        return qk.matvec_q8_reference(raw, x, qtype)
    return qk.matvec_reference(raw, x, qtype)


def matvec_fused_reference(
    raws: Sequence[np.ndarray],
    x: np.ndarray,
    qtype: GGMLQuantizationType,
    *,
    mode: str = "split",
    residual: np.ndarray | None = None,
) -> list[np.ndarray]:
    """What matvec_fused writes to y0 (y1, y2): float64 products of the Q8_1-rounded x (the
    quantized types) or of x (the float types), then SwiGLU (float64) or the residual add."""
    ys = [_product(r, x, qtype) for r in raws]
    if mode == "swiglu":
        return [swiglu_reference(ys[0], ys[1])]
    if mode == "add":
        assert residual is not None
        return [residual.astype(np.float64) + ys[0]]
    return ys


def _registry_reference(raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType) -> Any:
    return matvec_fused_reference([raw], x, qtype)[0]


# --- launch wrappers ------------------------------------------------------------------------------


def _module(loader: qk.ModuleLoader) -> Any:
    return loader(*qk.module_args("matvec"))


_check = qk._check  # the launch wrappers' one argument check (dtype, shape, C order)


def q8_1_buffer(like: Any, cols: int) -> Any:
    """A 16-aligned (cols + cols / 8,) uint8 buffer for x as Q8_1, in ``like``'s library."""
    return qk._aligned_bytes(like, cols + cols // 8)


def launch_rmsnorm_q8_1(
    loader: qk.ModuleLoader, x: Any, w: Any, eps: float, h: Any, xq: Any | None
) -> None:
    """x (cols,) -> h (cols,) = rmsnorm(x) * w and, unless xq is None, h as Q8_1 in xq (cols must
    then be a multiple of 32). One block."""
    (cols,) = x.shape
    for name, a in (("x", x), ("w", w), ("h", h)):
        _check(name, a, np.float32, (cols,))
    quant = xq is not None
    if quant:
        _q8_check(xq, cols)
    args = (x, w, h, xq if quant else h, np.int32(cols), np.float32(eps), np.int32(quant))
    launch = rmsnorm_q8_1_launch()
    _module(loader).get_function("rmsnorm_q8_1")(launch.grid, launch.block, args)


def _q8_check(xq: Any, cols: int) -> None:
    if cols % qk.Q8_1_QK:
        raise UserError("kernel.bad_argument", f"Q8_1 needs a multiple of 32 values, not {cols}")
    _check("xq", xq, np.uint8, (cols + cols // 8,))


def launch_matvec_fused(
    loader: qk.ModuleLoader,
    qtype: GGMLQuantizationType,
    raws: Sequence[Any],
    x: Any,
    xq: Any | None,
    ys: Sequence[Any],
    *,
    mode: str = "split",
    tail: str | None = None,
    tail_w: Any | None = None,
    eps: float = 0.0,
    tail_h: Any | None = None,
    tail_q: Any | None = None,
    counter: Any | None = None,
    residual: Any | None = None,
) -> None:
    """One matvec_fused launch.

    raws: 1..3 (rows_m, row_bytes) uint8 matrices of ``qtype`` sharing cols (split: y_m = W_m x;
    swiglu: two of one shape, y0 = silu(W0 x) * (W1 x); add: one, y0 = residual + W0 x, residual
    (rows0,) defaulting to y0 itself: in place). x (cols,) float32;
    xq its Q8_1 (the quantized types read only xq, the float types only x). ys: split one per
    matrix, otherwise one (rows0,) float32. tail (needs ``counter``, a (1,) uint32 of zeros that
    the kernel leaves at zero): "quant" writes y0 as Q8_1 into tail_q; "norm" writes
    tail_h = rmsnorm(y0) * tail_w and, unless tail_q is None, tail_h as Q8_1 into tail_q."""
    if mode not in MODES or tail not in TAILS:
        raise UserError("kernel.bad_argument", f"mode {mode!r} / tail {tail!r} unknown")
    want = {"split": (1, 2, 3), "swiglu": (2,), "add": (1,)}[mode]
    if len(raws) not in want or len(ys) != (len(raws) if mode == "split" else 1):
        raise UserError("kernel.bad_argument", f"{mode}: {len(raws)} matrices, {len(ys)} outputs")
    cols = qk._cols(qtype, raws[0])
    rb = raws[0].shape[1]
    for i, raw in enumerate(raws):
        _check(f"raws[{i}]", raw, np.uint8, (raw.shape[0], rb))
    if mode == "swiglu" and raws[1].shape != raws[0].shape:
        raise UserError("kernel.bad_argument", "gate and up must have one shape")
    _check("x", x, np.float32, (cols,))
    integer = qk.is_integer_path(qtype)
    if integer:
        assert xq is not None
        _q8_check(xq, cols)
    rows = [r.shape[0] for r in raws]
    for i, y in enumerate(ys):
        _check(f"ys[{i}]", y, np.float32, (rows[i],))
    mats = [*raws, *[raws[0]] * (3 - len(raws))]
    outs = [*ys, *[ys[0]] * (3 - len(ys))]
    if mode == "add" and residual is not None:
        _check("residual", residual, np.float32, (rows[0],))
        outs[1] = residual
    counts = [*rows, *[0] * (3 - len(rows))]
    if mode != "split":
        counts[1:] = [rows[-1] if mode == "swiglu" else 0, 0]
    t = TAILS[tail]
    n_out = rows[0]
    if t:
        if counter is None:
            raise UserError("kernel.bad_argument", "a tail needs a (1,) uint32 counter")
        _check("counter", counter, np.uint32, (1,))
    tq_on = tail_q is not None
    if t == 1 and not tq_on:
        raise UserError("kernel.bad_argument", "tail 'quant' needs tail_q")
    if tq_on:
        _q8_check(tail_q, n_out)
    if t == 2:
        assert tail_w is not None and tail_h is not None
        _check("tail_w", tail_w, np.float32, (n_out,))
        _check("tail_h", tail_h, np.float32, (n_out,))
    xq_arg = xq if integer else x
    filler = ys[0]  # any valid pointer for the arguments a call does not use
    args = (
        *mats, x, xq_arg, *outs, *(np.int32(c) for c in counts), np.int32(cols), np.int32(rb),
        np.int32(MODES[mode]), np.int32(t), filler if tail_w is None else tail_w,
        np.float32(eps), np.int32(tq_on), filler if tail_h is None else tail_h,
        tail_q if tq_on else xq_arg, filler if counter is None else counter,
    )  # fmt: skip
    launch = matvec_fused_launch(rows=rows if mode == "split" else rows[0], mode=mode)
    kernel = _module(loader).get_function(qk.symbol("matvec_fused", qtype))
    kernel(launch.grid, launch.block, args)


# --- registry -------------------------------------------------------------------------------------


def _fused_cost(qtype: GGMLQuantizationType) -> Callable[..., Cost]:
    def cost(*, rows: int, cols: int, **_: Any) -> Cost:  # a split of one matrix
        x = cols + cols // 8 if qk.is_integer_path(qtype) else 4 * cols
        return Cost(bytes=rows * row_bytes(qtype, cols) + x + 4 * rows, flops=2 * rows * cols)

    return cost


def _register_all() -> None:
    register(
        KernelSpec(
            name="rmsnorm_q8_1", source="matvec.hip", symbol="rmsnorm_q8_1",
            launch=rmsnorm_q8_1_launch,
            reference=lambda x, w, eps: norm_q8_1_reference(x, w, eps),
            cost=lambda dim, **_: Cost(bytes=4 * 3 * dim + dim + dim // 8, flops=5 * dim),
            description="RMSNorm of one row fused with its Q8_1 quantization (one block)",
            defines=qk.gguf_defines(),  # matvec.hip's: one module holds it and the products
            shapes=({"dim": 576},),
        )
    )  # fmt: skip
    for q in SUPPORTED_TYPES:
        register(
            KernelSpec(
                name=qk.kernel_name("matvec_fused", q),
                source="matvec.hip",
                symbol=qk.symbol("matvec_fused", q),
                launch=matvec_fused_launch,
                reference=functools.partial(_registry_reference, qtype=q),
                cost=_fused_cost(q),
                description=f"decode products on {q.name} blocks: QKV in one launch, "
                "gate/up with SwiGLU, residual add; RMSNorm/Q8_1 tail by the last block",
                defines=qk.gguf_defines(),
                shapes=tuple(
                    {"rows": r, "cols": c}
                    for r, c in ((960, 576), (1536, 576), (576, 1536))
                    if c % qk.block_layout(q)[0] == 0
                ),
            )
        )


_register_all()
