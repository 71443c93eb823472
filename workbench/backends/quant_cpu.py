"""CPU compute core of the NumPy backend: numba kernels over GGUF quantized blocks.

Five operations, every type in `SUPPORTED_TYPES`:

- `dequantize`: block bytes -> float32, bit-identical to ``gguf.quants.dequantize``.
- `matvec`: ``W @ x`` computed on the blocks (each block is decoded in registers and dotted with
  ``x`` at once; the float32 matrix never exists). This is the decode hot path.
- `matmul`: ``x @ W.T`` for several rows of ``x`` (prefill): dequantizes a bounded chunk of ``W``
  at a time into a scratch buffer and hands each chunk to BLAS.
- `matmul_cols`: the same product feature-major, ``W @ xt`` with xt (cols, n): on the blocks
  (`quant_gemm`) for the common types, else dequantized for BLAS in the orientation it runs
  fastest at a prompt's shapes.
- `get_rows`: embedding lookup, dequantizing only the requested rows.

This module holds the per-type drivers (threaded loops over rows) and the dispatch; the block
layouts and row kernels are in `quant_blocks`, the SIMD intrinsics they use in `quant_simd`.
The numerical contracts are stated in `quant_blocks`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import QK_K
from numba import njit, prange

from workbench.backends import quant_gemm
from workbench.backends.quant_blocks import (
    _BF16_B,
    _F16_B,
    _F32_B,
    _Q2_K_B,
    _Q3_K_B,
    _Q4_0_B,
    _Q4_1_B,
    _Q4_K_B,
    _Q5_0_B,
    _Q5_1_B,
    _Q5_K_B,
    _Q6_K_B,
    _Q8_0_B,
    _QK5_0,
    _QK5_1,
    _deq_bf16_row,
    _deq_f16_row,
    _deq_f32_row,
    _deq_q2_k_row,
    _deq_q3_k_row,
    _deq_q4_0_row,
    _deq_q4_1_row,
    _deq_q4_k_row,
    _deq_q5_0_row,
    _deq_q5_1_row,
    _deq_q5_k_row,
    _deq_q6_k_row,
    _deq_q8_0_row,
    _dot_bf16_row,
    _dot_f16_row,
    _dot_f32_row,
    _dot_q2_k_row,
    _dot_q3_k_row,
    _dot_q4_0_row,
    _dot_q4_1_row,
    _dot_q4_k_row,
    _dot_q5_0_row,
    _dot_q5_1_row,
    _dot_q5_k_row,
    _dot_q6_k_row,
    _dot_q8_0_row,
    _group_sums,
    _row_index,
)
from workbench.backends.quant_simd import _prefetch_range
from workbench.errors import ModelError, UserError
from workbench.gguf.quants import SUPPORTED_TYPES, block_layout

Q = GGMLQuantizationType

__all__ = [
    "default_threads", "dequantize", "get_rows", "get_threads", "matmul", "matmul_cols",
    "matvec", "physical_cores", "set_threads",
]  # fmt: skip

# ------------------------------------------------------------------------------------------------
# Drivers, one pair per type: ``_deq_*(raw, ids, out, par)`` and ``_mv_*(raw, x, out, par)``.
# raw (rows, row_bytes) uint8; ids (n,) int64 rows to decode, or (0,) for all rows;
# out (n, cols) / (rows,) float32; x (cols,) float32. ``par`` picks the threaded loop; small
# matrices take the plain loop, because waking the worker threads costs more than they save.
# Dequantization drivers are compiled without fastmath (bit-identity); matvec drivers with it.
# Dequantization releases the GIL, so that `matmul` can split a chunk across its own threads.
# ------------------------------------------------------------------------------------------------


# A matvec's row loop first asks for the bytes this far past the start of the row it reads
# (`_ask_ahead`): the hardware prefetchers alone left a core's stream stalled on memory. The
# fused decode's rows, SmolLM2 Q4_1 on 2 threads: 100-104 tok/s without, 113-122 at 1-8 KiB
# ahead, best at 2 KiB; the logits' rows (Q8_0) went from 14.8 to 21 GB/s. In `matvec`, the
# prompt's last logits right after its prefill (30 MB, cold): 1.93 ms without, 1.42-1.47 with.
AHEAD = 2048


@njit(nogil=True, inline="always")
def _ask_ahead(raw, r):
    """Ask for the `AHEAD` bytes past the start of row r of raw (rows, row_bytes) uint8,
    C-contiguous: a hint, which never faults past the end."""
    rb = raw.shape[1]
    _prefetch_range(raw.reshape(-1), r * rb + AHEAD, (r + 1) * rb + AHEAD)


@njit(parallel=True, cache=True, nogil=True)
def _deq_f32(raw, ids, out, par):
    n = raw.shape[1] // _F32_B
    if par:
        for i in prange(out.shape[0]):
            _deq_f32_row(raw[_row_index(ids, i)], out[i], n)
    else:
        for i in range(out.shape[0]):
            _deq_f32_row(raw[_row_index(ids, i)], out[i], n)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f32(raw, x, out, par):
    n = raw.shape[1] // _F32_B
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_f32_row(raw[r], x, x, n)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_f32_row(raw[r], x, x, n)


@njit(parallel=True, cache=True, nogil=True)
def _deq_f16(raw, ids, out, par):
    n = raw.shape[1] // _F16_B
    if par:
        for i in prange(out.shape[0]):
            _deq_f16_row(raw[_row_index(ids, i)], out[i], n)
    else:
        for i in range(out.shape[0]):
            _deq_f16_row(raw[_row_index(ids, i)], out[i], n)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_f16(raw, x, out, par):
    n = raw.shape[1] // _F16_B
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_f16_row(raw[r], x, x, n)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_f16_row(raw[r], x, x, n)


@njit(parallel=True, cache=True, nogil=True)
def _deq_bf16(raw, ids, out, par):
    n = raw.shape[1] // _BF16_B
    if par:
        for i in prange(out.shape[0]):
            _deq_bf16_row(raw[_row_index(ids, i)], out[i], n)
    else:
        for i in range(out.shape[0]):
            _deq_bf16_row(raw[_row_index(ids, i)], out[i], n)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_bf16(raw, x, out, par):
    n = raw.shape[1] // _BF16_B
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_bf16_row(raw[r], x, x, n)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_bf16_row(raw[r], x, x, n)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_0(raw, ids, out, par):
    nb = raw.shape[1] // _Q4_0_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q4_0_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q4_0_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_0(raw, x, out, par):
    nb = raw.shape[1] // _Q4_0_B
    if par:  # the 16-lane kernel takes no block sums (``xs`` unused, as for Q8_0)
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q4_0_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q4_0_row(raw[r], x, x, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_1(raw, ids, out, par):
    nb = raw.shape[1] // _Q4_1_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q4_1_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q4_1_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_1(raw, x, out, par):
    nb = raw.shape[1] // _Q4_1_B
    if par:  # the 16-lane kernel takes no block sums (``xs`` unused, as for Q8_0)
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q4_1_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q4_1_row(raw[r], x, x, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q5_0(raw, ids, out, par):
    nb = raw.shape[1] // _Q5_0_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q5_0_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q5_0_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q5_0(raw, x, out, par):
    nb = raw.shape[1] // _Q5_0_B
    xs = _group_sums(x, _QK5_0)  # (nb,)
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q5_0_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q5_0_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q5_1(raw, ids, out, par):
    nb = raw.shape[1] // _Q5_1_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q5_1_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q5_1_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q5_1(raw, x, out, par):
    nb = raw.shape[1] // _Q5_1_B
    xs = _group_sums(x, _QK5_1)  # (nb,)
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q5_1_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q5_1_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q8_0(raw, ids, out, par):
    nb = raw.shape[1] // _Q8_0_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q8_0_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q8_0_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q8_0(raw, x, out, par):
    nb = raw.shape[1] // _Q8_0_B
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q8_0_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q8_0_row(raw[r], x, x, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q2_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q2_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q2_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q2_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q2_k(raw, x, out, par):
    nb = raw.shape[1] // _Q2_K_B
    xs = _group_sums(x, QK_K // 16)  # (nb * 16,)
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q2_k_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q2_k_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q3_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q3_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q3_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q3_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q3_k(raw, x, out, par):
    nb = raw.shape[1] // _Q3_K_B
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q3_k_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q3_k_row(raw[r], x, x, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q4_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q4_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q4_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q4_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q4_k(raw, x, out, par):
    nb = raw.shape[1] // _Q4_K_B
    xs = _group_sums(x, QK_K // 8)  # (nb * 8,)
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q4_k_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q4_k_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q5_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q5_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q5_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q5_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q5_k(raw, x, out, par):
    nb = raw.shape[1] // _Q5_K_B
    xs = _group_sums(x, QK_K // 8)  # (nb * 8,)
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q5_k_row(raw[r], x, xs, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q5_k_row(raw[r], x, xs, nb)


@njit(parallel=True, cache=True, nogil=True)
def _deq_q6_k(raw, ids, out, par):
    nb = raw.shape[1] // _Q6_K_B
    if par:
        for i in prange(out.shape[0]):
            _deq_q6_k_row(raw[_row_index(ids, i)], out[i], nb)
    else:
        for i in range(out.shape[0]):
            _deq_q6_k_row(raw[_row_index(ids, i)], out[i], nb)


@njit(parallel=True, cache=True, fastmath=True)
def _mv_q6_k(raw, x, out, par):
    nb = raw.shape[1] // _Q6_K_B
    if par:
        for r in prange(raw.shape[0]):
            _ask_ahead(raw, r)
            out[r] = _dot_q6_k_row(raw[r], x, x, nb)
    else:
        for r in range(raw.shape[0]):
            out[r] = _dot_q6_k_row(raw[r], x, x, nb)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


class _Kernels(NamedTuple):
    qtype: GGMLQuantizationType
    values: int  # values per block
    nbytes: int  # bytes per block
    deq: numba.core.registry.CPUDispatcher  # (raw, ids, out, par) -> None
    mv: numba.core.registry.CPUDispatcher  # (raw, x, out, par) -> None


def _entry(qtype: GGMLQuantizationType, deq, mv) -> _Kernels:
    return _Kernels(qtype, *block_layout(qtype), deq, mv)


_KERNELS: dict[GGMLQuantizationType, _Kernels] = {
    Q.F32: _entry(Q.F32, _deq_f32, _mv_f32),
    Q.F16: _entry(Q.F16, _deq_f16, _mv_f16),
    Q.BF16: _entry(Q.BF16, _deq_bf16, _mv_bf16),
    Q.Q4_0: _entry(Q.Q4_0, _deq_q4_0, _mv_q4_0),
    Q.Q4_1: _entry(Q.Q4_1, _deq_q4_1, _mv_q4_1),
    Q.Q5_0: _entry(Q.Q5_0, _deq_q5_0, _mv_q5_0),
    Q.Q5_1: _entry(Q.Q5_1, _deq_q5_1, _mv_q5_1),
    Q.Q8_0: _entry(Q.Q8_0, _deq_q8_0, _mv_q8_0),
    Q.Q2_K: _entry(Q.Q2_K, _deq_q2_k, _mv_q2_k),
    Q.Q3_K: _entry(Q.Q3_K, _deq_q3_k, _mv_q3_k),
    Q.Q4_K: _entry(Q.Q4_K, _deq_q4_k, _mv_q4_k),
    Q.Q5_K: _entry(Q.Q5_K, _deq_q5_k, _mv_q5_k),
    Q.Q6_K: _entry(Q.Q6_K, _deq_q6_k, _mv_q6_k),
}
assert set(_KERNELS) == set(SUPPORTED_TYPES)

_U8 = np.dtype(np.uint8)
_F32_DTYPE = np.dtype(np.float32)

# Passed as ``ids`` to decode every row. Kept writable like the ids `get_rows` builds, so both
# calls share one compiled specialisation.
_ALL_ROWS = np.empty(0, np.int64)  # (0,)

# Below this many weight bytes a call stays on the calling thread: handing work to the other
# threads and waiting for them costs microseconds, more than such a matrix takes alone.
_PAR_MIN_BYTES = 64 << 10

# Largest float32 chunk of W that `matmul` dequantizes at a time (when no scratch is given, or
# the scratch is bigger): large enough for BLAS to run at full speed, small enough to stay cheap.
_CHUNK_BYTES = 16 << 20


def _kernels(qtype: GGMLQuantizationType) -> _Kernels:
    k = _KERNELS.get(qtype)
    if k is None:
        name = getattr(qtype, "name", repr(qtype))
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ModelError(
            "model.unsupported_type",
            f"tensor type {name} is not supported by the CPU kernels (supported: {supported})",
            qtype=name,
        )
    return k


def _check_bytes(op: str, k: _Kernels, raw: np.ndarray, ndim: int | None) -> None:
    """Raise the `UserError` that says what is wrong with ``raw`` (dtype, rank, row length)."""
    if raw.dtype != np.uint8:
        raise UserError(
            "user.bad_dtype", f"{op}: raw must be uint8 block bytes, got dtype {raw.dtype}", op=op
        )
    if (ndim is not None and raw.ndim != ndim) or raw.ndim == 0:
        raise UserError(
            "user.bad_shape",
            f"{op}: raw must be 2-D (rows, row_bytes), got shape {raw.shape}",
            op=op,
            got=raw.shape,
        )
    if raw.shape[-1] % k.nbytes:
        raise UserError(
            "user.bad_shape",
            f"{op}: a {k.qtype.name} row is a whole number of {k.nbytes}-byte blocks ({k.values}"
            f" values each), got row_bytes={raw.shape[-1]} (raw shape {raw.shape})",
            op=op,
            got=raw.shape,
        )


def _blocks(raw: np.ndarray) -> np.ndarray:
    """raw as a read-only C-contiguous array: one compiled specialisation for every input,
    writable or memory-mapped (read-only), and no copy for the usual memory-mapped tensor."""
    flags = raw.flags
    if not flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
        flags = raw.flags
    if flags.writeable:
        raw = raw.view()
        raw.flags.writeable = False
    return raw


def _matrix(op: str, k: _Kernels, raw: np.ndarray) -> tuple[np.ndarray, int]:
    """(raw as read-only C-contiguous (rows, row_bytes) uint8, cols)."""
    raw = np.asarray(raw)
    shape = raw.shape
    if raw.dtype != _U8 or len(shape) != 2 or shape[1] % k.nbytes:
        _check_bytes(op, k, raw, 2)
    return _blocks(raw), shape[1] // k.nbytes * k.values


def _f32(x: np.ndarray) -> np.ndarray:
    """x as a writable C-contiguous float32 array (a copy only when it is not one already)."""
    flags = x.flags
    if x.dtype != _F32_DTYPE or not flags.c_contiguous or not flags.writeable:
        x = np.array(x, dtype=np.float32, order="C")
    return x


def _output(op: str, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise UserError(
            "user.bad_out",
            f"{op}: out must be a writable C-contiguous float32 array of shape {shape}, got {got}",
            op=op,
            expected=shape,
        )
    return out


def dequantize(
    qtype: GGMLQuantizationType, raw: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Block bytes -> float32, bit-identical to ``gguf.quants.dequantize(raw, qtype)``.

    raw: (..., row_bytes) uint8, typically (rows, row_bytes) or (row_bytes,).
    Returns (..., cols) float32 (``out`` if given).
    """
    k = _kernels(qtype)
    raw = np.asarray(raw)
    _check_bytes("dequantize", k, raw, None)
    row_bytes = raw.shape[-1]
    cols = row_bytes // k.nbytes * k.values
    out = _output("dequantize", out, (*raw.shape[:-1], cols))
    if out.size == 0:
        return out
    rows = _blocks(raw.reshape(-1, row_bytes))  # (rows, row_bytes)
    k.deq(rows, _ALL_ROWS, out.reshape(-1, cols), rows.nbytes >= _PAR_MIN_BYTES)
    return out


def matvec(
    qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``W @ x`` on the blocks: raw (rows, row_bytes) uint8, x (cols,) -> (rows,) float32.

    Float32 accumulation with FMAs; against a float64 product of the dequantized matrix the
    error is ~1e-7 of sum(|W| |x|) per output.
    """
    k = _KERNELS.get(qtype) or _kernels(qtype)
    raw, cols = _matrix("matvec", k, raw)
    x = np.asarray(x)
    if x.shape != (cols,):
        raise UserError(
            "user.bad_shape",
            f"matvec: x has shape {x.shape}, expected ({cols},) for a {k.qtype.name} matrix of"
            f" {raw.shape[0]} x {cols} (raw {raw.shape})",
            op="matvec",
            expected=(cols,),
            got=x.shape,
        )
    out = _output("matvec", out, (raw.shape[0],))
    k.mv(raw, _f32(x), out, raw.nbytes >= _PAR_MIN_BYTES)
    return out


def matmul(
    qtype: GGMLQuantizationType,
    raw: np.ndarray,
    x: np.ndarray,
    out: np.ndarray | None = None,
    *,
    scratch: np.ndarray | None = None,
    workers: int = 1,
) -> np.ndarray:
    """``x @ W.T``: raw (rows, row_bytes) uint8, x (n, cols) -> (n, rows) float32.

    W is dequantized a chunk of rows at a time (at most 16 MB of float32, inside ``scratch`` when
    given: any writable C-contiguous float32 array of at least ``cols`` values) and each chunk
    goes to BLAS. A single row of x takes the fused `matvec` path instead.

    ``workers`` > 1 splits each chunk's rows across that many threads of a plain thread pool (the
    calling thread is one), each dequantizing its slice and multiplying it with BLAS: the
    dequantization of one slice overlaps the product of another, and no thread spin-waits.
    Limit BLAS to one thread around such calls (as the NumPy backend does).
    """
    k, raw, x, cols = _operands("matmul", qtype, raw, x, 1)
    n, rows = x.shape[0], raw.shape[0]
    out = _output("matmul", out, (n, rows))
    chunk = _chunk_rows("matmul", scratch, cols)
    if out.size == 0:
        return out
    if n == 1:
        k.mv(raw, x[0], out[0], raw.nbytes >= _PAR_MIN_BYTES)
        return out
    if k.qtype == Q.F32:
        # Already float32: BLAS reads the block bytes as they are.
        np.matmul(x, raw.view(np.float32).T, out=out)
        return out
    for r0, r1, w in _chunks(scratch, rows, cols, chunk):
        if workers > 1 and w.nbytes >= _PAR_MIN_BYTES:
            _split(k, raw[r0:r1], x, w, out[:, r0:r1], workers)
        else:
            k.deq(raw[r0:r1], _ALL_ROWS, w, w.nbytes >= _PAR_MIN_BYTES)
            np.matmul(x, w.T, out=out[:, r0:r1])
    return out


def matmul_cols(
    qtype: GGMLQuantizationType,
    raw: np.ndarray,
    xt: np.ndarray,
    out: np.ndarray | None = None,
    *,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """``W @ xt``, `matmul` feature-major: raw (rows, row_bytes) uint8, xt (cols, n), a
    position per column -> (rows, n) float32.

    The types of `quant_gemm.FUSED_TYPES` (F32, Q4_0, Q4_1, Q8_0 where the CPU has AVX-512)
    multiply on the blocks, the dequantization inside the GEMM's panels, on numba's threads
    (`quant_gemm.gemm_cols`; the scratch is not used). The others are dequantized a chunk of
    rows at a time on the calling thread, as `matmul`, for BLAS's own threads, in the
    orientation BLAS runs fastest at a prompt's shapes (OpenBLAS's float32 GEMM for (576 x 576)
    x (576 x 128) is 280 against 200 GFLOP/s ``x @ W.T`` on this project's 2-core machine,
    docs/performance.md)."""
    k, raw, xt, cols = _operands("matmul_cols", qtype, raw, xt, 0)
    n, rows = xt.shape[1], raw.shape[0]
    given, out = out, _output("matmul_cols", out, (rows, n))
    chunk = _chunk_rows("matmul_cols", scratch, cols)
    if out.size == 0:
        return out
    if k.qtype in quant_gemm.FUSED_TYPES:
        if given is None:
            return quant_gemm.gemm_cols(k.qtype, raw, xt)
        out[...] = quant_gemm.gemm_cols(k.qtype, raw, xt)
        return out
    for r0, r1, w in _chunks(scratch, rows, cols, chunk):
        # One thread pool at a time: this thread dequantizes while BLAS's threads wait.
        k.deq(raw[r0:r1], _ALL_ROWS, w, False)
        np.matmul(w, xt, out=out[r0:r1])
    return out


def _operands(
    op: str, qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray, axis: int
) -> tuple[_Kernels, np.ndarray, np.ndarray, int]:
    """(kernels, raw blocks, x as C-contiguous float32, cols) for a product with x, whose
    ``axis`` must have W's cols values: 1 for x (n, cols), 0 for xt (cols, n)."""
    k = _kernels(qtype)
    raw, cols = _matrix(op, k, raw)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[axis] != cols:
        expected = (None, cols) if axis == 1 else (cols, None)
        want = f"(n, {cols})" if axis == 1 else f"({cols}, n)"
        raise UserError(
            "user.bad_shape",
            f"{op}: x has shape {x.shape}, expected {want} for a {k.qtype.name} matrix of"
            f" {raw.shape[0]} x {cols} (raw {raw.shape})",
            op=op,
            expected=expected,
            got=x.shape,
        )
    return k, raw, _f32(x), cols


def _chunks(
    scratch: np.ndarray | None, rows: int, cols: int, chunk: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, w) for W's rows in chunks of ``chunk``: w (r1 - r0, cols) float32, the part of
    ``scratch`` (or of one new buffer) that the chunk's dequantized rows go to."""
    size = min(chunk, rows) * cols
    buf = scratch.reshape(-1) if scratch is not None else np.empty(size, np.float32)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        yield r0, r1, buf[: (r1 - r0) * cols].reshape(r1 - r0, cols)


def _chunk_rows(op: str, scratch: np.ndarray | None, cols: int) -> int:
    """Rows of W dequantized per BLAS call: at most 16 MB, and what ``scratch`` holds."""
    chunk = max(1, _CHUNK_BYTES // (4 * max(cols, 1)))
    if scratch is None:
        return chunk
    if (
        not isinstance(scratch, np.ndarray)
        or scratch.dtype != np.float32
        or not scratch.flags.c_contiguous
        or not scratch.flags.writeable
        or scratch.size < cols
    ):
        got = (
            f"{scratch.dtype} {scratch.shape}"
            if isinstance(scratch, np.ndarray)
            else type(scratch).__name__
        )
        raise UserError(
            "user.bad_scratch",
            f"{op}: scratch must be a writable C-contiguous float32 array of at least"
            f" {cols} values, got {got}",
            op=op,
        )
    return min(chunk, scratch.size // max(cols, 1))


_POOL: ThreadPoolExecutor | None = None  # `matmul`'s helper threads, made on first use

# `matmul` with workers: two slices per thread, of at least this many rows of W: large enough
# for BLAS to run at speed, small enough that a descheduled thread leaves work for the others.
_SLICE_ROWS = 64


class _Slices:
    """Slices of one product handed out one at a time to whichever thread asks next.

    A thread that the OS deschedules (a shared machine) delays only the slice it holds: the
    others take the rest, and the caller waits only for slices in progress, not for helpers that
    have not started yet (they find nothing left and return)."""

    def __init__(self, bounds: np.ndarray, work: Callable[[int, int], None]) -> None:
        self.bounds = bounds  # (slices + 1,) row bounds
        self.work = work
        self.next = 0
        self.running = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)

    def run(self) -> None:
        while True:
            with self.lock:
                i = self.next
                if i + 1 >= len(self.bounds) or self.error is not None:
                    return
                self.next, self.running = i + 1, self.running + 1
            try:
                self.work(int(self.bounds[i]), int(self.bounds[i + 1]))
            except BaseException as e:
                with self.lock:
                    self.error = e
            finally:
                with self.lock:
                    self.running -= 1
                    if self.running == 0:
                        self.idle.notify_all()

    def wait(self) -> None:
        with self.lock:
            while self.running:
                self.idle.wait()
        if self.error is not None:
            raise self.error


def _split(
    k: _Kernels, raw: np.ndarray, x: np.ndarray, w: np.ndarray, out: np.ndarray, workers: int
) -> None:
    """out = x @ dequantize(raw).T by ``workers`` threads (the calling thread is one) over
    slices of W's rows: each thread dequantizes a slice into its part of w (rows, cols) and
    multiplies it with BLAS (which should run single-threaded here), then takes the next."""
    global _POOL
    if _POOL is None:  # threads start as work arrives, up to numba's thread limit
        limit = max(numba.config.NUMBA_NUM_THREADS - 1, 1)
        _POOL = ThreadPoolExecutor(limit, thread_name_prefix="workbench-matmul")
    rows = raw.shape[0]
    n = max(1, min(2 * workers, rows // _SLICE_ROWS))
    bounds = np.linspace(0, rows, n + 1).astype(np.int64)  # (n + 1,)

    def work(a: int, b: int) -> None:
        k.deq(raw[a:b], _ALL_ROWS, w[a:b], False)
        np.matmul(x, w[a:b].T, out=out[:, a:b])

    slices = _Slices(bounds, work)
    for _ in range(min(workers, n) - 1):
        _POOL.submit(slices.run)
    slices.run()
    slices.wait()


def get_rows(qtype: GGMLQuantizationType, raw: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: raw (rows, row_bytes) uint8, ids (n,) int -> (n, cols) float32.

    Decodes only the requested rows; bit-identical to ``dequantize(qtype, raw)[ids]``. ``ids`` of
    any shape gives ``ids.shape + (cols,)``.
    """
    k = _kernels(qtype)
    raw, cols = _matrix("get_rows", k, raw)
    rows = raw.shape[0]
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise UserError(
            "user.bad_ids", f"get_rows: ids must be integers, got dtype {ids.dtype}", op="get_rows"
        )
    flat = ids.astype(np.int64).reshape(-1)  # (n,), a private writable copy
    if flat.size and (flat.min() < 0 or flat.max() >= rows):
        raise UserError(
            "user.bad_ids",
            f"get_rows: ids must lie in [0, {rows}), got min {flat.min()} and max {flat.max()}",
            op="get_rows",
            rows=rows,
        )
    out = np.empty((*ids.shape, cols), np.float32)
    if out.size == 0:
        return out
    k.deq(raw, flat, out.reshape(-1, cols), flat.size * raw.shape[1] >= _PAR_MIN_BYTES)
    return out


def set_threads(n: int) -> None:
    """Threads the kernels use (numba's count for the calling thread)."""
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise UserError(
            "user.bad_threads",
            f"threads must be an integer from 1 to {limit} (this machine's numba limit), got {n!r}",
            threads=repr(n),
            limit=limit,
        )
    numba.set_num_threads(int(n))


def physical_cores() -> int:
    """Physical cores of this machine (hyper-threads of one core count once), from sysfs.

    Falls back to the logical CPU count where the topology is not exposed."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def default_threads() -> int:
    """The kernels' default thread count: the physical cores, within numba's limit."""
    return max(1, min(physical_cores(), numba.config.NUMBA_NUM_THREADS))


def get_threads() -> int:
    """Threads the kernels use."""
    return int(numba.get_num_threads())
