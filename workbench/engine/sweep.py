"""Kernel sweeps: a grid of kernel jobs run in a process pool or on Ray, one result row each.

A `SweepGrid` is kernels x shapes x warp widths x targets x kinds; a job of each kind depends on
only some of those dimensions, and the grid holds each distinct job once, in the grid's order
(kernels outermost, then shapes, warps, targets, kinds):

- ``time``: `kernel_bench.bench_kernel` on the emulator (or ``backend``), at the shape and warp
  width; ignores the target. Timings are the CPU emulation's wall clock.
- ``sanitize``: `kernel_sanitize`'s sanitizer example under ``tools`` at the warp width; ignores
  the shape (the example is small inputs that reach every edge) and the target.
- ``profile``: `kernel_sanitize.profile_kernel`: memory counters at the shape and warp width as
  the target (`workbench.kernels.instrument.TARGETS`) sees them, and its time floor there.
- ``compile``: `workbench.kernels.toolchain.check` for the target (an AMD gfx or NVIDIA sm
  architecture): registers, LDS, spills; ignores the shape and warp width (the compiler picks).

Every row has ``kernel, kind, shape, warp, target, status ("ok" or "failed"), error`` and the
kind's own fields (`COLUMNS` lists them all); `TIMING_COLUMNS` are those that vary from run to
run. A failed job (retried once first) is a row with status "failed" and the error.

`parse_spec` reads the command line's ``--sweep`` SPEC (see its docstring and docs/scaling.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from workbench.engine import distribute
from workbench.engine import kernel_bench as kb
from workbench.errors import UserError

KINDS = ("time", "sanitize", "profile", "compile")
DEFAULT_TARGET = "gfx90a"  # an instrument target and a compiler architecture alike
DEFAULT_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")

# The dimensions each kind depends on (the others are None in its rows).
_USES = {
    "time": ("shape", "warp"),
    "sanitize": ("warp",),
    "profile": ("shape", "warp", "target"),
    "compile": ("target",),
}

KEY_COLUMNS = ["kernel", "kind", "shape", "warp", "target", "status", "error"]
RESULT_COLUMNS = [
    "bytes", "flops",  # time: the registry's cost model
    "findings", "finding_kinds",  # sanitize
    "requests", "bytes_requested", "bytes_moved", "efficiency", "shared_requests",
    "bank_conflict_ways", "floor_s", "bound",  # profile
    "vgprs", "sgprs", "registers", "lds_bytes", "scratch_bytes", "spills", "occupancy",  # compile
]  # fmt: skip
TIMING_COLUMNS = ["reps", "p50_ms", "p95_ms", "mean_ms", "gb_s", "gflop_s", "seconds"]
COLUMNS = KEY_COLUMNS + RESULT_COLUMNS + TIMING_COLUMNS


@dataclass(frozen=True)
class SweepJob:
    """One cell of the grid; ``shape`` is an override of the kernel's representative shape (None:
    the representative one) and ``target`` an instrument target or a compiler architecture."""

    kernel: str
    kind: str
    shape: Mapping[str, int] | None = None
    warp: int | None = None
    target: str | None = None
    # what every job of a sweep shares
    backend: str = "emulator"
    tools: tuple[str, ...] = DEFAULT_TOOLS
    warmup_ms: float = 0.0
    rep_ms: float = 20.0
    seed: int = 0
    # the emulator's OS threads in the worker (None: its default, every CPU): workers that share
    # a machine's CPUs each take their share rather than all of them
    threads: int | None = None

    def trace_attributes(self) -> dict[str, Any]:
        """What the job's span says it is (`distribute.call_job`)."""
        attrs = {"workbench.kernel": self.kernel, "workbench.job.kind": self.kind}
        if self.warp is not None:
            attrs["workbench.warp"] = self.warp
        if self.target is not None:
            attrs["workbench.target"] = self.target
        if self.shape:
            attrs["workbench.shape"] = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return attrs


@dataclass(frozen=True)
class SweepGrid:
    """What to sweep. Empty ``kernels``: every registered kernel; empty ``shapes``: each kernel's
    representative shape."""

    kernels: Sequence[str] = ()
    shapes: Sequence[Mapping[str, int]] = ()
    warps: Sequence[int] = (64,)
    targets: Sequence[str] = (DEFAULT_TARGET,)
    kinds: Sequence[str] = ("time",)
    backend: str = "emulator"
    tools: Sequence[str] = DEFAULT_TOOLS
    warmup_ms: float = 0.0  # per timed job; small by default: a sweep is about breadth
    rep_ms: float = 20.0
    seed: int = 0  # of the sanitizer examples' inputs

    def jobs(self) -> list[SweepJob]:
        """The distinct jobs of the grid, in its order (validated; `UserError` when bad)."""
        from workbench.kernels.instrument import check_tools, target_spec
        from workbench.kernels.registry import all_kernels
        from workbench.kernels.toolchain import vendor_of

        registry = all_kernels()
        names = list(self.kernels) or list(registry)
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise UserError(
                "user.unknown_kernel",
                f"no kernel named {', '.join(map(repr, unknown))} (known: {', '.join(registry)})",
            )
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise UserError("user.bad_sweep", f"kinds are {', '.join(KINDS)}, not {bad or '[]'}")
        if not self.warps or any(w not in (32, 64) for w in self.warps):
            raise UserError("user.bad_sweep", f"warps are 32 and/or 64, not {list(self.warps)}")
        if not self.targets:
            raise UserError("user.bad_sweep", "name at least one target")
        for t in self.targets:
            if "profile" in self.kinds:
                target_spec(t)
            if "compile" in self.kinds:
                vendor_of(t)
        tools = check_tools(self.tools)
        if "sanitize" in self.kinds and not tools:
            raise UserError("user.bad_sweep", "a sanitize sweep needs at least one tool")
        shared = {
            "backend": self.backend, "tools": tools, "warmup_ms": float(self.warmup_ms),
            "rep_ms": float(self.rep_ms), "seed": int(self.seed),
        }  # fmt: skip
        out: dict[SweepJob, None] = {}  # ordered set
        for name in names:
            spec = registry[name]
            for shape in self.shapes or (None,):
                resolved = kb.resolve_shape(spec, shape) if shape else None  # validates the keys
                for warp in self.warps:
                    for target in self.targets:
                        for kind in self.kinds:
                            cell = {"shape": resolved, "warp": warp, "target": target}
                            uses = _USES[kind]
                            job = SweepJob(
                                name, kind, **{k: v if k in uses else None
                                               for k, v in cell.items()}, **shared,
                            )  # fmt: skip
                            out.setdefault(_hashable(job), None)
        return [_unhashable(j) for j in out]


def _hashable(job: SweepJob) -> SweepJob:
    return replace(job, shape=tuple(job.shape.items()) if job.shape else None)  # type: ignore[arg-type]


def _unhashable(job: SweepJob) -> SweepJob:
    return replace(job, shape=dict(job.shape) if job.shape else None)  # type: ignore[arg-type]


# --- running one job (in a worker) ----------------------------------------------------------------


def run_job(job: SweepJob) -> dict[str, Any]:
    """The result fields of one job (raises when it fails: the caller records the error)."""
    from workbench.kernels import emulator
    from workbench.kernels.registry import get as get_kernel

    emulator.set_default_threads(job.threads)
    spec = get_kernel(job.kernel)
    if job.kind == "time":
        target = kb._Target(job.backend, job.warp or 64)
        shape = kb.resolve_shape(spec, job.shape)
        t = kb.bench_kernel(spec, target, shape, warmup_ms=job.warmup_ms, rep_ms=job.rep_ms)
        return {
            "shape": shape, "bytes": t.bytes, "flops": t.flops, "reps": t.reps,
            "p50_ms": t.p50_ms, "p95_ms": t.p95_ms, "mean_ms": t.mean_ms, "gb_s": t.gb_s,
            "gflop_s": t.gflop_s,
        }  # fmt: skip
    if job.kind == "sanitize":
        from workbench.engine.kernel_sanitize import sanitize_kernels

        (run,) = sanitize_kernels([job.kernel], tools=job.tools, warps=[job.warp], seed=job.seed)
        if run.error:
            raise UserError("kernel.stopped", run.error)
        findings = run.report.findings if run.report else []
        return {
            "findings": len(findings),
            "finding_kinds": ",".join(sorted({f.kind for f in findings})),
        }
    if job.kind == "profile":
        from workbench.engine.kernel_sanitize import profile_kernel

        p = profile_kernel(job.kernel, job.shape, target=job.target, warp_size=job.warp)
        totals = p.report.totals
        return {
            "shape": dict(p.shape),
            **{k: totals.get(k) for k in ("requests", "bytes_requested", "bytes_moved",
                                          "efficiency", "shared_requests", "bank_conflict_ways")},
            "floor_s": p.floor.floor_s, "bound": p.floor.bound,
        }  # fmt: skip
    from workbench.kernels import toolchain

    (r,) = toolchain.check([spec], [job.target], jobs=1)
    if not r.ok:
        raise UserError(r.error_code or "backend.compile_failed", r.error or "compile failed")
    res = r.resources
    return {
        "vgprs": res.vgprs, "sgprs": res.sgprs, "registers": res.registers,
        "lds_bytes": res.lds_bytes if res.vendor == "amd" else res.shared_bytes,
        "scratch_bytes": res.scratch_bytes, "spills": res.spills, "occupancy": res.occupancy,
        "seconds": r.seconds,
    }  # fmt: skip


def job_row(job: SweepJob, outcome: distribute.Outcome) -> dict[str, Any]:
    """The flat row of one job's outcome (``COLUMNS``; shape as ``k=v,...`` text)."""
    value = dict(outcome.value or {})
    shape = value.pop("shape", job.shape)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        kernel=job.kernel,
        kind=job.kind,
        shape=",".join(f"{k}={v}" for k, v in shape.items()) if shape else None,
        warp=job.warp,
        target=job.target,
        status="ok" if outcome.ok else "failed",
        error=None if outcome.ok else f"{outcome.error} (after {outcome.attempts} attempts)",
    )
    row.update(value)
    return row


# --- running a sweep ------------------------------------------------------------------------------


def iter_sweep(
    grid: SweepGrid,
    *,
    workers: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    retries: int = distribute.DEFAULT_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    trace_carrier: dict | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``grid``'s jobs; yield their rows in the grid's order as they complete. ``workers``
    local processes (default: one per CPU), or Ray tasks with ``ray`` (a local cluster unless
    ``ray_address`` names one)."""
    n = workers if workers is not None else distribute.cpu_count()
    distribute.check_workers(n)
    # A Ray task holds one CPU; local workers share this machine's.
    threads = 1 if ray else None if n == 1 else max(1, distribute.cpu_count() // n)
    jobs = [replace(j, threads=threads) for j in grid.jobs()]
    attributes = {"workbench.sweep.jobs": len(jobs), "workbench.sweep.workers": n,
                  "workbench.sweep.ray": ray}  # fmt: skip
    with distribute.traced_run("workbench.sweep", attributes, trace_carrier) as carrier:
        outcomes = distribute.run_jobs(
            run_job, jobs, workers=n, ray=ray, ray_address=ray_address, retries=retries,
            progress=progress, trace_carrier=carrier,
        )  # fmt: skip
        for job, outcome in zip(jobs, outcomes):
            yield job_row(job, outcome)


def sweep(grid: SweepGrid | Mapping[str, Any] | str, **kwargs: Any) -> Any:
    """Run a sweep and return its rows as a pandas DataFrame (`COLUMNS`), in the grid's order.
    ``grid``: a `SweepGrid`, a mapping of its fields, or a SPEC string (`parse_spec`);
    ``kwargs`` as `iter_sweep`'s."""
    import pandas as pd

    return pd.DataFrame(list(iter_sweep(as_grid(grid), **kwargs)), columns=COLUMNS)


def as_grid(grid: SweepGrid | Mapping[str, Any] | str) -> SweepGrid:
    if isinstance(grid, SweepGrid):
        return grid
    if isinstance(grid, str):
        return parse_spec(grid)
    return _grid_from_mapping(grid, "the grid")


# --- the SPEC -----------------------------------------------------------------------------------

_LIST_KEYS = {"kernel": "kernels", "shape": "shapes", "warp": "warps", "target": "targets",
              "kind": "kinds", "tool": "tools"}  # fmt: skip
_SCALAR_KEYS = {"backend": str, "warmup_ms": float, "rep_ms": float, "seed": int}


def parse_spec(spec: str) -> SweepGrid:
    """A grid from a SPEC: a JSON file's path (an object of `SweepGrid`'s fields), or inline
    ``key=v1,v2;key=...`` with keys ``kernel`` (``all``: every one), ``shape`` (``k:v/k:v``
    per shape, e.g. ``shape=rows:576/cols:1536,rows:64/cols:64``), ``warp``, ``target``,
    ``kind``, ``tool``, ``backend``, ``warmup_ms``, ``rep_ms``, ``seed``. Example:
    ``kernel=rmsnorm,add;warp=32,64;kind=time,profile``."""
    text = spec.strip()
    if not text:
        raise UserError("user.bad_sweep", "empty sweep spec")
    path = Path(text)
    if text.endswith(".json") or (path.is_file() and "=" not in text):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError("user.bad_sweep", f"no sweep spec file {text!r}") from None
        except json.JSONDecodeError as e:
            raise UserError("user.bad_sweep", f"{text}: not JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError("user.bad_sweep", f"{text}: a sweep spec is a JSON object")
        return _grid_from_mapping(data, text)
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise UserError("user.bad_sweep", f"sweep spec parts are key=value: {part!r}")
        if key in _LIST_KEYS:
            values = [v.strip() for v in value.split(",") if v.strip()]
            if key == "kernel" and values == ["all"]:
                values = []
            if key == "shape":
                values = [v.replace(":", "=").replace("/", ",") for v in values]
            fields[_LIST_KEYS[key]] = values
        elif key in _SCALAR_KEYS:
            fields[key] = value.strip()
        else:
            known = ", ".join([*_LIST_KEYS, *_SCALAR_KEYS])
            raise UserError("user.bad_sweep", f"unknown sweep spec key {key!r} (known: {known})")
    return _grid_from_mapping(fields, repr(spec))


def _grid_from_mapping(data: Mapping[str, Any], where: str) -> SweepGrid:
    names = {**{v: v for v in _LIST_KEYS.values()}, **_LIST_KEYS}  # singular or plural keys
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in names:
            values = value if isinstance(value, list) else [value]
            field_name = names[key]
            if field_name == "shapes":
                values = [
                    kb.parse_shape(v) if isinstance(v, str) else _int_shape(v, where)
                    for v in values
                ]
            elif field_name == "warps":
                try:
                    values = [int(v) for v in values]
                except (TypeError, ValueError):
                    raise UserError("user.bad_sweep", f"{where}: warps are integers") from None
            else:
                values = [str(v) for v in values if str(v) != "all"]
            out[field_name] = tuple(values)
        elif key in _SCALAR_KEYS:
            try:
                out[key] = _SCALAR_KEYS[key](value)
            except (TypeError, ValueError):
                raise UserError(
                    "user.bad_sweep", f"{where}: {key} must be {_SCALAR_KEYS[key].__name__}"
                ) from None
        else:
            known = ", ".join([*_LIST_KEYS.values(), *_SCALAR_KEYS])
            raise UserError("user.bad_sweep", f"{where}: unknown key {key!r} (known: {known})")
    grid = SweepGrid(**out)
    grid.jobs()  # validate now, before anything runs
    return grid


def _int_shape(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or not value:
        raise UserError("user.bad_sweep", f"{where}: a shape is an object of integers")
    return kb.parse_shape(",".join(f"{k}={v}" for k, v in value.items()))
