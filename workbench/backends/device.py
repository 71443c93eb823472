"""The device backend: the engine's operations as HIP kernel launches.

One class for both targets: "cupy" (a GPU: CuPy arrays, hiprtc on ROCm or NVRTC on CUDA) and
"emulator" (NumPy arrays, the same kernel sources run by the CPU emulator). Weights are uploaded
once in their GGUF block form; activations and the KV cache live in `xp` arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from workbench.errors import UserError, WorkbenchError
from workbench.gguf.reader import ModelSpec, Tensor
from workbench.kernels import ops_kernels as ops
from workbench.kernels import paged_kernels as pk
from workbench.kernels import quant_kernels as qk
from workbench.runtime import faults
from workbench.runtime.classify import classify
from workbench.runtime.retry import RetryPolicy

TARGETS = ("emulator", "cupy")
KV_DTYPES = ("float16", "float32")  # the KV cache's element type; fp16 halves attention's traffic
COMPILE_RETRY = RetryPolicy(max_attempts=3, initial_delay_s=0.05, max_delay_s=1.0)

# (modules built so far, modules in all, the one being built now: a source file name).
CompileProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class DeviceWeight:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: Any  # matrices: (rows, row_bytes) uint8 blocks; vectors: (n,) float32


class DeviceBackend:
    """``progress`` is called before each module is built; every module is built here, at
    start, so compile errors (and the compile retry) happen now, never inside a forward pass.
    ``kv_dtype`` is the KV cache's element type (`KV_DTYPES`). ``arch`` (emulator only, e.g.
    ``"gfx90a"``) emulates that GPU's branches of the kernels; on "cupy" it is the device's own.
    ``mfma`` says whether prefill's matmul runs on FP16 matrix cores (the arch has them)."""

    def __init__(
        self,
        target: str = "emulator",
        *,
        warp_size: int = 64,
        kv_dtype: str = "float16",
        progress: CompileProgress | None = None,
        arch: str | None = None,
    ) -> None:
        if target not in TARGETS:
            raise UserError("user.bad_target", f"target must be one of {TARGETS}, not {target!r}")
        if kv_dtype not in KV_DTYPES:
            raise UserError(
                "user.bad_option", f"kv_dtype must be one of {KV_DTYPES}, not {kv_dtype!r}"
            )
        self.kv_dtype = np.dtype(kv_dtype)  # KVCache allocates (layer, kv_heads, ctx, hd) of it
        self.name = target
        self.threads = 1
        if target == "cupy":
            from workbench.kernels.cupy_target import device_arch, import_cupy
            from workbench.kernels.cupy_target import warp_size as device_warp_size

            cupy = import_cupy()
            self.xp = cupy
            self.warp_size = device_warp_size(cupy)
            self.arch: str | None = device_arch(cupy)  # hiprtc compiles for it: MFMA if it has
            self._quant = qk.cupy_loader()
        else:
            if qk.has_mfma(arch) and warp_size != 64:
                raise UserError(
                    "user.bad_option",
                    f"{arch} runs waves of 64 (its MFMA needs them), not {warp_size}",
                )
            self.xp = np
            self.warp_size = warp_size
            self.arch = arch
            self._quant = qk.emulator_loader(warp_size, arch=arch)
        self.mfma = qk.has_mfma(self.arch)
        jobs: list[tuple[str, Callable[[], Any]]] = [
            (src, functools.partial(self._load_ops, src)) for src in ops.SOURCES
        ]
        jobs += [
            (qk.SOURCES[op], functools.partial(self._quant, *qk.module_args(op)))
            for op in qk.OPERATIONS
        ]
        self._ops: dict[str, Any] = {}
        for i, (source, build) in enumerate(jobs):
            if progress is not None:
                progress(i, len(jobs), source)
            module = self._compile(source, build)
            if source in ops.SOURCES:
                self._ops[source] = module
        if progress is not None:
            progress(len(jobs), len(jobs), "")
        self._rope_tables: dict[tuple, Any] = {}  # (rope_dim, base, scale, factors) -> table

    def _load_ops(self, source: str) -> Any:
        if self.name == "emulator":
            return ops.load_module(source, self.name, warp_size=self.warp_size)
        return ops.load_module(source, self.name)

    def _compile(self, source: str, build: Callable[[], Any]) -> Any:
        """Build one module, retrying a transient compiler failure (the compile site)."""

        def attempt() -> Any:
            faults.maybe_fail("compile", source=source, backend=self.name)
            try:
                return build()
            except WorkbenchError:
                raise
            except Exception as e:  # a driver's or compiler's own exception: ours, here
                raise classify(e, operation="compile", source=source, backend=self.name) from e

        return COMPILE_RETRY.call(attempt, operation="compile")

    def _m(self, source: str) -> Any:
        return self._ops[source]

    # -- weights ---------------------------------------------------------------------------
    def load_weight(self, t: Tensor) -> DeviceWeight:
        xp = self.xp
        if len(t.shape) == 1:
            raw = xp.asarray(np.ascontiguousarray(t.raw.reshape(1, -1)))
            vec = xp.empty((1, t.shape[0]), dtype=xp.float32)
            qk.launch_dequant(self._quant, t.qtype, raw, vec)
            return DeviceWeight(t.name, GGMLQuantizationType.F32, t.shape, vec.reshape(t.shape))
        return DeviceWeight(t.name, t.qtype, t.shape, xp.asarray(np.ascontiguousarray(t.raw)))

    # -- operations ------------------------------------------------------------------------
    def embed(self, w: DeviceWeight, ids: Any) -> Any:
        xp = self.xp
        ids = xp.asarray(np.asarray(ids, dtype=np.int32))  # (n,)
        out = xp.empty((ids.shape[0], w.shape[1]), dtype=xp.float32)  # (n, dim)
        return qk.launch_get_rows(self._quant, w.qtype, ids, w.data, out)

    def linear(self, w: DeviceWeight, x: Any) -> Any:
        """x (n, cols) -> (n, rows) = x @ W.T: matvec (decode) or tiled matmul (prefill; on
        matrix cores where ``self.mfma``: the kernel's MFMA body is compiled for such an arch)."""
        xp = self.xp
        n, rows = x.shape[0], w.shape[0]
        x = xp.ascontiguousarray(x)
        if n == 1:
            out = xp.empty((rows,), dtype=xp.float32)
            qk.launch_matvec(self._quant, w.qtype, w.data, x[0], out, self.warp_size)
            return out[None, :]
        out = xp.empty((n, rows), dtype=xp.float32)
        return qk.launch_matmul(self._quant, w.qtype, x, w.data, out)

    def linear_rows(self, w: DeviceWeight, x: Any) -> Any:
        """x (n, cols), n decoding rows -> (n, rows): each row exactly as `linear` of that row
        alone (the one-row matvec), the weights read once for up to 32 rows."""
        xp = self.xp
        x = xp.ascontiguousarray(x)
        if x.shape[0] == 1:
            return self.linear(w, x)
        out = xp.empty((x.shape[0], w.shape[0]), dtype=xp.float32)
        return qk.launch_matvec_batch(self._quant, w.qtype, w.data, x, out)

    def paged_attention(
        self, q: Any, k_pool: Any, v_pool: Any, tables: list[list[int]], lens: list[int]
    ) -> Any:
        """q (n, heads, hd), the last position of each of n sequences; k_pool, v_pool one layer
        of the page pool (pages, page_size, kv_heads, hd) -> (n, heads*hd). Sequence s attends to
        its keys 0..lens[s]-1 through its page table, as `attention` on its gathered keys."""
        q = self.xp.ascontiguousarray(q)
        return pk.paged_attention(self._m("attention.hip"), q, k_pool, v_pool, tables, lens)

    def rmsnorm(self, x: Any, w: DeviceWeight, eps: float) -> Any:
        x = self.xp.ascontiguousarray(x)
        out = self.xp.empty_like(x)
        return ops.rmsnorm(self._m("rmsnorm.hip"), x, w.data, eps, out=out)

    def rope(self, x: Any, start: int, spec: ModelSpec, factors: DeviceWeight | None) -> None:
        ops.rope(
            self._m("rope.hip"),
            x,
            start,
            mode=spec.rope_mode,
            rope_dim=spec.rope_dim,
            base=spec.rope_base,
            rope_scale=spec.rope_scale,
            table=self._rope_table(spec, factors, start + x.shape[0]),
        )

    def _rope_table(self, spec: ModelSpec, factors: DeviceWeight | None, positions: int) -> Any:
        """The (cos, sin) table of positions 0.. for this model, kept on the device and grown
        by doubling as the context does (rows are computed once, not per token)."""
        key = (
            spec.rope_dim,
            spec.rope_base,
            spec.rope_scale,
            None if factors is None else factors.name,
        )
        table = self._rope_tables.get(key)
        if table is None or table.shape[0] < positions:
            rows = max(positions, 256, 2 * (0 if table is None else table.shape[0]))
            ff = None if factors is None else np.asarray(self.to_host(factors.data))
            host = ops.rope_table(rows, spec.rope_dim, spec.rope_base, spec.rope_scale, ff)
            table = self._rope_tables[key] = self.xp.asarray(host)  # (rows, rope_dim/2, 2)
        return table

    def kv_append(self, k_cache: Any, v_cache: Any, k: Any, v: Any, start: int) -> None:
        xp = self.xp
        ops.kv_append(
            self._m("elementwise.hip"),
            xp.ascontiguousarray(k),
            xp.ascontiguousarray(v),
            k_cache,
            v_cache,
            start,
        )

    def attention(self, q: Any, k_cache: Any, v_cache: Any, start: int) -> Any:
        return ops.attention(self._m("attention.hip"), q, k_cache, v_cache, start)

    def swiglu(self, gate: Any, up: Any) -> Any:
        return ops.swiglu(self._m("elementwise.hip"), gate, up, out=gate)

    def add(self, a: Any, b: Any) -> Any:
        return ops.add(self._m("elementwise.hip"), self.xp.ascontiguousarray(a), b)

    def sample_token(
        self, logits: Any, *, temperature: float, top_k: int, top_p: float, min_p: float, u: float
    ) -> int:
        """The next token id, drawn on the device: only the id crosses to the host.

        temperature 0 is greedy (argmax); otherwise top-k (1..128), top-p, min-p, temperature and
        a draw with the uniform number u, in the order of the engine's sampler.
        """
        m = self._m("sampling.hip")
        if temperature == 0:
            out = ops.argmax(m, logits)
        else:
            out = ops.sample(
                m, logits, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature, u=u
            )
        return int(self.to_host(out)[0])

    def to_host(self, a: Any) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def synchronize(self) -> None:
        """Wait for the launched kernels (the emulator runs them synchronously)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def free_memory(self) -> None:
        """Return the memory pool's cached blocks to the device (before retrying an allocation)."""
        if self.name == "cupy":
            self.xp.get_default_memory_pool().free_all_blocks()

    def memory(self) -> dict[str, int] | None:
        """Free and total device memory in bytes (None on the emulator)."""
        if self.name != "cupy":
            return None
        free, total = self.xp.cuda.runtime.memGetInfo()
        return {"free": int(free), "total": int(total)}
