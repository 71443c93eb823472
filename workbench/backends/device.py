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
from workbench.kernels import fused_kernels as fk
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
class Activation:
    """A decode step's vector as the next product reads it: h (cols,) float32 (the float types'
    input) and, where cols % 32 == 0, h as Q8_1 (the quantized types'; None otherwise)."""

    h: Any
    xq: Any | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.h.shape)


class _CountingModule:
    """A compiled module whose kernels count their launches on the backend (``launches``): the
    launcher records how many kernels each operation ran."""

    def __init__(self, module: Any, backend: DeviceBackend) -> None:
        self._module, self._backend = module, backend

    def get_function(self, name: str) -> Callable[..., Any]:
        fn = self._module.get_function(name)
        backend = self._backend

        def launch(*args: Any, **kwargs: Any) -> Any:
            backend.launches += 1
            return fn(*args, **kwargs)

        return launch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


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
        self.launches = 0  # kernels launched so far (the launcher's per-operation count)
        self.fused_decode = True  # the engine decodes a token through the fused operations
        self.threads = 1
        if target == "cupy":
            from workbench.kernels.cupy_target import device_arch, import_cupy
            from workbench.kernels.cupy_target import warp_size as device_warp_size

            cupy = import_cupy()
            self.xp = cupy
            self.warp_size = device_warp_size(cupy)
            self.arch: str | None = device_arch(cupy)  # hiprtc compiles for it: MFMA if it has
            loader = qk.cupy_loader()
        else:
            if qk.has_mfma(arch) and warp_size != 64:
                raise UserError(
                    "user.bad_option",
                    f"{arch} runs waves of 64 (its MFMA needs them), not {warp_size}",
                )
            self.xp = np
            self.warp_size = warp_size
            self.arch = arch
            loader = qk.emulator_loader(warp_size, arch=arch)
        self.mfma = qk.has_mfma(self.arch)
        self._quant: qk.ModuleLoader = lambda *a: _CountingModule(loader(*a), self)
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
                self._ops[source] = _CountingModule(module, self)
        if progress is not None:
            progress(len(jobs), len(jobs), "")
        self._rope_tables: dict[tuple, Any] = {}  # (rope_dim, base, scale, factors) -> table
        self._scratch: dict[tuple, Any] = {}  # the fused decode's buffers, by (role, size)

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

    def attention_paged(self, q: Any, k_pool: Any, v_pool: Any, tables: Any, lengths: Any) -> Any:
        """q (n, heads, hd), the last position of each of n sequences; k_pool, v_pool one layer
        of the page pool (pages, page_size, kv_heads, hd); tables (n, max_pages), lengths (n,)
        -> (n, heads*hd). Sequence s attends to its keys 0..lengths[s]-1 through its page
        table, as `attention` on its gathered keys: one launch for all of them."""
        page_size = k_pool.shape[1]
        lens = [int(t) for t in lengths]
        pages = [[int(p) for p in row[: -(-t // page_size)]] for row, t in zip(tables, lens)]
        q = self.xp.ascontiguousarray(q)
        return pk.paged_attention(self._m("attention.hip"), q, k_pool, v_pool, pages, lens)

    def rope_rows(
        self, x: Any, positions: tuple[int, ...], spec: ModelSpec, factors: DeviceWeight | None
    ) -> None:
        """Rotate x (n, heads, hd) in place, row i at position positions[i] (a launch per row)."""
        for i, p in enumerate(positions):
            self.rope(x[i : i + 1], p, spec, factors)

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

    # -- the fused decode step (one token; see docs/kernels.md "Fusion") ----------------------
    def _buf(self, role: str, n: int, dtype: Any = np.float32) -> Any:
        """A persistent (n,) buffer for one role of the decode step (reused every token)."""
        key = (role, n, np.dtype(dtype).str)
        buf = self._scratch.get(key)
        if buf is None:
            if np.dtype(dtype) == np.uint8:  # Q8_1: 16-aligned
                buf = qk._aligned_bytes(self.xp.empty(1, np.float32), n)
            else:
                buf = self.xp.zeros(n, dtype=dtype)
            self._scratch[key] = buf
        return buf

    def _act(self, role: str, n: int) -> Activation:
        xq = self._buf(role + ".q", n + n // 8, np.uint8) if n % qk.Q8_1_QK == 0 else None
        return Activation(self._buf(role, n), xq)

    def norm_quant(self, x: Any, w: DeviceWeight, eps: float) -> Activation:
        """x (1, dim) -> rmsnorm(x) * w as an `Activation` (rmsnorm_q8_1: one launch)."""
        act = self._act("norm", x.shape[-1])
        fk.launch_rmsnorm_q8_1(self._quant, x.reshape(-1), w.data, eps, act.h, act.xq)
        return act

    def _products(self, ws: list[DeviceWeight], act: Activation, ys: list[Any]) -> None:
        """y_m = W_m @ act: one matvec_fused launch when the matrices share a type, else one
        per matrix."""
        groups = [ws] if len({w.qtype for w in ws}) == 1 else [[w] for w in ws]
        i = 0
        for group in groups:
            fk.launch_matvec_fused(
                self._quant, group[0].qtype, [w.data for w in group], act.h, act.xq,
                ys[i : i + len(group)], mode="split",
            )  # fmt: skip
            i += len(group)

    def linear_qkv(
        self, wq: DeviceWeight, wk: DeviceWeight, wv: DeviceWeight, act: Activation
    ) -> tuple[Any, Any, Any]:
        """q, k, v = Wq h, Wk h, Wv h in one launch (block ranges over the three matrices)."""
        ys = [self._buf(role, w.shape[0]) for role, w in (("q", wq), ("k", wk), ("v", wv))]
        self._products([wq, wk, wv], act, ys)
        return ys[0], ys[1], ys[2]

    def rope_kv(
        self,
        q: Any,
        k: Any,
        v: Any,
        k_cache: Any,
        v_cache: Any,
        start: int,
        spec: ModelSpec,
        factors: DeviceWeight | None,
    ) -> Any:
        """RoPE of q and k, and k, v into the cache at position start: one launch. Returns the
        rotated q (another buffer: a retried launch computes the same)."""
        hd = spec.head_dim
        return ops.rope_kv(
            self._m("rope.hip"), q.reshape(-1, hd), k.reshape(-1, hd), v.reshape(-1, hd),
            k_cache, v_cache, start, mode=spec.rope_mode, rope_dim=spec.rope_dim,
            table=self._rope_table(spec, factors, start + 1),
            q_out=self._buf("q.rot", q.size).reshape(-1, hd),
        )  # fmt: skip

    def attention_quant(self, q: Any, k_cache: Any, v_cache: Any, start: int) -> Activation:
        """Decode attention of q (heads, hd) whose merge also writes its output as Q8_1."""
        hd = k_cache.shape[2]
        n = q.size  # heads * hd
        act = self._act("att", n)
        out = act.h.reshape(1, n)
        ops.attention(
            self._m("attention.hip"), q.reshape(1, n // hd, hd), k_cache, v_cache, start,
            out=out, xq=act.xq,
        )  # fmt: skip
        return act

    def _tail(self, n: int, norm: DeviceWeight | None, eps: float) -> tuple[dict, Activation]:
        act = self._act("norm" if norm is not None else "ff", n)
        if act.xq is None and norm is None:
            return {}, act  # nothing to do after the product
        kw = {"tail": "norm" if norm is not None else "quant", "tail_q": act.xq,
              "counter": self._buf("counter", 1, np.uint32), "eps": eps}  # fmt: skip
        if norm is not None:
            kw |= {"tail_w": norm.data, "tail_h": act.h}
        return kw, act

    def linear_add(
        self, w: DeviceWeight, act: Activation, x: Any, norm: DeviceWeight, eps: float
    ) -> Activation:
        """(x + W @ act, rmsnorm of it * norm as an `Activation`): one launch, the norm by its last
        block. x: (rows,) or (1, rows); the sum goes to another buffer than x, so that a retried
        launch (after a failed synchronisation) computes the same."""
        rows = w.shape[0]
        kw, out = self._tail(rows, norm, eps)
        a = self._buf("x.a", rows)
        x_new = self._buf("x.b", rows) if x is a else a
        fk.launch_matvec_fused(
            self._quant, w.qtype, [w.data], act.h, act.xq, [x_new], mode="add",
            residual=x.reshape(-1), **kw,
        )  # fmt: skip
        return x_new, out

    def linear_swiglu(self, wg: DeviceWeight, wu: DeviceWeight, act: Activation) -> Activation:
        """silu(Wg @ act) * (Wu @ act) as an `Activation` (quantized by the last block)."""
        kw, out = self._tail(wg.shape[0], None, 0.0)
        if wg.qtype == wu.qtype:
            fk.launch_matvec_fused(
                self._quant, wg.qtype, [wg.data, wu.data], act.h, act.xq, [out.h],
                mode="swiglu", **kw,
            )  # fmt: skip
            return out
        up = self._buf("up", wu.shape[0])
        self._products([wg, wu], act, [out.h, up])
        ops.swiglu(self._m("elementwise.hip"), out.h, up, out=out.h)
        if out.xq is not None:
            self._products_quantize(out)
        return out

    def _products_quantize(self, act: Activation) -> None:
        module = self._quant(*qk.module_args("matvec"))
        n = act.h.shape[0]
        launch = qk.quantize_launch(cols=n)
        args = (act.h, act.xq, np.int32(n))
        module.get_function("quantize_q8_1")(launch.grid, launch.block, args)

    def linear_act(self, w: DeviceWeight, act: Activation) -> Any:
        """W @ act (1, rows): the logits."""
        out = self.xp.empty((1, w.shape[0]), dtype=self.xp.float32)
        self._products([w], act, [out.reshape(-1)])
        return out

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
