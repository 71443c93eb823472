"""What an instrumented emulator run reports: findings (memcheck, racecheck, initcheck, synccheck)
and per-line memory counters, with the figures of the GPU targets the counters are modelled on.

An `EmulatorModule(..., tools=TOOLS, counters=True, target="gfx942")` leaves a `KernelReport`
in ``kernel.last_report`` after each launch. Findings are grouped like compute-sanitizer's
records: one per kind and source-line pair, with a count and the block and thread of the first
occurrence. Counters are grouped per source line like Nsight Compute's source view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from workbench.errors import UserError

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")

# Finding kinds and the tool that reports each.
KINDS = {
    "out_of_bounds_read": "memcheck",
    "out_of_bounds_write": "memcheck",
    "misaligned_access": "memcheck",
    "shared_race_raw": "racecheck",
    "shared_race_war": "racecheck",
    "shared_race_waw": "racecheck",
    "global_race_waw": "racecheck",
    "uninitialized_shared_read": "initcheck",
    "barrier_divergence": "synccheck",
}


@dataclass(frozen=True)
class TargetSpec:
    """One GPU's published figures that the counters and time floors are computed with."""

    name: str
    warp_size: int  # 64 on CDNA (wave64), 32 on RDNA (wave32 default) and NVIDIA
    segment_bytes: int  # memory transaction granule: bytes_moved = distinct segments x this
    shared_banks: int  # LDS / shared-memory banks
    bank_bytes: int  # width of one bank
    peak_gb_s: float  # HBM/DRAM peak bandwidth of one device (one GCD for multi-die parts)
    peak_tflops_fp32: float  # vector (non-matrix) FP32 peak
    peak_tflops_fp16: float  # dense matrix-core FP16 peak
    product: str = ""  # the part the figures are for


# Sources of the figures:
# - segment_bytes: AMD's rocprof-compute (Omniperf) documentation of the vector L1 cache: the
#   cache line a wave's global access is split into is 64 B on MI100/MI200 (gfx908/gfx90a) and
#   128 B on MI300 (gfx942); RDNA's L0 vector cache line is 128 B (RDNA whitepaper). NVIDIA: the
#   CUDA C++ Best Practices Guide, "Coalesced Access to Global Memory": 32-byte sectors.
# - banks: AMD's CDNA ISA guides and LDS documentation (32 banks of 4 bytes per CU); NVIDIA's CUDA
#   C++ Programming Guide, "Shared Memory" (32 banks of 4 bytes, compute capability 5.x-9.x).
# - peaks: vendor datasheets. MI100: 1.23 TB/s, 23.1 TF FP32, 184.6 TF FP16 matrix. MI210
#   (gfx90a): 1.6 TB/s, 22.6 TF FP32 vector, 181 TF FP16 matrix. MI300X (gfx942): 5.3 TB/s,
#   81.7 TF FP32 vector, 1307 TF FP16 matrix (dense). RX 6900 XT (gfx1030): 512 GB/s, 23 TF
#   FP32, 46 TF FP16. H100 SXM (sm_90): 3.35 TB/s, 67 TF FP32, 989 TF FP16 tensor (dense).
#   A100 SXM (sm_80): 2.04 TB/s, 19.5 TF FP32, 312 TF FP16 tensor.
TARGETS: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        TargetSpec("gfx908", 64, 64, 32, 4, 1228.8, 23.1, 184.6, "AMD Instinct MI100"),
        TargetSpec("gfx90a", 64, 64, 32, 4, 1638.4, 22.6, 181.0, "AMD Instinct MI210"),
        TargetSpec("gfx942", 64, 128, 32, 4, 5300.0, 81.7, 1307.4, "AMD Instinct MI300X"),
        TargetSpec("gfx1030", 32, 128, 32, 4, 512.0, 23.0, 46.1, "AMD Radeon RX 6900 XT"),
        TargetSpec("sm_80", 32, 32, 32, 4, 2039.0, 19.5, 312.0, "NVIDIA A100 SXM 80GB"),
        TargetSpec("sm_90", 32, 32, 32, 4, 3350.0, 67.0, 989.4, "NVIDIA H100 SXM"),
    )
}
DEFAULT_TARGET = "gfx90a"


def target_spec(name: str) -> TargetSpec:
    """The `TargetSpec` called ``name``; `UserError` naming the known ones otherwise."""
    spec = TARGETS.get(name)
    if spec is None:
        raise UserError(
            "user.bad_target",
            f"unknown GPU target {name!r} (known: {', '.join(TARGETS)})",
            target=name,
        )
    return spec


def check_tools(tools: object) -> tuple[str, ...]:
    """``tools`` as a tuple of known tool names (a single string counts as one tool)."""
    names = (tools,) if isinstance(tools, str) else tuple(tools)  # type: ignore[arg-type]
    bad = [t for t in names if t not in TOOLS]
    if bad:
        raise UserError(
            "user.bad_option",
            f"unknown tool(s) {', '.join(map(repr, bad))} (known: {', '.join(TOOLS)})",
        )
    return tuple(t for t in TOOLS if t in names)


@dataclass(frozen=True)
class Finding:
    """One defect, grouped over every thread that hit it at this line (pair)."""

    tool: str  # one of TOOLS
    kind: str  # one of KINDS
    file: str  # source file the line is in (the cell's / .hip file or an included header)
    line: int
    block: tuple[int, int, int]  # of the first occurrence
    thread: tuple[int, int, int]
    message: str  # one line a person can act on
    count: int = 1  # occurrences grouped into this finding
    other_file: str | None = None
    other_line: int | None = None  # the conflicting access, for races and divergent barriers
    arg: int | None = None  # kernel argument index, for out-of-bounds accesses
    offset: int | None = None  # bytes past the end (> 0) or before the start (< 0) of that buffer
    address: int | None = None


@dataclass(frozen=True)
class LineCounters:
    """Memory traffic of one source line in one space and operation, summed over the launch."""

    file: str
    line: int
    space: str  # "global" | "shared"
    op: str  # "load" | "store" | "atomic"
    requests: int  # warp-level instructions executed
    active_lanes: float  # mean active lanes per request
    bytes_requested: int
    bytes_moved: int  # distinct aligned segments per request x segment size (global); = requested
    efficiency: float  # bytes_requested / bytes_moved (global); 1.0 for shared
    bank_conflict_ways: float  # mean serialization over the target's banks (shared); 1.0 global


@dataclass
class KernelReport:
    """What one instrumented launch found and counted."""

    kernel: str
    target: str
    warp_size: int
    tools: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    lines: list[LineCounters] = field(default_factory=list)  # empty unless counters=True
    # requests, bytes_requested, bytes_moved, efficiency (global); shared_requests,
    # shared_bytes, bank_conflict_ways (shared); atomics
    totals: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""
        d = asdict(self)
        d["tools"] = list(self.tools)
        for f in d["findings"]:
            f["block"] = list(f["block"])
            f["thread"] = list(f["thread"])
        return d


def totals_of(lines: list[LineCounters]) -> dict[str, float]:
    """Kernel totals from per-line counters (global and shared kept apart)."""
    glob = [c for c in lines if c.space == "global"]
    shared = [c for c in lines if c.space == "shared"]
    req = sum(c.requests for c in glob)
    b_req = sum(c.bytes_requested for c in glob)
    b_moved = sum(c.bytes_moved for c in glob)
    s_req = sum(c.requests for c in shared)
    ways = sum(c.bank_conflict_ways * c.requests for c in shared)
    return {
        "requests": float(req),
        "bytes_requested": float(b_req),
        "bytes_moved": float(b_moved),
        "efficiency": b_req / b_moved if b_moved else 1.0,
        "shared_requests": float(s_req),
        "shared_bytes": float(sum(c.bytes_requested for c in shared)),
        "bank_conflict_ways": ways / s_req if s_req else 1.0,
        "atomics": float(sum(c.requests for c in lines if c.op == "atomic")),
    }
