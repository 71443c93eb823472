"""Presenting instrumented emulator runs: findings as rows, the source beside its memory counters,
and the time floor a kernel has on a GPU target.

The runs themselves are `instrument.KernelReport`s (the emulator's); this module only arranges
them for a table (the CLI's `kernels sanitize` / `kernels profile`, the ``%%hip`` magic, the
kernel-timing widget's memory view) and derives the estimate: bytes moved over the target's
peak bandwidth and FLOPs over its peak compute. Those are floors in the roofline's sense (what
the target could not beat were every moved segment fetched from its memory), never predictions:
an emulator knows no caches, latencies or scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workbench.kernels.instrument import Finding, KernelReport, LineCounters, target_spec
from workbench.kernels.occupancy import nvidia_occupancy

FINDING_COLUMNS = ("kernel", "warp", "tool", "kind", "where", "block", "thread", "count", "message")
COUNTER_COLUMNS = ("requests", "lanes", "bytes req", "bytes moved", "efficiency", "ways")
SOURCE_COLUMNS = ("file", "line", "access", *COUNTER_COLUMNS, "source")


@dataclass(frozen=True)
class SanitizeRun:
    """One kernel at one warp width under the sanitizers: its report, and why the launch did
    not complete if it did not (``error``: the code and message of the error it raised)."""

    kernel: str
    warp_size: int
    report: KernelReport | None
    error: str | None = None

    @property
    def clean(self) -> bool:
        return self.error is None and self.report is not None and not self.report.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "warp_size": self.warp_size,
            "error": self.error,
            "report": self.report.to_dict() if self.report is not None else None,
        }


def display_file(
    path: str, roots: Sequence[str | Path] = (), rename: Mapping[str, str] | None = None
) -> str:
    """How a finding or counter names its file: ``rename[path]`` when given (a notebook cell's
    source file is ``<cell NAME>``), else ``path`` relative to the first of ``roots`` it lies
    under (the kernels directory, say: ``rmsnorm.hip``), else its file name."""
    if rename and path in rename:
        return rename[path]
    p = Path(path)
    for root in roots:
        try:
            return str(p.resolve().relative_to(Path(root).resolve()))
        except (ValueError, OSError):
            continue
    return p.name or path


def where(
    file: str, line: int, roots: Sequence[str | Path] = (), rename: Mapping[str, str] | None = None
) -> str:
    return f"{display_file(file, roots, rename)}:{line}"


def _dim(d: Sequence[int]) -> str:
    return "(" + ",".join(str(int(x)) for x in d) + ")"


def finding_row(
    kernel: str,
    warp_size: int,
    f: Finding,
    roots: Sequence[str | Path] = (),
    rename: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One table row for one (grouped) finding; races name the conflicting line too."""
    loc = where(f.file, f.line, roots, rename)
    if f.other_line is not None:
        other = where(f.other_file or f.file, f.other_line, roots, rename)
        loc = f"{loc} vs {other}"
    # The message may start with the location (a temporary file's name, for a cell): the
    # "where" column says it better.
    message = f.message.removeprefix(f"{Path(f.file).name}:{f.line}: ")
    for path, name in (rename or {}).items():
        message = message.replace(Path(path).name, name)
    return {
        "kernel": kernel,
        "warp": warp_size,
        "tool": f.tool,
        "kind": f.kind,
        "where": loc,
        "block": _dim(f.block),
        "thread": _dim(f.thread),
        "count": f.count,
        "message": message,
    }


def findings_rows(
    runs: Iterable[SanitizeRun],
    roots: Sequence[str | Path] = (),
    rename: Mapping[str, str] | None = None,
) -> list[dict]:
    """Rows of the findings table: one per finding, and one per launch that did not complete
    (tool ``launch``, kind ``error``), in the order of ``runs``."""
    rows = []
    for run in runs:
        if run.error is not None:
            rows.append({
                "kernel": run.kernel, "warp": run.warp_size, "tool": "launch", "kind": "error",
                "where": "-", "block": "-", "thread": "-", "count": 1, "message": run.error,
            })  # fmt: skip
        if run.report is not None:
            rows.extend(
                finding_row(run.kernel, run.warp_size, f, roots, rename)
                for f in run.report.findings
            )
    return rows


# --- the source view ------------------------------------------------------------------------------


def access_label(c: LineCounters) -> str:
    """ "global load", "shared store", "global atomic"."""
    return f"{c.space} {c.op}"


def counter_cells(c: LineCounters) -> dict[str, str]:
    """The counters of one line as table cells. Efficiency applies to global accesses and bank
    conflicts to shared ones: the other is shown as "-"."""
    glob = c.space == "global"
    return {
        "requests": str(c.requests),
        "lanes": f"{c.active_lanes:.1f}",
        "bytes req": str(c.bytes_requested),
        "bytes moved": str(c.bytes_moved),
        "efficiency": f"{c.efficiency:.1%}" if glob else "-",
        "ways": "-" if glob else f"{c.bank_conflict_ways:.1f}",
    }


def source_rows(
    report: KernelReport,
    read_lines: Callable[[str], Sequence[str]],
    *,
    context: int | None = 2,
    roots: Sequence[str | Path] = (),
    rename: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The source view: for each file with counters (in order of first appearance), its lines
    with the counters beside them (one row per space and operation on a line; the source text
    on the first). ``context`` lines around each counted line are shown too, and a row with
    "..." marks a gap; ``None`` shows every line of the file. ``read_lines(file)`` gives a
    file's lines (an unreadable file shows its counted lines without text)."""
    by_file: dict[str, dict[int, list[LineCounters]]] = {}
    for c in report.lines:
        by_file.setdefault(c.file, {}).setdefault(c.line, []).append(c)
    blank = dict.fromkeys(COUNTER_COLUMNS, "")
    rows: list[dict[str, str]] = []
    for file, counted in by_file.items():
        try:
            text = list(read_lines(file))
        except OSError:
            text = []
        name = display_file(file, roots, rename)
        last = max([len(text), *counted])
        if context is None:
            shown = list(range(1, last + 1))
        else:
            keep = {
                n for line in counted for n in range(line - context, line + context + 1)
            }  # fmt: skip
            shown = sorted(n for n in keep if 1 <= n <= last)
        previous = 0
        for n in shown:
            if previous and n != previous + 1:
                rows.append({"file": name, "line": "...", "access": "", **blank, "source": ""})
            previous = n
            src = text[n - 1].rstrip() if n <= len(text) else ""
            entries = sorted(counted.get(n, []), key=lambda c: (c.space, c.op))
            if not entries:
                rows.append({"file": name, "line": str(n), "access": "", **blank, "source": src})
            for i, c in enumerate(entries):
                rows.append({
                    "file": name, "line": str(n), "access": access_label(c), **counter_cells(c),
                    "source": src if i == 0 else "",
                })  # fmt: skip
    return rows


def totals_rows(report: KernelReport) -> list[tuple[str, str]]:
    """The kernel totals as (label, value) pairs, global then shared."""
    t = report.totals
    out = [
        ("global requests", f"{t.get('requests', 0):.0f}"),
        ("global bytes requested", f"{t.get('bytes_requested', 0):.0f}"),
        ("global bytes moved", f"{t.get('bytes_moved', 0):.0f}"),
        ("global efficiency", f"{t.get('efficiency', 1.0):.1%}"),
        ("shared requests", f"{t.get('shared_requests', 0):.0f}"),
        ("shared bytes", f"{t.get('shared_bytes', 0):.0f}"),
        ("bank conflict ways (mean)", f"{t.get('bank_conflict_ways', 1.0):.2f}"),
    ]
    if t.get("atomics"):
        out.append(("atomic requests", f"{t['atomics']:.0f}"))
    return out


# --- the estimate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeFloor:
    """The shortest time the kernel could take on ``target``: ``memory_s`` is the global bytes
    the counters saw moved (whole segments of the target's size) at its peak bandwidth,
    ``compute_s`` the FLOPs of the registry's cost model at its FP32 vector peak (None when no
    cost model is known, e.g. a notebook cell). ``floor_s`` is the larger; ``bound`` says which.
    Both assume every moved segment comes from HBM and no latency is exposed."""

    target: str
    product: str
    warp_size: int
    bytes_moved: int
    bytes_requested: int
    flops: int | None
    peak_gb_s: float
    peak_tflops_fp32: float
    memory_s: float
    compute_s: float | None
    floor_s: float
    bound: str  # "memory" or "compute"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_floor(report: KernelReport, flops: int | None = None) -> TimeFloor:
    """The `TimeFloor` of ``report`` on its own target (the one its counters were taken for)."""
    spec = target_spec(report.target)
    moved = int(report.totals.get("bytes_moved", 0))
    memory_s = moved / (spec.peak_gb_s * 1e9)
    compute_s = flops / (spec.peak_tflops_fp32 * 1e12) if flops is not None else None
    bound = "compute" if compute_s is not None and compute_s > memory_s else "memory"
    return TimeFloor(
        target=spec.name,
        product=spec.product,
        warp_size=report.warp_size,
        bytes_moved=moved,
        bytes_requested=int(report.totals.get("bytes_requested", 0)),
        flops=flops,
        peak_gb_s=spec.peak_gb_s,
        peak_tflops_fp32=spec.peak_tflops_fp32,
        memory_s=memory_s,
        compute_s=compute_s,
        floor_s=max(memory_s, compute_s or 0.0),
        bound=bound,
    )


def duration(seconds: float) -> str:
    """3 significant digits in the unit that keeps the number at or above 1 (ns at least)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def floor_lines(floor: TimeFloor) -> list[str]:
    """The estimate in words, labelled as a floor."""
    f = floor
    out = [
        f"time floor on {f.target} ({f.product}, warp {f.warp_size}): {duration(f.floor_s)} "
        f"({f.bound}-bound; a floor, not a prediction: no caches, latencies or clocks modelled)",
        f"  memory:  {f.bytes_moved} bytes moved / {f.peak_gb_s:g} GB/s = {duration(f.memory_s)}",
    ]
    if f.compute_s is not None:
        peak = f"{f.peak_tflops_fp32:g} TFLOP/s FP32"
        out.append(f"  compute: {f.flops} FLOPs / {peak} = {duration(f.compute_s)}")
    else:
        out.append("  compute: no FLOP count (no cost model for this kernel)")
    return out


def occupancy_text(
    resources: Any, block_threads: int | None = None, dynamic_shared: int = 0
) -> str:
    """One line from an offline compiler's `toolchain.KernelResources`: AMD's occupancy in waves
    per SIMD as hipcc reports it; for NVIDIA (ptxas reports none) the theoretical occupancy
    from its registers and shared memory at ``block_threads`` (`occupancy.nvidia_occupancy`)."""
    if resources is None:
        return "occupancy: n/a"
    r = resources
    lead = ""
    if r.vendor == "amd":
        parts = [
            (r.occupancy, "occupancy {} waves/SIMD"),
            (r.vgprs, "{} VGPRs"),
            (r.lds_bytes, "{} LDS bytes"),
        ]
    else:
        parts = [(r.registers, "{} registers/thread"), (r.shared_bytes, "{} shared bytes/block")]
        occ = None
        if block_threads:
            occ = nvidia_occupancy(
                r.arch, r.registers or 0, r.shared_bytes or 0, block_threads, dynamic_shared
            )
        if occ is not None:
            lead = (
                f"theoretical occupancy {occ.fraction:.0%} ({occ.warps_per_sm} of "
                f"{occ.max_warps} warps per SM at {block_threads} threads per block, bound by "
                f"{occ.limit}), "
            )
    known = [fmt.format(v) for v, fmt in parts if v is not None]
    return f"{r.arch}: " + lead + (", ".join(known) or "no resources reported")


# --- plain-text tables ----------------------------------------------------------------------------

_RIGHT = {"warp", "count", "line", *COUNTER_COLUMNS}


def text_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows (dicts) as an aligned text table: numbers right-aligned, the last column unpadded."""
    cells = [[str(c) for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(row, widths)):
            last = i == len(columns) - 1
            out.append(cell if last else cell.rjust(w) if columns[i] in _RIGHT else cell.ljust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
