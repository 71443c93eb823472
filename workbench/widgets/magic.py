"""The ``%%hip`` cell magic: write a HIP kernel in a notebook cell, run it, check it, time it.

::

    %load_ext workbench

    %%hip block_sum --grid 4 --block 256 --args "(x, out, np.int32(n))" --check ref_sum --bench
    #include "wb.h"
    WB_KERNEL void block_sum(const float* x, float* out, int n) { ... }

The cell is compiled for the active backend: CuPy (hiprtc on ROCm, NVRTC on CUDA) when a GPU is
usable, else the CPU emulator (``--backend`` overrides). The kernels' include directory (``wb.h``)
is on the include path. The compiled kernel is bound to ``NAME`` in the notebook's namespace with
CuPy's signature ``NAME(grid, block, args, shared_mem=0)``.

Conventions:

- ``--args EXPR`` is evaluated in the notebook's namespace. It gives the kernel's argument tuple
  (NumPy arrays and NumPy scalars, in the kernel's parameter order), or a zero-argument callable
  returning one: the callable is called afresh for every check trial, so it can draw new random
  inputs each time.
- ``--check PYFUNC``: ``PYFUNC(*args)`` is called with copies of the arguments, taken before the
  launch, and returns the expected contents of the output arguments: one array, or a tuple of
  arrays in the order of ``--out``. ``--out`` lists the indices of the output arguments in the
  argument tuple (default: the last array argument). Outputs are poisoned (NaN, or all bits set
  for integers) before the launch, so elements the kernel never writes show up as mismatches.
- ``--bench`` launches once to warm up, then for ``--warmup-ms`` more, then as many timed
  repetitions as fit in ``--rep-ms``: device events on a GPU, the wall clock on the emulator.
- ``--arch gfx90a[,gfx1030...]`` compiles the cell offline with ``hipcc`` (``nvcc`` for ``sm_``
  targets) and shows the compiler's resource report: registers, LDS, scratch, spills, occupancy.
- ``--sanitize`` (``--tools memcheck,racecheck,...``; default all) launches on the instrumented
  CPU emulator (instead of the plain launch) and shows the findings under the cell; ``--profile``
  (``--target gfx942``) shows the cell's source with per-line memory counters and the time floor
  on the target (`magic_instrument`).

Failures (compile errors, launch faults, a failed check) raise `HipCellError`, which IPython shows
as one readable block (compile errors with the numbered cell lines they point at) instead of a
traceback; they are also recorded in the process-wide error log (`ErrorInspector` shows them).
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import UserError, WorkbenchError
from workbench.widgets.magic_instrument import instrument_warp, run_instrumented
from workbench.widgets.progress import status_line

BACKENDS = ("auto", "emulator", "cupy")
DEFAULT_RTOL = 1e-4  # float32 reductions sum in a different order than NumPy's pairwise sum
DEFAULT_ATOL = 1e-5


class HipCellError(Exception):
    """A ``%%hip`` cell failed; IPython renders it as `text` alone (no traceback)."""

    def __init__(self, text: str, error: BaseException | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.error = error

    def _render_traceback_(self) -> list[str]:
        return self.text.splitlines()


@dataclass
class HipKernel:
    """A cell's kernel built for one backend: call it like a CuPy RawKernel."""

    name: str
    backend: str  # "emulator" or "cupy"
    source: str
    function: Any  # kernel(grid, block, args, shared_mem=0)
    warp_size: int | None
    note: str = ""  # e.g. the emulator's fiber implementation

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        self.function(grid, block, args, shared_mem=shared_mem)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reference: str
    outputs: tuple[int, ...]  # argument indices compared
    max_abs_error: float
    mismatches: int
    total: int
    first_bad: str = ""  # "out[3]: got 1.0, expected 2.0" when not ok
    trials: int = 1


@dataclass(frozen=True)
class BenchResult:
    reps: int
    warmup_reps: int
    p50_ms: float
    p95_ms: float
    min_ms: float
    mean_ms: float
    timing: str


@dataclass
class HipResult:
    """What one ``%%hip`` cell did; its plain-text form is the cell's output."""

    kernel: HipKernel
    grid: tuple[int, ...] | None = None
    block: tuple[int, ...] | None = None
    launched: bool = False
    check: CheckResult | None = None
    bench: BenchResult | None = None
    resources: list[Any] = field(default_factory=list)  # toolchain.KernelResources per --arch
    sanitize: Any = None  # magic_instrument.InstrumentedCell with --sanitize
    profile: Any = None  # magic_instrument.InstrumentedCell with --profile

    def lines(self) -> list[str]:
        k = self.kernel
        where = (
            "the GPU (CuPy)" if k.backend == "cupy" else f"the CPU emulator (warp {k.warp_size})"
        )
        out = [f"hip kernel {k.name}: compiled for {where}"]
        if self.launched and self.grid is not None and self.block is not None:
            out.append(f"launched with grid {self.grid}, block {self.block}")
        if self.check is not None:
            c = self.check
            trials = f", {c.trials} trials" if c.trials > 1 else ""
            out.append(
                f"check against {c.reference}: OK ({c.total} elements in {len(c.outputs)} "
                f"output(s){trials}, max abs error {c.max_abs_error:.3g})"
            )
        if self.bench is not None:
            b = self.bench
            out.append(
                f"bench: p50 {b.p50_ms:.4f} ms, p95 {b.p95_ms:.4f} ms, min {b.min_ms:.4f} ms "
                f"over {b.reps} reps after {b.warmup_reps} warm-up ({b.timing})"
            )
        for r in self.resources:
            out.append(format_resources(r))
        out += self.sanitize.sanitize_lines() if self.sanitize is not None else []
        out += self.profile.profile_lines() if self.profile is not None else []
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


# --- building -----------------------------------------------------------------------------------


def active_backend(requested: str = "auto") -> str:
    """``cupy`` when requested or (auto) when a GPU is usable; else ``emulator``."""
    if requested not in BACKENDS:
        raise UserError(
            "user.bad_backend", f"backend must be one of {', '.join(BACKENDS)}, not {requested!r}"
        )
    if requested != "auto":
        return requested
    from workbench.engine.generate import gpu_available

    return "cupy" if gpu_available() else "emulator"


def build_kernel(
    source: str, name: str, *, backend: str = "auto", warp_size: int = 64
) -> HipKernel:
    """Compile ``source`` and return its kernel ``name`` (an extern "C" name or a C++ name
    expression such as ``reduce<256>``). Compile errors are `BackendError`
    ``backend.compile_failed`` with ``log`` and ``source_lines`` in their context."""
    from workbench.kernels.cupy_target import is_name_expression

    backend = active_backend(backend)
    exprs = [name] if is_name_expression(name) else []
    if backend == "cupy":
        from workbench.kernels.cupy_target import load_module

        module = load_module(source, name_expressions=exprs)
        return HipKernel(name, "cupy", source, module.get_function(name), None)
    from workbench.kernels.emulator import EmulatorModule

    module = EmulatorModule(source, name_expressions=exprs or None, warp_size=warp_size)
    return HipKernel(
        name, "emulator", source, module.get_function(name), warp_size, f"fibers: {module.fiber}"
    )


def parse_dims(text: str, namespace: Mapping[str, Any] | None = None) -> tuple[int, ...]:
    """ "4", "4,2", "4x2", "(4, 2)" or an expression in ``namespace`` -> a tuple of 1-3 ints."""
    body = text.strip().strip("()[]")
    parts = [p for p in re.split(r"[,x\s]+", body) if p]
    if parts and all(p.isdigit() for p in parts):
        dims = tuple(int(p) for p in parts)
    else:
        try:
            value = eval(text, dict(namespace or {}))
        except Exception as e:
            raise UserError(
                "user.bad_launch", f"cannot read launch dimensions {text!r}: {e}"
            ) from None
        dims = tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise UserError("user.bad_launch", f"launch dimensions are 1 to 3 positive ints: {text!r}")
    return dims


def _poison(a: np.ndarray) -> None:
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    elif a.dtype.kind in "iub":
        a.view(np.uint8).fill(0xFF)


def _to_device(
    kernel: HipKernel, args: Sequence[Any]
) -> tuple[tuple[Any, ...], Callable[[], None]]:
    """Arguments as the backend takes them, and a function copying device arrays back."""
    if kernel.backend != "cupy":
        return tuple(args), lambda: None
    import cupy

    dev = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args)

    def back() -> None:
        cupy.cuda.get_current_stream().synchronize()
        for host, d in zip(args, dev):
            if isinstance(host, np.ndarray):
                host[...] = cupy.asnumpy(d)

    return dev, back


def launch(
    kernel: HipKernel, grid: tuple[int, ...], block: tuple[int, ...], args: Sequence[Any],
    shared_mem: int = 0,
) -> None:  # fmt: skip
    """Launch once on host arrays; afterwards the arrays hold what the kernel wrote."""
    dev, back = _to_device(kernel, args)
    kernel(grid, block, dev, shared_mem)
    back()


def default_outputs(args: Sequence[Any]) -> tuple[int, ...]:
    arrays = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]
    if not arrays:
        raise UserError("user.bad_check", "--check needs at least one array argument (an output)")
    return (arrays[-1],)


def check_kernel(
    kernel: HipKernel,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    make_args: Callable[[], Sequence[Any]],
    reference: Callable[..., Any],
    *,
    reference_name: str = "reference",
    outputs: Sequence[int] | None = None,
    shared_mem: int = 0,
    trials: int = 1,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> CheckResult:
    """Launch on ``make_args()`` and compare the outputs with ``reference(*copies)``; see the
    module doc for the convention. Returns the result of the first failing trial, else the last."""
    worst = 0.0
    total = 0
    result: CheckResult | None = None
    for _ in range(trials):
        args = tuple(make_args())
        outs = tuple(outputs) if outputs else default_outputs(args)
        for i in outs:
            if not 0 <= i < len(args) or not isinstance(args[i], np.ndarray):
                raise UserError(
                    "user.bad_check", f"--out {i} is not an array argument of the {len(args)} given"
                )
        copies = tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)
        expected = reference(*copies)
        expected = expected if isinstance(expected, tuple) else (expected,)
        if len(expected) != len(outs):
            raise UserError(
                "user.bad_check",
                f"{reference_name} returned {len(expected)} value(s) for {len(outs)} output(s) "
                f"(arguments {list(outs)}); return one array per --out index",
            )
        for i in outs:
            _poison(args[i])
        launch(kernel, grid, block, args, shared_mem)
        mismatches, first = 0, ""
        total = 0
        for i, exp in zip(outs, expected):
            got = args[i]
            exp = np.asarray(exp)
            if exp.size != got.size:
                raise UserError(
                    "user.bad_check",
                    f"{reference_name} gave {exp.size} values for argument {i}, which has "
                    f"{got.size}",
                )
            g, e = got.reshape(-1).astype(np.float64), exp.reshape(-1).astype(np.float64)
            bad = ~np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=False)
            diff = np.abs(g - e)
            finite = diff[np.isfinite(diff)]
            worst = max(worst, float(finite.max()) if finite.size else 0.0)
            if bad.any() and not first:
                j = int(np.flatnonzero(bad)[0])
                first = f"argument {i}[{j}]: got {float(g[j]):.7g}, expected {float(e[j]):.7g}"
            mismatches += int(bad.sum())
            total += got.size
        result = CheckResult(
            ok=mismatches == 0,
            reference=reference_name,
            outputs=outs,
            max_abs_error=worst,
            mismatches=mismatches,
            total=total,
            first_bad=first,
            trials=trials,
        )
        if not result.ok:
            return result
    assert result is not None
    return result


def bench_kernel(
    kernel: HipKernel,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: Sequence[Any],
    *,
    shared_mem: int = 0,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    max_reps: int = 10_000,
) -> BenchResult:
    """One launch to warm up, more for ``warmup_ms``, then repetitions for ``rep_ms``."""
    from workbench.observe.profiler import percentile

    dev, _ = _to_device(kernel, args)
    gpu = kernel.backend == "cupy"
    if gpu:
        import cupy

        stream = cupy.cuda.get_current_stream()

    def once() -> float:
        if gpu:
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            kernel(grid, block, dev, shared_mem)
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end) / 1e3
        t0 = time.perf_counter()
        kernel(grid, block, dev, shared_mem)
        return time.perf_counter() - t0

    first = once()
    warm = [once()]
    while sum(warm) * 1e3 < warmup_ms and len(warm) < max_reps:
        warm.append(once())
    per_ms = max(statistics.fmean([first, *warm][1:]) * 1e3, 1e-6)
    reps = max(3, min(max_reps, int(rep_ms / per_ms)))
    times = sorted(once() for _ in range(reps))
    if gpu:
        stream.synchronize()
    return BenchResult(
        reps=reps,
        warmup_reps=1 + len(warm),
        p50_ms=percentile(times, 50) * 1e3,
        p95_ms=percentile(times, 95) * 1e3,
        min_ms=times[0] * 1e3,
        mean_ms=statistics.fmean(times) * 1e3,
        timing="device events" if gpu else "wall clock of the CPU emulator",
    )


def resource_report(source: str, name: str, arch: str) -> Any:
    """The offline compiler's resources for kernel ``name`` of ``source`` on ``arch``
    (`toolchain.KernelResources`); `BackendError` ``backend.compiler_missing`` without hipcc."""
    from workbench.kernels import toolchain

    with tempfile.TemporaryDirectory(prefix="wb-hip-cell-") as tmp:
        path = Path(tmp) / f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}.hip"
        path.write_text(source)
        try:
            result = toolchain.compile_source(path, arch, symbols=[name])
        except WorkbenchError as e:
            e.context["cell_source"] = source
            raise
        return result.resources(name)


_RESOURCE_FIELDS = (
    ("vgprs", "VGPRs"),
    ("agprs", "AGPRs"),
    ("sgprs", "SGPRs"),
    ("lds_bytes", "LDS bytes"),
    ("scratch_bytes", "scratch bytes/lane"),
    ("vgpr_spills", "VGPR spills"),
    ("sgpr_spills", "SGPR spills"),
    ("occupancy", "occupancy waves/SIMD"),
    ("registers", "registers"),
    ("shared_bytes", "shared bytes"),
    ("spill_store_bytes", "spill stores"),
    ("spill_load_bytes", "spill loads"),
)


def format_resources(r: Any) -> str:
    fields = [
        f"{label} {getattr(r, k)}" for k, label in _RESOURCE_FIELDS if getattr(r, k) is not None
    ]
    return f"{r.arch} ({r.vendor}): " + ", ".join(fields)


# --- errors -------------------------------------------------------------------------------------


def format_error(error: BaseException, source: str, name: str) -> str:
    """One readable block: the message, and for compile errors the numbered cell lines."""
    if not isinstance(error, WorkbenchError):
        return f"%%hip {name}: {type(error).__name__}: {error}"
    ctx = error.context
    head = f"%%hip {name}: {error.category} error {error.code}"
    if error.code == "backend.compile_failed" and ctx.get("log"):
        from workbench.kernels.toolchain import format_compile_log

        cell = f"<cell {name}>"
        names = [str(ctx[k]) for k in ("kernel_source",) if ctx.get(k)]
        log = str(ctx["log"])
        for n in names:
            log = log.replace(n, cell)
        summary, _ = format_compile_log(log, sources={cell: source}, main_source=source)
        return f"{head}: the kernel does not compile\n{summary}"
    message = error.message
    for k in ("kernel_source",):
        if ctx.get(k):
            message = message.replace(str(ctx[k]), f"<cell {name}>")
    return f"{head}\n{message}"


def _record(error: BaseException, name: str) -> None:
    from workbench.runtime.errorlog import default_log

    default_log().record(error, operation="hip_magic", kernel=name)


# --- the magic ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="%%hip", add_help=False, exit_on_error=False)
    p.add_argument("name")
    p.add_argument("--grid")
    p.add_argument("--block")
    p.add_argument("--shared", type=int, default=0)
    p.add_argument("--args")
    p.add_argument("--check")
    p.add_argument("--out")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    p.add_argument("--bench", action="store_true")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--arch")
    p.add_argument("--warp", type=int, default=None, choices=(32, 64))
    p.add_argument("--sanitize", action="store_true")
    p.add_argument("--tools")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--target")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    return p


USAGE = (
    "usage: %%hip NAME [--grid G --block B] [--shared BYTES] [--args EXPR] [--check PYFUNC "
    "[--out I,J] [--trials N] [--rtol R] [--atol A]] [--bench [--warmup-ms MS] [--rep-ms MS]] "
    "[--arch gfx90a[,...]] [--sanitize [--tools memcheck,...]] [--profile [--target gfx942]] "
    "[--warp 32|64] [--backend auto|emulator|cupy]"
)


def parse_line(line: str) -> argparse.Namespace:
    try:
        return _parser().parse_args(shlex.split(line))
    except (argparse.ArgumentError, ValueError) as e:
        raise UserError("user.bad_magic", f"{e}\n{USAGE}") from None
    except SystemExit:  # argparse exits on some errors even with exit_on_error=False
        raise UserError("user.bad_magic", USAGE) from None


def run_cell(line: str, cell: str, namespace: dict[str, Any]) -> HipResult:
    """What ``%%hip`` does, without IPython: ``namespace`` is the notebook's user namespace."""
    name = line.split()[0] if line.split() else "?"
    try:
        opts = parse_line(line)
        return _run(opts, cell, namespace)
    except WorkbenchError as e:
        _record(e, name)
        raise HipCellError(format_error(e, cell, name), e) from None


def _run(opts: argparse.Namespace, cell: str, ns: dict[str, Any]) -> HipResult:
    name = opts.name
    if not cell.strip():
        raise UserError("user.bad_magic", f"%%hip {name}: the cell has no kernel source")
    wants_launch = opts.args is not None
    needs_args = opts.check or opts.bench or opts.sanitize or opts.profile
    if (wants_launch or needs_args) and not (opts.grid and opts.block):
        raise UserError(
            "user.bad_magic",
            f"--args, --check, --bench, --sanitize and --profile need --grid and --block\n{USAGE}",
        )
    if needs_args and not wants_launch:
        raise UserError(
            "user.bad_magic",
            f"--check, --bench, --sanitize and --profile need --args (the kernel's arguments)"
            f"\n{USAGE}",
        )
    opts.warp = opts.warp or instrument_warp(opts.target)
    # A line under the cell while the compiler runs (seconds the first time, then cached); it is
    # cleared after, so the stored output is the same whether or not a compile was needed.
    with status_line(f"%%hip {name}") as status:
        status.show("compiling (cached after the first time)")
        kernel = build_kernel(cell, name, backend=opts.backend, warp_size=opts.warp)
    if name.isidentifier():
        ns[name] = kernel
    result = HipResult(kernel)
    if wants_launch:
        grid, block = parse_dims(opts.grid, ns), parse_dims(opts.block, ns)
        result.grid, result.block = grid, block
        make_args = _args_factory(opts.args, ns)
        if opts.check:
            ref = ns.get(opts.check)
            if not callable(ref):
                raise UserError(
                    "user.bad_check", f"--check {opts.check}: no such function in the notebook"
                )
            outs = tuple(int(i) for i in opts.out.split(",")) if opts.out else None
            check = check_kernel(
                kernel, grid, block, make_args, ref, reference_name=opts.check, outputs=outs,
                shared_mem=opts.shared, trials=max(1, opts.trials), rtol=opts.rtol, atol=opts.atol,
            )  # fmt: skip
            if not check.ok:
                raise UserError(
                    "user.check_failed",
                    f"{name} disagrees with {check.reference}: {check.mismatches} of "
                    f"{check.total} elements differ (rtol {opts.rtol}, atol {opts.atol}); first: "
                    f"{check.first_bad}",
                    kernel=name,
                )
            result.check = check
        elif not (opts.sanitize or opts.profile):  # else the instrumented launch is the launch
            launch(kernel, grid, block, make_args(), opts.shared)
        result.launched = True
        if opts.bench:
            result.bench = bench_kernel(
                kernel, grid, block, make_args(), shared_mem=opts.shared,
                warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
            )  # fmt: skip
    if opts.arch:
        for arch in filter(None, (a.strip() for a in opts.arch.split(","))):
            result.resources.append(resource_report(cell, name, arch))
    if opts.sanitize or opts.profile:
        run_instrumented(opts, cell, result, make_args)
    return result


def _args_factory(expr: str, ns: dict[str, Any]) -> Callable[[], tuple[Any, ...]]:
    try:
        value = eval(expr, ns)
    except Exception as e:
        raise UserError(
            "user.bad_args", f"--args {expr!r} fails: {type(e).__name__}: {e}"
        ) from None
    produce = value if callable(value) else (lambda: value)

    def make() -> tuple[Any, ...]:
        args = produce()
        if not isinstance(args, tuple):
            args = (args,)
        return args

    return make


def hip(line: str, cell: str) -> HipResult:
    """The ``%%hip`` cell magic (registered by `load_ipython_extension`)."""
    from IPython import get_ipython

    shell = get_ipython()
    return run_cell(line, cell, shell.user_ns if shell is not None else {})


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext workbench`` (or ``workbench.widgets.magic``): registers ``%%hip``."""
    ipython.register_magic_function(
        lambda line, cell: run_cell(line, cell, ipython.user_ns),
        magic_kind="cell",
        magic_name="hip",
    )
