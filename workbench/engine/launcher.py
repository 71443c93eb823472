"""The one launcher every backend operation goes through.

A thin proxy in front of a backend: each operation (embed, linear, rmsnorm, rope, kv_append,
attention, swiglu, add) is timed into the profiler under the name of the kernel that implements it
(``matvec_q4_1``, ``attention_decode``, ...), with the bytes and flops of that kernel's cost model
in the registry (`cost`). On device backends it also passes the fault
injector's ``launch`` site and retries recoverable errors per the policy, with statistics and the
error log. The NumPy backend is not retried: NumPy code cannot fail transiently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from workbench.errors import RecoverableError
from workbench.kernels import registry
from workbench.observe.profiler import Profiler
from workbench.runtime import faults as faults_mod
from workbench.runtime.classify import classify
from workbench.runtime.errorlog import ErrorLog
from workbench.runtime.faults import FaultInjector
from workbench.runtime.retry import RetryPolicy, RetryStats

log = logging.getLogger(__name__)

OPERATIONS = (
    "embed", "linear", "rmsnorm", "rope", "kv_append", "attention", "swiglu", "add",
    "linear_rows", "rope_rows", "attention_paged", "swiglu_rows",  # a batch (engine/runner.py)
    "sample_token",  # device backends only
    # the device backend's fused decode step (see Transformer.forward)
    "norm_quant", "linear_qkv", "rope_kv", "attention_quant", "linear_add", "linear_swiglu",
    "linear_act",
    # a prompt feature-major (the NumPy backend; see Transformer.forward)
    "linear_cols", "rmsnorm_cols", "rope_cols", "kv_append_cols", "attention_cols",
    "linear_qkv_cols", "qkv_rope_kv_cols", "linear_add_cols", "linear_swiglu_cols",
)  # fmt: skip
_FUSED_LINEAR = ("linear_qkv", "linear_add", "linear_swiglu", "linear_act")
# The prompt's products, each with RoPE, the KV append, an add or SwiGLU inside or not: how many
# weights come first in their arguments (then xt)
_PRODUCTS_COLS = {
    "linear_cols": 1,
    "linear_qkv_cols": 3,
    "qkv_rope_kv_cols": 3,
    "linear_add_cols": 1,
    "linear_swiglu_cols": 2,
}


def kernel_name(op: str, args: tuple[Any, ...]) -> str:
    """The registry name of the kernel that runs ``op`` on these arguments."""
    # Feature-major operations run a prompt (n > 1) with the same kernels, (features, n).
    if op in _PRODUCTS_COLS:  # named for the product; the add or SwiGLU inside is small
        return f"matmul_{args[0].qtype.name.lower()}"
    if op == "attention_cols":
        return "attention_prefill"
    if op.endswith("_cols"):
        return kernel_name(op.removesuffix("_cols"), args)
    if op == "linear":
        w, x = args
        return f"{'matvec' if x.shape[0] == 1 else 'matmul'}_{w.qtype.name.lower()}"
    if op == "linear_rows":
        w, x = args
        return f"{'matvec' if x.shape[0] == 1 else 'matvec_batch'}_{w.qtype.name.lower()}"
    if op == "attention_paged":
        return "attention_decode_paged"
    if op == "embed":
        return f"get_rows_{args[0].qtype.name.lower()}"
    if op == "attention":
        return "attention_decode" if args[0].shape[0] == 1 else "attention_prefill"
    if op in ("rope", "rope_rows"):
        return f"rope_{args[2].rope_mode}"
    if op in _FUSED_LINEAR:
        return f"matvec_fused_{args[0].qtype.name.lower()}"
    if op == "norm_quant":
        return "rmsnorm_q8_1"
    if op == "attention_quant":
        return "attention_decode"
    if op == "sample_token":
        return "sample_top_k_top_p"  # argmax when greedy; named for the family
    if op == "swiglu_rows":
        return "swiglu"
    return op


def cost(op: str, args: tuple[Any, ...]) -> tuple[int | None, int | None]:
    """(bytes, flops) of the operations that dominate a forward pass; None where not modelled."""
    if op in ("linear", "linear_rows"):  # the weights once, whatever the rows
        w, x = args
        n, (rows, cols) = x.shape[0], w.shape
        return int(w.data.nbytes) + 4 * n * (cols + rows), 2 * n * rows * cols
    if op in _PRODUCTS_COLS:  # the products' (xt read once for each; the residual as an output)
        ws, xt = args[: _PRODUCTS_COLS[op]], args[_PRODUCTS_COLS[op]]
        each = [cost("linear", (w, xt.T)) for w in ws]
        return sum(b for b, _ in each), sum(f for _, f in each)
    if op in _FUSED_LINEAR:  # the matrices, the input once, the outputs
        ws = [a for a in args if hasattr(a, "qtype") and len(a.shape) == 2]  # not the norm
        cols = ws[0].shape[1]
        rows = sum(w.shape[0] for w in ws)
        nbytes = sum(int(w.data.nbytes) for w in ws) + 4 * (cols + rows)
        return nbytes, 2 * rows * cols
    shape = _kernel_shape(op, args)
    spec = registry.all_kernels().get(kernel_name(op, args)) if shape is not None else None
    if spec is None:  # not modelled, or a weight type without a GPU kernel
        return None, None
    c = spec.cost(**shape)
    return c.bytes, c.flops


def _kernel_shape(op: str, args: tuple[Any, ...]) -> dict[str, int] | None:
    """The parameters of the registry's cost model for the kernel that runs ``op`` on ``args``,
    None for an operation it does not model."""
    if op in ("swiglu", "add"):
        return {"count": int(args[0].size)}
    if op == "embed":  # the table (rows, cols), ids
        return {"n": int(args[1].size), "rows": args[0].shape[0], "cols": args[0].shape[1]}
    if op == "rmsnorm":  # x (n, dim)
        return {"n": args[0].shape[0], "dim": args[0].shape[1]}
    if op == "rmsnorm_cols":  # xt (dim, n)
        return {"n": args[0].shape[1], "dim": args[0].shape[0]}
    if op in ("rope", "rope_cols"):
        x, _, spec = args[:3]  # x (n, heads, hd) or xt (heads*hd, n)
        n, heads = (
            (x.shape[0], x.shape[1]) if op == "rope" else (x.shape[1], x.shape[0] // spec.head_dim)
        )
        return {"n": n, "heads": heads, "rope_dim": spec.rope_dim}
    if op in ("kv_append", "kv_append_cols"):  # the cache (kv_heads, ctx, hd), then k
        k_cache, k = args[0], args[2]
        n = k.shape[0] if op == "kv_append" else k.shape[1]
        return {"n": n, "kv_heads": k_cache.shape[0], "head_dim": k_cache.shape[2]}
    if op in ("attention", "attention_cols"):  # q (n, heads, hd) or qt (heads*hd, n), the cache
        q, k_cache, start = args[0], args[1], args[3]
        kv_heads, _, hd = k_cache.shape
        n, heads = (q.shape[0], q.shape[1]) if op == "attention" else (q.shape[1], q.shape[0] // hd)
        if n == 1 and op == "attention":  # attention_decode
            return {"heads": heads, "head_dim": hd, "t": start + 1, "kv_heads": kv_heads}
        return {"n": n, "heads": heads, "head_dim": hd, "start": start}
    return None


class Launcher:
    """Backend proxy: ``launcher.linear(w, x)`` runs ``backend.linear`` through the launch path."""

    def __init__(
        self,
        backend: Any,
        *,
        profiler: Profiler,
        retry: RetryPolicy,
        retry_stats: RetryStats,
        error_log: ErrorLog,
        faults: FaultInjector | None = None,
    ) -> None:
        self.backend = backend
        self.profiler = profiler
        self.retry = retry
        self.retry_stats = retry_stats
        self.error_log = error_log
        self.faults = faults  # None: the process-wide injector (disabled unless installed)
        self.resilient = backend.name != "numpy"
        for op in OPERATIONS:
            if hasattr(backend, op):
                setattr(self, op, self._wrap(op, getattr(backend, op)))

    def __getattr__(self, name: str) -> Any:
        # Everything that is not an operation (xp, name, load_weight, to_host, ...) is the
        # backend's own.
        return getattr(self.backend, name)

    def fused_decoder(self, transformer: Any) -> Callable[[int, Any], Any] | None:
        """The backend's one-call decode of a token, timed per layer when profiling.

        Returns ``decode(token, cache) -> logits`` or None when the backend has no fused path.
        Each layer is recorded as ``decode_layer`` (shapes ``{"layer": i}``, its weight bytes
        and flops) and the output norm and logits as ``decode_head``.
        """
        make = getattr(self.backend, "fused_decoder", None)
        decoder = make(transformer) if make is not None else None
        if decoder is None:
            return None
        profiler, on_layer = self.profiler, self._layer_recorder(decoder, None)

        def decode(token: int, cache: Any) -> Any:
            if not profiler.enabled:
                return decoder.step(token, cache)
            return decoder.step(token, cache, on_layer=on_layer)

        return decode

    def fused_rows_decoder(self, transformer: Any) -> Callable[..., Any] | None:
        """The backend's one-call decode step of several sequences in pages (`engine.runner`),
        timed per layer as `fused_decoder` is, shapes ``{"layer": i, "rows": n}`` and the
        flops of all n rows (the weight bytes are read once for all of them).

        Returns ``decode(ids, positions, tables, k_pool, v_pool) -> logits (n, vocab)`` (see
        `FusedRowsDecoder.step`) or None when the backend has no fused path."""
        make = getattr(self.backend, "fused_rows_decoder", None)
        decoder = make(transformer) if make is not None else None
        if decoder is None:
            return None
        profiler = self.profiler
        recorders: dict[int, Callable[[int, float], None]] = {}

        def decode(ids: Any, positions: Any, tables: Any, k_pool: Any, v_pool: Any) -> Any:
            if not profiler.enabled:
                return decoder.step(ids, positions, tables, k_pool, v_pool)
            n = len(ids)
            if n not in recorders:
                recorders[n] = self._layer_recorder(decoder, n)
            return decoder.step(ids, positions, tables, k_pool, v_pool, on_layer=recorders[n])

        return decode

    def _layer_recorder(self, decoder: Any, rows: int | None) -> Callable[[int, float], None]:
        """``on_layer(layer, seconds)`` recording a fused decoder's layer (``decode_layer``)
        or, for layer -1, its output norm and logits (``decode_head``); ``rows``: the rows of a
        batched step (a shape of its own), None for one sequence."""
        be, profiler = self.backend, self.profiler
        extra, n = ({}, 1) if rows is None else ({"rows": rows}, rows)
        described = [
            ("decode_layer", {"layer": i, **extra}, nbytes, flops * n)
            for i, (nbytes, flops) in enumerate(decoder.layer_costs())
        ]
        nbytes, flops = decoder.head_cost()
        described.append(("decode_head", {"layer": -1, **extra}, nbytes, flops * n))

        def on_layer(layer: int, seconds: float) -> None:
            name, shapes, nbytes, flops = described[layer]
            profiler.record(
                name, backend=be.name, duration_s=seconds, shapes=shapes, bytes=nbytes, flops=flops
            )

        return on_layer

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        be = self.backend
        # What a record needs depends only on the operation's argument shapes and weight type,
        # which repeat every layer and every token: work it out once per signature.
        described: dict[tuple, tuple[str, dict, int | None, int | None]] = {}

        def describe(args: tuple[Any, ...]) -> tuple[str, dict, int | None, int | None]:
            key = tuple(
                (a.shape, getattr(a, "qtype", None)) if hasattr(a, "shape") else None for a in args
            )
            d = described.get(key)
            if d is None:
                shapes = {f"arg{i}": a.shape for i, a in enumerate(args) if hasattr(a, "shape")}
                d = described[key] = (kernel_name(op, args), shapes, *cost(op, args))
            return d

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.profiler.enabled:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            n0 = getattr(be, "launches", None)
            out = fn(*args, **kwargs)
            if self.resilient:
                self._fault("sync", op, args)
            be.synchronize()  # device work is asynchronous: time it to completion
            name, shapes, nbytes, flops = describe(args)
            self.profiler.record(
                name,
                backend=be.name,
                duration_s=time.perf_counter() - t0,
                shapes=shapes,
                bytes=nbytes,
                flops=flops,
                launches=1 if n0 is None else be.launches - n0,
            )
            return out

        if not self.resilient:
            return timed

        def launch(*args: Any, **kwargs: Any) -> Any:
            name = kernel_name(op, args)

            def attempt() -> Any:
                # The sites a real device fails at, in the order it would: outputs are
                # allocated, the kernel is launched, and (when timed) the stream synchronised.
                self._fault("alloc", op, args)
                self._fault("launch", op, args)
                try:
                    return timed(*args, **kwargs)
                except Exception as e:  # a driver's own exception becomes one of ours, here
                    raise classify(e, operation="launch", kernel=name, backend=be.name) from e

            return self.retry.call(
                attempt,
                operation="launch",
                stats=self.retry_stats,
                log=self.error_log,
                kernel=name,
                on_retry=self._before_retry,
            )

        return launch

    def _fault(self, site: str, op: str, args: tuple[Any, ...]) -> None:
        injector = self.faults
        context = {"kernel": kernel_name(op, args), "backend": self.backend.name}
        if injector is not None:
            injector.maybe_fail(site, **context)
        else:
            faults_mod.maybe_fail(site, **context)

    def _before_retry(self, attempt: int, error: RecoverableError, delay: float) -> None:
        # Out of device memory: give the pool's cached blocks back before trying again.
        if error.code.endswith("out_of_memory"):
            free = getattr(self.backend, "free_memory", None)
            if free is not None:
                free()
        log.info(
            "retrying %s after %s (attempt %d, waiting %.3f s)",
            error.context.get("kernel", "launch"),
            error.code,
            attempt,
            delay,
        )
