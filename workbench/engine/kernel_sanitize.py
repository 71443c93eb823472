"""Registry kernels on the instrumented CPU emulator: sanitizer sweeps and memory profiles.

Sweeps run `workbench.kernels.sanitize`'s examples (small inputs that reach every edge), a warp
width at a time; a stopped launch does not end the sweep. Profiles run
at the benchmarks' shapes with their inputs (`kernel_bench`'s factories: random inputs,
launched through the same wrappers the engine uses) on `EmulatorModule`s built with
``counters`` and a GPU ``target``, so the shape syntax is `workbench bench kernels --shape`'s.
`workbench.kernels.sanitize_report` presents what these return.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.engine import kernel_bench as kb
from workbench.errors import UserError, WorkbenchError
from workbench.kernels import ops_kernels as ops
from workbench.kernels import quant_kernels as qk
from workbench.kernels.instrument import (
    DEFAULT_TARGET,
    TOOLS,
    KernelReport,
    check_tools,
    target_spec,
)
from workbench.kernels.registry import KernelSpec, all_kernels, kernels_dir
from workbench.kernels.registry import get as get_kernel
from workbench.kernels.sanitize_report import SanitizeRun, TimeFloor, time_floor

WARPS = (32, 64)

# progress(done, total, what is about to run): called before each run and once at the end
Progress = Callable[[int, int, str], None]


class _InstrumentedTarget(kb._Target):
    """The benchmarks' emulator target with instrumented modules (one per source, cached)."""

    def __init__(self, warp_size: int, **instruments: Any) -> None:
        super().__init__("emulator", warp_size)
        self._instruments = instruments
        self.quant = functools.cache(self._quant_module)

    def _quant_module(self, path: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
        from workbench.kernels.emulator import EmulatorModule

        return EmulatorModule(
            path=path, options=options, name_expressions=names, warp_size=self.warp_size,
            **self._instruments,
        )  # fmt: skip

    def ops_module(self, source: str) -> Any:
        # ops.load_module's own ``target`` (emulator or cupy) would clash with the GPU target.
        if source not in ops.SOURCES:
            raise UserError(
                "user.bad_argument", f"{source!r} is not one of {', '.join(ops.SOURCES)}"
            )
        if source not in self._ops:
            from workbench.kernels.emulator import EmulatorModule

            self._ops[source] = EmulatorModule(
                path=kernels_dir() / source, options=(f"-I{kernels_dir()}",),
                warp_size=self.warp_size, **self._instruments,
            )  # fmt: skip
        return self._ops[source]

    def module_of(self, spec: KernelSpec) -> Any:
        if spec.source in qk.SOURCES.values():
            return self.quant(*qk.module_args(spec.symbol.partition("<")[0]))
        return self.ops_module(spec.source)


def instrumented_run(
    spec: KernelSpec, target: _InstrumentedTarget, shape: Mapping[str, int]
) -> KernelReport:
    """Launch ``spec`` once at ``shape`` and return the report its kernel was left with."""
    fn = kb._factory(spec, target, shape)
    kernel = target.module_of(spec).get_function(spec.symbol)
    fn()
    report = getattr(kernel, "last_report", None)
    if report is None:
        raise UserError(
            "user.not_instrumented",
            f"{spec.name}: the emulator left no report (no tools and no counters asked for)",
            kernel=spec.name,
        )
    return report


def _check_warps(warps: Sequence[int]) -> tuple[int, ...]:
    bad = [w for w in warps if w not in WARPS]
    if bad or not warps:
        raise UserError("user.bad_argument", f"warp widths are 32 and/or 64, not {list(warps)}")
    return tuple(dict.fromkeys(warps))


def sanitize_kernels(
    names: Sequence[str] = (),
    *,
    tools: Sequence[str] = TOOLS,
    warps: Sequence[int] = WARPS,
    seed: int = 0,
    progress: Progress | None = None,
    arch: str | None = None,
) -> list[SanitizeRun]:
    """Run each named registry kernel (default: all) on its sanitizer example under ``tools``
    at each warp width (`workbench.kernels.sanitize.sanitize_registered`: small inputs that
    reach the kernels' edges); one `SanitizeRun` per kernel and width, widths outer. A launch
    the emulator stops (a write far outside every buffer, say) is a run with ``error`` set,
    carrying the findings made until then, and the sweep goes on. ``arch`` (e.g. ``"gfx90a"``)
    emulates that target's code paths; a matrix-core target runs at warp 64 only."""
    from workbench.kernels.quant_kernels import has_mfma
    from workbench.kernels.sanitize import sanitize_registered

    tools = check_tools(tools)
    if not tools:
        raise UserError("user.bad_option", f"name at least one tool ({', '.join(TOOLS)})")
    warps = _check_warps(warps)
    if has_mfma(arch) and 32 in warps:
        raise UserError(
            "user.bad_option", f"{arch} runs waves of 64 (its matrix-core instructions need them)"
        )
    specs = [get_kernel(n) for n in names] if names else list(all_kernels().values())
    total = len(specs) * len(warps)
    runs: list[SanitizeRun] = []
    started = 0  # runs begun (progress counts them; a batch reports before each of its runs)

    def step(name: str, warp: int) -> None:
        nonlocal started
        if progress is not None:
            progress(started, total, f"{name} (warp {warp})")
        started += 1

    for warp in warps:
        # One batch per width (modules built once). A stopped launch ends a batch: then the
        # width's kernels run one at a time, and the stopped one becomes a row of its own.
        try:
            reports = sanitize_registered(
                [s.name for s in specs], tools, [warp], seed=seed, progress=step, arch=arch
            )
            runs += [SanitizeRun(s.name, warp, r) for s, r in zip(specs, reports)]
            continue
        except WorkbenchError as e:
            if not e.code.startswith("kernel."):  # no clang, a kernel without an example
                raise
            started = len(runs)
        for spec in specs:
            step(spec.name, warp)
            try:
                (report,) = sanitize_registered([spec.name], tools, [warp], seed=seed, arch=arch)
                runs.append(SanitizeRun(spec.name, warp, report))
            except WorkbenchError as e:  # the findings so far travel with a stopped launch
                if not e.code.startswith("kernel."):
                    raise
                report = e.context.get("report")
                report = report if isinstance(report, KernelReport) else None
                runs.append(SanitizeRun(spec.name, warp, report, f"{e.code}: {e.message}"))
    if progress is not None:
        progress(total, total, "done")
    return runs


@dataclass(frozen=True)
class KernelProfile:
    """One registry kernel's counters on a target, and its time floor there."""

    kernel: str
    source: str  # file name in kernels/
    shape: Mapping[str, int]
    report: KernelReport
    floor: TimeFloor

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "source": self.source,
            "shape": dict(self.shape),
            "report": self.report.to_dict(),
            "floor": self.floor.to_dict(),
        }


def profile_kernel(
    name: str,
    shape: Mapping[str, int] | None = None,
    *,
    target: str = DEFAULT_TARGET,
    warp_size: int | None = None,
) -> KernelProfile:
    """Count the memory traffic of registry kernel ``name`` at ``shape`` (overrides of its
    representative shape) as ``target`` would see it, with warps of ``warp_size`` (default: the
    target's), and its time floor there (FLOPs from the registry's cost model)."""
    spec = get_kernel(name)
    tspec = target_spec(target)
    warp = warp_size or tspec.warp_size
    _check_warps([warp])
    full = kb.resolve_shape(spec, shape)
    t = _InstrumentedTarget(warp, counters=True, target=tspec.name)
    report = instrumented_run(spec, t, full)
    flops = spec.cost(**full, warp_size=warp).flops
    return KernelProfile(spec.name, spec.source, full, report, time_floor(report, flops))
